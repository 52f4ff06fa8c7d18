"""The public verbs: :func:`transform` a model with rules, :func:`load_adapter` from a folder.

Loading another adapter into an adapted model is its own method, ``AdaptedModel.load_adapter``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fxpeft.adapters import Adapter
from fxpeft.capture.export import forward_kwargs
from fxpeft.errors import AdapterLoadError, NoMatchError
from fxpeft.formats.diffusers import is_diffusers_lora, read_diffusers_lora
from fxpeft.formats.files import check_state_fits, read_adapter
from fxpeft.formats.peft import rules_and_state, without_base_layers
from fxpeft.formats.peft_configs import as_rules, asks_inference_mode
from fxpeft.model import AdaptedModel
from fxpeft.rules import Rule

__all__ = ["transform", "load_adapter", "call_kwargs"]


def call_kwargs(model: torch.nn.Module, example_inputs=None, example_kwargs=None) -> dict[str, Any] | None:
    """Example inputs as keyword arguments of ``model.forward``: ``example_inputs`` (positional: a tensor, tuple or
    list) bound to its parameter names, plus ``example_kwargs``; None when neither is given."""
    if example_inputs is None and example_kwargs is None:
        return None
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else \
        (() if example_inputs is None else (example_inputs,))
    return forward_kwargs(model, args, dict(example_kwargs or {}))


def _freeze_base(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def transform(model: torch.nn.Module, rules: Rule | Sequence[Rule] | Any, *, example_inputs: Sequence | None = None,
              example_kwargs: dict[str, Any] | None = None, dynamic_shapes: dict[str, Any] | None = None,
              adapter_name: str = "default") -> AdaptedModel:
    """Capture ``model`` as a graph, apply ``rules``, and return the adapted model.

    Transformers models need no example inputs (they are built from the config); other models take
    ``example_inputs`` (positional) or ``example_kwargs``. The base model's parameters are frozen and
    never written; the adapter's parameters are trainable.

    ``rules`` may also be a PEFT config object (``peft.LoraConfig(...)``, ``PromptTuningConfig``,
    ``PromptEncoderConfig``, ``PrefixTuningConfig``), alone or among rules: it is converted to the rules
    ``peft.get_peft_model`` would build (fxpeft/formats/peft_configs.py); ``inference_mode=True`` freezes the
    adapter, as PEFT does.

    Example::

        adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["q", "v"], r=8, alpha=32, dropout=0.1)])
        adapted = fxpeft.transform(model, peft.LoraConfig(target_modules=["q", "v"], r=8, lora_alpha=32))
        adapted.print_trainable_parameters()
        loss = adapted(input_ids=ids, attention_mask=mask, labels=labels).loss
        adapted.save_adapter("out/")
    """
    frozen = asks_inference_mode(rules)
    rules = as_rules(rules, "transform()", model)
    adapted = AdaptedModel(model, {adapter_name: Adapter(rules)},
                           call_kwargs(model, example_inputs, example_kwargs), dynamic_shapes)
    _freeze_base(model)
    if frozen:
        adapted.adapters[adapter_name].frozen = True
        adapted.adapters[adapter_name].requires_grad_(False)
    return adapted


def load_adapter(model: torch.nn.Module, directory, *, adapter_name: str = "default", is_trainable: bool = False,
                 example_inputs: Sequence | None = None, example_kwargs: dict[str, Any] | None = None) -> AdaptedModel:
    """Load an adapter folder saved by fxpeft or PEFT into ``model``; returns the adapted model. A diffusers or
    Kohya LoRA (a ``.safetensors`` file, or a folder with ``pytorch_lora_weights.safetensors``) loads too, the
    part for ``model``'s pipeline component (fxpeft/formats/diffusers.py).

    Keys and shapes are validated before anything is written; on a mismatch the error lists every
    mismatched key and ``model`` is left as it was. ``is_trainable=False`` (PEFT's default) freezes the
    adapter too.
    """
    if is_diffusers_lora(directory):  # diffusers' or Kohya's LoRA file (fxpeft/formats/diffusers.py)
        rules, state = read_diffusers_lora(directory, model)
    else:
        config, state = read_adapter(directory)
        rules, state = rules_and_state(config, state, str(directory))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        adapted = transform(model, rules, example_inputs=example_inputs, example_kwargs=example_kwargs,
                            adapter_name=adapter_name)
        adapter = adapted.adapters[adapter_name]
        state = without_base_layers(state, adapter.peft_keys(), model, str(directory))
        check_state_fits(adapter.peft_keys(), state, str(directory))
    except NoMatchError as error:
        _restore(model, requires_grad)
        raise AdapterLoadError(f"The adapter in {directory} targets modules this base model does not have: "
                               f"{error}", mismatches=error.candidates) from error
    except Exception:
        _restore(model, requires_grad)
        raise
    adapter.load_peft_state_dict(state, str(directory))
    if not is_trainable:
        adapter.frozen = True
        adapter.requires_grad_(False)
    return adapted


def _restore(model: torch.nn.Module, requires_grad: dict[str, bool]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])
