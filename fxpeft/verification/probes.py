"""The inputs verify runs the models on, and the fresh captures of the base model for them.

Probe inputs are the ones given (``example_inputs``), a transformers model's example inputs (built from its
config), or inputs of the shapes and dtypes an adapted graph was captured with (:func:`kwargs_like`). Each
signature of the base model is captured once per run (:class:`FreshCaptures`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fxpeft.capture.example_inputs import default_example_kwargs
from fxpeft.capture.export import capture, device_of, is_hf_model
from fxpeft.graph.examples import call_example
from fxpeft.graph.program import Program, signature_key
from fxpeft.verification.graph_view import GraphView

__all__ = ["kwargs_like", "signature_text", "default_kwargs", "probe_kwargs", "FreshCaptures"]


def kwargs_like(program: Program, model: torch.nn.Module) -> dict[str, Any] | None:
    """Concrete inputs of the shapes and dtypes ``program`` was captured with, token ids below the model's vocabulary
    (:func:`fxpeft.graph.examples.call_example`), without the arguments capture fixed; None for nested inputs."""
    users = [node for node, source in zip(program.placeholders(), program.sources) if source.kind == "user"]
    if len(users) != len(program.kwarg_names):
        return None
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size",
                                                            None) or 2
    example = call_example(program, device_of(model), vocab=vocab)
    return None if example is None else {name: value for name, value in example.items()
                                         if name not in program.fixed_kwargs}


def signature_text(program: Program) -> str:
    """``(input_ids, attention_mask)``: the inputs a program takes, for messages."""
    return "(" + ", ".join(name for name in program.kwarg_names if name not in program.fixed_kwargs) + ")"


def default_kwargs(model: torch.nn.Module, example_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The given example inputs, or a transformers model's own; CaptureError for any other model."""
    if example_kwargs is not None:
        return dict(example_kwargs)
    return default_example_kwargs(model, device_of(model),
                                  "fxpeft.verify(model, adapter, example_inputs=(torch.randn(4, 16),))")


def probe_kwargs(adapted, model: torch.nn.Module, example_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The inputs the behaviour check runs ``model`` and ``adapted`` on."""
    if example_kwargs is not None or is_hf_model(model):
        return default_kwargs(model, example_kwargs)
    return kwargs_like(adapted.programs()[0], model) or {}


class FreshCaptures:
    """Fresh captures of ``base_model``, one per signature, each with its view taken before any rewrite."""

    def __init__(self, base_model: torch.nn.Module):
        self.base_model = base_model
        self.seconds = 0.0
        self._captures: dict[tuple, tuple[Program, GraphView]] = {}

    def __len__(self) -> int:
        return len(self._captures)

    def get(self, kwargs: dict[str, Any]) -> tuple[Program, GraphView]:
        """The capture for the signature of ``kwargs`` (made the first time), and its view."""
        key = signature_key({name: value for name, value in kwargs.items() if value is not None})
        if key not in self._captures:
            start = time.perf_counter()
            program = capture(self.base_model, kwargs)
            self.seconds += time.perf_counter() - start
            program.graph.eliminate_dead_code()  # as finish_rewrite does to every adapted graph
            self._captures[key] = (program, GraphView(program.graph, program.sources))
        return self._captures[key]

    def get_like(self, program: Program) -> tuple[Program, GraphView] | None:
        """The capture for the signature ``program`` was captured with; None for a program with nested inputs."""
        kwargs = kwargs_like(program, self.base_model)
        return None if kwargs is None else self.get(kwargs)
