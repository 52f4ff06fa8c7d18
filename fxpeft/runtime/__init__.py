"""Graphs derived from a rewritten program for running it: the eval-mode twin (:mod:`.eval_twin`), the
mixed-batch form (:mod:`.mixed_batch`) and repeated layers as one shared region (:mod:`.shared_layers`); and
transformers' ``generate`` driving the graphs, the KV cache in them (:mod:`.generation`)."""
