"""Stage 2, graph facts: the token sequence of a captured call, for methods that add virtual tokens.

A method that puts ``n`` virtual tokens in front of a model's own (learned embeddings, or keys and values as a
cache would hold them) needs the same few facts about a captured graph, read from data flow alone (no module
names): the call's inputs by keyword (:func:`user_inputs`), the ``input_ids`` input and the token embedding it
indexes (:func:`find_token_inputs`), the length of a learned position table (:func:`position_limit`), and a
graph node that fails a call clearly when it runs past that table (:func:`check_positions`).

:func:`extend_sequence` is the rewrite every embedding-side method shares: it makes the graph's sequence inputs
``n`` tokens longer where they enter and puts the method's ``[n, d]`` rows in place of the token embeddings at
the new positions (see its docstring). :func:`prepend_virtual_tokens` adds the site module those rows come from.
The nodes they insert are tagged (:mod:`fxpeft.graph.tags`) for the running method, at the token embedding's
module path, in these roles::

    extend      a sequence input made n tokens longer: cat(full([b, n], fill), x), placed per row by a gather
    check       check_positions: the longer input ids, or a call's error when they overrun the position table
    prompt      the method's rows as [b, n, d] in the embeddings' dtype
    splice      the nodes that put those rows in front of (or in place of the first n) token embeddings
    embeddings  the spliced embeddings [b, n + s, d]: what every user of the token embedding now reads
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx
from torch import nn

from fxpeft.errors import NoMatchError, RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.patterns import view_chain
from fxpeft.graph.program import Program

if TYPE_CHECKING:  # annotations only: the rewrite stage uses these helpers, not the other way round
    from fxpeft.adapters import SiteModule
    from fxpeft.rewrite import RewriteContext

__all__ = ["OPEN_END", "TokenInputs", "user_inputs", "find_token_inputs", "position_limit", "positions_left",
           "check_positions", "is_encoder_decoder", "extend_sequence", "prepend_virtual_tokens"]

aten = torch.ops.aten
OPEN_END = 9223372036854775807  # ``aten.slice``'s open end, as export writes it
# Ops a position index goes through from ``arange`` or a position buffer to a learned position table. Bucketed
# relative positions (t5: abs, log, where) and gathered token types (bert) leave this set, so they do not count.
_POSITION_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.add.Tensor, aten.add.Scalar,
                 aten.sub.Tensor, aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default, aten.view.default,
                 aten.reshape.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                 aten.contiguous.default, aten.clone.default}
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)


# -- finding the token inputs -----------------------------------------------------------------------------
@dataclasses.dataclass
class TokenInputs:
    """The graph's token-sequence inputs: ``input_ids`` and the token embedding it feeds, plus the
    sequence-aligned inputs that travel with it (``attention_mask``, ``token_type_ids``, ``labels``...)."""

    ids: fx.Node
    embedding: fx.Node
    weight_fqn: str
    inputs: dict[str, fx.Node]  # every user input placeholder by keyword name


def user_inputs(program: Program) -> dict[str, fx.Node]:
    """The call's input placeholders by the keyword argument they are fed from (by node name when the capture
    did not record keywords)."""
    users = [node for node, source in zip(program.placeholders(), program.sources) if source.kind == "user"]
    if len(users) == len(program.kwarg_names):
        return dict(zip(program.kwarg_names, users))
    return {node.name: node for node in users}


def find_token_inputs(program: Program, rule_name: str) -> TokenInputs:
    """The ``input_ids`` input and the one ``aten.embedding`` it indexes (no module names involved); a
    :class:`~fxpeft.errors.NoMatchError` naming ``rule_name`` when there is no such input or not one such op."""
    inputs = user_inputs(program)
    ids = inputs.get("input_ids")
    if ids is None:
        raise NoMatchError(
            f"{rule_name}: the captured call has no `input_ids` (its inputs: {sorted(inputs)}); virtual tokens go in "
            "front of token embeddings, so call the model with input_ids.", candidates=sorted(inputs))
    sources = program.source_map()
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and ids in view_chain(node.args[1]):
            weight = sources.get(getattr(node.args[0], "name", ""))
            if weight is not None and weight.kind == "parameter":
                found.append((node, weight.target))
    if len(found) != 1:
        raise NoMatchError(f"{rule_name}: expected one token embedding indexed by input_ids in the graph, found "
                           f"{len(found)} ({[fqn for _, fqn in found]}).", candidates=[fqn for _, fqn in found])
    node, fqn = found[0]
    return TokenInputs(ids, node, fqn, inputs)


# -- the position table ---------------------------------------------------------------------------------------
def position_limit(program: Program) -> int | None:
    """Rows of the model's learned position table (None for rotary or relative positions).

    A learned position table is an ``aten.embedding`` whose indices come from ``arange`` or a position buffer
    through index arithmetic only, never from an input's values. Read from the graph as captured (a pass's
    nodes on the position path would hide the table from the next)."""
    sources = program.source_map()
    limits = []
    for node in program.pristine.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        frontier, seen, ok, rooted = [node.args[1]], set(), True, False
        while frontier and ok:
            current = frontier.pop()
            if not isinstance(current, fx.Node) or current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder":
                kind = getattr(sources.get(current.name), "kind", None)
                ok = kind in ("buffer", "constant")
                rooted = rooted or ok
            elif current.op == "call_function" and current.target in _POSITION_OPS:
                rooted = rooted or current.target in _ARANGES
                frontier += [a for a in current.args if isinstance(a, fx.Node) and
                             isinstance(a.meta.get("val"), torch.Tensor)]
            elif current.op == "call_function" and current.target is aten.sym_size.int:
                continue
            else:
                ok = False
        weight = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if ok and rooted and weight is not None:
            limits.append(int(weight.shape[0]))
    return min(limits) if limits else None


def positions_left(program: Program, rule) -> int | None:
    """:func:`position_limit`, checked at transform time: a :class:`~fxpeft.errors.RuleError` when
    ``rule.num_virtual_tokens`` alone fill the table, leaving no room for a single input token."""
    limit = position_limit(program)
    n = rule.num_virtual_tokens
    if limit is not None and n >= limit:
        raise RuleError(f"{type(rule).__name__}: {n} virtual tokens fill the model's position table ({limit} "
                        f"positions), leaving no room for the input; use fewer than {limit} virtual tokens.")
    return limit


def check_positions(passed: torch.Tensor, tokens: torch.Tensor, dim: int, limit: int, virtual: int) -> torch.Tensor:
    """Graph node: ``passed``, unchanged, when ``tokens.shape[dim]`` input tokens after ``virtual`` virtual ones fit
    a position table of ``limit`` rows; otherwise a clear :class:`~fxpeft.errors.RuleError` for the call, not an
    index error deep in torch. Under ``torch.compile`` the test is a guard on the symbolic size."""
    needed = tokens.shape[dim] + virtual
    if needed > limit:
        raise RuleError(
            f"With {virtual} virtual tokens this call needs {needed} positions, but the model's position table has "
            f"{limit}: use inputs of at most {limit - virtual} tokens, or fewer virtual tokens.")
    return passed


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (its config says ``is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


# -- the rewrite ------------------------------------------------------------------------------------------------
def _tag_untagged(ctx: RewriteContext, nodes: set[fx.Node], site: str, role: str) -> None:
    """Tag those of ``nodes`` that have no tag yet (a role given to one node first stays)."""
    for node in nodes:
        if not tags.is_adapter_node(node):
            ctx.tag(node, site, role)


def _placement(graph: fx.Graph, mask: fx.Node, length: fx.Node, n: int) -> fx.Node:
    """[b, n + s] source index into ``cat(head[n], tokens[s])`` for each output position.

    The virtual tokens go right before each row's first real token: after left padding (``p`` leading zeros in
    the mask) that is position ``p``, otherwise 0, where PEFT puts them. So a left-padded row sees its prompt at
    the same distance as the unpadded row does, and rows without left padding are exactly PEFT's layout."""
    call = graph.call_function
    leading = call(aten.eq.Scalar, (call(aten.cumsum.default, (call(aten.ne.Scalar, (mask, 0)), 1)), 0))
    pads = call(aten.sum.dim_IntList, (leading, [1], True))
    where = call(aten.unsqueeze.default, (call(aten.arange.default, (length,), {"device": mask.meta["val"].device}), 0))
    inside = call(aten.where.self, (call(aten.lt.Tensor, (where, call(aten.add.Tensor, (pads, n)))),
                                    call(aten.sub.Tensor, (where, pads)), where))
    return call(aten.where.self, (call(aten.lt.Tensor, (where, pads)), call(aten.add.Tensor, (where, n)), inside))


def extend_sequence(ctx: RewriteContext, rule, tokens: TokenInputs, virtual: Callable[[fx.Graph], fx.Node],
                    site: str, extend_labels: bool) -> None:
    """Make every sequence input ``rule.num_virtual_tokens`` (``n``) tokens longer and put ``virtual(graph)``
    ([n, d], inserted by the caller's callback) in place of the token embeddings at the new positions::

        ids'    = cat(full([b, n], v), input_ids)[order]     every use of input_ids reads ids'
        mask'   = cat(ones([b, n]), attention_mask)[order]   (if the call has a mask)
        types'  = cat(zeros([b, n]), token_type_ids)[order]  (if the call has token types)
        labels' = cat(full([b, n], -100), labels)[order]     (if ``extend_labels``)
        E       = embedding(W, ids')                         the token embedding, found from data flow
        E'      = where(virtual position, prompt, E)         every use of E reads E'

    Everything downstream then sees ``n + s`` tokens, sizes included (they are read with ``sym_size`` from the
    longer inputs), so nothing is specialised to a size. ``order`` (a per-row gather, :func:`_placement`) is the
    identity unless a row is left-padded: then the virtual tokens go right before the row's first real token.
    Without an attention mask the prompt is a plain ``cat`` in front. Inserted nodes are tagged at ``site`` in
    the roles the module docstring lists."""
    program, graph = ctx.program, ctx.program.graph
    name, n = type(rule).__name__, rule.num_virtual_tokens
    if "position_ids" in tokens.inputs:
        raise UnsupportedError(f"{name}: the call passes position_ids; PEFT ignores them for virtual-token methods "
                               "(the model numbers the prompt and tokens itself). Call without position_ids.")
    limit = positions_left(program, rule)
    before = set(graph.nodes)
    call = graph.call_function
    first = next(node for node in graph.nodes if node.op != "placeholder")
    pad = getattr(getattr(ctx.base_model, "config", None), "pad_token_id", None)
    fills = {"input_ids": 1 if pad == 0 else 0, "attention_mask": 1, "token_type_ids": 0}
    if extend_labels:
        fills["labels"] = -100
    present = {key: tokens.inputs.get(key) for key in fills}  # in ``fills`` order: the order nodes are inserted
    extended = {key: node for key, node in present.items() if node is not None and
                isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].dim() == 2}
    mask = extended.get("attention_mask")
    order = None
    replacements = {}
    with graph.inserting_before(first):
        for key, node in extended.items():
            value = node.meta["val"]
            head = call(aten.full.default, ([call(aten.sym_size.int, (node, 0)), n], fills[key]),
                        {"dtype": value.dtype, "device": value.device})
            longer = call(aten.cat.default, ([head, node], 1))
            if mask is not None:
                if order is None:
                    order = _placement(graph, mask, call(aten.sym_size.int, (longer, 1)), n)
                longer = call(aten.gather.default, (longer, 1, order))
            if key == "input_ids" and limit is not None:
                longer = ctx.tag(call(check_positions, (longer, node, 1, limit, n)), site, "check")
            replacements[node] = longer
    inserted = set(graph.nodes) - before
    _tag_untagged(ctx, inserted, site, "extend")
    for node, longer in replacements.items():
        node.replace_all_uses_with(longer, delete_user_cb=lambda user: user not in inserted)
    embedding = tokens.embedding
    extended_nodes = set(graph.nodes)
    with graph.inserting_before(embedding.next):
        batch = call(aten.sym_size.int, (embedding, 0))
        prompt = call(aten.to.dtype, (virtual(graph), embedding.meta["val"].dtype))
        rows = call(aten.expand.default, (call(aten.unsqueeze.default, (prompt, 0)), [batch, -1, -1]))
        _tag_untagged(ctx, set(graph.nodes) - extended_nodes, site, "prompt")
        if order is None:  # no mask, so no padding to place around: PEFT's layout
            joined = call(aten.cat.default, ([rows, call(aten.slice.Tensor, (embedding, 1, n, OPEN_END))], 1))
        else:
            picked = call(aten.unsqueeze.default, (call(aten.clamp.default, (order, None, n - 1)), -1))
            picked = call(aten.expand.default, (picked, [-1, -1, embedding.meta["val"].shape[-1]]))
            is_virtual = call(aten.unsqueeze.default, (call(aten.lt.Scalar, (order, n)), -1))
            joined = call(aten.where.self, (is_virtual, call(aten.gather.default, (rows, 1, picked)), embedding))
    ctx.tag(joined, site, "embeddings")
    inserted = set(graph.nodes) - before
    _tag_untagged(ctx, inserted, site, "splice")
    embedding.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in inserted)


def prepend_virtual_tokens(ctx: RewriteContext, rule, kind: str, attribute: str, rows: int,
                           make_site: Callable[[str, torch.Tensor], SiteModule]) -> None:
    """The embedding-side virtual-token rewrite: a site module at the token embedding's module path
    (``make_site(path, token_table)``, of kind ``kind``) supplies ``attribute``, a tensor of ``rows`` rows whose
    first ``rule.num_virtual_tokens`` go in front of the token embeddings (:func:`extend_sequence`). Labels are
    extended too, except for an encoder-decoder model (its labels are the decoder's).

    A graph captured with a KV cache is left alone: its virtual tokens are in the cache already (or, for an
    encoder-decoder, in the encoder's output), see fxpeft/runtime/virtual_tokens.py."""
    if ctx.program.reads_cache:
        return
    tokens = find_token_inputs(ctx.program, type(rule).__name__)
    table = ctx.base_model.get_parameter(tokens.weight_fqn)
    path = tokens.weight_fqn.rpartition(".")[0]
    ctx.site(path, kind, lambda: make_site(path, table))
    source = ctx.adapter_input(path, kind, attribute)
    n = rule.num_virtual_tokens

    def virtual(graph: fx.Graph) -> fx.Node:
        return graph.call_function(aten.slice.Tensor, (source, 0, 0, n)) if rows != n else source

    extend_sequence(ctx, rule, tokens, virtual, path, extend_labels=not is_encoder_decoder(ctx.base_model))
