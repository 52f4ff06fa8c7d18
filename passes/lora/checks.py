"""What verify checks for LoRA (the verify hooks of :class:`fxpeft.passes.lora.LoraMethod`).

LoRA's file keys are ``base_model.model.<linear>.lora_A.weight`` ([r, in]: the rank is axis 0) and
``...lora_B.weight`` ([out, r]: axis 1); a convolution's are the same keys with kernel-shaped tensors (``[r, in, *k]``,
``[out, r / groups, 1, ...]``), an embedding's ``...lora_embedding_A`` ([r, num]: axis 0) and
``...lora_embedding_B`` ([dim, r]: axis 1). It adapts linear, convolution and embedding modules. A declared LoRA
rule (``--rules``) allows the sites it selects, with rank at most its ``r`` and the fields it states equal, and, when
it states ``bias``, the bias copies that bias mode trains. (A grouped conv's ``lora_B`` has ``r / groups`` columns;
the shapes the config makes are not compared for rank, so that is no mismatch.)
"""

from __future__ import annotations

import re

from fxpeft.adapters import ParameterCopy
from fxpeft.methods import KeyPart
from fxpeft.passes.lora.parameters import (
    ParameterLoraWeights,
    allowed_parameters,
    describe_parameter_site,
    parameter_findings,
)
from fxpeft.passes.lora.weights import LoraWeights
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["KEY_FORM", "SITE_KIND", "key_part", "describe_site", "allowed_sites", "policy_findings"]

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?:(?P<part>lora_[AB])\.weight|"
                  r"(?P<dora>lora_magnitude_vector|lora_embedding_[AB]))$")
_RANK_AXIS = {"lora_A": 0, "lora_B": 1, "lora_magnitude_vector": None, "lora_embedding_A": 0, "lora_embedding_B": 1}
_FIELDS = ("alpha", "dropout", "use_rslora", "use_dora", "init", "bias")  # compared when a declared rule states them
KEY_FORM = ("<module>.lora_A.weight / lora_B.weight (/ lora_magnitude_vector with DoRA; an embedding's "
            "lora_embedding_A / lora_embedding_B)")
SITE_KIND = "a linear, convolution or embedding module"


def key_part(key: str) -> KeyPart | None:
    """The linear and the part (``lora_A``/``lora_B``) a LoRA key names, with its rank axis."""
    match = _KEY.match(key)
    if not match:
        return None
    part = match["part"] or match["dora"]
    return KeyPart(match["path"], part, _RANK_AXIS[part])


def describe_site(path: str, ctx: RewriteContext) -> str | None:
    """``"a linear 32 -> 16"`` for a linear of the base model (``"a Conv2d 3 -> 8, kernel [3, 3]"``, ``"an embedding
    128 x 64"``), None for any other module."""
    site = ctx.linear_sites.get(path)
    if site is not None:
        return f"a linear {site.in_features} -> {site.out_features}"
    conv = ctx.conv_sites.get(path)
    if conv is not None:
        return f"a Conv{conv.dims}d {conv.in_channels} -> {conv.out_channels}, kernel {list(conv.kernel_size)}"
    embedding = ctx.embedding_sites.get(path)
    if embedding is None:  # PEFT's keys for target_parameters name the module holding them (lora/parameters.py)
        return describe_parameter_site(path, ctx)
    return f"an embedding {embedding.num_embeddings} x {embedding.embedding_dim}"


def allowed_sites(rule: LoRA, ctx: RewriteContext) -> dict[str, LoRA]:
    """The linears, convolutions and embeddings ``rule`` selects, and the biases its ``bias`` mode trains (all, or
    those of its sites)."""
    allowed = {site.path: rule for site in ctx.select_sites(rule)} if rule.targets is not None else {}
    allowed.update(allowed_parameters(rule, ctx))  # target_parameters
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
    if isinstance(site, ParameterLoraWeights):
        return parameter_findings(site, allowed, state)
    if not isinstance(site, LoraWeights):
        return []
    if allowed is None:
        return ["the adapter puts LoRA on this module, which no rule allows."]
    prefix = f"base_model.model.{site.path}"
    tensor = state.get(f"{prefix}.lora_A.weight", state.get(f"{prefix}.lora_embedding_A"))
    rank = int(tensor.shape[0]) if tensor is not None and tensor.dim() >= 2 else site.r
    found: list = []
    if rank > allowed.r:
        found.append((f"LoRA rank {rank} exceeds the rules' r={allowed.r}.", {"rank": rank, "allowed": allowed.r}))
    for field in _FIELDS:
        if field in given and getattr(declared, field) != getattr(allowed, field):
            found.append(f"the adapter has {field}={getattr(declared, field)!r}; the rules say "
                         f"{field}={getattr(allowed, field)!r}.")
    return found
