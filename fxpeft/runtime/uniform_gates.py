"""The graph for calls in which every row uses the same adapters: no per-row gating.

A rewritten graph gates each adapter per batch row (``RewriteContext.gated``/``rows_on``: a ``where`` that keeps the
rows whose gate is on), so that switching, disabling and mixing adapters changes tensors, never the graph, and a
compiled model recompiles nothing. Eager calls pay for that in kernels: each site runs a few small ops and two
row selects more than PEFT's ``y + B(A(x)) * scaling``. When a call has no ``adapter_names``, every row uses the same
adapters, and which ones is known in Python (``AdaptedModel`` keeps the flags' values beside the flag tensors). For
such eager calls the model runs a twin of its graph specialised to that set of *active* adapters:

- an inactive adapter's nodes are gone: each of its joins (fxpeft/graph/tags.py) is replaced by the base value it
  joins to, its outputs by what they cast, and what only they read is dead code;
- an active adapter's gating nodes are replaced by what they equal when every row is on (``tags.mark_when_on``:
  a row select by its input, ``delta * scaling`` for the scaled select), so LoRA's branch is PEFT's expression.

Nodes without such a form (a method's own gating) stay and read the gate inputs, which are still fed: the twin is
always right, only less lean. The values equal the gated graph's (a select that keeps every row is its input; a
gate of 1 multiplies exactly), up to the sign of a zero where an inactive branch added ``+0.0``. An inactive
adapter's dropout draws nothing (PEFT's inactive adapters draw nothing either).

Under ``torch.compile`` the gated graph runs (Inductor fuses the gating into the branch's kernels, and a switch of
adapters must not recompile); a twin is made once per graph and set of active adapters, outside tracing.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from fxpeft.graph import tags

__all__ = ["uniform_twin"]

aten = torch.ops.aten


def _owner(node: fx.Node, sources: dict) -> str | None:
    """The adapter a node belongs to: its tag's, or for a placeholder the adapter its gate or tensor is of."""
    tag = tags.tag_of(node)
    if tag:
        return tag["adapter"]
    source = sources.get(node.name)
    if source is None:
        return None
    if source.kind == "gate":
        return source.target
    if source.kind == "adapter":
        return source.target[0]
    return None


def _base_operand(join: fx.Node, adapter: str, sources: dict) -> fx.Node | None:
    """The one operand of ``adapter``'s join that is not the adapter's own (the value it joins to), or None."""
    others = [arg for arg in join.all_input_nodes if _owner(arg, sources) != adapter]
    return others[0] if len(others) == 1 else None


def _drop_inactive(graph: fx.Graph, active: frozenset[str], sources: dict) -> None:
    """Replace every join and output of an adapter outside ``active`` by the value it stands for."""
    for node in list(graph.nodes):
        tag = tags.tag_of(node)
        if not tag or tag["adapter"] in active or node.op != "call_function":
            continue
        role = tag.get("role")
        if role == tags.JOIN:
            base = _base_operand(node, tag["adapter"], sources)
        elif role == tags.OUTPUT and node.args and isinstance(node.args[0], fx.Node) \
                and _owner(node.args[0], sources) != tag["adapter"]:  # its join is gone: it casts the base value
            base = node.args[0]
        else:
            continue
        if base is not None:
            node.replace_all_uses_with(base)


def _when_on(graph: fx.Graph, node: fx.Node, form: tuple, nodes: dict[str, fx.Node]) -> fx.Node | None:
    """What ``node`` equals when every row is on: one of its arguments, or a product inserted before ``node``
    (carrying ``node``'s tags); None for a form it cannot build."""
    kind, *operands = form
    if kind == "arg":
        value = node.args[operands[0]]
        return value if isinstance(value, fx.Node) else None
    if kind not in ("scaled", "product") or any(name not in nodes for name in operands):
        return None
    first, second = (nodes[name] for name in operands)
    with graph.inserting_before(node):
        if kind == "scaled":
            second = graph.call_function(aten.reshape.default, (second, [1]))
        product = graph.call_function(aten.mul.Tensor, (first, second))
    for inserted in (second, product) if kind == "scaled" else (product,):
        inserted.meta.update({key: value for key, value in node.meta.items() if key != tags.WHEN_ON})
    return product


def _fold_active(graph: fx.Graph, active: frozenset[str]) -> None:
    """Replace every gating node of an adapter in ``active`` that has a form by what it equals."""
    nodes = {node.name: node for node in graph.nodes}
    for node in list(graph.nodes):
        form = tags.when_on(node)
        tag = tags.tag_of(node) or {}
        if form is None or tag.get("adapter") not in active or not node.users:
            continue
        replacement = _when_on(graph, node, form, nodes)
        if replacement is not None:
            node.replace_all_uses_with(replacement)


def uniform_twin(module: fx.GraphModule, sources: list, active: frozenset[str]) -> fx.GraphModule:
    """A copy of ``module`` (a rewritten graph; ``sources`` its placeholders' input sources, in order) for calls in
    which every row uses exactly the adapters in ``active`` (empty: adapters disabled). Same placeholders, same
    outputs; see the module docstring."""
    graph = copy.deepcopy(module.graph)
    placeholders = [node.name for node in graph.nodes if node.op == "placeholder"]
    by_name = dict(zip(placeholders, sources))
    _drop_inactive(graph, active, by_name)
    _fold_active(graph, active)
    graph.eliminate_dead_code()
    graph.lint()
    twin = fx.GraphModule(module, graph)
    twin.meta = dict(getattr(module, "meta", {}))
    return twin
