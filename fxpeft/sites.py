"""Sites: the places in a captured graph where a rule can apply, found from the graph itself.

A *linear site* is a module whose weight ``W`` (a 2-D parameter) computes ``x @ W^T`` in one of the
forms the captured graphs hold (one line each; see CAPTURE-FACTS)::

    aten.linear(x, W, b?)                 nn.Linear and most families
    aten.addmm(b, x, W)       W: [in, out] transformers' Conv1D (gpt2)
    aten.matmul(x, T(W)) / mm(x, T(W))    falcon's FalconLinear, and hand-written x @ W.T

An *attention op* is ``scaled_dot_product_attention``, or the eager pattern
``scores = matmul|bmm|baddbmm(q, k) -> ... -> softmax -> ... -> matmul|bmm(probs, v)``.

Roles (``attention.query`` / ``key`` / ``value`` / ``output``) are read from data flow: the linear sites
that reach an attention op's query/key/value input without passing through another linear site, and the
ones that consume its output the same way. No module names are involved.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import torch
import torch.fx as fx

from .program import Program

__all__ = ["LinearSite", "AttentionOp", "find_linear_sites", "find_attention_ops", "role_paths", "output_heads",
           "module_path_of"]

aten = torch.ops.aten
_TRANSPOSES = {aten.numpy_T.default, aten.t.default}


@dataclasses.dataclass
class LinearSite:
    """One linear module of the base model: its module path and the graph nodes that compute it."""

    path: str
    weight_fqn: str
    in_features: int
    out_features: int
    form: str  # "linear", "addmm" or "matmul"
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    bias_fqn: str | None = None

    def input_of(self, node: fx.Node) -> fx.Node:
        """The activation ``x`` of one of this site's nodes."""
        return node.args[1] if self.form == "addmm" else node.args[0]


@dataclasses.dataclass
class AttentionOp:
    """An attention op in the graph: its output node and its query, key and value inputs."""

    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    form: str  # "sdpa" or "eager"
    path: str = ""


def module_path_of(node: fx.Node) -> str:
    """The innermost module path recorded by export for ``node`` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path


def _parameter(program: Program, node) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    source = program.source_of(node)
    if source is None or source.kind != "parameter":
        return None
    value = node.meta.get("val")
    return source.target if value is not None and value.dim() == 2 else None


def _transposed_parameter(program: Program, node) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    is_transpose = node.target in _TRANSPOSES or (
        node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) == [0, 1]) or (
        node.target is aten.permute.default and list(node.args[1]) == [1, 0])
    return _parameter(program, node.args[0]) if is_transpose else None


def _match_linear(program: Program, node: fx.Node):
    """(form, weight fqn, bias node) when ``node`` computes a linear site, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        weight = _parameter(program, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return ("linear", weight, bias) if weight else None
    if node.target is aten.addmm.default:
        weight = _parameter(program, node.args[2])
        return ("addmm", weight, node.args[0]) if weight else None
    if node.target in (aten.matmul.default, aten.mm.default):
        weight = _transposed_parameter(program, node.args[1])
        return ("matmul", weight, None) if weight else None
    return None


def find_linear_sites(program: Program) -> dict[str, LinearSite]:
    """Every linear site in the program, keyed by module path, in graph order."""
    sites: dict[str, LinearSite] = {}
    for node in program.graph.nodes:
        match = _match_linear(program, node)
        if match is None:
            continue
        form, weight_fqn, bias_node = match
        shape = node.args[2 if form == "addmm" else 1].meta["val"].shape if form != "matmul" else \
            node.args[1].args[0].meta["val"].shape
        out_features, in_features = (shape[1], shape[0]) if form == "addmm" else (shape[0], shape[1])
        owner = weight_fqn.rpartition(".")[0]
        recorded = module_path_of(node)
        # Tied weights are lifted under one name; the module path export recorded says which module ran.
        path = recorded if recorded and form == "linear" else owner
        site = sites.get(path)
        if site is None:
            bias_source = program.source_of(bias_node) if isinstance(bias_node, fx.Node) else None
            bias_fqn = bias_source.target if bias_source is not None and bias_source.kind == "parameter" else None
            site = sites[path] = LinearSite(path, weight_fqn, int(in_features), int(out_features), form,
                                            bias_fqn=bias_fqn)
        site.nodes.append(node)
    return sites


def _softmax_chain_end(node: fx.Node, forward: bool, stop) -> fx.Node | None:
    """Follow single-input elementwise/shape ops from a softmax to the matmul on either side of it."""
    passthrough = {aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
                   aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.view.default, aten.reshape.default,
                   aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.contiguous.default, aten.clone.default,
                   aten._to_copy.default, aten.alias.default}
    current = node
    for _ in range(12):
        candidates = list(current.users) if forward else [current.args[0]] if current.args else []
        if len(candidates) != 1 or not isinstance(candidates[0], fx.Node):
            return None
        current = candidates[0]
        if current.op != "call_function":
            return None
        if stop(current):
            return current
        if current.target not in passthrough:
            return None
    return None


def find_attention_ops(program: Program) -> list[AttentionOp]:
    """Every attention op: SDPA nodes, and the eager ``matmul -> softmax -> matmul`` pattern."""
    ops = []
    score_ops = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
    mix_ops = {aten.matmul.default, aten.bmm.default}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            ops.append(AttentionOp(node, node.args[0], node.args[1], node.args[2], "sdpa", module_path_of(node)))
        elif node.target in (aten.softmax.int, aten._softmax.default):
            scores = _softmax_chain_end(node, False, lambda n: n.target in score_ops)
            mixed = _softmax_chain_end(node, True, lambda n: n.target in mix_ops)
            if scores is None or mixed is None:
                continue
            query, key = (scores.args[1], scores.args[2]) if scores.target is aten.baddbmm.default else scores.args[:2]
            ops.append(AttentionOp(mixed, query, key, mixed.args[1], "eager", module_path_of(node)))
    return ops


def _is_tensor(node: fx.Node) -> bool:
    """Data flow only: shape queries (``sym_size``) link layers without carrying their values."""
    return isinstance(node.meta.get("val"), torch.Tensor)


def _reach_back(start: fx.Node, site_of: dict[fx.Node, LinearSite]) -> set[str]:
    """Module paths of the linear sites that feed ``start`` without passing through another site."""
    found: set[str] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node in site_of and node is not start:
            found.add(site_of[node].path)
            continue
        for source in node.all_input_nodes:
            if source not in seen and _is_tensor(source):
                seen.add(source)
                queue.append(source)
    return found


def role_paths(program: Program, sites: dict[str, LinearSite], attention: list[AttentionOp]) -> dict[str, set[str]]:
    """Module paths per role: ``attention.query``, ``attention.key``, ``attention.value``, ``attention.output``."""
    site_of = {node: site for site in sites.values() for node in site.nodes}
    roles: dict[str, set[str]] = {f"attention.{r}": set() for r in ("query", "key", "value", "output")}
    for op in attention:
        roles["attention.query"] |= _reach_back(op.query, site_of)
        roles["attention.key"] |= _reach_back(op.key, site_of)
        roles["attention.value"] |= _reach_back(op.value, site_of)
        roles["attention.output"] |= _forward_sites(op.output, site_of)
    return roles


def _forward_sites(start: fx.Node, site_of: dict[fx.Node, LinearSite]) -> set[str]:
    """Linear sites whose *input* is reached from ``start`` without passing through another site."""
    found: set[str] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in site_of:
                if site_of[user].input_of(user) is node:
                    found.add(site_of[user].path)
                continue
            if user not in seen and _is_tensor(user):
                seen.add(user)
                queue.append(user)
    return found


def output_heads(program: Program, sites: dict[str, LinearSite]) -> set[str]:
    """Linear sites whose result reaches a model output without passing through another linear site."""
    site_of = {node: site for site in sites.values() for node in site.nodes}
    output = next(node for node in program.graph.nodes if node.op == "output")
    return _reach_back(output, site_of)
