"""Inline the grad-mode regions ``torch.export`` wraps as higher-order ops, so ``torch.compile`` takes the graph.

A ``with torch.no_grad():`` block inside a model's forward (transformers' rotary embeddings up to 5.17, for one)
is exported as ``wrap_with_set_grad_enabled(False, submod, *operands)`` calling a nested graph module. Dynamo
refuses that op when an operand is a symbolic size ("wrap_with_set_grad_enabled: unexpected freevars"), which
breaks ``fullgraph=True`` on every dynamic-shape model with such a block. The region is plain ops in between:
this pass copies its body into the enclosing graph and, for a region that disabled grad, ``detach``es what it
returns, which is exactly what grad mode off means for the values leaving it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["inline_grad_regions"]

_SET_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _inline(module: fx.GraphModule, node: fx.Node) -> None:
    graph = module.graph
    enabled, submodule_node, *operands = node.args
    body: fx.GraphModule = getattr(module, submodule_node.target)
    env: dict[fx.Node, object] = {}
    placeholders = [inner for inner in body.graph.nodes if inner.op == "placeholder"]
    env.update(zip(placeholders, operands))
    returned = None
    with graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                returned = inner.args[0]
                break
            if inner.op == "get_attr":  # a constant or a nested region's body: carry it over under a new name
                name = f"{submodule_node.target}_{inner.target}".replace(".", "_")
                setattr(module, name, getattr(body, inner.target))
                env[inner] = graph.get_attr(name)
                continue
            env[inner] = graph.node_copy(inner, lambda arg: env[arg])
        results = fx.map_arg(returned, lambda arg: env[arg])
        if not enabled:
            results = fx.map_arg(results, lambda arg: _detached(graph, arg))
    if isinstance(results, (tuple, list)):
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                graph.erase_node(user)
    else:
        node.replace_all_uses_with(results)
    graph.erase_node(node)


def _detached(graph: fx.Graph, node: fx.Node) -> fx.Node:
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return node
    detached = graph.call_function(torch.ops.aten.detach.default, (node,))
    detached.meta.update(node.meta)
    return detached


def inline_grad_regions(module: fx.GraphModule) -> int:
    """Replace every ``wrap_with_set_grad_enabled`` region of ``module`` by its body; returns how many."""
    if _SET_GRAD is None:
        return 0
    count = 0
    while True:  # a region's body may hold another region: inline until none is left
        regions = [node for node in module.graph.nodes if node.op == "call_function" and node.target is _SET_GRAD]
        if not regions:
            break
        for node in regions:
            _inline(module, node)
            count += 1
    if count:
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.recompile()
    return count
