"""Sites: the places in a captured graph where a rule can apply, found from the graph itself.

A *linear site* is a module whose weight ``W`` (a 2-D parameter) computes ``x @ W^T`` in one of the
forms the captured graphs hold (one line each; see CAPTURE-FACTS)::

    aten.linear(x, W, b?)                 nn.Linear and most families
    aten.addmm(b, x, W)       W: [in, out] transformers' Conv1D (gpt2)
    aten.matmul(x, T(W)) / mm(x, T(W))    falcon's FalconLinear, and hand-written x @ W.T
    fxpeft.quantized_linear(x, W, b?, ...)  bitsandbytes Linear8bitLt / Linear4bit (fxpeft/quantized.py)

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

from fxpeft.graph.program import Program
from fxpeft.ops.quantized import QUANTIZED_LINEAR

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
    form: str  # "linear", "addmm", "matmul" or "quantized"
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
    scores: fx.Node | None = None  # eager form: the ``q @ k`` node
    softmax: fx.Node | None = None  # eager form: the softmax between scores and the mix with values


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
    if node.target is QUANTIZED_LINEAR:
        return _match_quantized(program, node)
    return None


# -- quantized linears (fxpeft/quantized.py): one op node per layer, its path and sizes in the arguments ----
def _match_quantized(program: Program, node: fx.Node):
    source = program.source_of(node.args[1]) if isinstance(node.args[1], fx.Node) else None
    weight = source.target if source is not None and source.kind == "parameter" else f"{node.args[4]}.weight"
    return ("quantized", weight, node.args[2])


def _quantized_site(program: Program, node: fx.Node, bias_node) -> LinearSite:
    path, in_features, out_features = node.args[4], node.args[5], node.args[6]
    bias_source = program.source_of(bias_node) if isinstance(bias_node, fx.Node) else None
    bias_fqn = bias_source.target if bias_source is not None and bias_source.kind == "parameter" else None
    weight_fqn = _match_quantized(program, node)[1]
    return LinearSite(path, weight_fqn, int(in_features), int(out_features), "quantized", bias_fqn=bias_fqn)


def find_linear_sites(program: Program) -> dict[str, LinearSite]:
    """Every linear site in the program, keyed by module path, in graph order."""
    sites: dict[str, LinearSite] = {}
    for node in program.graph.nodes:
        match = _match_linear(program, node)
        if match is None:
            continue
        form, weight_fqn, bias_node = match
        if form == "quantized":
            sites.setdefault(node.args[4], _quantized_site(program, node, bias_node)).nodes.append(node)
            continue
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


# Ops allowed between an attention's scores matmul, its softmax and the matmul with the values: casts,
# scaling, masking, dropout and reshapes. Anything else (another matmul, a norm, an activation) ends the chain.
_SCORE_CHAIN_OPS = {
    aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten._to_copy.default,
    aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar,
    aten.view.default, aten.reshape.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
}
_SCORE_OPS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_MIX_OPS = {aten.matmul.default, aten.bmm.default}
_CHAIN_DEPTH = 12


def _scores_before(softmax: fx.Node) -> fx.Node | None:
    """The one scores matmul that feeds ``softmax`` through masking/scaling/cast ops, else None.

    Every tensor input is followed (a mask may be added on either side, ``where`` puts the scores second),
    so the search is over a small tree; the mask's own branch ends at the first op outside the chain.
    """
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    frontier = [source for source in softmax.all_input_nodes if _is_tensor(source)]
    for _ in range(_CHAIN_DEPTH):
        following = []
        for node in frontier:
            if node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if node.target in _SCORE_OPS:
                found.add(node)
            elif node.target in _SCORE_CHAIN_OPS:
                following += [source for source in node.all_input_nodes if _is_tensor(source)]
        frontier = following
    return found.pop() if len(found) == 1 else None


def _mix_after(softmax: fx.Node) -> fx.Node | None:
    """The matmul that multiplies ``softmax``'s probabilities (its first operand) with the values, else None.

    Only tensor-valued users count: export adds ``_assert_tensor_metadata`` checks beside casts.
    """
    current = softmax
    for _ in range(_CHAIN_DEPTH):
        users = [user for user in current.users if _is_tensor(user)]
        if len(users) != 1 or users[0].op != "call_function":
            return None
        previous, current = current, users[0]
        if current.target in _MIX_OPS:
            return current if current.args[0] is previous else None
        if current.target not in _SCORE_CHAIN_OPS:
            return None
    return None


def find_attention_ops(program: Program) -> list[AttentionOp]:
    """Every attention op: SDPA nodes, and the eager ``matmul -> softmax -> matmul`` pattern."""
    ops = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            ops.append(AttentionOp(node, node.args[0], node.args[1], node.args[2], "sdpa", module_path_of(node)))
        elif node.target in (aten.softmax.int, aten._softmax.default):
            scores = _scores_before(node)
            mixed = _mix_after(node)
            if scores is None or mixed is None:
                continue
            query, key = (scores.args[1], scores.args[2]) if scores.target is aten.baddbmm.default else scores.args[:2]
            ops.append(AttentionOp(mixed, query, key, mixed.args[1], "eager", module_path_of(node), scores, node))
    return ops


def _is_tensor(node: fx.Node) -> bool:
    """Data flow only: shape queries (``sym_size``) link layers without carrying their values.

    A node whose value is a list or tuple of tensors (``split``, ``chunk``, ``unbind``) carries data too: a
    fused ``qkv`` projection reaches attention through ``split -> getitem`` (gpt2's ``c_attn``)."""
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(item, torch.Tensor) for item in value)
    return isinstance(value, torch.Tensor)


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
