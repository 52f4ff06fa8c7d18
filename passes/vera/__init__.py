"""VeRA (Kopiczko et al. 2024), PEFT 0.21.2's ``VERA``: two frozen random projections shared by every adapted linear,
and two trained vectors per linear::

    y' = y + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))

``vera_A`` [r, max_in] and ``vera_B`` [max_out, r] are made once per adapter from ``projection_prng_key`` exactly as
PEFT's ``VeraModel._init_vera_A_vera_B`` makes them (one CPU ``torch.Generator`` seeded with the key; PEFT's
``_kaiming_init``: ``uniform_(-b, b)`` with ``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``, A then B, in the default dtype),
so the same key gives bit-identical projections in PEFT and fxpeft; each linear reads its slice. They are buffers of
one site module per adapter (:class:`VeraProjections`, not trained, not counted by ``get_nb_trainable_parameters``)
and graph inputs like every adapter tensor, so another key, or projections loaded from a file, change tensors, never
the graph. ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] (:class:`VeraVectors`) start as PEFT's: ``d_initial``
and zeros (``init=False``: ``randn`` and ones), so a fresh adapter is the base model bit for bit.

Numerics are PEFT's ``vera.Linear.forward``, in its order: ``x`` cast to the vectors' dtype, dropout, the two
linears with ``lambda_d *`` between them and ``lambda_b *`` after, added to ``y`` in the promoted dtype and cast back
to ``y``'s. The branch's input and its result are kept to the rows whose gate is on (``RewriteContext.rows_on``:
selected, never multiplied by a gate), so switching and disabling adapters change tensors, not the graph, and an
inactive adapter's ``inf`` cannot reach another row. Merging adds PEFT's ``get_delta_weight``
(``(lambda_b B) @ (lambda_d A)``, transposed for transformers' ``Conv1D``, read off the graph); unmerging subtracts it.

Files are PEFT's: ``peft_type`` VERA, ``base_model.model.<path>.vera_lambda_b`` / ``vera_lambda_d`` and, with
``save_projection=True`` (the default), ``base_model.vera_A`` / ``base_model.vera_B``; ``modules_to_save`` from
Trainable rules; ``bias`` ``"all"``/``"vera_only"`` trains bias copies as LoRA's does. PEFT's own oddities, matched:

- over a half-precision base PEFT moves every new adapter tensor to the base dtype before upcasting it to float32, so
  the projections and the initial vectors are rounded to bfloat16/float16 once (``d_initial=0.1`` is 0.10009765625
  over bfloat16); fxpeft rounds them the same way;
- ``torch.randn(r)`` is drawn for ``lambda_d`` even when ``init=True`` overwrites it (the global RNG moves as PEFT's);
- a second VeRA adapter gets no projections of its own: PEFT reuses the first adapter's, so it must have the same
  ``projection_prng_key``, ``save_projection`` and ``r`` (PEFT raises or fails in its forward otherwise) and linears
  within the first adapter's sizes. fxpeft gives it projections of the first adapter's shape made from that same key:
  the same numbers, held (and saved) per adapter;
- projections in a file are used as they are (PEFT does not compare them with the key); a file whose projections
  differ from what its key makes gets a warning on load and a ``rules-violation`` from ``fxpeft check --rules``;
- PEFT's ``VeraConfig`` has no ``exclude_modules``: an adapter with ``exclude`` is saved with the module paths it
  selected as ``target_modules``.

What differs from PEFT, on purpose: ``adapter_names`` (one adapter per row) works as for LoRA (each row is its adapter
alone), where PEFT's VeRA has no per-row forward and silently applies the active adapter to every row; a config
with ``save_projection=false`` whose file still holds projections is refused (PEFT warns and regenerates them);
quantized (bitsandbytes) linears are not supported; one VeRA rule per adapter (PEFT's one ``VeraConfig``); several
active adapters at one linear each rejoin it in turn (``y + d1``, cast back to ``y``'s dtype, then ``+ d2``), where
PEFT adds them all in the promoted dtype and casts once: equal over a float32 base, within one rounding over half
precision.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from fxpeft.adapters import ParameterCopy, adapter_dtype, site_key
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.program import InputSource
from fxpeft.graph.sites import LinearSite
from fxpeft.methods import KeyPart, Method, register_method
from fxpeft.ops.dropout import dropout, next_draw
from fxpeft.passes.lora.joins import rejoin
from fxpeft.passes.lora.targeting import narrow, train_biases, trained_whole
from fxpeft.passes.vera.codec import PROJECTION_KEY, VeraCodec
from fxpeft.passes.vera.rule import VeRA, resolved
from fxpeft.passes.vera.weights import PROJECTIONS, VeraProjections, VeraVectors, projections
from fxpeft.rewrite import RewriteContext

__all__ = ["VeRA", "VeraVectors", "VeraProjections", "VeraCodec", "VeraMethod", "projections"]

aten = torch.ops.aten

KIND = "vera"  # the site kind of the vectors: adapter keys ``vera:<path>``
PROJECTION_KIND = "vera_proj"
_VECTOR_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<part>vera_lambda_[bd])$")
_FORMS = ("linear", "addmm", "matmul")
_META = "fxpeft_vera"  # placeholder meta of vera_A: (key, save_projection, r, max_in, max_out)


# -- the rewrite ------------------------------------------------------------------------------------------------
def _input(ctx: RewriteContext, path: str, kind: str, attribute: str) -> fx.Node:
    """The graph input of ``attribute`` of this adapter's site module, made once per program."""
    wanted = InputSource("adapter", (ctx.adapter_name, site_key(path, kind), attribute))
    for node, source in zip(ctx.program.placeholders(), ctx.program.sources):
        if source == wanted:
            return node
    return ctx.adapter_input(path, kind, attribute)


def _earlier_projections(ctx: RewriteContext) -> tuple[str, tuple] | None:
    """The first other VeRA adapter in this program, with what its projections are made of (``_META``)."""
    for node, source in zip(ctx.program.placeholders(), ctx.program.sources):
        if source.kind == "adapter" and source.target[0] != ctx.adapter_name and _META in node.meta:
            return source.target[0], node.meta[_META]
    return None


def _sites(rule: VeRA, ctx: RewriteContext) -> list[LinearSite]:
    """The selected linears, minus those outside ``layers`` (a target given as the whole path stays, as in PEFT) and
    those inside a module a Trainable rule trains whole (PEFT's ``modules_to_save``)."""
    wanted = resolved(rule, ctx.base_model)
    sites = ctx.select_linear(wanted)
    kept = narrow(wanted, ctx, sites, trained_whole(ctx))
    for site in kept:
        if site.form not in _FORMS:
            raise UnsupportedError(f"VeRA: {site.path} is computed as {site.form!r}; fxpeft's VeRA adapts float "
                                   "nn.Linear and Conv1D layers only (no quantized ones yet).")
    ctx.adapter.selected[rule] = [site.path for site in kept]
    return kept


def _shared_projections(rule: VeRA, ctx: RewriteContext, sites: list[LinearSite], base_dtype) -> VeraProjections:
    """The adapter's projections: sized by its own linears, or, after another VeRA adapter, PEFT's rules (module
    docstring): that adapter's shape, the same key, ``save_projection`` and ``r``, linears that fit."""
    max_in = max(site.in_features for site in sites)
    max_out = max(site.out_features for site in sites)
    made = (rule.projection_prng_key, rule.save_projection, rule.r, max_in, max_out)
    earlier = _earlier_projections(ctx)
    if earlier is not None:
        name, (key, save, r, first_in, first_out) = earlier
        for field, mine, theirs in (("projection_prng_key", rule.projection_prng_key, key),
                                    ("save_projection", rule.save_projection, save), ("r", rule.r, r)):
            if mine != theirs:
                raise RuleError(f"VeRA: adapter {ctx.adapter_name!r} has {field}={mine!r}, but the first VeRA adapter "
                                f"{name!r} has {theirs!r}; PEFT shares the first adapter's projections with every "
                                f"later one, so they must agree. Give {field}={theirs!r}, or adapt another copy of "
                                "the base model.")
        if max_in > first_in or max_out > first_out:
            raise RuleError(f"VeRA: adapter {ctx.adapter_name!r} adapts linears up to {max_in} -> {max_out}, but the "
                            f"projections of the first VeRA adapter {name!r} are sized {first_in} -> {first_out} "
                            "(PEFT shares them). Add the larger adapter first, or narrow the targets.")
        made = (key, save, r, first_in, first_out)
    key, save, r, size_in, size_out = made
    device = ctx.base_model.get_parameter(sites[0].weight_fqn).device
    module = ctx.site(PROJECTIONS, PROJECTION_KIND, lambda: VeraProjections(
        key, r, size_in, size_out, save, base_dtype, device, adapter_dtype(base_dtype)))
    return module


def _insert_branch(ctx: RewriteContext, site: LinearSite, node: fx.Node, inputs: dict[str, fx.Node],
                   vectors: VeraVectors) -> None:
    """``y`` becomes ``(y + lambda_b * linear(lambda_d * linear(dropout(x.to(vera)), A_s), B_s)).to(y.dtype)``."""
    graph = ctx.program.graph
    call = graph.call_function
    path = site.path
    x = site.input_of(node)
    vera_dtype = vectors.vera_lambda_d.dtype
    stack = node.meta.get("nn_module_stack")
    node = ctx.site_output(node)  # after the adapters already at this site: they compose in adapter order
    readers = set(node.users)
    with graph.inserting_before(node.next):
        h = x
        if x.meta["val"].dtype != vera_dtype:
            h = ctx.tag(call(aten.to.dtype, (h, vera_dtype)), path, "input")
        if vectors.dropout > 0:
            h = ctx.tag(call(dropout, (h, vectors.dropout, True, next_draw())), path, "input")
        h = ctx.rows_on(h, path)
        a = ctx.tag(call(aten.slice.Tensor, (inputs["vera_A"], 1, 0, site.in_features)), path, "vera_A")
        b = ctx.tag(call(aten.slice.Tensor, (inputs["vera_B"], 0, 0, site.out_features)), path, "vera_B")
        t = ctx.tag(call(aten.linear.default, (h, a)), path, "vera_A")
        t = ctx.tag(call(aten.mul.Tensor, (inputs["vera_lambda_d"], t)), path, "lambda_d")
        u = ctx.tag(call(aten.linear.default, (t, b)), path, "vera_B")
        delta = ctx.rows_on(ctx.tag(call(aten.mul.Tensor, (inputs["vera_lambda_b"], u)), path, "lambda_b"), path)
        total = ctx.tag(call(aten.add.Tensor, (node, delta)), path, tags.JOIN)
    rejoin(ctx, path, node, total, readers, vera_dtype, stack)



def _rewrite(rule: VeRA, ctx: RewriteContext) -> None:
    if sum(isinstance(other, VeRA) for other in ctx.adapter.rules) > 1:
        raise RuleError(f"VeRA: adapter {ctx.adapter_name!r} has more than one VeRA rule; PEFT's VeraConfig is one per "
                        "adapter (one set of projections). Put the targets in one rule.")
    sites = _sites(rule, ctx)
    base_dtype = ctx.base_model.get_parameter(sites[0].weight_fqn).dtype
    shared = _shared_projections(rule, ctx, sites, base_dtype)
    inputs = {name: _input(ctx, PROJECTIONS, PROJECTION_KIND, name) for name in ("vera_A", "vera_B")}
    inputs["vera_A"].meta[_META] = (shared.key, shared.save_projection, shared.r, shared.max_in, shared.max_out)
    for site in sites:
        weight = ctx.base_model.get_parameter(site.weight_fqn)
        vectors = ctx.site(site.path, KIND, lambda: VeraVectors(site.path, site, rule, shared.r, weight.dtype,
                                                                weight.device, adapter_dtype(weight.dtype)))
        vectors.projections = [shared]
        site_inputs = dict(inputs, **{name: ctx.adapter_input(site.path, KIND, name)
                                      for name in ("vera_lambda_d", "vera_lambda_b")})
        for node in site.nodes:
            _insert_branch(ctx, site, node, site_inputs, vectors)
    train_biases(rule, ctx, {site.path for site in sites}, trained_whole(ctx))


# -- the method -------------------------------------------------------------------------------------------------
class VeraMethod(Method):
    """VeRA: a gated branch of shared frozen random projections scaled by two trained vectors per linear."""

    rule_type = VeRA
    tag = KIND
    codec = VeraCodec()
    key_form = "<module>.vera_lambda_b / vera_lambda_d (and base_model.vera_A / vera_B)"
    site_kind = "a linear module"

    def rewrite(self, rule: VeRA, ctx: RewriteContext) -> None:
        _rewrite(rule, ctx)

    def key_part(self, key: str) -> KeyPart | None:
        match = _VECTOR_KEY.match(key)
        if match:
            return KeyPart(match["path"], match["part"], 0 if match["part"] == "vera_lambda_d" else None)
        match = PROJECTION_KEY.match(key)
        if match:  # vera_A [r, max_in], vera_B [max_out, r]: both must have the rank r
            return KeyPart(PROJECTIONS, match["part"], 0 if match["part"] == "vera_A" else 1)
        return None

    def describe_site(self, path: str, ctx: RewriteContext) -> str | None:
        if path == PROJECTIONS:
            return "the adapter's shared projections"
        site = ctx.linear_sites.get(path)
        return f"a linear {site.in_features} -> {site.out_features}" if site is not None else None

    def allowed_sites(self, rule: VeRA, ctx: RewriteContext) -> dict[str, VeRA]:
        """The linears a declared VeRA rule selects, its projections, and the biases its ``bias`` trains."""
        wanted = resolved(rule, ctx.base_model)
        allowed = {site.path: wanted for site in ctx.select_linear(wanted) if wanted.selects_layer(site.path)}
        if rule.bias != "none":
            for source in ctx.program.sources:
                if source.kind == "parameter" and source.target.rpartition(".")[2] == "bias" and \
                        (rule.bias == "all" or source.target.rpartition(".")[0] in allowed):
                    allowed.setdefault(source.target, wanted)
        allowed[PROJECTIONS] = wanted
        return allowed

    def policy_findings(self, site, allowed, given, declared, state) -> list:
        """Vectors only where allowed, of rank at most the rule's ``r``; projections that are what the key makes and
        the key the rule states; bias copies only under a rule stating that bias."""
        if isinstance(site, ParameterCopy):
            if allowed is None or "bias" not in given or allowed.bias != declared.bias:
                return [f"the adapter trains this bias (bias={declared.bias!r}), which the rules do not allow."]
            return []
        if isinstance(site, VeraProjections):
            found = []
            if allowed is not None and "projection_prng_key" in given and allowed.projection_prng_key != site.key:
                found.append(f"the adapter's projection_prng_key is {site.key}; the rules say "
                             f"{allowed.projection_prng_key}.")
            differs = site.differences(state) if site.save_projection else []
            if differs:
                found.append(f"the file's {differs} are not what projection_prng_key={site.key} makes (PEFT loads "
                             "them as they are): the adapter's projections were replaced.")
            return found
        if not isinstance(site, VeraVectors):
            return []
        if allowed is None:
            return ["the adapter puts VeRA on this module, which no rule allows."]
        if site.r > allowed.r:
            return [(f"VeRA rank {site.r} exceeds the rules' r={allowed.r}.", {"rank": site.r, "allowed": allowed.r})]
        return []


register_method(VeraMethod())
