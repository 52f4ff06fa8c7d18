"""LoRA's mixed-batch form: one gathered product per site instead of one gated branch per loaded adapter.

A call with ``adapter_names`` gives each batch row exactly one adapter (or none). The graph's LoRA branches are
gated per row, so every loaded adapter's ``B(A(x))`` runs on every row and all but one are multiplied by zero:
N adapters cost N times the adapter work. For those calls (in eval mode and in training) the model runs a graph in
which each site's N branches are one per-row gathered product, as punica/S-LoRA do::

    idx, g = argmax(stack(gates), 0), the gate there    once per graph (per list of adapters): each row's adapter
                                                        and gate (a row with none: adapter 0, gate 0)
    slot   = where(g != 0, idx, N)                      the row's weights; N: an all-zero slot for a row with none
    A_row  = stack(A_i, 0)[slot]  B_row = stack(B_i, 0)[slot]   ranks padded with zeros to the largest
    y      = y + where(g != 0, bmm(bmm(x, A_row^T), B_row^T) * (scaling[idx] * g), 0)

The branch's nodes are found by their tags (fxpeft/graph/tags.py: roles ``rows``, ``lora_A``, ``lora_B``,
``row_scale``, ``join``, ``output``), never re-parsed. The graph reads the same inputs as the graph it is made from
(each adapter's ``A``, ``B``, ``scaling`` and gate), so it is fed the same way; stacking them is a copy of the
adapters' small weights per call (kept copies would go stale unseen: ``param.data.copy_`` changes a weight without
a version bump, and in training they would not be the parameters autograd differentiates). Per site and call that
is three stacks (``A`` and ``B``, each with a zero slot, and the scalings), three row gathers, two batched products
and the select; the gates' stack and argmax are shared by the sites. With one adapter per row the sum of the gated
branches *is* that row's branch (the others add exact zeros), so both graphs compute the same values, up to the order
a batched product accumulates in. A site whose nodes do not have that shape keeps its gated branches (still right,
only slower), and the log says why.

Training. ``stack`` and ``index_select`` are differentiable: the backward of the row gather adds each row's
gradient into the slot it read, so a row's gradient reaches its own adapter's ``A`` and ``B`` and no other. A row
with no adapter reads the zero slot, never adapter 0's weights: with a non-finite weight there, ``0 * inf`` in
backward would give that adapter (and, through ``x``'s gradient, the row) NaN. An adapter no row uses is gathered
by none, so its gradient is exact zeros even with an Inf in its weights. Dropout (fxpeft/ops/dropout.py): each
adapter's branch drops its input with a dropout node of its own. Where every branch at a site has the same ``p``
(or none), the gathered product drops the input once, with the first branch's node: one mask for all rows, so
each row sees a mask of the same distribution as in the gated graph, but not the same mask (the draws differ).
Where the branches' ``p`` differ the site keeps its gated branches, and the log (at INFO) says why.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxpeft import debug
from fxpeft.graph import tags
from fxpeft.ops.dropout import dropout

__all__ = ["gather_branches", "stack_ranks"]

aten = torch.ops.aten


@dataclasses.dataclass
class _Branch:
    adapter: str
    h: fx.Node  # the branch's input, in the adapter's dtype (dropped, in a train graph with dropout)
    lora_a: fx.Node
    lora_b: fx.Node
    row_scale: fx.Node  # scaling * gate: [batch], the branch's per-row coefficient
    gate: fx.Node
    total: fx.Node  # the join: add(previous, delta)
    out: fx.Node  # ``total`` cast back to the site's dtype (or ``total``)
    dropout: float = 0.0  # the ``p`` of the branch's dropout node (``h``), 0 where it has none


def _branch(adapter: str, roles: dict[str, list[fx.Node]], gate: fx.Node | None) -> _Branch | str:
    """One adapter's branch at a site from its tagged nodes, or the reason it is not one."""
    single = {role: nodes[0] for role, nodes in roles.items() if len(nodes) == 1}
    missing = [role for role in ("lora_A", "lora_B", "row_scale", tags.JOIN) if role not in single]
    if missing or gate is None:
        return f"adapter {adapter!r} has no single {missing or 'gate input'} node"
    join = single[tags.JOIN]
    h = single["lora_A"].args[0]
    if tags.role_of(h) == "rows":  # the input in this adapter's rows only (RewriteContext.rows_on): every row here
        h = h.args[1]  # view_as(kept, value)
    p = h.args[1] if h.op == "call_function" and h.target is dropout else 0.0  # train graph: dropout(x, p, ...)
    return _Branch(adapter, h, single["lora_A"].args[1], single["lora_B"].args[1],
                   single["row_scale"], gate, join, single.get(tags.OUTPUT, join), p)


def _dropout_differs(branches: list[_Branch]) -> str | None:
    """Why the branches cannot share one dropped input (their dropout ``p`` differ), or None where they can."""
    if len({branch.dropout for branch in branches}) == 1:
        return None
    return f"the adapters' dropout differs ({', '.join(f'{b.adapter}: {b.dropout}' for b in branches)})"


def _chain(branches: list[_Branch]) -> list[_Branch] | str:
    """The branches in the order they add up (``y + d1``, then ``+ d2``...), or the reason they do not chain."""
    outs = {branch.out for branch in branches}
    first = [b for b in branches if b.total.args[0] not in outs]
    if len(first) != 1:
        return f"{len(first)} branches add to a base value (expected one)"
    ordered = [first[0]]
    while len(ordered) < len(branches):
        following = [b for b in branches if b.total.args[0] is ordered[-1].out]
        if len(following) != 1:
            return f"after adapter {ordered[-1].adapter!r} come {len(following)} branches (expected one)"
        ordered.append(following[0])
    return ordered


def stack_ranks(tensors: list[torch.Tensor], rank_dim: int) -> torch.Tensor:
    """``stack(tensors)``, each tensor first padded with zeros at the end of ``rank_dim`` to the largest size there
    (adapters of different ranks); equal ranks, the common case, are stacked as they are. The graph does not carry
    the adapters' shapes (their inputs are fed at call time), so the choice is made here, per call, from the sizes:
    a few integer comparisons, traced once under torch.compile (the sizes are the parameters' own, fixed)."""
    ranks = [tensor.shape[rank_dim] for tensor in tensors]
    rank = max(ranks)
    if min(ranks) == rank:
        return torch.stack(tensors)
    pads = [[0, 0] * (tensor.dim() - 1 - rank_dim) + [0, rank - size] for tensor, size in zip(tensors, ranks)]
    return torch.stack([torch.nn.functional.pad(tensor, pad) if pad[-1] else tensor
                        for tensor, pad in zip(tensors, pads)])


@dataclasses.dataclass(frozen=True)
class _RowChoice:
    """Per row, which of a site's adapters it uses, computed once per graph for each list of gates (every site with
    the same adapters in the same order shares it): ``index`` (the adapter's position in the list; 0 for a row with
    none), ``slot`` (where its weights are stacked: ``index``, or the list's length, the zero slot, for a row with
    none), ``gate`` (its gate value; 0 for a row with none), ``on`` (``gate != 0`` as ``[batch, 1, 1]``) and
    ``batch`` (the number of rows)."""

    index: fx.Node
    slot: fx.Node
    gate: fx.Node
    on: fx.Node
    batch: fx.Node


def _row_choice(graph: fx.Graph, gates: tuple[fx.Node, ...]) -> _RowChoice:
    """The nodes of :class:`_RowChoice`, inserted before the graph's first computation (the gates are inputs)."""
    call = graph.call_function
    first = next(node for node in graph.nodes if node.op != "placeholder")
    with graph.inserting_before(first):
        stacked = call(aten.stack.default, (list(gates), 0))  # [N, batch]
        index = call(aten.argmax.default, (stacked, 0))
        gate = call(aten.squeeze.dim, (call(aten.gather.default, (
            stacked, 0, call(aten.unsqueeze.default, (index, 0)))), 0))
        batch = call(aten.sym_size.int, (gates[0], 0))
        used = call(aten.ne.Scalar, (gate, 0))
        slot = call(aten.where.ScalarOther, (used, index, len(gates)))
        on = call(aten.reshape.default, (used, [batch, 1, 1]))
    return _RowChoice(index, slot, gate, on, batch)


def _width(h: fx.Node, lora_a: fx.Node, graph: fx.Graph) -> int | fx.Node:
    """The branch input's last size: from the value metadata of ``h`` or of what it was made from (a cast, a dropout:
    inserted nodes carry none, and keep the last size), else read from ``A`` at run time."""
    node = h
    while "val" not in node.meta and node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    known = node.meta.get("val")
    if known is not None and isinstance(known.shape[-1], int):
        return known.shape[-1]
    return graph.call_function(aten.sym_size.int, (lora_a, 1))


def _scaling_and_gate(branch: _Branch) -> tuple[fx.Node, fx.Node]:
    """The two operands of a branch's ``row_scale = scaling * gate`` (the gate perhaps cast to the scaling's dtype)."""
    scaling, gate = branch.row_scale.args
    return scaling, gate


def _gathered(graph: fx.Graph, branches: list[_Branch], rows: _RowChoice) -> fx.Node:
    """The site's output: ``y + (x A_row^T) B_row^T * coefficient``, inserted before the last branch's add.

    The coefficient of a row is its adapter's ``scaling * gate``, the product the gated branch takes; rows whose
    gate is 0 (no adapter here) read the zero slot and are selected away as well (exact zeros, whatever ``x``)."""
    call = graph.call_function
    last, first = branches[-1], branches[0]
    with graph.inserting_before(last.total):
        zero_a = call(aten.zeros_like.default, (first.lora_a,))  # the slot of rows with no adapter here
        zero_b = call(aten.zeros_like.default, (first.lora_b,))
        a_all = call(stack_ranks, ([b.lora_a for b in branches] + [zero_a], 0))  # [N + 1, r, in]
        b_all = call(stack_ranks, ([b.lora_b for b in branches] + [zero_b], 1))  # [N + 1, out, r]
        scalings = call(aten.stack.default, ([_scaling_and_gate(b)[0] for b in branches], 0))  # [N]
        gate = rows.gate
        cast = _scaling_and_gate(first)[1]
        if cast.op == "call_function" and cast.target is aten.to.dtype:  # the gate in the scaling's dtype
            gate = call(aten.to.dtype, (gate, cast.args[1]))
        coefficient = call(aten.mul.Tensor, (call(aten.index_select.default, (scalings, 0, rows.index)), gate))
        h = first.h  # the branches' inputs are equal (one dropout node, with one mask, in a train graph)
        x_rows = call(aten.reshape.default, (h, [rows.batch, -1, _width(h, first.lora_a, graph)]))
        a_rows = call(aten.index_select.default, (a_all, 0, rows.slot))
        b_rows = call(aten.index_select.default, (b_all, 0, rows.slot))
        low = call(aten.bmm.default, (x_rows, call(aten.transpose.int, (a_rows, 1, 2))))
        delta = call(aten.bmm.default, (low, call(aten.transpose.int, (b_rows, 1, 2))))
        per_row = call(aten.reshape.default, (coefficient, [rows.batch, 1, 1]))
        delta = call(aten.where.ScalarOther, (rows.on, call(aten.mul.Tensor, (delta, per_row)), 0.0))
        base = first.total.args[0]  # y: the value this site's branches add to, shaped as each branch's delta
        total = call(aten.add.Tensor, (base, call(aten.view_as.default, (delta, base))))
        out = call(aten.to.dtype, (total, last.out.meta["val"].dtype)) if last.out is not last.total else total
    return out


def gather_branches(graph: fx.Graph, sources: dict, method_tag: str) -> int:
    """Replace, in ``graph`` (a copy of an eval or a train graph), every site's LoRA branches from two or more
    adapters by one gathered product; returns how many sites changed. ``sources`` maps placeholders to their input
    sources."""
    gates = {source.target: node for node, source in sources.items() if source.kind == "gate"}
    found: dict[str, dict[str, dict[str, list[fx.Node]]]] = {}  # site -> adapter -> role -> nodes
    for node in graph.nodes:
        tag = tags.tag_of(node)
        if tag and tag["method"] == method_tag:
            roles = found.setdefault(tag["site"], {}).setdefault(tag["adapter"], {})
            roles.setdefault(tag.get("role"), []).append(node)
    changed = 0
    choices: dict[tuple[fx.Node, ...], _RowChoice] = {}
    for site, adapters in found.items():
        if len(adapters) < 2:
            continue
        if any(role in roles for roles in adapters.values() for role in ("conv_A", "embedding_A")):  # LoRA on a
            continue  # convolution or embedding (passes/lora/conv.py, embedding.py): its gated branches stay
        if any("magnitude" in roles for roles in adapters.values()):  # a DoRA branch (passes/lora/dora.py): its rows
            debug.count("mixed_batch", method_tag, "kept")  # are never mixed (refused, as in PEFT): gated branches
            continue
        branches = [_branch(adapter, roles, gates.get(adapter)) for adapter, roles in adapters.items()]
        reason = next((b for b in branches if isinstance(b, str)), None)
        ordered = _chain(branches) if reason is None else reason
        if isinstance(ordered, str):
            debug.logger.warning("mixed batch: the site %s keeps one gated branch per adapter (%s)", site, ordered)
            debug.count("mixed_batch", method_tag, "kept")
            continue
        differs = _dropout_differs(ordered)
        if differs:  # a train graph only (an eval graph has no dropout): training such rows mixed stays gated
            debug.logger.info("mixed batch: the site %s keeps one gated branch per adapter in training (%s)", site,
                              differs)
            debug.count("mixed_batch", method_tag, "kept")
            continue
        listed = tuple(branch.gate for branch in ordered)
        if listed not in choices:
            choices[listed] = _row_choice(graph, listed)
        ordered[-1].out.replace_all_uses_with(_gathered(graph, ordered, choices[listed]))
        debug.count("mixed_batch", method_tag, "gathered")
        changed += 1
    return changed
