"""Rules: *where* an adaptation goes (targets) and *what* it is (a method and its hyper-parameters).

Rules are frozen dataclasses that validate themselves when built, so a bad hyper-parameter fails at the
line that wrote it, not deep inside a training step. They round-trip through plain dicts (and so JSON)::

    rule = LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)
    assert Rule.from_dict(rule.to_dict()) == rule

``targets`` is resolved against the captured graph by :mod:`fxpeft.selectors`; see there for the forms
it accepts (PEFT-style names, globs, a regex string, module types, ``"all-linear"`` and graph roles such
as ``"attention.query"``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Sequence, Union

from .errors import RuleError

__all__ = ["Rule", "LoRA", "Trainable", "Targets"]

Targets = Union[str, type, Sequence[Union[str, type]]]

_RULE_TYPES: dict[str, type["Rule"]] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _type_from_name(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _normalize_targets(value: Any, field: str, rule: str, allow_none: bool = False) -> Any:
    """Targets become a str (PEFT's regex form) or a tuple of names/globs/roles/types."""
    if value is None:
        if allow_none:
            return None
        raise RuleError(f"{rule}: `{field}` is required; pass module names, globs, a regex, types or roles.")
    if isinstance(value, (str, type)):
        return value
    try:
        items = tuple(value)
    except TypeError:
        raise RuleError(f"{rule}: `{field}` must be a string, a type or a list of them, got {value!r}.") from None
    for item in items:
        if not isinstance(item, (str, type)):
            raise RuleError(f"{rule}: every entry of `{field}` must be a string or a type, got {item!r}.")
    if not items:
        raise RuleError(f"{rule}: `{field}` is empty; name at least one target.")
    return items


def _targets_to_json(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, type):
        return {"type": _type_name(value)}
    return [_targets_to_json(item) for item in value]


def _targets_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"type"}:
        return _type_from_name(value["type"])
    if isinstance(value, list):
        return tuple(_targets_from_json(item) for item in value)
    return value


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of every rule. Subclasses are frozen dataclasses with a ``method`` name."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            _RULE_TYPES[cls.method] = cls

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"method": ..., <fields>}``."""
        data = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = _targets_to_json(value) if field.name in ("targets", "exclude") else value
        return data

    @staticmethod
    def from_dict(data: dict) -> "Rule":
        """Rebuild a rule from :meth:`to_dict`'s output (validated like any other construction)."""
        data = dict(data)
        method = data.pop("method", None)
        cls = _RULE_TYPES.get(method)
        if cls is None:
            raise RuleError(f"Unknown rule method {method!r}; known methods: {sorted(_RULE_TYPES)}.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RuleError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}.")
        for name in ("targets", "exclude"):
            if name in data:
                data[name] = _targets_from_json(data[name])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class LoRA(Rule):
    """Low-rank adaptation (Hu et al., 2021), numerically the same as PEFT's ``LoraConfig``.

    Each selected linear ``y = x W^T + b`` becomes ``y + B(A(dropout(x))) * scaling`` with
    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). ``A`` starts kaiming-uniform
    (``init="default"``) or gaussian with std ``1/r`` (``init="gaussian"``), ``B`` starts at zero, so a
    fresh adapter leaves the model's outputs unchanged bit for bit.

    ``bias``: ``"none"`` (PEFT's default), ``"lora_only"`` (the biases of the adapted linears train) or
    ``"all"`` (every linear bias trains). Trained biases are copies owned by the adapter; the base model's
    tensors are never written.

    Example::

        fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
        fxpeft.LoRA(targets="all-linear", r=16)
        fxpeft.LoRA(targets=["attention.query", "attention.value"])   # roles read from the graph
    """

    method: ClassVar[str] = "lora"
    _INITS: ClassVar[tuple] = ("default", "gaussian")
    _BIASES: ClassVar[tuple] = ("none", "all", "lora_only")

    targets: Targets = None
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    bias: str = "none"
    exclude: Targets | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", _normalize_targets(self.targets, "targets", "LoRA"))
        object.__setattr__(self, "exclude", _normalize_targets(self.exclude, "exclude", "LoRA", allow_none=True))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise RuleError(f"LoRA: `r` must be an integer >= 1, got {self.r!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise RuleError(f"LoRA: `alpha` must be a positive number, got {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise RuleError(f"LoRA: `dropout` must satisfy 0 <= dropout < 1, got {self.dropout!r}.")
        if self.init not in self._INITS:
            raise RuleError(f"LoRA: unknown `init` {self.init!r}; use one of {list(self._INITS)}.")
        if self.bias not in self._BIASES:
            raise RuleError(f"LoRA: unknown `bias` {self.bias!r}; use one of {list(self._BIASES)}.")
        if not isinstance(self.use_rslora, bool):
            raise RuleError(f"LoRA: `use_rslora` must be True or False, got {self.use_rslora!r}.")

    @property
    def scaling(self) -> float:
        """The factor applied to the low-rank update, as PEFT computes it."""
        return self.alpha / (self.r**0.5) if self.use_rslora else self.alpha / self.r

    @classmethod
    def from_peft_config(cls, config) -> list["Rule"]:
        """Rules equivalent to a PEFT ``LoraConfig`` (or its dict): this LoRA rule, plus a
        :class:`Trainable` rule for ``modules_to_save``. Unsupported fields are an error naming them."""
        from .peft_config import rules_from_peft_config

        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return rules_from_peft_config(data, saved_keys=None)

    def to_peft_config(self, modules_to_save: list[str] | None = None):
        """This rule as a ``peft.LoraConfig`` (needs the ``peft`` package)."""
        from peft import LoraConfig

        from .peft_config import lora_config_fields

        return LoraConfig(**lora_config_fields(self, modules_to_save))


@dataclasses.dataclass(frozen=True)
class Trainable(Rule):
    """Train whole modules next to the adapter, as PEFT's ``modules_to_save`` does.

    The selected modules' parameters are copied into the adapter (the base model keeps its own tensors,
    untouched) and the copies train and are saved with the adapter under PEFT's key names
    (``base_model.model.<module path>.weight``). Typical use: a new classification head::

        fxpeft.Trainable(targets=["classifier"])
    """

    method: ClassVar[str] = "trainable"

    targets: Targets = None

    def __post_init__(self):
        object.__setattr__(self, "targets", _normalize_targets(self.targets, "targets", "Trainable"))
