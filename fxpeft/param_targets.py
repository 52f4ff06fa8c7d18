"""Validation of LoRA's ``target_parameters`` (PEFT's field of that name): raw parameters adapted by LoRA.

Kept out of :mod:`fxpeft.rules` (size). PEFT matches each name against ``<module path>.<parameter name>`` of the
parameters a module holds directly: equal, or ending with ``.<name>``; it takes a list of names only (no regex).
"""

from __future__ import annotations

from typing import Any

from fxpeft.errors import RuleError

__all__ = ["normalize_target_parameters", "parameter_matches"]


def normalize_target_parameters(value: Any, rule: Any) -> tuple[str, ...]:
    """``target_parameters`` as a sorted tuple of names (PEFT sorts them too), checked against ``rule``'s other
    fields: PEFT's ``ParamWrapper`` refuses ``lora_dropout``, ``use_dora`` (and ``fan_in_fan_out``) with them."""
    if value is None:
        return ()
    if isinstance(value, str):
        raise RuleError(f"LoRA: `target_parameters` must be a list of parameter names, got the string {value!r} "
                        f"(PEFT does not match a regex there). Write target_parameters=[{value!r}].")
    try:
        items = tuple(value)
    except TypeError:
        raise RuleError(f"LoRA: `target_parameters` must be a list of parameter names such as "
                        f"['experts.gate_up_proj'], got {value!r}.") from None
    bad = [item for item in items if not isinstance(item, str) or not item or item.startswith(".")
           or item.endswith(".")]
    if bad:
        raise RuleError(f"LoRA: every entry of `target_parameters` must be a parameter name (its path or the end "
                        f"of it, e.g. 'experts.down_proj'), got {bad[:4]!r}.")
    if items and rule.dropout:
        raise RuleError(f"LoRA: `target_parameters` with dropout={rule.dropout}: LoRA on a raw parameter changes "
                        "the weight, not the input, so there is no input to drop (PEFT's ParamWrapper refuses it "
                        "too). Use dropout=0, or put the linears with dropout in a rule of their own.")
    if items and rule.use_dora:
        raise RuleError("LoRA: `target_parameters` with use_dora=True: PEFT's ParamWrapper has no DoRA. Use "
                        "use_dora=False for the parameters (DoRA linears can go in another adapter).")
    if items and rule.init == "orthogonal":
        raise RuleError("LoRA: `target_parameters` with init='orthogonal': PEFT's orthogonal init does not fit the "
                        "expert-stacked lora_A [r * experts, in]. Use init='default', 'gaussian' or 'random'.")
    return tuple(sorted(dict.fromkeys(items)))


def parameter_matches(fqn: str, names: tuple[str, ...]) -> bool:
    """Whether the parameter path ``fqn`` is one of ``names`` as PEFT matches them (equal, or ending ``.name``)."""
    return any(fqn == name or fqn.endswith(f".{name}") for name in names)
