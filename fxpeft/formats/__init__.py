"""Adapter files: PEFT's on-disk layout written atomically and read safely (:mod:`.files`), the PEFT config codecs,
looked up by rule type or ``peft_type`` in the method registry (:mod:`.peft`), PEFT config objects as rules
(:mod:`.peft_configs`), and adapters of a LoRA and a virtual-token method saved as one PEFT folder per method
(:mod:`.composed`)."""
