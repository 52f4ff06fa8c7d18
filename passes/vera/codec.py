"""VeRA's adapter files in PEFT's format: ``peft_type`` VERA, one :class:`~fxpeft.passes.vera.rule.VeRA` rule (plus
Trainable rules as ``modules_to_save``) <-> PEFT's ``VeraConfig`` fields, and the file's projections checked against
``save_projection``."""

from __future__ import annotations

import re
from typing import Any

from fxpeft.errors import AdapterLoadError, UnsupportedError
from fxpeft.formats.peft import (
    TASK_HEADS,
    bool_field,
    check_size,
    int_field,
    modules_to_save_of,
    names_field,
    number_field,
    saved_task_type,
    shown,
    str_field,
    the_one_rule,
)
from fxpeft.graph.selectors import as_peft_names
from fxpeft.methods import PeftCodec
from fxpeft.passes.vera.rule import BIASES, SEEDS, VeRA, resolved
from fxpeft.rules import Trainable

__all__ = ["VeraCodec", "PROJECTION_KEY"]

PROJECTION_KEY = re.compile(r"^base_model\.(?P<part>vera_[AB])$")
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping", "fan_in_fan_out"}  # fan_in_fan_out: read off the graph
_HONOURED = {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias",
             "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern"}




def _config_fields(rule: VeRA, modules_to_save: list[str] | None, selected: list[str] | None) -> dict[str, Any]:
    """``VeraConfig`` fields of ``rule``. PEFT's config has no ``exclude_modules`` and applies ``layers_to_transform``
    to lists of names only: otherwise the module paths the rule ``selected`` (None without a model: refused)."""
    targets = as_peft_names(rule.targets) if rule.targets is not None else None
    plain = (rule.targets is None or targets is not None) and rule.exclude is None and not (
        rule.layers is not None and isinstance(targets, str))
    layers, pattern = rule.layers, rule.layers_pattern
    if not plain:
        if selected is None:
            raise UnsupportedError(f"VeRA: targets {rule.targets!r} / exclude {rule.exclude!r} cannot be written "
                                   "as PEFT's VeraConfig (module names or one regex, no exclude_modules); save the "
                                   "adapter from a transformed model, which writes the module paths they select.")
        targets, layers, pattern = sorted(selected), None, None
    return {"r": rule.r, "target_modules": targets, "projection_prng_key": rule.projection_prng_key,
            "save_projection": rule.save_projection, "vera_dropout": rule.dropout, "d_initial": rule.d_initial,
            "bias": rule.bias, "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
            "init_weights": rule.init, "layers_to_transform": list(layers) if layers is not None else None,
            "layers_pattern": list(pattern) if isinstance(pattern, tuple) else pattern}


def _selector(config: dict, field: str) -> Any:
    value = config.get(field)
    if isinstance(value, str):
        return value
    names = names_field(config, field)
    return None if names is None else tuple(sorted(names))


class VeraCodec(PeftCodec):
    """``peft_type`` VERA: one VeRA rule (plus Trainable rules as ``modules_to_save``) <-> PEFT's ``VeraConfig``."""

    peft_types = ("VERA",)

    def to_config(self, model, rules, selected, adapter) -> dict[str, Any]:
        given = the_one_rule(rules, VeRA)
        rule = resolved(given, model)
        modules_to_save = modules_to_save_of(rules, selected)
        task_type = saved_task_type(model, modules_to_save)
        return {"peft_type": "VERA", "task_type": task_type,
                "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                "revision": None, "inference_mode": True,
                **_config_fields(rule, modules_to_save, selected.get(given, [])),
                "fan_in_fan_out": any(getattr(site, "fan_in_fan_out", False) for site in adapter.site_modules())}

    def to_rules(self, config, saved_keys) -> list:
        peft_type = str_field(config, "peft_type", "VERA")
        if peft_type != "VERA":
            raise UnsupportedError(f"adapter_config.json has peft_type {shown(peft_type)}; this codec reads VERA.")
        unsupported = sorted(name for name, value in config.items() if name not in _HONOURED and
                             name not in _METADATA and value not in (None, False, {}, [], "", 0))
        if unsupported:
            raise UnsupportedError(f"adapter_config.json sets {unsupported[:10]}, which fxpeft's VeRA does not "
                                   "support; remove them or convert the adapter without them.")
        layers = config.get("layers_to_transform")
        pattern = config.get("layers_pattern")
        rule = VeRA(targets=_selector(config, "target_modules"), r=int_field(config, "r", 256),
                    projection_prng_key=number_field(config, "projection_prng_key", 0, **SEEDS),
                    save_projection=bool_field(config, "save_projection", True),
                    dropout=number_field(config, "vera_dropout", 0.0, minimum=0, below=1),
                    d_initial=number_field(config, "d_initial", 0.1), bias=str_field(config, "bias", "none", BIASES),
                    init=bool_field(config, "init_weights", True), layers=layers,
                    layers_pattern=pattern if pattern is None or isinstance(pattern, str) else
                    names_field(config, "layers_pattern"))
        shapes = getattr(saved_keys, "shapes", None)
        if shapes is not None:
            self._check_file(rule, shapes)
        rules: list = [rule]
        wanted = list(dict.fromkeys(list(names_field(config, "modules_to_save") or ()) +
                                    list(TASK_HEADS.get(str_field(config, "task_type", None), ()))))
        if saved_keys is not None:
            wanted = [name for name in wanted if any(
                key.startswith(f"base_model.model.{name}.") or f".{name}." in key for key in saved_keys
                if ".vera_" not in key)]
        if wanted:
            rules.append(Trainable(targets=tuple(wanted)))
        return rules

    @staticmethod
    def _check_file(rule: VeRA, shapes: dict[str, tuple[int, ...]]) -> None:
        """The file's projections as ``save_projection`` says, and ``r`` bounded by its tensors."""
        held = sorted(key for key in shapes if PROJECTION_KEY.match(key))
        if rule.save_projection and len(held) != 2:
            raise AdapterLoadError("save_projection is true but the file does not hold base_model.vera_A and "
                                   "base_model.vera_B (PEFT refuses it too); save the adapter again.")
        if not rule.save_projection and held:
            raise UnsupportedError(f"save_projection is false but the file holds {held}: PEFT ignores them (with a "
                                   "warning) and makes the projections from projection_prng_key, fxpeft refuses to "
                                   "guess. Set save_projection to true to use the file's, or remove them.")
        ranks = [shape[0] for key, shape in shapes.items() if key.endswith(".vera_lambda_d") and shape]
        check_size("r", rule.r, max(ranks) if ranks else 0, "the length of the file's vera_lambda_d")

    def rule_to_peft_config(self, rule, modules_to_save=None):
        from peft import VeraConfig  # optional dependency

        return VeraConfig(**_config_fields(rule, modules_to_save, None))
