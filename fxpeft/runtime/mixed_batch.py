"""Mixed-adapter batches in one gathered LoRA product per site, instead of one branch per loaded adapter.

A call with ``adapter_names`` gives each batch row exactly one adapter (or none). The graph's LoRA branches are
gated per row, so every loaded adapter's ``B(A(x))`` runs on every row and all but one are multiplied by zero:
N adapters cost N times the adapter work. For those calls (in eval mode) the model runs this graph instead, the
eval graph with the N branches of each site replaced by one per-row gathered product, as punica/S-LoRA do::

    idx   = argmax(stack(gates), 0)                     the row's adapter (rows with none: coefficient 0)
    A_row = stack(pad(A_i))[idx]    B_row = stack(pad(B_i))[idx]      ranks padded with zeros to the largest
    y     = y + bmm(bmm(x, A_row^T), B_row^T) * (scaling * gate)[idx, row]

The graph reads the same inputs as the eval graph (each adapter's ``A``, ``B``, ``scaling`` and gate), so it is
fed the same way; stacking them is a copy of the adapters' small weights per call. With one adapter per row the
sum of the gated branches *is* that row's branch (the others add exact zeros), so both graphs compute the same
values, up to the order a batched product accumulates in.
"""

from __future__ import annotations

import copy
import dataclasses

import builtins
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from fxpeft.graph.program import InputSource

__all__ = ["route_lora_branches"]

aten = torch.ops.aten


@dataclasses.dataclass
class _Branch:
    adapter: str
    h: fx.Node  # the branch's input, in the adapter's dtype
    lora_a: fx.Node
    lora_b: fx.Node
    row_scale: fx.Node  # scaling * gate: [batch], the branch's per-row coefficient
    gate: fx.Node
    total: fx.Node  # add(previous, delta)
    out: fx.Node  # ``total`` cast back to the site's dtype (or ``total``)


def _source(sources: dict[fx.Node, "InputSource"], node) -> "InputSource | None":
    return sources.get(node) if isinstance(node, fx.Node) else None


def _branches(graph: fx.Graph, sources: dict[fx.Node, InputSource]) -> dict[str, list[_Branch]]:
    """Each site's LoRA branches, in the order they chain (``y + d1``, then ``+ d2``...)."""
    parts: dict[tuple[str, str], dict] = {}
    for node in graph.nodes:
        tag = node.meta.get("fxpeft") or {}
        if tag.get("method") != "lora" or node.op != "call_function":
            continue
        part = parts.setdefault((tag["site"], tag["adapter"]), {"adapter": tag["adapter"], "nodes": []})
        part["nodes"].append(node)
        if node.target is aten.linear.default:
            attribute = getattr(_source(sources, node.args[1]), "target", (None, None, None))[2]
            if attribute == "lora_A":
                part["h"], part["lora_a"] = node.args[0], node.args[1]
            elif attribute == "lora_B":
                part["lora_b"] = node.args[1]
        elif node.target is aten.mul.Tensor and getattr(_source(sources, node.args[0]), "target",
                                                        (None, None, None))[2] == "scaling":
            part["row_scale"] = node
        elif node.target is aten.view_as.default:
            part["delta"] = node
    from fxpeft.graph.program import InputSource  # (program imports this module)

    sites: dict[str, list[_Branch]] = {}
    for (site, adapter), part in parts.items():
        gate = next((n for n in sources if sources[n] == InputSource("gate", adapter)), None)
        delta = part.get("delta")
        total = next((n for n in part["nodes"] if n.target is aten.add.Tensor and delta is not None
                      and n.args[1] is delta), None)
        if None in (gate, total) or not {"h", "lora_a", "lora_b", "row_scale"} <= part.keys():
            return {}  # not the branch shape this module knows: leave the graph alone
        casts = [n for n in total.users if n.target is aten.to.dtype and n in part["nodes"]]
        sites.setdefault(site, []).append(_Branch(adapter, part["h"], part["lora_a"], part["lora_b"],
                                                  part["row_scale"], gate, total, casts[0] if casts else total))
    for site, branches in sites.items():
        outs = {branch.out: branch for branch in branches}
        first = [b for b in branches if b.total.args[0] not in outs]
        if len(first) != 1:
            return {}
        ordered = [first[0]]
        while len(ordered) < len(branches):
            following = [b for b in branches if b.total.args[0] is ordered[-1].out]
            if len(following) != 1:
                return {}
            ordered.append(following[0])
        sites[site] = ordered
    return sites


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
        delta = call(aten.mul.Tensor, (delta, call(aten.reshape.default, (coefficient, [batch, 1, 1]))))
        sizes = [call(aten.sym_size.int, (h, dim)) for dim in range(known.dim() - 1)]
        delta = call(aten.reshape.default, (delta, sizes + [call(aten.sym_size.int, (first.lora_b, 0))]))
        total = call(aten.add.Tensor, (first.total.args[0], delta))
        out = call(aten.to.dtype, (total, last.out.meta["val"].dtype)) if last.out is not last.total else total
    return out


def route_lora_branches(module: fx.GraphModule, sources: list[InputSource]) -> fx.GraphModule | None:
    """A copy of ``module`` (an eval graph) with every site's LoRA branches from two or more adapters replaced by
    one gathered product; None when no site has two (the eval graph then serves mixed batches as it is)."""
    adapters_at: dict[str, set[str]] = {}
    for node in module.graph.nodes:
        tag = node.meta.get("fxpeft") or {}
        if tag.get("method") == "lora":
            adapters_at.setdefault(tag["site"], set()).add(tag["adapter"])
    if all(len(adapters) < 2 for adapters in adapters_at.values()):
        return None  # the common case (one adapter per site): no copy
    graph = copy.deepcopy(module.graph)
    by_node = dict(zip((node for node in graph.nodes if node.op == "placeholder"), sources))
    sites = {site: branches for site, branches in _branches(graph, by_node).items() if len(branches) > 1}
    if not sites:
        return None
    for branches in sites.values():
        out = _gathered(graph, branches)
        branches[-1].out.replace_all_uses_with(out)
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(module, graph)
