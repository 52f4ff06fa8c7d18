"""Stage 1, capture: a model becomes a lifted fx graph (:class:`fxpeft.graph.program.Program`).

``torch.export`` with dynamic batch and sequence dimensions (:mod:`.export`), example inputs built from a
transformers config (:mod:`.example_inputs`), a call's arguments bound and checked (:mod:`.arguments`), clean-ups of
what export leaves (:mod:`.grad_regions`, :mod:`.tidy`), bitsandbytes layers called as one op each while capturing
(:mod:`.quantized_calls`), and KV caches as graph inputs and outputs (:mod:`.caches`).
"""

from fxpeft.capture.export import capture, forward_kwargs, is_hf_model

__all__ = ["capture", "forward_kwargs", "is_hf_model"]
