"""LoRA's part of hot swap (fxpeft/runtime/hotswap.py): which LoRA rules a slot takes, the sites a rule selects, the
rule a slot's graph is rewritten with, and what of a rule the train graph bakes in (its dropout). The per-site parts
(padding, spares, taking a rule in place) are :class:`~fxpeft.passes.lora.weights.LoraWeights` methods."""

from __future__ import annotations

from typing import Any

from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph.sites import LinearSite
from fxpeft.passes.lora.targeting import narrow, trained_whole
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["hotswap_refusal", "hotswap_sites", "stand_in", "graph_settings"]


def hotswap_refusal(rule: LoRA) -> str | None:
    """LoRA on linears with ``bias="none"``, without DoRA or ``target_parameters``, fits a slot."""
    problems = [name for name, bad in (("use_dora=True", rule.use_dora), (f"bias={rule.bias!r}", rule.bias != "none"),
                                       ("target_parameters", bool(rule.target_parameters))) if bad]
    if problems:
        return f"hot swap takes LoRA on linear layers with bias='none', not {problems}."
    return None


def hotswap_sites(rule: LoRA, ctx: RewriteContext, capacity: int) -> list[str]:
    """The linears ``rule`` selects (as its rewrite would: ``layers``, modules trained whole), each of rank at most
    ``capacity``; UnsupportedError for a convolution or embedding, RuleError for a rank over ``capacity``."""
    sites = narrow(rule, ctx, ctx.select_sites(rule), trained_whole(ctx)) if rule.targets is not None else []
    others = [site.path for site in sites if not isinstance(site, LinearSite)]
    if others:
        raise UnsupportedError(f"LoRA targets {others[:4]}, which are not linear layers; hot swap takes LoRA on "
                               "linears only.")
    over = {site.path: rule.rank_for(site.path) for site in sites if rule.rank_for(site.path) > capacity}
    if over:
        raise RuleError(f"LoRA ranks {dict(list(over.items())[:4])} exceed the hot-swap max_rank={capacity} given to "
                        "prepare_hotswap().")
    return [site.path for site in sites]


def stand_in(paths: list[str], capacity: int, settings: dict[str, Any]) -> LoRA:
    """The LoRA rule every slot's graph is rewritten with: each hot-swap linear, at ``capacity``, the slots' dropout
    (a slot's own sites hold its adapter's rank and scaling as tensors)."""
    return LoRA(targets=list(paths), r=capacity, alpha=capacity, dropout=settings.get("dropout", 0.0))


def graph_settings(rule: LoRA) -> dict[str, Any]:
    """The train graph bakes in LoRA's dropout."""
    return {"dropout": float(rule.dropout)}
