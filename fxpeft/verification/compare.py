"""Matching two :class:`~fxpeft.verification.GraphView` s node for node.

The base graph is a fresh capture of the base model (never the adapted model's own copy of it), one per
argument signature the adapted model was captured with. Each graph becomes a view: dead code removed, adapter
nodes taken out, and every base op that read an adapter's join reads the base value again. Then the views are
matched by walking from the placeholders, which are anchored by their source (parameter or buffer name, user
input position): a node matches a base node when op, target and non-node arguments are equal and its inputs
matched, slot for slot. Duplicates are taken in graph order. The walk is linear in the graph's size (a 7B
llama's ~2,200 nodes take well under a second), where a generic isomorphism search (VF2) has no such bound;
the mapping it finds is confirmed edge for edge on the two :mod:`networkx` DiGraphs. Nodes left over are
reported at their roots: an extra op, a replaced op or a missing op; the nodes downstream that differ only
because they read a changed value are counted, not listed.
"""

from __future__ import annotations

import collections
import dataclasses

import networkx as nx

from fxpeft.verification.graph_view import GraphView

__all__ = ["Comparison", "compare_views"]


@dataclasses.dataclass
class Comparison:
    """How ``other`` (adapted, minus adapters) corresponds to ``base``: a node mapping and what is left over."""

    mapping: dict[str, str]
    extra: list[str]
    missing: list[str]
    replaced: list[tuple[str, str]]  # (other node, base node): another op on the same inputs
    rewired: list[tuple[str, str]]   # (other node, base node): the same op on other inputs
    downstream: int                  # nodes that differ only because they read a changed value
    isomorphic: bool


def compare_views(base: GraphView, other: GraphView) -> Comparison:
    """Match ``other`` onto ``base`` node for node (see the module docstring); O(nodes + edges)."""
    index: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in base.names:
        index[(base.local[name], base.inputs[name])].append(name)
    mapping: dict[str, str] = {}
    for name in other.names:
        mapped = tuple(mapping.get(source) for source in other.inputs[name])
        if None in mapped:
            continue
        bucket = index.get((other.local[name], mapped))
        if bucket:
            mapping[name] = bucket.popleft()
    matched = set(mapping.values())
    unmatched_other = [name for name in other.names if name not in mapping]
    unmatched_base = [name for name in base.names if name not in matched]

    # Same op at the same module path, but reading a changed value: a consequence, not a cause.
    similar: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in unmatched_base:
        similar[(base.local[name], base.module[name])].append(name)
    paired: dict[str, str] = {}
    for name in unmatched_other:
        bucket = similar.get((other.local[name], other.module[name]))
        if bucket and not other.local[name].startswith("placeholder"):
            paired[name] = bucket.popleft()
    full = {**mapping, **paired}
    # A pair whose inputs all correspond, but to other nodes than the base op's: the data flow changed here.
    rewired = []
    for name, base_name in paired.items():
        inputs = tuple(full.get(source) for source in other.inputs[name])
        if None not in inputs and inputs != base.inputs[base_name]:
            rewired.append((name, base_name))
    left_base = [name for name in unmatched_base if name not in set(paired.values())]
    by_inputs: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in left_base:
        if not base.local[name].startswith("placeholder"):
            by_inputs[base.inputs[name]].append(name)
    replaced = []
    for name in unmatched_other:
        if name in paired or other.local[name].startswith("placeholder"):
            continue
        bucket = by_inputs.get(tuple(full.get(source, "?") for source in other.inputs[name]))
        if bucket:
            replaced.append((name, bucket.popleft()))
    replaced_other = {pair[0] for pair in replaced}
    replaced_base = {pair[1] for pair in replaced}
    extra = [name for name in unmatched_other if name not in paired and name not in replaced_other]
    missing = [name for name in left_base if name not in replaced_base]
    isomorphic = not unmatched_other and not unmatched_base
    if isomorphic:  # confirm on the networkx graphs: every edge, with its argument slots, maps onto one
        relabeled = nx.relabel_nodes(other.graph, mapping)
        isomorphic = (relabeled.number_of_edges() == base.graph.number_of_edges() and all(
            base.graph.has_edge(u, v) and base.graph[u][v]["slots"] == data["slots"]
            for u, v, data in relabeled.edges(data=True)))
    return Comparison(mapping, extra, missing, replaced, rewired, len(paired) - len(rewired), isomorphic)
