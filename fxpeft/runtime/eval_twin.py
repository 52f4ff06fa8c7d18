"""The eval-mode twin of a train-mode graph: no dropout anywhere, batch norm on its running statistics.

A graph is captured once, in train mode; ``.eval()`` must not capture again. Every op that behaves differently
in training has a row in a table of eval forms, one line each::

    aten.dropout / feature_dropout / alpha_dropout / feature_alpha_dropout   train=False
    aten.scaled_dot_product_attention                                          dropout_p=0.0
    aten.batch_norm                                                            training=False
    aten.add_ on a num_batches_tracked buffer, unused                          dropped (a training-only count)
    fxpeft.ops.dropout.dropout                                                 dropped: the node is its input

Methods add rows for ops of their own (``Method.eval_forms``: op target -> function rewriting the node in
place); the engine never looks at which method inserted a node.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx

from fxpeft.methods import methods
from fxpeft.ops.dropout import dropout as fxpeft_dropout

__all__ = ["eval_twin", "to_eval_mode", "ENGINE_EVAL_FORMS"]

aten = torch.ops.aten


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def _bypass(node: fx.Node) -> None:
    """The node computes nothing in eval mode: its users read its input. (Gone, so that layers stay alike:
    fxpeft's dropout nodes carry per-node draw numbers.)"""
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


ENGINE_EVAL_FORMS: dict[Any, Callable[[fx.Node], None]] = {
    aten.dropout.default: lambda node: _set_arg(node, 2, "train", False),
    aten.feature_dropout.default: lambda node: _set_arg(node, 2, "train", False),
    aten.alpha_dropout.default: lambda node: _set_arg(node, 2, "train", False),
    aten.feature_alpha_dropout.default: lambda node: _set_arg(node, 2, "train", False),
    aten.scaled_dot_product_attention.default: lambda node: _set_arg(node, 4, "dropout_p", 0.0),
    aten.batch_norm.default: lambda node: _set_arg(node, 5, "training", False),
    fxpeft_dropout: _bypass,
}


def _is_batch_count(node: fx.Node, sources: dict) -> bool:
    """BatchNorm's ``num_batches_tracked += 1``: it only happens in training."""
    if node.target is not aten.add_.Tensor or node.users:
        return False
    source = sources.get(getattr(node.args[0], "name", ""))
    return source is not None and source.kind == "buffer" and source.target.endswith("num_batches_tracked")


def to_eval_mode(graph: fx.Graph, sources: dict) -> None:
    """Rewrite ``graph`` (train mode) in place into its eval-mode form; ``sources`` maps placeholder names to their
    input sources (:class:`fxpeft.graph.program.InputSource`)."""
    forms = dict(ENGINE_EVAL_FORMS)
    for method in methods():
        forms.update(method.eval_forms)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in forms:
            forms[node.target](node)
        elif _is_batch_count(node, sources):
            graph.erase_node(node)
    graph.lint()


def eval_twin(module: fx.GraphModule, sources: list) -> fx.GraphModule:
    """A copy of ``module`` in eval mode; ``sources`` are its placeholders' sources, in order."""
    graph = copy.deepcopy(module.graph)
    placeholders = [node.name for node in module.graph.nodes if node.op == "placeholder"]
    to_eval_mode(graph, dict(zip(placeholders, sources)))
    return fx.GraphModule(module, graph)
