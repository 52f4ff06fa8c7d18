"""The graphs for calls that give each batch row one adapter (``adapter_names``), in eval mode and in training.

Every adapter's nodes are gated per row, so the eval graph and the train graph themselves serve such calls: each
row gets its adapter's update and exact zeros from the others (in backward too: no gradient from a row reaches
another adapter). That costs one branch per loaded adapter at every shared site. Where some site has nodes of two
or more adapters of one method, this module asks that method for a cheaper form of its nodes
(``Method.mixed_batch``; the low-rank method gathers each row's two factors into one batched product, which
autograd differentiates per row). The program derives one such copy of its eval graph and one of its train graph
whenever they change, outside any compiled code (``Program.module_for`` only reads them), so new row patterns
recompile nothing. Where no site is shared, nothing is copied and the graph serves mixed batches as it is.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from fxpeft.graph import tags
from fxpeft.methods import methods

__all__ = ["mixed_batch_graph", "shared_sites"]


def shared_sites(graph: fx.Graph) -> dict[str, set[str]]:
    """Per method tag, the sites that hold nodes of two or more adapters of that method."""
    adapters: dict[tuple[str, str], set[str]] = {}
    for node in graph.nodes:
        tag = tags.tag_of(node)
        if tag:
            adapters.setdefault((tag["method"], tag["site"]), set()).add(tag["adapter"])
    shared: dict[str, set[str]] = {}
    for (method, site), names in adapters.items():
        if len(names) > 1:
            shared.setdefault(method, set()).add(site)
    return shared


def mixed_batch_graph(module: fx.GraphModule, sources: list) -> fx.GraphModule | None:
    """A copy of ``module`` (an eval or a train graph; ``sources`` its placeholders' input sources) whose shared
    sites are in their methods' mixed-batch forms; None when no method changed anything (``module`` then serves)."""
    shared = shared_sites(module.graph)
    involved = [method for method in methods() if method.tag in shared]
    if not involved:
        return None  # the common case (one adapter per site): no copy
    graph = copy.deepcopy(module.graph)
    by_node = dict(zip((node for node in graph.nodes if node.op == "placeholder"), sources))
    if not sum(method.mixed_batch(graph, by_node) for method in involved):
        return None
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(module, graph)
