"""PEFT's names in fxpeft's rules: a rule takes PEFT's names for its fields as aliases, and a keyword it does not know
(PEFT's name for something it takes differently, a typo) is a :class:`~fxpeft.errors.RuleError` that says what to
write, never a bare ``TypeError``.

:class:`RuleType` is the metaclass of :class:`fxpeft.rules.Rule`; a rule class declares ``aliases`` (PEFT's name ->
its field) and ``peft_hints`` (PEFT's name -> what to write instead), and :data:`PEFT_HINTS` covers the fields of every
PEFT config that no rule has::

    fxpeft.LoRA(target_modules=["q_proj"], lora_alpha=16, lora_dropout=0.1)   # LoRA(targets=..., alpha=16, ...)
    fxpeft.LoRA(targets=["q_proj"], task_type="CAUSAL_LM")                    # RuleError: ... drop it
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from fxpeft.errors import RuleError

__all__ = ["PEFT_HINTS", "RuleType", "own_names", "not_a_rule"]


def not_a_rule(what: str, value: Any) -> RuleError:
    """The error for ``value`` where rules were expected; for a PEFT config object (found by its ``peft_type`` and
    ``to_dict``: peft is never imported here), how to use it."""
    if hasattr(value, "peft_type") and callable(getattr(value, "to_dict", None)):
        return RuleError(f"{what} takes fxpeft rules such as fxpeft.LoRA(...); got a PEFT {type(value).__name__}. "
                         "fxpeft.transform(model, config) takes a PEFT config as it is; elsewhere, turn it into fxpeft "
                         "rules with fxpeft.Rule.from_peft_config(config).")
    return RuleError(f"{what} takes fxpeft rules such as fxpeft.LoRA(...); got {value!r}.")


# PEFT config fields that no rule has, and what to write instead (RuleError messages; a rule's own `peft_hints`
# come first).
PEFT_HINTS = {
    "task_type": "fxpeft reads the task from the model; drop it",
    "inference_mode": "load the adapter with is_trainable=False, or freeze it (requires_grad_(False)); drop it",
    "peft_type": "the rule's class is its method; drop it",
    "base_model_name_or_path": "fxpeft records the base model when it saves the adapter; drop it",
    "revision": "drop it",
    "modules_to_save": "add fxpeft.Trainable(targets=[...]) to the rules",
    "num_layers": "fxpeft reads the model's sizes from the model; drop it",
    "token_dim": "fxpeft reads the model's sizes from the model; drop it",
    "num_attention_heads": "fxpeft reads the model's sizes from the model; drop it",
    "num_transformer_submodules": "fxpeft reads the model's sizes from the model; drop it",
}


class RuleType(type):
    """The metaclass of rules: a rule takes PEFT's names for its fields as aliases (its ``aliases``), and a keyword
    it does not know is a :class:`RuleError` naming its fields (and, for PEFT's names of other things, what to write
    instead), never a bare ``TypeError``."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **own_names(cls, len(args), kwargs))

    @property
    def __signature__(cls):
        """The dataclass's own signature (what ``help()`` and ``inspect.signature`` show), not ``__call__``'s."""
        signature = inspect.signature(cls.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


def own_names(cls, positional: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with PEFT's names (``cls.aliases``) turned into the rule's own field names; RuleError for a field
    given twice (by both names, or by position and by name) and for an unknown keyword."""
    if not dataclasses.is_dataclass(cls):
        return kwargs
    fields = [field.name for field in dataclasses.fields(cls) if field.init]
    named: dict[str, Any] = {}
    for name, value in kwargs.items():
        field = cls.aliases.get(name, name)
        twice = field in named or (field != name and field in kwargs) or field in fields[:positional]
        if twice:
            given = f"`{name}` (PEFT's name for `{field}`) and `{field}`" if field != name else f"`{field}`"
            raise RuleError(f"{cls.__name__}: {given} given twice (by both names, or by position and by name); "
                            "give it once.")
        named[field] = value
    unknown = [name for name in named if name not in fields]
    if unknown:
        hints = {name: cls.peft_hints.get(name) or PEFT_HINTS.get(name) for name in unknown}
        told = "".join(f" `{name}`: {hint}." for name, hint in hints.items() if hint)
        aliases = f" (and PEFT's names {sorted(cls.aliases)})" if cls.aliases else ""
        raise RuleError(f"{cls.__name__}: unknown field(s) {unknown}; its fields are {fields}{aliases}.{told} A PEFT "
                        "config object can also be given to fxpeft.transform as it is.")
    return named
