"""What verify checks for LoRA (the verify hooks of :class:`fxpeft.passes.lora.LoraMethod`).

LoRA's file keys are ``base_model.model.<linear>.lora_A.weight`` ([r, in]: the rank is axis 0) and
``...lora_B.weight`` ([out, r]: axis 1); it adapts linear modules. A declared LoRA rule (``--rules``) allows the
linears it selects, with rank at most its ``r`` and the fields it states equal, and, when it states ``bias``,
the bias copies that bias mode trains.
"""

from __future__ import annotations

import re

from fxpeft.adapters import ParameterCopy
from fxpeft.methods import KeyPart
from fxpeft.passes.lora.weights import LoraWeights
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["KEY_FORM", "SITE_KIND", "key_part", "describe_site", "allowed_sites", "policy_findings"]

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?:(?P<part>lora_[AB])\.weight|(?P<dora>lora_magnitude_vector))$")
_RANK_AXIS = {"lora_A": 0, "lora_B": 1, "lora_magnitude_vector": None}
_FIELDS = ("alpha", "dropout", "use_rslora", "use_dora", "init", "bias")  # compared when a declared rule states them
KEY_FORM = "<module>.lora_A.weight / lora_B.weight (/ lora_magnitude_vector with DoRA)"
SITE_KIND = "a linear module"


def key_part(key: str) -> KeyPart | None:
    """The linear and the part (``lora_A``/``lora_B``) a LoRA key names, with its rank axis."""
    match = _KEY.match(key)
    if not match:
        return None
    part = match["part"] or match["dora"]
    return KeyPart(match["path"], part, _RANK_AXIS[part])


def describe_site(path: str, ctx: RewriteContext) -> str | None:
    """``"a linear 32 -> 16"`` for a linear of the base model, None for any other module."""
    site = ctx.linear_sites.get(path)
    return f"a linear {site.in_features} -> {site.out_features}" if site is not None else None


def allowed_sites(rule: LoRA, ctx: RewriteContext) -> dict[str, LoRA]:
    """The linears ``rule`` selects, and the biases its ``bias`` mode trains (all, or those of its linears)."""
    allowed = {site.path: rule for site in ctx.select_linear(rule)}
    if rule.bias != "none":
        for source in ctx.program.sources:
            if source.kind == "parameter" and source.target.rpartition(".")[2] == "bias" and \
                    (rule.bias == "all" or source.target.rpartition(".")[0] in allowed):
                allowed.setdefault(source.target, rule)
    return allowed


def policy_findings(site, allowed: LoRA | None, given: set[str], declared: LoRA, state: dict) -> list:
    """A LoRA site must be allowed, of rank at most the rule's ``r``, with the stated fields equal; a bias copy
    must be allowed by a rule that states the adapter's bias mode."""
    if isinstance(site, ParameterCopy):
        if allowed is None or "bias" not in given or allowed.bias != declared.bias:
            return [f"the adapter trains this bias (bias={declared.bias!r}), which the rules do not allow (give a "
                    "lora rule with that bias)."]
        return []
    if not isinstance(site, LoraWeights):
        return []
    if allowed is None:
        return ["the adapter puts LoRA on this module, which no rule allows."]
    tensor = state.get(f"base_model.model.{site.path}.lora_A.weight")
    rank = int(tensor.shape[0]) if tensor is not None and tensor.dim() == 2 else site.r
    found: list = []
    if rank > allowed.r:
        found.append((f"LoRA rank {rank} exceeds the rules' r={allowed.r}.", {"rank": rank, "allowed": allowed.r}))
    for field in _FIELDS:
        if field in given and getattr(declared, field) != getattr(allowed, field):
            found.append(f"the adapter has {field}={getattr(declared, field)!r}; the rules say "
                         f"{field}={getattr(allowed, field)!r}.")
    return found
