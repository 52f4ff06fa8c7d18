"""The VeRA rule (PEFT's ``VeraConfig`` as an fxpeft rule); the method is :mod:`fxpeft.passes.vera`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from torch import nn

from fxpeft.errors import RuleError
from fxpeft.rule_checks import MAX_SIZE, check_number, check_regex
from fxpeft.rules import Rule, normalize_targets

__all__ = ["VeRA", "resolved", "BIASES", "SEEDS"]

BIASES = ("none", "all", "vera_only")
SEEDS = dict(integer=True, minimum=-(1 << 63), maximum=(1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclasses.dataclass(frozen=True)
class VeRA(Rule):
    """VeRA at the selected linears (``nn.Linear`` and transformers' ``Conv1D``), PEFT's ``VeraConfig``.

    ``targets``: as for :class:`~fxpeft.LoRA`; None for PEFT's default targets of the model's type. ``r``: the
    projections' rank (PEFT's default 256). ``projection_prng_key``: the seed of the shared projections;
    ``save_projection``: whether files hold them. ``dropout`` (``vera_dropout``) on the branch input; ``d_initial``: the
    first value of ``lambda_d``; ``bias``: ``"none"``, ``"all"`` or ``"vera_only"``; ``init`` (``init_weights``):
    False for ``randn``/ones vectors; ``layers`` / ``layers_pattern`` as LoRA's. PEFT's field names work as aliases::

        fxpeft.VeRA(target_modules=["q_proj", "v_proj"], r=64, projection_prng_key=7, vera_dropout=0.1)
    """

    method: ClassVar[str] = "vera"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "exclude_modules": "exclude",
                                         "vera_dropout": "dropout", "init_weights": "init",
                                         "layers_to_transform": "layers"}
    peft_hints: ClassVar[dict[str, str]] = {
        "fan_in_fan_out": "fxpeft reads the layout from the graph (transformers' Conv1D); drop it",
        "lora_alpha": "VeRA has no alpha (lambda_b and lambda_d scale the branch); drop it"}

    targets: Any = None
    r: int = 256
    exclude: Any = None
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    bias: str = "none"
    init: bool = True
    layers: Any = None
    layers_pattern: Any = None

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "VeRA", allow_none=True))
        object.__setattr__(self, "exclude", normalize_targets(self.exclude, "exclude", "VeRA", allow_none=True))
        check_number("VeRA", "r", self.r, integer=True, minimum=1, maximum=MAX_SIZE)
        check_number("VeRA", "projection_prng_key", self.projection_prng_key, **SEEDS)
        check_number("VeRA", "dropout", self.dropout, minimum=0, below=1)
        check_number("VeRA", "d_initial", self.d_initial)
        for flag in ("save_projection", "init"):
            if not isinstance(getattr(self, flag), bool):
                raise RuleError(f"VeRA: `{flag}` must be True or False, got {getattr(self, flag)!r}.")
        if self.bias not in BIASES:
            raise RuleError(f"VeRA: unknown `bias` {self.bias!r}; use one of {list(BIASES)}.")
        layers = self.layers
        if layers is not None:
            items = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
            items = tuple(items) if isinstance(items, (list, tuple)) else (layers,)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise RuleError(f"VeRA: `layers` must be a layer index or a list of them (integers >= 0), got "
                                f"{layers!r}.")
            object.__setattr__(self, "layers", items or None)  # PEFT reads [] as every layer
        pattern = self.layers_pattern
        if pattern is not None:
            items = (pattern,) if isinstance(pattern, str) else tuple(pattern) if isinstance(pattern, (list, tuple)) \
                else None
            if items is None or not all(isinstance(p, str) for p in items):
                raise RuleError(f"VeRA: `layers_pattern` must be a name (or a list of names) such as 'layers', got "
                                f"{pattern!r}.")
            items = tuple(p for p in items if p)
            for item in items:
                check_regex("VeRA", "layers_pattern", item, fixed=True)
            pattern = None if not items else items[0] if len(items) == 1 else items
            if pattern is not None and self.layers is None:  # PEFT's VeraConfig raises too
                raise RuleError("VeRA: `layers_pattern` only says where to read the layer index; give `layers` too.")
            object.__setattr__(self, "layers_pattern", pattern)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["layers_pattern"] = list(self.layers_pattern) if isinstance(self.layers_pattern, tuple) else \
            self.layers_pattern
        return data

    def selects_layer(self, path: str) -> bool:
        """Whether ``layers`` keeps the site ``path``: PEFT's layer index, the number after ``layers_pattern`` (or
        after the first numbered segment without one)."""
        if self.layers is None:
            return True
        patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        regexes = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns] if patterns else \
            [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (re.match(regex, path) for regex in regexes) if m is not None), None)
        return match is not None and int(match["idx"]) in self.layers


def resolved(rule: VeRA, model: nn.Module) -> VeRA:
    """``rule`` with PEFT's default targets for ``model``'s type when it leaves them out (RuleError when none)."""
    if rule.targets is not None:
        return rule
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as table
    except ImportError:  # optional dependency
        table = {}
    if model_type not in table:
        raise RuleError(f"VeRA: `targets` was left out, and PEFT has no default VeRA targets for model type "
                        f"{model_type!r}{'' if table else ' (or peft is not installed)'}. Give `targets=`.")
    value = table[model_type]
    return dataclasses.replace(rule, targets=value if isinstance(value, str) else tuple(value))
