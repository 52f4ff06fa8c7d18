"""LoRA's parameters counted from a model's modules, without a capture: what :func:`fxpeft.distributed.plan_memory`
plans for a base model too large to capture quickly (a 70B llama on the meta device: milliseconds here, minutes for a
capture). Counts agree with a real transform of the same rules (tests/test_distributed_planning.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxpeft.adapters import adapter_dtype
from fxpeft.distributed.planning import ROOT, ParameterSpec
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph.selectors import ROLES, matches_any
from fxpeft.rules import LoRA, as_rule_list

__all__ = ["lora_parameter_specs"]


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer (``nn.Linear`` or transformers' ``Conv1D``, stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.nf
    return None


def lora_parameter_specs(model: nn.Module, rules: Any) -> list[ParameterSpec]:
    """The specs of the LoRA parameters ``rules`` (one :class:`fxpeft.LoRA` or several) would add to ``model``,
    counted from its modules without capturing it: ``A`` ``[r, in]`` and ``B`` ``[out, r]`` per selected linear,
    ``r * (in + out)`` elements, float32 over a half-precision base (:func:`fxpeft.adapters.adapter_dtype`).

    Targets may be names, globs, a regex string, module types or ``"all-linear"`` (every linear but the output
    embeddings), with ``exclude``, ``rank_pattern`` and ``layers``. Roles, DoRA, trained biases, raw parameters and
    non-linear sites (convolutions, embeddings) are an :class:`~fxpeft.errors.UnsupportedError`: transform the model
    on the ``meta`` device and plan the :class:`~fxpeft.AdaptedModel` instead."""
    rules = as_rule_list(rules, "lora_parameter_specs")
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {path: shape for path, module in modules.items() if (shape := _linear_shape(module)) is not None}
    all_linear = {path for path in linears if modules[path] is not head}
    no_roles = {role: set() for role in ROLES}
    specs: list[ParameterSpec] = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, LoRA):
            raise UnsupportedError(f"lora_parameter_specs counts LoRA rules only, got {type(rule).__name__}: "
                                   "transform the model on the meta device and plan the adapted model instead.")
        spec_targets = [rule.targets] if isinstance(rule.targets, (str, type)) else list(rule.targets or ())
        unsupported = [name for name, on in (("roles", any(t in ROLES for t in spec_targets if isinstance(t, str))),
                                             ("use_dora", rule.use_dora), ("bias", rule.bias != "none"),
                                             ("target_parameters", bool(rule.target_parameters))) if on]
        if unsupported:
            raise UnsupportedError(f"lora_parameter_specs cannot count {unsupported} without a capture: transform the "
                                   "model on the meta device and plan the adapted model instead.")
        hits = [path for path in modules if path and matches_any(rule.targets, path, modules.__getitem__, no_roles,
                                                                   all_linear)]
        if rule.exclude is not None:
            hits = [p for p in hits if not matches_any(rule.exclude, p, modules.__getitem__, no_roles, all_linear)]
        others = [p for p in hits if p not in linears and any(True for _ in modules[p].parameters(recurse=False))]
        if others:
            raise UnsupportedError(f"lora_parameter_specs counts linear sites only; {others[:4]} are not linears "
                                   "(convolutions, embeddings): plan the adapted model instead.")
        hits = [p for p in hits if p in linears and rule.selects_layer(p)]
        if not hits:
            raise RuleError(f"LoRA targets {rule.targets!r} select no linear layer of this model.")
        for path in hits:
            fan_in, fan_out = linears[path]
            r = rule.rank_for(path)
            weight = modules[path].weight
            itemsize = torch.empty((), dtype=adapter_dtype(weight.dtype), device="meta").element_size()
            for part, shape in (("lora_A", (r, fan_in)), ("lora_B", (fan_out, r))):
                specs.append(ParameterSpec(f"lora{index}.{path}.{part}", shape, itemsize, ROOT, trainable=True,
                                           adapter=True))
    return specs
