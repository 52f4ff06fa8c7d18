"""LoRA's PEFT codec: fxpeft's :class:`~fxpeft.rules.LoRA` rule <-> PEFT's ``adapter_config.json`` (``LoraConfig``).

One LoRA rule holds a whole ``LoraConfig``: ``r``/``lora_alpha`` with ``rank_pattern``/``alpha_pattern`` (per
site, PEFT's ``get_pattern_key``), ``target_modules``/``exclude_modules`` as names or one regex,
``layers_to_transform``/``layers_pattern`` as ``layers``/``layers_pattern``; ``modules_to_save`` becomes a
:class:`~fxpeft.rules.Trainable` rule. ``fan_in_fan_out`` is read off the graph (transformers' ``Conv1D``
computes ``x @ W`` with ``W`` stored ``[in, out]``), as PEFT itself corrects the flag per layer type.
Fields fxpeft does not support are an :class:`~fxpeft.errors.UnsupportedError` that names them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fxpeft.errors import UnsupportedError
from fxpeft.formats.peft import TASK_HEADS, enum_value, modules_to_save_of, task_type_of
from fxpeft.graph.selectors import ALL_LINEAR, ROLES, as_regex, is_plain_name
from fxpeft.methods import PeftCodec
from fxpeft.rules import LoRA, Rule, Trainable

__all__ = ["LoraCodec", "lora_config_fields", "to_peft_config", "rules_from_peft_config"]

# Fields PEFT writes that carry no behaviour, and fields whose default is not falsy.
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping"}
_TRUTHY_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
# PEFT's init_lora_weights -> fxpeft's LoRA.init. These only set A and B; the others (PiSSA, OLoRA, LoftQ,
# CorDA, ...) also rewrite the base weights, so their adapters do not fit the original base. EVA's data-driven
# A is computed by a separate PEFT call; until then (and when loading, where the file replaces it) it is the
# default initialisation.
_INITS_FROM_PEFT = {True: "default", False: "random", "gaussian": "gaussian", "orthogonal": "orthogonal",
                    "eva": "default"}
_INITS_TO_PEFT = {"default": True, "random": False, "gaussian": "gaussian", "orthogonal": "orthogonal"}
_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
             "init_lora_weights", "modules_to_save", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
             "layers_to_transform", "layers_pattern"}


def _peft_selector(value: Any, field: str) -> Any:
    """``targets``/``exclude`` as PEFT reads them: one regex (or ``"all-linear"``), or a sorted list of names.

    Roles, globs and module types mean something only against a captured graph: they raise."""
    if isinstance(value, str) and value not in ROLES and as_regex(value) is not None:
        return value
    entries = (value,) if isinstance(value, (str, type)) else tuple(value)
    odd = [entry if isinstance(entry, str) else getattr(entry, "__name__", repr(entry))
           for entry in entries if not is_plain_name(entry)]
    if odd:
        raise UnsupportedError(
            f"LoRA `{field}` has {odd}, which PEFT's config cannot express (it takes module names or one regex). "
            "Save the adapter from a transformed model (AdaptedModel.save_adapter), which writes the module paths "
            "these resolve to, or write the targets as names or a regex.")
    return sorted(entries)


def lora_config_fields(rule: LoRA, modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` keyword arguments for one LoRA rule (plus ``modules_to_save``), without a model.

    Raises :class:`UnsupportedError` for what PEFT's config cannot say: roles, globs or module types in
    ``targets``/``exclude``, and ``layers`` with a regex ``targets`` (PEFT applies ``layers_to_transform``
    only to a list of names). Example::

        peft.LoraConfig(**lora_config_fields(fxpeft.LoRA(targets=["q_proj"], r=4), ["classifier"]))
    """
    targets = _peft_selector(rule.targets, "targets")
    exclude = None if rule.exclude is None else _peft_selector(rule.exclude, "exclude")
    if rule.layers is not None and isinstance(targets, str):
        raise UnsupportedError(
            f"LoRA `layers={list(rule.layers)}` with the regex targets {targets!r}: PEFT applies "
            "layers_to_transform only to a list of target names. Put the layer in the regex "
            r"(e.g. '.*\.layers\.(0|1)\..*q_proj') or list the names.")
    pattern = rule.layers_pattern
    return {
        "r": rule.r,
        "lora_alpha": rule.alpha,
        "lora_dropout": rule.dropout,
        "target_modules": targets,
        "exclude_modules": exclude,
        "bias": rule.bias,
        "use_rslora": rule.use_rslora,
        "init_lora_weights": _INITS_TO_PEFT[rule.init],
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "rank_pattern": dict(rule.rank_pattern),
        "alpha_pattern": dict(rule.alpha_pattern),
        "layers_to_transform": list(rule.layers) if rule.layers is not None else None,
        "layers_pattern": list(pattern) if isinstance(pattern, tuple) else pattern,
    }


def to_peft_config(model: torch.nn.Module, rules: list[Rule], selected: dict[Rule, list[str]],
                   conv1d: bool) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for one adapter's rules on ``model``.

    Targets are written as given when PEFT reads them the same way (names, a regex, ``"all-linear"``);
    otherwise as the module paths they selected in the graph (then ``exclude`` and ``layers`` are already
    applied, and written as nothing)."""
    loras = [rule for rule in rules if isinstance(rule, LoRA)]
    unknown = [type(rule).__name__ for rule in rules if not isinstance(rule, (LoRA, Trainable))]
    if unknown or len(loras) != 1:
        raise UnsupportedError(
            f"Saving in PEFT's format needs exactly one LoRA rule per adapter (plus Trainable rules); "
            f"this adapter has {len(loras)} LoRA rule(s) and {unknown or 'no'} other rules. Per-site ranks and "
            "alphas fit in one rule: LoRA(rank_pattern={...}, alpha_pattern={...}).")
    lora = loras[0]
    modules_to_save = modules_to_save_of(rules, selected)
    try:
        fields = lora_config_fields(lora, modules_to_save)
    except UnsupportedError:
        resolved = dataclasses.replace(lora, targets=tuple(selected.get(lora, [])), exclude=None, layers=None,
                                       layers_pattern=None)
        fields = lora_config_fields(resolved, modules_to_save)
    config = getattr(model, "config", None)
    task_type = task_type_of(model)
    heads = TASK_HEADS.get(task_type, ())
    if any(name.rpartition(".")[2] in heads and name not in (modules_to_save or ())
           for name, _ in model.named_modules()):
        # PEFT's class for this task would expect the head's trained weights in the file and fail to load
        # without them; with no task type it loads the adapter onto the head as it is, as fxpeft ran it.
        task_type = None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        **fields,
        "fan_in_fan_out": conv1d,
        "use_dora": False,
    }


def _unsupported_fields(config: dict[str, Any]) -> list[str]:
    init = config.get("init_lora_weights", True)
    ignored = {"eva_config"} if init == "eva" else set()  # only drives EVA's data-driven init
    return sorted(
        name for name, value in config.items()
        if name not in _HONOURED and name not in _METADATA and name not in ignored
        and value not in (None, False, {}, [], "", 0) and _TRUTHY_DEFAULTS.get(name, object()) != value)


def _selector_from_peft(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return ALL_LINEAR if isinstance(value, str) and value.lower() == ALL_LINEAR else value
    return tuple(sorted(value))


def rules_from_peft_config(config: dict[str, Any], saved_keys: set[str] | None = None) -> list[Rule]:
    """Rules equivalent to a PEFT ``LoraConfig`` dict; unsupported non-default fields are an error naming them.

    ``saved_keys``: the keys of the adapter file the config came with. Then ``modules_to_save`` (and the head
    that PEFT's class for the ``task_type`` trains) become a :class:`Trainable` rule only where the file holds
    their tensors. ``None`` (no file): ``modules_to_save`` as given, plus the task type's heads, as
    ``peft.get_peft_model`` does.
    """
    peft_type = enum_value(config.get("peft_type", "LORA"))
    if peft_type != "LORA":
        raise UnsupportedError(f"adapter_config.json has peft_type {peft_type!r}; fxpeft loads LORA adapters.")
    unsupported = _unsupported_fields(config)
    if unsupported:
        raise UnsupportedError(f"adapter_config.json sets {unsupported}, which fxpeft does not support yet; "
                               "remove them or convert the adapter without them.")
    init = config.get("init_lora_weights", True)
    if not any(init is key or (isinstance(init, str) and init == key) for key in _INITS_FROM_PEFT):
        raise UnsupportedError(
            f"adapter_config.json sets init_lora_weights={init!r}, which fxpeft does not support: that "
            "initialisation also rewrites the base weights, so the saved A and B only fit that changed base. "
            "Convert the adapter to a plain LoRA with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)).")
    targets = _selector_from_peft(config.get("target_modules"))
    if not targets:
        raise UnsupportedError("adapter_config.json has no target_modules (PEFT's target_parameters is not supported).")
    rules: list[Rule] = [LoRA(
        targets=targets, exclude=_selector_from_peft(config.get("exclude_modules")), r=int(config.get("r", 8)),
        alpha=config.get("lora_alpha", 8), dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)), bias=config.get("bias", "none"),
        init=_INITS_FROM_PEFT[init], rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {}, layers=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"))]
    wanted = list(dict.fromkeys(list(config.get("modules_to_save") or []) +
                                list(TASK_HEADS.get(enum_value(config.get("task_type")), ()))))
    if saved_keys is not None:
        wanted = [name for name in wanted
                  if any(key.startswith("base_model.model.") and (f".{name}." in key or key.startswith(
                      f"base_model.model.{name}.")) and ".lora_" not in key for key in saved_keys)]
    if wanted:
        rules.append(Trainable(targets=tuple(wanted)))
    return rules


class LoraCodec(PeftCodec):
    """``peft_type`` LORA: the functions above, and ``fan_in_fan_out`` read from the adapter's sites."""

    peft_types = ("LORA",)

    def to_config(self, model, rules, selected, adapter):
        conv1d = any(getattr(site, "fan_in_fan_out", False) for site in adapter.site_modules())
        return to_peft_config(model, rules, selected, conv1d)

    def to_rules(self, config, saved_keys):
        return rules_from_peft_config(config, saved_keys)

    def rule_to_peft_config(self, rule, modules_to_save=None):
        from peft import LoraConfig  # optional dependency

        return LoraConfig(**lora_config_fields(rule, modules_to_save))
