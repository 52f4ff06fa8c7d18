"""LoRA's mixed-batch form: one gathered product per site instead of one gated branch per loaded adapter.

A call with ``adapter_names`` gives each batch row exactly one adapter (or none). The graph's LoRA branches are
gated per row, so every loaded adapter's ``B(A(x))`` runs on every row and all but one are multiplied by zero:
N adapters cost N times the adapter work. For those calls (in eval mode) the model runs a graph in which each
site's N branches are one per-row gathered product, as punica/S-LoRA do::

    idx   = argmax(stack(gates), 0)                     the row's adapter (rows with none: coefficient 0)
    A_row = stack(pad(A_i))[idx]    B_row = stack(pad(B_i))[idx]      ranks padded with zeros to the largest
    y     = y + bmm(bmm(x, A_row^T), B_row^T) * (scaling * gate)[idx, row]

The branch's nodes are found by their tags (fxpeft/graph/tags.py: roles ``rows``, ``lora_A``, ``lora_B``,
``row_scale``, ``join``, ``output``), never re-parsed. The graph reads the same inputs as the eval graph (each
adapter's ``A``, ``B``, ``scaling`` and gate), so it is fed the same way; stacking them is a copy of the adapters'
small weights per call. With one adapter per row the sum of the gated branches *is* that row's branch (the others
add exact zeros), so both graphs compute the same values, up to the order a batched product accumulates in. A site
whose nodes do not have that shape keeps its gated branches (still right, only slower), and the log says why.
"""

from __future__ import annotations

import builtins
import dataclasses
import operator

import torch
import torch.fx as fx

from fxpeft import debug
from fxpeft.graph import tags

__all__ = ["gather_branches"]

aten = torch.ops.aten


@dataclasses.dataclass
class _Branch:
    adapter: str
    h: fx.Node  # the branch's input, in the adapter's dtype
    lora_a: fx.Node
    lora_b: fx.Node
    row_scale: fx.Node  # scaling * gate: [batch], the branch's per-row coefficient
    gate: fx.Node
    total: fx.Node  # the join: add(previous, delta)
    out: fx.Node  # ``total`` cast back to the site's dtype (or ``total``)


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
    return _Branch(adapter, h, single["lora_A"].args[1], single["lora_B"].args[1],
                   single["row_scale"], gate, join, single.get(tags.OUTPUT, join))


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


def _gathered(graph: fx.Graph, branches: list[_Branch]) -> fx.Node:
    """The site's output: ``y + (x A_row^T) B_row^T * coefficient``, inserted before the last branch's add."""
    call = graph.call_function
    last, first = branches[-1], branches[0]
    with graph.inserting_before(last.total):
        ranks = [call(aten.sym_size.int, (b.lora_a, 0)) for b in branches]
        rank = call(builtins.max, tuple(ranks))
        pads = [call(operator.sub, (rank, r)) for r in ranks]
        a_all = call(aten.stack.default, ([call(aten.constant_pad_nd.default, (b.lora_a, [0, 0, 0, pad]))
                                           for b, pad in zip(branches, pads)], 0))
        b_all = call(aten.stack.default, ([call(aten.constant_pad_nd.default, (b.lora_b, [0, pad]))
                                           for b, pad in zip(branches, pads)], 0))
        gates = call(aten.stack.default, ([b.gate for b in branches], 0))  # [N, batch]
        coefficients = call(aten.stack.default, ([b.row_scale for b in branches], 0))  # scaling * gate
        index = call(aten.argmax.default, (gates, 0))
        coefficient = call(aten.squeeze.dim, (call(aten.gather.default, (
            coefficients, 0, call(aten.unsqueeze.default, (index, 0)))), 0))
        batch = call(aten.sym_size.int, (first.gate, 0))
        h = first.h
        known = h.meta.get("val") if "val" in h.meta else h.args[0].meta["val"]  # a cast of x has x's shape
        width = call(aten.sym_size.int, (first.lora_a, 1))
        rows = call(aten.reshape.default, (h, [batch, -1, width]))
        a_rows = call(aten.index_select.default, (a_all, 0, index))
        b_rows = call(aten.index_select.default, (b_all, 0, index))
        low = call(aten.bmm.default, (rows, call(aten.transpose.int, (a_rows, 1, 2))))
        delta = call(aten.bmm.default, (low, call(aten.transpose.int, (b_rows, 1, 2))))
        per_row = call(aten.reshape.default, (coefficient, [batch, 1, 1]))
        # Rows with no adapter gather adapter 0's weights with coefficient 0: select them away, since 0 * inf is NaN.
        delta = call(aten.where.ScalarOther, (call(aten.ne.Scalar, (per_row, 0)),
                                              call(aten.mul.Tensor, (delta, per_row)), 0.0))
        sizes = [call(aten.sym_size.int, (h, dim)) for dim in range(known.dim() - 1)]
        delta = call(aten.reshape.default, (delta, sizes + [call(aten.sym_size.int, (first.lora_b, 0))]))
        total = call(aten.add.Tensor, (first.total.args[0], delta))
        out = call(aten.to.dtype, (total, last.out.meta["val"].dtype)) if last.out is not last.total else total
    return out


def gather_branches(graph: fx.Graph, sources: dict, method_tag: str) -> int:
    """Replace, in ``graph`` (a copy of an eval graph), every site's LoRA branches from two or more adapters by one
    gathered product; returns how many sites changed. ``sources`` maps placeholders to their input sources."""
    gates = {source.target: node for node, source in sources.items() if source.kind == "gate"}
    found: dict[str, dict[str, dict[str, list[fx.Node]]]] = {}  # site -> adapter -> role -> nodes
    for node in graph.nodes:
        tag = tags.tag_of(node)
        if tag and tag["method"] == method_tag:
            roles = found.setdefault(tag["site"], {}).setdefault(tag["adapter"], {})
            roles.setdefault(tag.get("role"), []).append(node)
    changed = 0
    for site, adapters in found.items():
        if len(adapters) < 2:
            continue
        branches = [_branch(adapter, roles, gates.get(adapter)) for adapter, roles in adapters.items()]
        reason = next((b for b in branches if isinstance(b, str)), None)
        ordered = _chain(branches) if reason is None else reason
        if isinstance(ordered, str):
            debug.logger.warning("mixed batch: the site %s keeps one gated branch per adapter (%s)", site, ordered)
            debug.count("mixed_batch", method_tag, "kept")
            continue
        ordered[-1].out.replace_all_uses_with(_gathered(graph, ordered))
        debug.count("mixed_batch", method_tag, "gathered")
        changed += 1
    return changed
