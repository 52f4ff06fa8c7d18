"""Sites: the places in a captured graph where a rule can apply, found from the graph itself.

A *linear site* is a module whose weight ``W`` (a 2-D parameter) computes ``x @ W^T``; an *attention op* is
``scaled_dot_product_attention`` or the eager ``matmul -> softmax -> matmul`` chain. What they look like in
a graph is written once, as tables, in :mod:`fxpeft.graph.patterns` (``LINEAR_FORMS``, ``ATTENTION_FORMS``);
this module gathers the matches: one :class:`LinearSite` per module (a module called twice has two nodes),
and the :class:`AttentionOp` list. A *convolution site* (:class:`ConvSite`) is a conv op whose weight is a model
parameter, an *embedding site* (:class:`EmbeddingSite`) an ``aten.embedding`` whose weight is one: one per module
path as for linears (the module export recorded running the op, else the weight's owner).

Roles (``attention.query`` / ``key`` / ``value`` / ``output``) are read from data flow: the linear sites
that reach an attention op's query/key/value input without passing through another linear site, and the
ones that consume its output the same way. ``feedforward.output`` is the last linear of every other residual
sublayer: a linear site whose result reaches a *residual add* (an add whose other operand is a value the site's
input is computed from: ``h + f(h)``) without passing through another linear site, and that is no attention
role (the attention output projection ends its sublayer the same way). No module names are involved.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import torch
import torch.fx as fx

from fxpeft.graph.patterns import (
    CONV_OPS,
    EMBEDDING_OPS,
    AttentionOp,
    attention_form_for,
    carries_tensor,
    input_sources,
    linear_form,
    linear_form_for,
    match_attention,
    match_conv,
    match_embedding,
    match_linear,
    module_path_of,
)
from fxpeft.graph.program import Program

__all__ = ["LinearSite", "ConvSite", "EmbeddingSite", "AttentionOp", "find_linear_sites", "find_conv_sites",
           "find_embedding_sites", "find_attention_ops", "role_paths", "output_heads",
           "residual_outputs", "module_path_of"]


@dataclasses.dataclass
class LinearSite:
    """One linear module of the base model: its module path and the graph nodes that compute it."""

    path: str
    weight_fqn: str
    in_features: int
    out_features: int
    form: str  # the name of a row of fxpeft.graph.patterns.LINEAR_FORMS: "linear", "addmm", "matmul", "quantized"
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    bias_fqn: str | None = None

    def input_of(self, node: fx.Node) -> fx.Node:
        """The activation ``x`` of one of this site's nodes (where the site's form puts it)."""
        return linear_form(self.form).input_of(node)


def find_linear_sites(program: Program) -> dict[str, LinearSite]:
    """Every linear site in the program, keyed by module path, in graph order.

    A module whose node appears more than once (called twice, or a tied weight) is one site with several
    nodes; the first node's match gives its weight, sizes and form."""
    sources = input_sources(program)
    sites: dict[str, LinearSite] = {}
    for node in program.graph.nodes:
        if linear_form_for(node) is None:
            continue
        match = match_linear(node, sources)
        if not match:
            continue
        site = sites.get(match.path)
        if site is None:
            site = sites[match.path] = LinearSite(match.path, match.weight_fqn, match.in_features,
                                                  match.out_features, match.form.name, bias_fqn=match.bias_fqn)
        site.nodes.append(node)
    return sites


@dataclasses.dataclass
class ConvSite:
    """One convolution module of the base model: its geometry (read from the graph's conv op) and its nodes.

    ``kernel_size``, ``stride``, ``dilation`` have one entry per spatial dimension (``dims``: 1, 2 or 3);
    ``padding`` likewise, or the string ``"same"``/``"valid"``. The weight is ``[out_channels, in_channels /
    groups, *kernel_size]``. The activation ``x`` (``[batch, in_channels, ...]``) is :meth:`input_of` a node."""

    path: str
    weight_fqn: str
    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    bias_fqn: str | None = None

    @staticmethod
    def input_of(node: fx.Node) -> fx.Node:
        """The activation ``x`` of one of this site's conv nodes (its first argument)."""
        return node.args[0]


@dataclasses.dataclass
class EmbeddingSite:
    """One embedding module of the base model: its weight ``[num_embeddings, embedding_dim]``, the lookup's arguments
    (``padding_idx`` -1 for none) and its nodes. :meth:`input_of` a node is the indices it looks up."""

    path: str
    weight_fqn: str
    num_embeddings: int
    embedding_dim: int
    padding_idx: int = -1
    scale_grad_by_freq: bool = False
    sparse: bool = False
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)

    @staticmethod
    def input_of(node: fx.Node) -> fx.Node:
        """The indices of one of this site's embedding nodes."""
        return node.args[1]


def _sites_of(program: Program, ops, match, site_type: type) -> dict:
    """Every site of ``site_type`` in the program: the nodes calling one of ``ops`` that ``match`` accepts, grouped by
    module path in graph order; a site takes its fields from its first node's match (same names)."""
    sources = input_sources(program)
    fields = [field.name for field in dataclasses.fields(site_type) if field.name != "nodes"]
    sites: dict = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        found = match(node, sources)
        if found:
            site = sites.get(found.path)
            if site is None:
                site = sites[found.path] = site_type(**{name: getattr(found, name) for name in fields})
            site.nodes.append(node)
    return sites


def find_conv_sites(program: Program) -> dict[str, ConvSite]:
    """Every convolution site in the program (see :class:`ConvSite`), keyed by module path, in graph order."""
    return _sites_of(program, CONV_OPS, match_conv, ConvSite)


def find_embedding_sites(program: Program) -> dict[str, EmbeddingSite]:
    """Every embedding site in the program (see :class:`EmbeddingSite`), keyed by module path, in graph order."""
    return _sites_of(program, EMBEDDING_OPS, match_embedding, EmbeddingSite)


def find_attention_ops(program: Program) -> list[AttentionOp]:
    """Every attention op, in graph order: SDPA nodes, and the eager ``matmul -> softmax -> matmul`` chain."""
    found = []
    for node in program.graph.nodes:
        if attention_form_for(node) is None:
            continue
        match = match_attention(node)
        if match:
            found.append(match)
    return found


def _nearest_sites(start: fx.Node, site_of: dict[fx.Node, LinearSite], forward: bool = False) -> set[str]:
    """Module paths of the linear sites nearest to ``start`` along data flow, without passing through another site:
    backwards, the sites that feed ``start``; forwards, the sites whose *input* ``start`` reaches."""
    found: set[str] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for other in (node.users if forward else node.all_input_nodes):
            if other in site_of:
                if not forward or site_of[other].input_of(other) is node:
                    found.add(site_of[other].path)
            elif other not in seen and carries_tensor(other):
                seen.add(other)
                queue.append(other)
    return found


def role_paths(program: Program, sites: dict[str, LinearSite], attention: list[AttentionOp]) -> dict[str, set[str]]:
    """Module paths per role: ``attention.query``, ``attention.key``, ``attention.value``, ``attention.output``,
    ``feedforward.output`` (the module docstring)."""
    site_of = {node: site for site in sites.values() for node in site.nodes}
    roles: dict[str, set[str]] = {f"attention.{r}": set() for r in ("query", "key", "value", "output")}
    for op in attention:
        roles["attention.query"] |= _nearest_sites(op.query, site_of)
        roles["attention.key"] |= _nearest_sites(op.key, site_of)
        roles["attention.value"] |= _nearest_sites(op.value, site_of)
        roles["attention.output"] |= _nearest_sites(op.output, site_of, forward=True)
    attention_roles = set().union(*roles.values())
    roles["feedforward.output"] = residual_outputs(program, sites) - attention_roles
    return roles


_ADD_OPS = (torch.ops.aten.add.Tensor,)


def _computed_from(source: fx.Node, value: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``value`` is computed from ``source`` (searching back from ``value`` over the nodes after ``source``
    in graph order only, so the search stays within the stretch of graph between them)."""
    start = order[source]
    if order[value] < start:
        return False
    seen = {value}
    stack = [value]
    while stack:
        node = stack.pop()
        if node is source:
            return True
        for other in node.all_input_nodes:
            if other not in seen and order[other] >= start:
                seen.add(other)
                stack.append(other)
    return False


def residual_outputs(program: Program, sites: dict[str, LinearSite]) -> set[str]:
    """Linear sites that end a residual sublayer: their result reaches, without passing through another linear
    site, an add whose other operand the site's input is computed from (``h + f(h)``, the residual connection of a
    transformer's attention and feed-forward sublayers, pre- or post-norm alike)."""
    order = {node: index for index, node in enumerate(program.graph.nodes)}
    site_of = {node: site for site in sites.values() for node in site.nodes}
    found: set[str] = set()
    for site in sites.values():
        for start in site.nodes:
            x = site.input_of(start)
            seen = {start}
            queue = deque([start])
            while queue and site.path not in found:
                node = queue.popleft()
                for user in node.users:
                    if user in seen or user in site_of or not carries_tensor(user):
                        continue
                    seen.add(user)
                    if user.target in _ADD_OPS:
                        others = [arg for arg in user.all_input_nodes if arg is not node]
                        if len(others) == 1 and _computed_from(others[0], x, order):
                            found.add(site.path)
                            break
                    queue.append(user)
    return found


def output_heads(program: Program, sites: dict[str, LinearSite]) -> set[str]:
    """Linear sites whose result reaches a model output without passing through another linear site."""
    site_of = {node: site for site in sites.values() for node in site.nodes}
    output = next(node for node in program.graph.nodes if node.op == "output")
    return _nearest_sites(output, site_of)
