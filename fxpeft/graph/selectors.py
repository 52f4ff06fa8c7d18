"""Resolve a rule's ``targets`` to module paths of a captured model.

A single target string (not in a list) is a **regex** matched against the whole path, as PEFT treats a
string ``target_modules`` — unless it is ``"all-linear"``, a role, or not a valid regex (then it is a
glob). In a list, each entry is one of (one line each)::

    "q_proj"                    PEFT-style name: the path equals it or ends in ".q_proj"
    "*.layers.1[0-5].*.v_proj"  glob over the whole path (has * ? or [)
    "attention.query"           role read from data flow (also .key .value .output; "feedforward.output")
    "all-linear"                every linear except the output head (PEFT's definition)
    torch.nn.Linear             module type: the module at the path is an instance of it

The candidates are the sites the caller passes (``RewriteContext.select_sites``: linears, and for LoRA also
convolutions and embeddings); ``"all-linear"`` and the roles only ever name linears.

Selecting nothing raises :class:`fxpeft.errors.NoMatchError` with the closest paths. Each selection is
counted (``("selector", rule, "selected" | "excluded" | "failed")``, see :mod:`fxpeft.debug`) and, at DEBUG
level, logged per target entry: what each entry of ``targets`` selected and what ``exclude`` removed.

**Regexes are bounded work**: every regex target is checked and matched through
:mod:`fxpeft.graph.bounded_regex` (regexes come from strangers' files).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from typing import Any, Callable, Iterable

import torch

from fxpeft import debug
from fxpeft.errors import NoMatchError
from fxpeft.graph.bounded_regex import bounded_regex

__all__ = ["ROLES", "ALL_LINEAR", "select_paths", "matches_any", "as_regex", "is_plain_name", "as_peft_names"]

ROLES = ("attention.query", "attention.key", "attention.value", "attention.output", "feedforward.output")
ALL_LINEAR = "all-linear"
_GLOB_CHARS = set("*?[")


def as_regex(target: str) -> re.Pattern | None:
    """``target`` compiled as a regex, or None when it is not a valid one."""
    try:
        return re.compile(target)
    except re.error:
        return None


def is_plain_name(entry: Any) -> bool:
    """A PEFT-style module name: a string that is no role, no ``"all-linear"`` and no glob."""
    return isinstance(entry, str) and entry not in ROLES and entry != ALL_LINEAR and not (_GLOB_CHARS & set(entry))


def as_peft_names(value: Any) -> Any:
    """A normalized selector (a string, or a tuple of entries) as PEFT's config writes it: one regex string (or
    ``"all-linear"``), or a sorted list of plain names; None when PEFT's config cannot say it (globs, roles, types)."""
    if isinstance(value, str):
        return value if value == ALL_LINEAR or (value not in ROLES and as_regex(value) is not None) else None
    if isinstance(value, tuple) and all(is_plain_name(item) for item in value):
        return sorted(value)
    return None


def _entry_matcher(entry: Any, get_module: Callable[[str], torch.nn.Module], roles: dict[str, set[str]],
                   all_linear: set[str]) -> Callable[[str], bool]:
    if isinstance(entry, type):
        return lambda path: isinstance(get_module(path), entry)
    if entry in roles:
        return roles[entry].__contains__
    if entry == ALL_LINEAR:
        return all_linear.__contains__
    if _GLOB_CHARS & set(entry):
        return lambda path: fnmatch.fnmatchcase(path, entry)
    return lambda path: path == entry or path.endswith("." + entry)


def matches_any(targets: Any, path: str, get_module: Callable[[str], torch.nn.Module],
                roles: dict[str, set[str]], all_linear: set[str]) -> bool:
    """Whether ``path`` is selected by ``targets`` (see the module docstring for the forms)."""
    if isinstance(targets, str) and targets not in roles and targets != ALL_LINEAR:
        if as_regex(targets) is not None:
            return bounded_regex(targets).fullmatch(path)
    entries = (targets,) if isinstance(targets, (str, type)) else targets
    return any(_entry_matcher(entry, get_module, roles, all_linear)(path) for entry in entries)


def select_paths(targets: Any, exclude: Any, candidates: Iterable[str], *, what: str, rule: str,
                 get_module: Callable[[str], torch.nn.Module], roles: dict[str, set[str]] | None = None,
                 all_linear: set[str] | None = None) -> list[str]:
    """The candidate paths ``targets`` selects, minus those ``exclude`` selects, in candidate order."""
    roles = roles or {role: set() for role in ROLES}
    all_linear = set(all_linear or ())
    candidates = list(candidates)
    chosen = [p for p in candidates if matches_any(targets, p, get_module, roles, all_linear)]
    excluded = []
    if exclude is not None:
        excluded = [p for p in chosen if matches_any(exclude, p, get_module, roles, all_linear)]
        removed = set(excluded)
        chosen = [p for p in chosen if p not in removed]
    debug.count("selector", rule, "selected", n=len(chosen))
    debug.count("selector", rule, "excluded", n=len(excluded))
    if debug.logger.isEnabledFor(logging.DEBUG):
        _log_selection(targets, exclude, candidates, chosen, excluded, what=what, rule=rule, get_module=get_module,
                       roles=roles, all_linear=all_linear)
    if not chosen:
        debug.count("selector", rule, "failed")
        names = [targets] if isinstance(targets, (str, type)) else list(targets)
        wanted = [n if isinstance(n, str) else n.__name__ for n in names]
        close: list[str] = []
        for name in wanted:
            close += difflib.get_close_matches(name, candidates, n=5, cutoff=0.3)
            short = sorted({p.rpartition(".")[2] for p in candidates})
            close += [s for s in difflib.get_close_matches(name, short, n=5, cutoff=0.3) if s not in close]
        close = list(dict.fromkeys(close))[:8] or candidates[:8]
        raise NoMatchError(
            f"{rule}: targets {wanted} selected no {what} (after exclude={exclude!r}). "
            f"Closest {what} paths and names: {close}. The model has {len(candidates)} {what}s; "
            "use a name, a glob, a regex, a module type, 'all-linear' or a role such as 'attention.query'."
            + _regex_hint(targets, candidates), candidates=close)
    return chosen


_SHOWN = 12  # paths listed per log line


def _entry_kind(entry: Any, single: bool, roles: dict[str, set[str]]) -> str:
    """What kind of target ``entry`` is (see the module docstring); ``single``: a lone string, not in a list."""
    if isinstance(entry, type):
        return "module type"
    if entry in roles:
        return "role"
    if entry == ALL_LINEAR:
        return "all-linear"
    if single and as_regex(entry) is not None:
        return "regex"
    return "glob" if _GLOB_CHARS & set(entry) else "name"


def _listed(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "") if paths else "nothing"


def _log_selection(targets: Any, exclude: Any, candidates: list[str], chosen: list[str], excluded: list[str], *,
                   what: str, rule: str, get_module: Callable[[str], torch.nn.Module], roles: dict[str, set[str]],
                   all_linear: set[str]) -> None:
    """DEBUG lines for one selection: the result, then what each entry of ``targets`` and ``exclude`` matched."""
    log = debug.logger.debug
    log("selector %s: targets %r selected %d of %d %s(s) (exclude %r removed %d): %s", rule, targets, len(chosen),
        len(candidates), what, exclude, len(excluded), _listed(chosen))
    for label, spec in (("target", targets), ("exclude", exclude)):
        if spec is None:
            continue
        single = isinstance(spec, (str, type))
        for entry in ((spec,) if single else spec):
            matched = [p for p in candidates if matches_any(entry if single else (entry,), p, get_module, roles,
                                                           all_linear)]
            name = entry.__name__ if isinstance(entry, type) else repr(entry)
            log("selector %s: %s %s (%s) matches %d %s(s): %s", rule, label, name,
                _entry_kind(entry, single, roles), len(matched), what, _listed(matched))


def _regex_hint(targets: Any, candidates: list[str]) -> str:
    """A single string is a full-path regex (PEFT's rule); say so when it would have matched as a name."""
    if not isinstance(targets, str) or targets in ROLES or targets == ALL_LINEAR or as_regex(targets) is None:
        return ""
    if not any(path == targets or path.endswith("." + targets) for path in candidates):
        return ""
    return (f" Note: a single string is a regex matched against the whole module path, as in PEFT; to select "
            f"modules named {targets!r} pass a list, targets=[{targets!r}], or a regex such as '.*\\.{targets}'.")


# -- regexes in bounded time (the module docstring) -------------------------------------------------------------
