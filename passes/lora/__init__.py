"""The LoRA pass: ``y = linear(x)`` becomes ``y + B(A(dropout(x))) * scaling`` at each selected linear
(with ``use_dora=True``, DoRA's branch instead: :mod:`fxpeft.passes.lora.dora`), and PEFT's conv and embedding
forms at each selected convolution (:mod:`fxpeft.passes.lora.conv`) and embedding
(:mod:`fxpeft.passes.lora.embedding`): the same ``targets`` select all three kinds of site from the graph
(``"all-linear"`` and the roles select linears only, as in PEFT).

The inserted nodes read ``A``, ``B`` and ``scaling`` as graph inputs fed from a :class:`LoraWeights`
module owned by the adapter, so the base weights are never touched and the same tensors serve every
captured signature. ``scaling`` is a tensor, so changing ``alpha`` changes no graph. The computation is
PEFT's, in PEFT's order, so equal weights give equal numbers; with ``B = 0`` the added term is exactly
zero and the output is the base model's bit for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from fxpeft.adapters import adapter_dtype
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.sites import ConvSite, EmbeddingSite, LinearSite
from fxpeft.methods import Method, register_method
from fxpeft.ops.dropout import dropout, next_draw
from fxpeft.passes.lora import checks, hotswap
from fxpeft.passes.lora.codec import LoraCodec
from fxpeft.passes.lora.combine import add_weighted_adapter
from fxpeft.passes.lora.conv import LoraConvWeights, check_conv_site, insert_conv_branch
from fxpeft.passes.lora.dora import EVAL_FORMS, check_dora_site, insert_dora_branch
from fxpeft.passes.lora.embedding import LoraEmbeddingWeights, check_embedding_site, insert_embedding_branch
from fxpeft.passes.lora.joins import cast, rejoin
from fxpeft.passes.lora.mixed_batch import gather_branches
from fxpeft.passes.lora.parameters import apply_parameter_lora
from fxpeft.passes.lora.targeting import narrow, train_biases, trained_whole
from fxpeft.passes.lora.weights import LoraWeights
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["LoraMethod", "LoraWeights", "LoraConvWeights", "LoraEmbeddingWeights", "apply_lora"]

aten = torch.ops.aten


def _insert_branch(ctx: RewriteContext, site: LinearSite, node: fx.Node, inputs: dict[str, fx.Node],
                   weights: LoraWeights) -> None:
    """``y`` becomes ``(y + B(A(dropout(x.to(lora)))) * scaling).to(y.dtype)``, PEFT's order of operations.

    ``scaling`` is applied per batch row through the adapter's gate (see ``RewriteContext.gated``), which
    is 1 for rows the adapter applies to: then the product is exactly PEFT's ``b * scaling``.

    The order matters over a half-precision base: PEFT casts ``x`` to the adapter's dtype *before* dropout
    and adds in the promoted dtype before casting back, so the sum is rounded once, not twice.
    """
    graph = ctx.program.graph
    x = site.input_of(node)
    x_dtype = x.meta["val"].dtype
    lora_dtype = weights.lora_A.dtype
    stack = node.meta.get("nn_module_stack")
    node = ctx.site_output(node)  # after the adapters already at this site: they compose in adapter order
    readers = set(node.users)  # the graph's readers of ``y``, which read the branch's result instead
    with graph.inserting_before(node.next):
        h = cast(graph, x, x_dtype, lora_dtype)
        if h is not x:
            ctx.tag(h, site.path, "input")
        if weights.dropout > 0:
            h = ctx.tag(graph.call_function(dropout, (h, weights.dropout, True, next_draw())), site.path,
                        "input")  # see fxpeft.ops.dropout
        h = ctx.rows_on(h, site.path)
        a = ctx.tag(graph.call_function(aten.linear.default, (h, inputs["lora_A"])), site.path, "lora_A")
        b = ctx.tag(graph.call_function(aten.linear.default, (a, inputs["lora_B"])), site.path, "lora_B")
        delta = ctx.gated(b, inputs["scaling"], site.path, weights.scaling.dtype)
        total = ctx.tag(graph.call_function(aten.add.Tensor, (node, delta)), site.path, tags.JOIN)
    rejoin(ctx, site.path, node, total, readers, lora_dtype, stack)


def _check_not_adapted(ctx: RewriteContext, rule: LoRA, site: LinearSite | ConvSite | EmbeddingSite) -> None:
    """Two LoRA rules of one adapter at one linear would add two branches sharing one set of weights."""
    for node in site.nodes:
        for joined in ctx.joined_after(node):
            tag = tags.tag_of(joined)
            if tag.get("adapter") == ctx.adapter_name and tag.get("method") == LoraMethod.tag:
                earlier = [r for r, paths in ctx.adapter.selected.items() if r is not rule and site.path in paths]
                raise RuleError(
                    f"LoRA: {site.path} is selected by more than one LoRA rule of adapter "
                    f"{ctx.adapter_name!r} ({earlier[:1] + [rule]}); each linear takes one LoRA per adapter. "
                    "Narrow the targets or add `exclude=` to one rule, or put the second one in another adapter.")


def _refuse_tied_sites(ctx: RewriteContext, sites: list) -> None:
    """``ensure_weight_tying=True`` at a site whose weight another module shares (a tied embedding and head): PEFT
    then gives the head a LoRA made of the embedding's (``lora_A = lora_embedding_B.T``), which fxpeft does not do.
    Refused rather than two independent LoRAs."""
    names: dict[int, list[str]] = {}
    for name, parameter in ctx.base_model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for site in sites:
        shared = names.get(id(ctx.base_model.get_parameter(site.weight_fqn)), [])
        if len(shared) > 1:
            raise UnsupportedError(
                f"LoRA: ensure_weight_tying=True at {site.path}, whose weight is tied ({sorted(shared)}): PEFT then "
                "ties the LoRA of the tied modules to the embedding's, which fxpeft does not do. Leave "
                "ensure_weight_tying False (each targeted module gets a LoRA of its own, as in PEFT without it), "
                "or untie the weights first.")


def apply_lora(rule: LoRA, ctx: RewriteContext) -> None:
    """Add a LoRA branch at every linear site the rule selects (and train biases if asked)."""
    trained = trained_whole(ctx)
    sites = narrow(rule, ctx, ctx.select_sites(rule), trained) if rule.targets is not None else []
    if rule.ensure_weight_tying:
        _refuse_tied_sites(ctx, sites)
    for site in sites:
        _check_not_adapted(ctx, rule, site)
        if isinstance(site, ConvSite):
            check_conv_site(rule, site, ctx)
        elif isinstance(site, EmbeddingSite):
            check_embedding_site(rule, site, ctx)
        elif rule.use_dora:
            check_dora_site(site)
    for site in sites:
        if not isinstance(site, LinearSite):
            _apply_other(rule, ctx, site)
            continue
        base = ctx.base_model.get_parameter(site.weight_fqn)
        weights = ctx.site(site.path, "lora", lambda: LoraWeights(
            site.path, site.in_features, site.out_features, rule, base.device, adapter_dtype(base.dtype),
            base_weight=functools.partial(ctx.base_model.get_parameter, site.weight_fqn) if rule.use_dora else None,
            fan_in_fan_out=site.form == "addmm"))
        weights.fan_in_fan_out = site.form == "addmm"
        weights.weight_fqn = site.weight_fqn
        names = ("lora_A", "lora_B", "scaling") + (("lora_magnitude_vector",) if weights.use_dora else ())
        inputs = {name: ctx.adapter_input(site.path, "lora", name) for name in names}
        for node in site.nodes:
            (insert_dora_branch if weights.use_dora else _insert_branch)(ctx, site, node, inputs, weights)
    train_biases(rule, ctx, {site.path for site in sites}, trained)
    apply_parameter_lora(rule, ctx)  # target_parameters: passes/lora/parameters.py


def _apply_other(rule: LoRA, ctx: RewriteContext, site: ConvSite | EmbeddingSite) -> None:
    """PEFT's LoRA branch at a convolution or an embedding site (passes/lora/conv.py, passes/lora/embedding.py)."""
    base = ctx.base_model.get_parameter(site.weight_fqn)
    conv = isinstance(site, ConvSite)
    dora = functools.partial(ctx.base_model.get_parameter, site.weight_fqn) if conv and rule.use_dora else None
    weights = ctx.site(site.path, "lora", lambda: LoraConvWeights(
        site, rule, base.device, adapter_dtype(base.dtype), base_weight=dora) if conv else LoraEmbeddingWeights(
        site, rule, base.device, adapter_dtype(base.dtype)))
    weights.weight_fqn = site.weight_fqn
    names = ("lora_A", "lora_B", "scaling") + (("lora_magnitude_vector",) if weights.use_dora else ())
    inputs = {name: ctx.adapter_input(site.path, "lora", name) for name in names}
    for node in site.nodes:
        (insert_conv_branch if conv else insert_embedding_branch)(ctx, site, node, inputs, weights)


class LoraMethod(Method):
    """LoRA: a gated low-rank branch added to each selected linear's output."""

    rule_type = LoRA
    tag = "lora"
    codec = LoraCodec()
    key_form = checks.KEY_FORM
    site_kind = checks.SITE_KIND
    eval_forms = EVAL_FORMS  # DoRA's base part on the dropped input (train) is y - b in eval mode

    def rewrite(self, rule: LoRA, ctx: RewriteContext) -> None:
        apply_lora(rule, ctx)

    def mixed_batch(self, graph, sources) -> int:
        return gather_branches(graph, sources, self.tag)

    def combine(self, adapted, adapters, weights, adapter_name, **options) -> None:
        add_weighted_adapter(adapted, adapters, weights, adapter_name, **options)

    def key_part(self, key):
        return checks.key_part(key)

    def describe_site(self, path, ctx):
        return checks.describe_site(path, ctx)

    def allowed_sites(self, rule, ctx):
        return checks.allowed_sites(rule, ctx)

    def policy_findings(self, site, allowed, given, declared, state):
        return checks.policy_findings(site, allowed, given, declared, state)

    def hotswap_refusal(self, rule):
        return hotswap.hotswap_refusal(rule)

    def hotswap_sites(self, rule, ctx, capacity):
        return hotswap.hotswap_sites(rule, ctx, capacity)

    def hotswap_stand_in(self, paths, capacity, settings):
        return hotswap.stand_in(paths, capacity, settings)

    def graph_settings(self, rule):
        return hotswap.graph_settings(rule)


register_method(LoraMethod())
