"""Repeated layers as one shared subgraph, so that ``torch.compile`` compiles a transformer layer once.

Opt-in (``AdaptedModel.compile_layers_once``), for compiled calls without autograd: with torch 2.13, Inductor's
backward through a nested compile region that holds ``scaled_dot_product_attention`` gives wrong gradients
with dynamic shapes (aot_eager's are right), so training compiles the flat graph. Measured, first compiled
inference call of a llama-like model (hidden 512, LoRA q/v, cold Inductor cache, 2 CPU cores;
``python -m benchmarks.shared_layers``): 4 layers 41.0 s flat vs 26.2 s shared; 12 layers 64.8 s vs 28.8 s.

A captured graph is flat: layer 0's nodes, then layer 1's, each with its own weight placeholders. This module
finds the *repeated regions* of such a graph and rewrites it so that every layer calls one shared function
wrapped in ``torch.compiler.nested_compile_region``: dynamo then traces, and Inductor compiles, that function
once and stamps it out for the other layers (PyTorch's hierarchical or "regional" compilation). Eager runs
call the same function as plain Python, with the same ops in the same order, so the numbers do not change.

A region is every node whose innermost module (export's ``nn_module_stack``) lies under a numbered child of
a module list (``model.layers.3``, ``encoder.block.0``), plus any node between two of its nodes (so that the
region is convex: nothing outside it both reads from it and feeds it). Regions whose nodes, arguments and
constants match node for node form one group; a group of two or more gets one template graph. A region
that matches no other (T5's first block, which computes the position bias) stays inline.

No architecture table: the only knowledge used is that a module list's children are numbered.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx

__all__ = ["LayerRegion", "layer_regions", "outline_regions", "outlined_module", "region_module",
           "repeated_groups", "repeated_region_count", "share_repeated_layers"]

_NUMBERED = re.compile(r"^((?:[^.]+\.)*?\d+)(?=\.|$)")


@dataclasses.dataclass(frozen=True)
class LayerRegion:
    """One numbered layer of a graph (``key``: its module path, ``model.layers.3``): its ``nodes`` in graph order, its
    ``inputs`` (nodes outside it that it reads, by first use) and its ``outputs`` (its nodes read outside it)."""

    key: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def _region_key(node: fx.Node) -> str | None:
    """``model.layers.3`` for a node inside ``model.layers.3.self_attn.q_proj``; None outside numbered modules."""
    stack = node.meta.get("nn_module_stack")
    if node.op != "call_function" or not stack:
        return None
    path = list(stack.values())[-1][0]
    match = _NUMBERED.match(path) if isinstance(path, str) else None
    return match.group(1) if match else None


def _convex_regions(graph: fx.Graph) -> dict[str, list[fx.Node]] | None:
    """Region key to its nodes (in graph order), each closed under "between two of its nodes"; None when two
    regions overlap that way (the graph is then left flat)."""
    members: dict[str, set[fx.Node]] = {}
    for node in graph.nodes:
        key = _region_key(node)
        if key is not None:
            members.setdefault(key, set()).add(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    owner = {node: key for key, nodes in members.items() for node in nodes}
    for key, nodes in members.items():
        last = max(order[n] for n in nodes)
        # Nodes downstream of the region (within its span: a node after ``last`` cannot feed it).
        downstream: set[fx.Node] = set()
        for node in sorted(nodes, key=order.__getitem__):
            for user in node.users:
                if user not in nodes and order[user] <= last:
                    downstream.add(user)
        frontier = list(downstream)
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user not in nodes and user not in downstream and order[user] <= last:
                    downstream.add(user)
                    frontier.append(user)
        # Of those, the ones that feed the region back are between two of its nodes: they join it.
        feeding = {n for n in downstream if any(u in nodes for u in n.users)}
        frontier = list(feeding)
        between = set(feeding)
        while frontier:
            node = frontier.pop()
            for arg in node.all_input_nodes:
                if arg in downstream and arg not in between:
                    between.add(arg)
                    frontier.append(arg)
        for node in between:
            if owner.get(node, key) != key or node.op != "call_function":
                return None
            owner[node] = key
        nodes |= between
    return {key: sorted(nodes, key=order.__getitem__) for key, nodes in members.items()}


def _schema_returns_alias(node: fx.Node) -> bool:
    """Whether ``node``'s result may be a view of its first argument (its schema says ``Tensor(a)``)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and bool(node.args) and isinstance(node.args[0], fx.Node)


def _writes(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its arguments (an in-place or out= op)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return any(arg.alias_info is not None and arg.alias_info.is_write for arg in target._schema.arguments)


def _alias_base(node: fx.Node, within: set[fx.Node] | None = None) -> fx.Node:
    """The tensor ``node`` may be a view of: up the chain of view ops (staying ``within`` a set, if given)."""
    while _schema_returns_alias(node) and (within is None or node in within):
        node = node.args[0]
    return node


def _aliased_inputs(inputs: list[fx.Node]) -> set[fx.Node]:
    """Inputs that may share memory with an earlier input. A nested compile region refuses aliased inputs, so
    these are passed as copies (in practice: per-layer slices of one prefix tensor)."""
    seen: set[fx.Node] = set()
    aliased = set()
    for node in inputs:
        base = _alias_base(node)
        if base in seen:
            aliased.add(node)
        seen.add(base)
    return aliased


def _aliased_outputs(nodes: list[fx.Node], outputs: list[fx.Node]) -> set[fx.Node]:
    """Outputs that may be views of an input or of an earlier output: the region returns copies of them."""
    inside = set(nodes)
    seen: set[fx.Node] = set()
    aliased = set()
    for node in outputs:
        base = _alias_base(node, inside)
        if base not in inside or base in seen:
            aliased.add(node)
        seen.add(base)
    return aliased


def _interface(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """A region's inputs (nodes outside it that it reads, by first use) and outputs (its nodes read outside)."""
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                inputs.setdefault(arg, None)
    outputs = [node for node in nodes if any(user not in inside for user in node.users)]
    return list(inputs), outputs


def _signature(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
               call_number: Callable[[fx.Node], int | None] | None = None) -> tuple:
    """A region up to renaming: ops, targets, constants, and which local value each argument is. ``call_number(node)``:
    the position of an argument that only tells ``node``'s calls apart (a random op's own number), compared by its
    rank among the region's such numbers rather than by value; None for a node without one."""
    local = {node: ("in", i) for i, node in enumerate(inputs)}
    local.update({node: ("node", i) for i, node in enumerate(nodes)})
    numbered = [(node, call_number(node)) for node in nodes] if call_number is not None else []
    numbers = sorted(node.args[i] for node, i in numbered if i is not None and i < len(node.args))

    def shape(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return local[value]
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(shape(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((k, shape(v)) for k, v in value.items()))
        return ("const", repr(value))

    def arguments(node: fx.Node, position: int | None) -> Any:
        if position is None or position >= len(node.args):
            return shape(node.args)
        args = list(node.args)
        args[position] = ("rank", numbers.index(args[position]))
        return shape(tuple(args))

    positions = dict(numbered)
    body = tuple((node.op, str(node.target), arguments(node, positions.get(node)), shape(node.kwargs))
                 for node in nodes)
    return body, len(inputs), tuple(local[node] for node in outputs)


def repeated_groups(regions: list[LayerRegion], call_number: Callable[[fx.Node], int | None] | None = None
                    ) -> list[list[LayerRegion]]:
    """The groups of two or more of ``regions`` that match node for node (ops, targets, constants, and which local
    value each argument is: :func:`region_module` of any one of them computes every other's outputs from its own
    inputs, in the same order). Regions that match no other are left out. ``call_number``: see :func:`_signature`
    (numbers that only keep calls apart within one graph, such as a dropout node's draw, then do not stop a match)."""
    groups: dict[tuple, list[LayerRegion]] = {}
    for region in regions:
        groups.setdefault(_signature(region.nodes, region.inputs, region.outputs, call_number), []).append(region)
    return [group for group in groups.values() if len(group) > 1]


def region_module(region: LayerRegion, owner: torch.nn.Module, name: str) -> fx.GraphModule:
    """``region``'s nodes as a graph module of their own: one placeholder per input, returning its outputs (those that
    may be views of an input or of an earlier output as copies). ``owner`` is the module the region's graph is in."""
    nodes, inputs, outputs = region.nodes, region.inputs, region.outputs
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    copied = _aliased_outputs(nodes, outputs)
    graph.output(tuple(graph.call_function(torch.ops.aten.clone.default, (env[node],)) if node in copied
                       else env[node] for node in outputs))
    graph.lint()
    return fx.GraphModule(owner, graph, class_name=name)


def _shared_call(template: fx.GraphModule) -> Callable[..., Any]:
    """``template`` as one function marked for ``torch.compile`` to compile once and reuse.

    The marked function is called from a plain one: fx names call targets that live in ``torch.*`` by their
    import path, which the marker's wrapper does not have."""
    marked = torch.compiler.nested_compile_region(lambda *args: template(*args))

    def shared_layer(*args):
        return marked(*args)

    shared_layer.__name__ = shared_layer.__qualname__ = template.__class__.__name__
    return shared_layer


def repeated_region_count(module: fx.GraphModule) -> int:
    """How many calls to shared layer functions ``module``'s graph makes (0: it is flat)."""
    return sum(1 for node in module.graph.nodes if node.op == "call_function" and node.meta.get("fxpeft_shared"))


def _writes_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``node`` writes into a tensor that is not one of ``inside``'s own (an input, or a view of one)."""
    if not _writes(node):
        return False
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        while isinstance(value, fx.Node) and value in inside and (
                _schema_returns_alias(value) or value.target is operator.getitem):
            value = value.args[0]
        if not isinstance(value, fx.Node) or value not in inside:
            return True
    return False


def layer_regions(graph: fx.Graph, local_writes: bool = False) -> list[LayerRegion]:
    """The layer regions of ``graph`` that can be taken out as functions, in graph order: each numbered layer's nodes
    (see the module's docstring), convex, writing into none of its inputs (a region that does, say BatchNorm's
    counters, is left out). A region with an in-place op is left out too, unless ``local_writes`` and every such op
    writes into a tensor the region made itself (T5's first block adds into its position buckets in place). Empty
    when the graph has no numbered layers or two of them cannot be separated."""
    regions = _convex_regions(graph)
    found = []
    for key, nodes in (regions or {}).items():
        inside = set(nodes)
        if any(_writes_outside(node, inside) if local_writes else _writes(node) for node in nodes):
            continue  # a region may not write into its inputs (BatchNorm's counters): it stays inline
        found.append(LayerRegion(key, nodes, *_interface(nodes)))
    return found


def outline_regions(graph: fx.Graph, regions: list[LayerRegion],
                    call: Callable[[fx.Graph, LayerRegion, tuple], fx.Node]) -> fx.Graph:
    """A copy of ``graph`` in which each of ``regions`` (from :func:`layer_regions` of ``graph``) is one node made by
    ``call(new_graph, region, args)``, whose result's items are the region's outputs in order. ``args`` are the
    region's inputs; inputs that may share memory with an earlier input are passed as copies (compiled regions
    refuse aliased inputs). The other nodes are copied as they are, each after what it reads."""
    by_key = {region.key: region for region in regions}
    owner = {node: region.key for region in regions for node in region.nodes}
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    emitted: set[str] = set()

    def emit_region(region: LayerRegion) -> None:
        for node in region.inputs:  # an input defined later in graph order than the region's first node
            if node not in env:
                emit(node)
        copied = _aliased_inputs(region.inputs)
        args = tuple(new.call_function(torch.ops.aten.clone.default, (env[node],)) if node in copied else env[node]
                     for node in region.inputs)
        node_of_call = call(new, region, args)
        for i, node in enumerate(region.outputs):
            item = new.call_function(operator.getitem, (node_of_call, i))
            item.meta = dict(node.meta)
            env[node] = item
        emitted.add(region.key)

    def emit(node: fx.Node) -> None:
        key = owner.get(node)
        if key is not None:
            if key not in emitted:
                emit_region(by_key[key])
            return
        for arg in node.all_input_nodes:
            if arg not in env:
                emit(arg)
        env[node] = new.node_copy(node, env.__getitem__)

    for node in graph.nodes:
        if node not in env and owner.get(node) not in emitted:
            emit(node)
    new.lint()
    return new


def outlined_module(module: fx.GraphModule, graph: fx.Graph, calls: dict[str, torch.nn.Module],
                    drop_dead_code: bool = False) -> fx.GraphModule:
    """The graph module of ``graph`` (from :func:`outline_regions` of ``module``'s graph) whose submodules are
    ``calls`` (the outlined regions, by ``call_module`` target) and whatever ``module``'s own graph read
    (``get_attr``, ``call_module``); ``drop_dead_code``: without what only the outlined regions read."""
    attributes: dict[str, Any] = dict(calls)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in attributes:
            attributes[node.target] = functools.reduce(getattr, node.target.split("."), module)
    result = fx.GraphModule(attributes, graph)
    if drop_dead_code:
        result.graph.eliminate_dead_code()
    result.recompile()
    result.meta = dict(getattr(module, "meta", {}))
    return result


def share_repeated_layers(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` in which repeated layer regions call one shared, compile-once function each.

    Returns ``module`` itself when it has no two matching regions (or its regions cannot be separated), and
    on a torch without ``torch.compiler.nested_compile_region``."""
    if not hasattr(torch.compiler, "nested_compile_region"):
        return module
    groups = repeated_groups(layer_regions(module.graph))
    shared: dict[str, Callable[..., Any]] = {}
    for index, group in enumerate(groups):
        call = _shared_call(region_module(group[0], owner=module, name=f"SharedLayer{index}"))
        for region in group:
            shared[region.key] = call
    if not shared:
        return module

    def shared_call(graph: fx.Graph, region: LayerRegion, args: tuple) -> fx.Node:
        node = graph.create_node("call_function", shared[region.key], args, name=region.key.replace(".", "_"))
        node.meta["fxpeft_shared"] = region.key
        return node

    regions = [region for group in groups for region in group]
    result = fx.GraphModule(module, outline_regions(module.graph, regions, shared_call))
    result.meta = dict(getattr(module, "meta", {}))
    return result
