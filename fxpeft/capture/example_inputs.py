"""Example inputs for capture: built from a Hugging Face model's config, or widened from a real call.

Capture needs one example of each input and a statement of which dimensions may vary. The policy here
is per *argument*, never per architecture: dimension 0 of every tensor is the batch; dimension 1 of an
integer or boolean tensor (ids, masks, labels, positions) and of ``*inputs_embeds`` is a sequence.
Sizes are kept distinct (batch 3, sequence 11, decoder sequence 7) so export never unifies two
dimensions that only happen to be equal in the example.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.export import Dim

from fxpeft.capture.caches import (
    cache_dynamic_shapes,
    carries_cache,
    is_cache,
    is_output_pytree,
    output_dynamic_shapes,
    resize_cache_call,
    widen_output,
)
from fxpeft.errors import CaptureError

__all__ = ["is_hf_model", "hf_example_kwargs", "default_example_kwargs", "dynamic_shapes_for", "widen_example"]

_BATCH, _SEQ, _DECODER_SEQ = 3, 11, 7
_SEQUENCE_FLOATS = ("inputs_embeds", "decoder_inputs_embeds")


def is_hf_model(model: torch.nn.Module) -> bool:
    """True for transformers and diffusers models: they carry a config and take keyword inputs."""
    libraries = ("transformers.", "diffusers.")
    return hasattr(model, "config") and any(cls.__module__.startswith(libraries) for cls in type(model).__mro__)


def default_example_kwargs(model: torch.nn.Module, device: torch.device,
                           how: str = "fxpeft.transform(model, rules, example_inputs=(torch.randn(4, 16),))"
                           ) -> dict[str, Any]:
    """A transformers model's example inputs, built from its config; for any other model a CaptureError that says
    to pass them, showing the call ``how``."""
    if not is_hf_model(model):
        raise CaptureError(f"{type(model).__name__} is not a transformers model, so fxpeft cannot build example "
                           f"inputs for it: pass them, e.g. {how}.")
    return hf_example_kwargs(model, device)


def _forward_parameters(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(model.forward).parameters)


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``config`` or one of its sub-configs (text, vision, encoder, decoder: composite
    models such as ``EncoderDecoderModel`` keep their sizes there) sets."""
    holders = (config, *(getattr(config, name, None) for name in ("text_config", "vision_config", "encoder",
                                                                    "decoder")))
    for holder in holders:
        if holder is None:
            continue
        for name in names:
            value = getattr(holder, name, None)
            if value is not None:
                return value
    return default


def hf_example_kwargs(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Example keyword arguments for a transformers model, read from its config and forward signature."""
    config = model.config
    params = _forward_parameters(model)
    kwargs: dict[str, Any] = {}
    if "input_features" in params:
        mel = _config_value(config, "num_mel_bins", default=80)
        frames = 2 * _config_value(config, "max_source_positions", default=1500)
        kwargs["input_features"] = torch.randn(_BATCH, mel, frames, device=device)
    elif "pixel_values" in params and "input_ids" not in params:
        size = _config_value(config, "image_size", default=224)
        size = size if isinstance(size, int) else size[0]
        channels = _config_value(config, "num_channels", default=3)
        kwargs["pixel_values"] = torch.randn(_BATCH, channels, size, size, device=device)
    elif "input_ids" in params:
        vocab = _config_value(config, "vocab_size")
        if vocab is None:
            raise CaptureError(f"{type(model).__name__}: its config has no vocab_size to build example input_ids; "
                               "pass example inputs with fxpeft.transform(model, rules, example_inputs=...).")
        kwargs["input_ids"] = torch.randint(0, vocab, (_BATCH, _SEQ), device=device)
        if "attention_mask" in params:
            kwargs["attention_mask"] = torch.ones(_BATCH, _SEQ, dtype=torch.long, device=device)
    else:
        raise CaptureError(f"{type(model).__name__}.forward takes none of input_ids, pixel_values or input_features; "
                           "pass example inputs with fxpeft.transform(model, rules, example_inputs=...).")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        vocab = _config_value(getattr(config, "decoder", None) or config, "vocab_size", default=2)
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (_BATCH, _DECODER_SEQ), device=device)
    return kwargs


def _dynamic_dims(name: str, value: torch.Tensor) -> tuple[int, ...]:
    if value.dim() == 0:
        return ()
    sequence_like = (not value.is_floating_point() or name in _SEQUENCE_FLOATS) and value.dim() >= 2
    return (0, 1) if sequence_like else (0,)


def dynamic_shapes_for(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export``: automatic dims for batch and sequence axes (and for a KV cache's
    batch and length, see :mod:`fxpeft.capture.caches`)."""
    shapes: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            shapes[name] = {dim: Dim.AUTO for dim in _dynamic_dims(name, value)} or None
        elif is_cache(value):
            shapes[name] = cache_dynamic_shapes(value)
        elif is_output_pytree(value):  # a model output passed back in (encoder_outputs)
            shapes[name] = output_dynamic_shapes(value)
        else:
            shapes[name] = None
    return shapes


def widen_example(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Repeat size-1 batch/sequence axes to size 2, so export keeps them symbolic (it specializes 0 and 1).

    A call with a filled KV cache is resized as a whole (:func:`fxpeft.capture.caches.resize_cache_call`), so that
    query, past and mask lengths stay consistent."""
    if carries_cache(kwargs):
        kwargs = resize_cache_call(kwargs, _dynamic_dims)
    widened = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            for dim in _dynamic_dims(name, value):
                if value.shape[dim] == 1:
                    value = torch.cat([value, value], dim=dim)
        elif is_output_pytree(value):
            value = widen_output(value)
        widened[name] = value
    return widened
