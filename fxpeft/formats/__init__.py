"""Adapter files: PEFT's on-disk layout written atomically and read safely (:mod:`.files`), and the PEFT
config codecs, looked up by rule type or ``peft_type`` in the method registry (:mod:`.peft`)."""
