"""Declared rules (``--rules``): everything the adapter holds must be allowed by a rule the user declared.

Each policy rule's method says which sites the rule allows (:meth:`fxpeft.methods.Method.allowed_sites`),
resolved on a fresh capture of the base model; each site of the checked adapter is then judged by the method of
the rule that made it (:meth:`~fxpeft.methods.Method.policy_findings`), against the first policy rule of that
method that allows the site (or none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from fxpeft.adapters import ParameterCopy
from fxpeft.errors import RuleError
from fxpeft.methods import Method, method_for, methods
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule
from fxpeft.verification.declared import Declared
from fxpeft.verification.report import Findings

__all__ = ["Policy", "stated_rules", "allowed_by", "check_policy"]

Policy = list[tuple[Rule, set[str]]]
"""Policy rules, each with the fields it states."""


def stated_rules(rules: Sequence[Rule | dict] | None) -> Policy | None:
    """Rules with the fields they state: a dict states its keys; a Rule the fields that differ from defaults."""
    if rules is None:
        return None
    policy = []
    for entry in rules:
        if isinstance(entry, dict):
            policy.append((Rule.from_dict(entry), set(entry) - {"method"}))
        elif isinstance(entry, Rule):
            default = type(entry)(targets=entry.targets)
            policy.append((entry, {f.name for f in dataclasses.fields(entry)
                                   if getattr(entry, f.name) != getattr(default, f.name)}))
        else:
            raise RuleError(f"rules: expected fxpeft rules or their dicts, got {entry!r}.")
    return policy


def _checks_rules(method: Method) -> bool:
    return type(method).allowed_sites is not Method.allowed_sites


def allowed_by(policy: Policy, context: RewriteContext) -> dict[Method, dict[str, tuple[Any, set[str]]]]:
    """Method -> site path -> (what its first policy rule allowing the site says, the fields that rule states),
    selected on ``context``'s graph as captured. RuleError for a rule whose method cannot be checked."""
    allowed: dict[Method, dict[str, tuple[Any, set[str]]]] = {}
    for rule, given in policy:
        method = method_for(rule)
        if not _checks_rules(method):
            names = sorted(getattr(m.rule_type, "method", "") or m.name for m in methods() if _checks_rules(m))
            listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise RuleError(f"rules: {type(rule).__name__} rules cannot be checked yet; use {listed} rules.")
        sites = allowed.setdefault(method, {})
        for path, value in method.allowed_sites(rule, context).items():
            sites.setdefault(path, (value, given))
    return allowed


def check_policy(found: Findings, allowed: dict[Method, dict[str, tuple[Any, set[str]]]],
                 declared: dict[str, Declared]) -> None:
    """A ``rules-violation`` for everything a declared adapter holds that the policy does not allow."""
    for item in declared.values():
        if item.reference is None:
            continue
        for key, site in item.reference.sites.items():
            rule = item.made_by.get(key)
            if rule is None:
                continue
            method = method_for(rule)
            value, given = allowed.get(method, {}).get(site.path, (None, set()))
            module = site.path.rpartition(".")[0] if isinstance(site, ParameterCopy) else site.path
            for finding in method.policy_findings(site, value, given, rule, item.state):
                message, details = finding if isinstance(finding, tuple) else (finding, {})
                found.add("rules-violation", site.path, message, module, **details)
