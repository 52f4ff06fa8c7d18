"""The value checks of rules: numbers (finite, integral where PEFT's are, in range, sizes at most :data:`MAX_SIZE`)
and regexes (matched in bounded time). :mod:`fxpeft.rules` re-exports :func:`number_problem`, :func:`check_alpha` and
:data:`MAX_SIZE` for the code that takes such values from elsewhere (file configs, ``AdaptedModel.set_alpha``).
"""

from __future__ import annotations

import math
from typing import Any

from fxpeft.errors import RuleError
from fxpeft.graph.bounded_regex import regex_problem

__all__ = ["MAX_SIZE", "number_problem", "check_alpha", "check_number", "check_regex"]

MAX_SIZE = 1 << 16  # the largest rank, virtual-token count or hidden size a rule takes (65536)


def number_problem(value: Any, *, integer: bool = False, minimum: float | None = None, above: float | None = None,
                   below: float | None = None, maximum: float | None = None) -> str | None:
    """None when ``value`` is a finite number within the bounds, else what it must be (``"an integer >= 1"``).

    ``integer``: an ``int`` (``4.9`` and ``4.0`` are refused, never truncated). A bool is never a number."""
    bounds = [f"{sign} {bound}" for sign, bound in ((">=", minimum), (">", above), ("<", below), ("<=", maximum))
              if bound is not None]
    want = " and ".join(["an integer" if integer else "a finite number", *bounds]).replace(" and ", " ", 1)
    bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)) or (minimum is not None and value < minimum) or (
        above is not None and value <= above) or (below is not None and value >= below) or (
        maximum is not None and value > maximum)
    return want if bad else None


def check_alpha(alpha: Any, where: str = "alpha") -> Any:
    """``alpha`` when it is a finite number > 0 (LoRA's ``alpha``, what ``AdaptedModel.set_alpha`` takes), else a
    :class:`RuleError` naming ``where``: the scaling ``alpha / r`` multiplies every update, and NaN or inf there
    makes every output NaN."""
    want = number_problem(alpha, above=0)
    if want is not None:
        raise RuleError(f"{where}: `alpha` must be {want}, got {alpha!r}; it scales the adapter's update "
                        "(alpha / r), and NaN or inf would make every output NaN.")
    return alpha


def check_number(rule: str, field: str, value: Any, **bounds) -> None:
    """RuleError ``<rule>: `<field>` must be ...`` unless ``value`` is within ``bounds`` (:func:`number_problem`'s)."""
    want = number_problem(value, **bounds)
    if want is not None:
        raise RuleError(f"{rule}: `{field}` must be {want}, got {value!r}.")


def check_regex(rule: str, field: str, value: str, fixed: bool = False, shown: str | None = None) -> None:
    """RuleError naming ``rule`` and ``field`` unless ``value`` is a regex that matches in bounded time (``fixed``: a
    plain name, as ``layers_pattern`` must be)."""
    problem = regex_problem(value, fixed)
    if problem is not None:
        raise RuleError(f"{rule}: `{field}` {shown or repr(value[:80])} {problem}. " + (
            "Use a name such as 'layers'." if fixed else "Write a simpler regex (e.g. '.*\\.(q_proj|v_proj)') or "
            "list module names."))
