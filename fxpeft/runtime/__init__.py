"""Graphs derived from a rewritten program for running it: the eval-mode twin (:mod:`.eval_twin`), the
mixed-batch form (:mod:`.mixed_batch`), repeated layers as one shared region (:mod:`.shared_layers`) and as
recomputed regions (:mod:`.checkpointing`); transformers' ``generate`` driving the graphs, the KV cache in them
(:mod:`.generation`); and the adapted model's mixins: recapture after casts and pickling (:mod:`.recapture`), PEFT's
and transformers' model surface (:mod:`.peft_surface`), the base model's forward signature (:mod:`.signature`)."""
