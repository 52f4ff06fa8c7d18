"""Graph patterns as data: how a linear layer and an attention op look in a captured graph.

This module is the one place that knows the shapes fxpeft recognises in an exported graph. The forms are
tables, one row and one comment each (tinygrad's rule tables); the matchers read the tables and return either
what they matched or a :class:`NoMatch` that says why not (Inductor's ``FailedMatch``), never a silent None.
Every candidate a matcher looks at is counted and, at DEBUG level, logged (:mod:`fxpeft.debug`)::

    logging.getLogger("fxpeft").setLevel(logging.DEBUG)
    # linear form matmul: aten.matmul at node matmul_3 (in model.layers.0.self_attn): no: second operand is
    #   not a transposed 2-D parameter (it is the transpose of view_5, computed by aten.view)

**Linear forms** (:data:`LINEAR_FORMS`): a linear site is a module whose weight ``W`` computes ``x @ W^T (+ b)``.
A row names the op, the argument positions of ``x``, ``W`` and ``b``, how ``W`` is stored and where the site's
module path comes from. :func:`match_linear` reads a row; :meth:`LinearForm.input_of` gives a node's ``x``.

**Attention forms** (:data:`ATTENTION_FORMS`): ``scaled_dot_product_attention``, or the eager chain
``scores = matmul|bmm|baddbmm(q, k) -> ... -> softmax -> ... -> matmul|bmm(probs, v)``, where ``...`` are ops
of :data:`SCORE_CHAIN_OPS` (casts, scaling, masking, dropout, reshapes). :func:`match_attention` returns an
:class:`AttentionOp`.

**Convolutions and embeddings** (:data:`CONV_OPS`, :data:`EMBEDDING_OPS`): a conv or embedding op whose weight
is a model parameter; :func:`match_conv` / :func:`match_embedding` return the site's geometry.

**Views and casts** (:data:`VIEWS_AND_CASTS`, :func:`view_chain`, :func:`through_views`): the one table of
ops whose result holds its first argument's values (reshaped or cast), and the one walker that follows a value
back through them. Use these wherever a rule says "seen through views and casts".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.fx as fx

from fxpeft import debug
from fxpeft.graph.program import InputSource, Program
from fxpeft.ops.quantized import QUANTIZED_LINEAR

__all__ = [
    "NoMatch", "VIEW_OPS", "CAST_OPS", "VIEWS_AND_CASTS", "view_chain", "through_views", "carries_tensor",
    "TRANSPOSE_OPS", "is_transpose_2d", "module_path_of", "input_sources",
    "LinearForm", "LinearMatch", "LINEAR_FORMS", "OUT_IN", "IN_OUT", "TRANSPOSED", "PACKED",
    "STACK", "WEIGHT", "ARGUMENTS", "linear_form", "linear_form_for", "match_linear",
    "AttentionForm", "AttentionOp", "ATTENTION_FORMS", "SOFTMAX_OPS", "SCORE_OPS", "MIX_OPS", "SCORE_CHAIN_OPS",
    "CHAIN_DEPTH", "attention_form_for", "match_attention",
    "CONV_OPS", "EMBEDDING_OPS", "ConvMatch", "EmbeddingMatch", "match_conv", "match_embedding",
]

aten = torch.ops.aten


# -- views and casts ------------------------------------------------------------------------------------------
VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,  # same values, another shape
    aten.contiguous.default, aten.clone.default, aten.alias.default,      # same values, maybe another layout
})
CAST_OPS = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,           # x.to(dtype), x.float(), ...
    aten.type_as.default,                                                 # x.type_as(y): cast to y's dtype
})
VIEWS_AND_CASTS = VIEW_OPS | CAST_OPS
"""Ops whose result is their first argument's values, reshaped or cast: what "seen through views" crosses."""


def view_chain(value: Any, ops: Collection = VIEWS_AND_CASTS, limit: int = 8) -> list[Any]:
    """``[value, what value is a view or cast of, ..., origin]``: first arguments followed back through ``ops``.

    The walk stops at the first value that is not a call of one of ``ops`` (a placeholder, a computation,
    a constant), which ends the list, or after ``limit`` steps. ``value`` need not be a node. To ask whether
    ``node`` is ``source`` seen through views and casts: ``source in view_chain(node)``.
    """
    chain = [value]
    while len(chain) <= limit and _is_call(chain[-1], ops) and chain[-1].args:
        chain.append(chain[-1].args[0])
    return chain


def through_views(value: Any, ops: Collection = VIEWS_AND_CASTS, limit: int = 8) -> Any:
    """The value ``value`` is a view or cast of (``value`` itself when it is neither): ``view_chain(value)[-1]``."""
    return view_chain(value, ops, limit)[-1]


def carries_tensor(node: fx.Node) -> bool:
    """Whether ``node`` carries tensor data: shape queries (``sym_size``) link layers without their values.

    A node whose value is a list or tuple of tensors (``split``, ``chunk``, ``unbind``) carries data too: a
    fused ``qkv`` projection reaches attention through ``split -> getitem`` (gpt2's ``c_attn``)."""
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(item, torch.Tensor) for item in value)
    return isinstance(value, torch.Tensor)


TRANSPOSE_OPS = frozenset({aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default})


def is_transpose_2d(node: Any) -> bool:
    """Whether ``node`` swaps the two dimensions of a matrix: ``t``, ``.T``, ``transpose(0, 1)``, ``permute(1, 0)``."""
    if not _is_call(node, TRANSPOSE_OPS):
        return False
    if node.target is aten.transpose.int:
        return sorted(dim % 2 for dim in node.args[1:3]) == [0, 1]
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return True


def module_path_of(node: fx.Node) -> str:
    """The innermost module path export recorded for ``node`` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def input_sources(program: Program) -> dict[fx.Node, InputSource]:
    """Placeholder node -> where its value comes from (parameter, buffer, user input...): the matchers' view of
    a program's inputs, built once per search."""
    return dict(zip(program.placeholders(), program.sources))


@dataclasses.dataclass(frozen=True)
class NoMatch:
    """A failed match and its reason. Falsy, so ``if match:`` reads naturally; ``str()`` is the reason."""

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


# -- linear forms ---------------------------------------------------------------------------------------------
OUT_IN = "[out, in]"  # W is a 2-D parameter stored as nn.Linear stores it
IN_OUT = "[in, out]"  # W is a 2-D parameter stored transposed (transformers' Conv1D)
TRANSPOSED = "T([out, in])"  # the argument is a 2-D transpose of a [out, in] parameter
PACKED = "packed"  # W is whatever the layer holds; path and sizes are the op's arguments of those names
STACK = "module stack"  # site path: the module export recorded running the node (tied weights share one name)
WEIGHT = "weight owner"  # site path: the module that owns the weight
ARGUMENTS = "arguments"  # site path: the op's ``path`` argument
_PACKED_ARGUMENTS = ("model", "path", "in_features", "out_features")


@dataclasses.dataclass(frozen=True)
class LinearForm:
    """One way ``y = x @ W^T (+ b)`` appears in a captured graph (a row of :data:`LINEAR_FORMS`).

    ``input``, ``weight`` and ``bias`` are argument positions (``bias`` None: the form carries no bias);
    ``layout`` says how the ``weight`` argument holds ``W``; ``path`` where the site's module path comes
    from. Every other argument of the op must be at its schema default (``addmm``'s ``beta`` and ``alpha``),
    except a :data:`PACKED` form's ``model``, ``path``, ``in_features`` and ``out_features``, which say
    which layer runs."""

    name: str
    ops: tuple
    input: int
    weight: int
    bias: int | None
    layout: str
    path: str

    def input_of(self, node: fx.Node) -> Any:
        """The activation ``x`` of a node of this form."""
        return node.args[self.input]


LINEAR_FORMS: tuple[LinearForm, ...] = (
    #          name         ops                                     x  W  b     W is        site path
    LinearForm("linear",    (aten.linear.default,),                 0, 1, 2,    OUT_IN,     STACK),      # nn.Linear
    LinearForm("addmm",     (aten.addmm.default,),                  1, 2, 0,    IN_OUT,     WEIGHT),     # Conv1D (gpt2)
    LinearForm("matmul",    (aten.matmul.default, aten.mm.default), 0, 1, None, TRANSPOSED, WEIGHT),     # x @ W.T
    LinearForm("quantized", (QUANTIZED_LINEAR,),                    0, 1, 2,    PACKED,     ARGUMENTS),  # bitsandbytes
)  # fmt: skip
"""How a linear module appears in a captured graph, one row per form::

    linear     linear(x, W, b?)                        nn.Linear and most families; tied weights share one W
    addmm      addmm(b, x, W), W stored [in, out]      transformers' Conv1D (gpt2)
    matmul     matmul(x, T(W)) or mm(x, T(W))          falcon's FalconLinear, and hand-written x @ W.T
    quantized  quantized_linear(x, W, b, model, path, in_features, out_features)
                                                       bitsandbytes layers (fxpeft/ops/quantized.py)

An argument a row does not name must be at its schema default (addmm with ``beta=0.5`` is no linear).
"""
_LINEAR_FORM_OF_OP = {op: form for form in LINEAR_FORMS for op in form.ops}
_LINEAR_FORM_NAMED = {form.name: form for form in LINEAR_FORMS}


def linear_form(name: str) -> LinearForm:
    """The row of :data:`LINEAR_FORMS` called ``name`` (a :attr:`LinearSite.form <fxpeft.graph.sites.LinearSite>`)."""
    return _LINEAR_FORM_NAMED[name]


def linear_form_for(node: fx.Node) -> LinearForm | None:
    """The linear form whose op ``node`` calls (a candidate, not yet a match), else None."""
    return _LINEAR_FORM_OF_OP.get(node.target) if node.op == "call_function" else None


@dataclasses.dataclass(frozen=True)
class LinearMatch:
    """A node that computes a linear site: its form, the weight and bias it reads and the sizes of ``W``."""

    form: LinearForm
    node: fx.Node
    path: str
    weight_fqn: str
    in_features: int
    out_features: int
    bias: Any = None  # the bias argument (a node, or None)
    bias_fqn: str | None = None  # the parameter the bias argument reads, if it is one

    @property
    def input(self) -> Any:
        """The activation ``x``."""
        return self.form.input_of(self.node)


def match_linear(node: fx.Node, sources: Mapping[fx.Node, InputSource]) -> LinearMatch | NoMatch:
    """``node`` as a linear site per :data:`LINEAR_FORMS`, or why it is not one.

    ``sources`` is :func:`input_sources` of the program. A node whose op is a form's is a candidate: it is
    counted as ``("linear_form", form, "matched" | "rejected")`` and logged at DEBUG.
    """
    form = linear_form_for(node)
    if form is None:
        return NoMatch(f"{_op_name(node)} is not the op of a linear form")
    result = _match_linear_form(form, node, sources)
    _report("linear_form", form.name, node, result)
    return result


def _match_linear_form(form: LinearForm, node: fx.Node, sources: Mapping[fx.Node, InputSource]
                       ) -> LinearMatch | NoMatch:
    named = {form.input, form.weight, form.bias}
    for position, argument in enumerate(_schema_arguments(node)):
        if position in named or (form.layout == PACKED and argument.name in _PACKED_ARGUMENTS):
            continue
        found = _argument(node, position)
        default = argument.default_value if argument.has_default_value() else None
        if found != default:
            return NoMatch(f"{argument.name}={found!r}, not {default!r}: not a plain linear")
    operand = _argument(node, form.weight)
    bias = _argument(node, form.bias) if form.bias is not None else None
    bias_source = sources.get(bias) if isinstance(bias, fx.Node) else None
    bias_fqn = bias_source.target if bias_source is not None and bias_source.kind == "parameter" else None
    if form.layout == PACKED:
        path = _argument(node, "path")
        source = sources.get(operand) if isinstance(operand, fx.Node) else None
        weight_fqn = source.target if source is not None and source.kind == "parameter" else f"{path}.weight"
        return LinearMatch(form, node, path, weight_fqn, int(_argument(node, "in_features")),
                           int(_argument(node, "out_features")), bias, bias_fqn)
    if form.layout == TRANSPOSED:
        if not is_transpose_2d(operand):
            return NoMatch(f"{_ordinal(form.weight)} operand is not a transposed 2-D parameter "
                           f"(it is {_describe(operand, sources)})")
        weight = operand.args[0]
    else:
        weight = operand
    weight_fqn = _parameter_2d(weight, sources)
    if weight_fqn is None:
        what = "transposed 2-D parameter" if form.layout == TRANSPOSED else "2-D parameter"
        seen = f"the transpose of {_describe(weight, sources)}" if form.layout == TRANSPOSED \
            else _describe(weight, sources)
        return NoMatch(f"{_ordinal(form.weight)} operand is not a {what} (it is {seen})")
    rows, columns = weight.meta["val"].shape
    in_features, out_features = (rows, columns) if form.layout == IN_OUT else (columns, rows)
    owner = weight_fqn.rpartition(".")[0]
    # Tied weights are lifted under one name; the module path export recorded says which module ran.
    path = (module_path_of(node) or owner) if form.path == STACK else owner
    return LinearMatch(form, node, path, weight_fqn, int(in_features), int(out_features), bias, bias_fqn)


# -- convolution and embedding forms --------------------------------------------------------------------------
CONV_OPS = {aten.conv1d.default: 1, aten.conv1d.padding: 1, aten.conv2d.default: 2, aten.conv2d.padding: 2,
            aten.conv3d.default: 3, aten.conv3d.padding: 3, aten.convolution.default: None}
"""Ops that compute ``conv(x, W, b, stride, padding, dilation, groups)`` (nn.Conv1d/2d/3d; ``.padding``: padding
"same"/"valid"), with their spatial dimensions (None: from the weight). A conv site's ``W`` is a parameter."""
EMBEDDING_OPS = frozenset({aten.embedding.default})
"""``embedding(W, indices, padding_idx, scale_grad_by_freq, sparse)``: an embedding site's ``W`` is a 2-D parameter."""


@dataclasses.dataclass(frozen=True)
class ConvMatch:
    """A node that computes a convolution site: the weight and bias it reads and the conv's geometry (each of
    ``kernel_size``, ``stride``, ``dilation`` one entry per spatial dimension; ``padding`` likewise, or the string
    ``"same"``/``"valid"``)."""

    node: fx.Node
    path: str
    weight_fqn: str
    bias_fqn: str | None
    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


@dataclasses.dataclass(frozen=True)
class EmbeddingMatch:
    """A node that computes an embedding site: its 2-D weight ``[num_embeddings, embedding_dim]`` and the lookup's
    arguments (``padding_idx`` -1 for none)."""

    node: fx.Node
    path: str
    weight_fqn: str
    num_embeddings: int
    embedding_dim: int
    padding_idx: int
    scale_grad_by_freq: bool
    sparse: bool


def _per_dim(value: Any, dims: int) -> tuple[int, ...]:
    items = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
    return items * dims if len(items) == 1 and dims > 1 else items


def _site_path(node: fx.Node, weight_fqn: str) -> str:
    """The module export recorded running ``node`` (tied weights share one name), else the weight's owner."""
    return module_path_of(node) or weight_fqn.rpartition(".")[0]


def match_conv(node: fx.Node, sources: Mapping[fx.Node, InputSource]) -> ConvMatch | NoMatch:
    """``node`` as a convolution site (:data:`CONV_OPS`, the weight a parameter, not transposed), or why not."""
    if not _is_call(node, CONV_OPS):
        return NoMatch(f"{_op_name(node)} is not a convolution op")
    weight = _argument(node, "weight")
    source = sources.get(weight) if isinstance(weight, fx.Node) else None
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if source is None or source.kind != "parameter" or val is None or val.dim() < 3:
        result: Any = NoMatch(f"the weight is not a conv parameter (it is {_describe(weight, sources)})")
    elif _argument(node, "transposed"):
        result = NoMatch("a transposed convolution")
    else:
        dims = CONV_OPS[node.target] or val.dim() - 2
        groups = int(_argument(node, "groups") or 1)
        padding = _argument(node, "padding")
        bias = _argument(node, "bias")
        bias_source = sources.get(bias) if isinstance(bias, fx.Node) else None
        result = ConvMatch(
            node, _site_path(node, source.target), source.target,
            bias_source.target if bias_source is not None and bias_source.kind == "parameter" else None,
            dims, int(val.shape[1]) * groups, int(val.shape[0]), tuple(int(k) for k in val.shape[2:]),
            _per_dim(_argument(node, "stride"), dims),
            padding if isinstance(padding, str) else _per_dim(padding, dims),
            _per_dim(_argument(node, "dilation"), dims), groups)
    _report("conv_form", _op_name(node), node, result)
    return result


def match_embedding(node: fx.Node, sources: Mapping[fx.Node, InputSource]) -> EmbeddingMatch | NoMatch:
    """``node`` as an embedding site (:data:`EMBEDDING_OPS`, the weight a 2-D parameter), or why not."""
    if not _is_call(node, EMBEDDING_OPS):
        return NoMatch(f"{_op_name(node)} is not an embedding op")
    weight = node.args[0]
    weight_fqn = _parameter_2d(weight, sources)
    if weight_fqn is None:
        result: Any = NoMatch(f"the weight is not a 2-D parameter (it is {_describe(weight, sources)})")
    else:
        rows, columns = weight.meta["val"].shape
        padding_idx = _argument(node, "padding_idx")
        result = EmbeddingMatch(node, _site_path(node, weight_fqn), weight_fqn, int(rows), int(columns),
                                -1 if padding_idx is None else int(padding_idx),
                                bool(_argument(node, "scale_grad_by_freq")), bool(_argument(node, "sparse")))
    _report("embedding_form", "embedding", node, result)
    return result


# -- attention forms ------------------------------------------------------------------------------------------
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default})
SCORE_OPS = {aten.matmul.default: (0, 1), aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2)}
"""Ops that compute attention scores, with the argument positions of the query and the key."""
MIX_OPS = {aten.matmul.default: (0, 1), aten.bmm.default: (0, 1)}
"""Ops that mix values by the probabilities, with the argument positions of the probabilities and the values."""
SCORE_CHAIN_OPS = VIEWS_AND_CASTS | {
    aten.dropout.default,                                                            # dropout on the probabilities
    aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar,  # scaling, additive masks
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,                                # masking
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,                  # masking (scores second)
}
"""Ops allowed between the scores, the softmax and the mix: anything else (another matmul, a norm, an
activation) ends the chain."""
CHAIN_DEPTH = 12
"""How many ops an eager chain may hold on each side of the softmax."""


@dataclasses.dataclass(frozen=True)
class AttentionForm:
    """One way attention appears in a captured graph (a row of :data:`ATTENTION_FORMS`).

    A match starts at a node calling one of ``anchors``. A one-node form gives the argument positions of
    ``query``, ``key`` and ``value`` (``qkv``); the eager form (``qkv`` None) is read from the anchor, a softmax,
    along :data:`SCORE_CHAIN_OPS` back to a :data:`SCORE_OPS` node and forward to a :data:`MIX_OPS` node."""

    name: str
    anchors: frozenset
    qkv: tuple[int, int, int] | None


ATTENTION_FORMS: tuple[AttentionForm, ...] = (
    AttentionForm("sdpa",  frozenset({aten.scaled_dot_product_attention.default}), (0, 1, 2)),  # sdpa(q, k, v, mask?)
    AttentionForm("eager", SOFTMAX_OPS, None),  # matmul|bmm|baddbmm(q, k) -> ... -> softmax -> ... -> matmul|bmm(p, v)
)  # fmt: skip
_ATTENTION_FORM_OF_OP = {op: form for form in ATTENTION_FORMS for op in form.anchors}


@dataclasses.dataclass
class AttentionOp:
    """An attention op in the graph: its output node and its query, key and value inputs."""

    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    form: str  # a row of ATTENTION_FORMS: "sdpa" or "eager"
    path: str = ""
    scores: fx.Node | None = None  # eager form: the ``q @ k`` node
    softmax: fx.Node | None = None  # eager form: the softmax between scores and the mix with values


def attention_form_for(node: fx.Node) -> AttentionForm | None:
    """The attention form anchored at ``node``'s op (a candidate, not yet a match), else None."""
    return _ATTENTION_FORM_OF_OP.get(node.target) if node.op == "call_function" else None


def match_attention(node: fx.Node) -> AttentionOp | NoMatch:
    """The attention op anchored at ``node`` per :data:`ATTENTION_FORMS`, or why there is none.

    Candidates are counted as ``("attention_form", form, "matched" | "rejected")`` and logged at DEBUG."""
    form = attention_form_for(node)
    if form is None:
        return NoMatch(f"{_op_name(node)} is not an attention form's anchor")
    if form.qkv is not None:
        query, key, value = (_argument(node, position) for position in form.qkv)
        result: AttentionOp | NoMatch = AttentionOp(node, query, key, value, form.name, module_path_of(node))
    else:
        result = _match_eager(form, node)
    _report("attention_form", form.name, node, result)
    return result


def _match_eager(form: AttentionForm, softmax: fx.Node) -> AttentionOp | NoMatch:
    scores = _scores_before(softmax)
    if not scores:
        return scores
    mixed = _mix_after(softmax)
    if not mixed:
        return mixed
    query, key = (_argument(scores, position) for position in SCORE_OPS[scores.target])
    value = _argument(mixed, MIX_OPS[mixed.target][1])
    return AttentionOp(mixed, query, key, value, form.name, module_path_of(softmax), scores, softmax)


def _scores_before(softmax: fx.Node) -> fx.Node | NoMatch:
    """The one scores product that feeds ``softmax`` through :data:`SCORE_CHAIN_OPS`, or why there is none.

    Every tensor input is followed (a mask may be added on either side, ``where`` puts the scores second),
    so the search is over a small tree; the mask's own branch ends at the first op outside the chain.
    """
    found: dict[fx.Node, None] = {}
    seen: set[fx.Node] = set()
    frontier = [source for source in softmax.all_input_nodes if carries_tensor(source)]
    for _ in range(CHAIN_DEPTH):
        following = []
        for node in frontier:
            if node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if node.target in SCORE_OPS:
                found[node] = None
            elif node.target in SCORE_CHAIN_OPS:
                following += [source for source in node.all_input_nodes if carries_tensor(source)]
        frontier = following
    if len(found) == 1:
        return next(iter(found))
    if not found:
        return NoMatch(f"no {_names(SCORE_OPS)} reaches the softmax through casts, scaling and masking "
                       f"within {CHAIN_DEPTH} ops")
    return NoMatch(f"{len(found)} score products reach the softmax ({', '.join(n.name for n in found)}), not one")


def _mix_after(softmax: fx.Node) -> fx.Node | NoMatch:
    """The product that mixes the values by ``softmax``'s probabilities (its first operand), or why there is none.

    Only tensor-valued users count: export adds ``_assert_tensor_metadata`` checks beside casts.
    """
    current = softmax
    for _ in range(CHAIN_DEPTH):
        users = [user for user in current.users if carries_tensor(user)]
        if len(users) != 1:
            return NoMatch(f"{current.name} has {len(users)} tensor users, not one chain to {_names(MIX_OPS)}")
        previous, current = current, users[0]
        if current.target in MIX_OPS:
            if _argument(current, MIX_OPS[current.target][0]) is previous:
                return current
            return NoMatch(f"the probabilities are not the first operand of {current.name} ({_op_name(current)})")
        if current.op != "call_function" or current.target not in SCORE_CHAIN_OPS:
            return NoMatch(f"the probabilities reach {current.name} ({_op_name(current)}) before a "
                           f"{_names(MIX_OPS)} with the values")
    return NoMatch(f"no {_names(MIX_OPS)} within {CHAIN_DEPTH} ops after the softmax")


# -- helpers ----------------------------------------------------------------------------------------------------
def _is_call(value: Any, ops: Collection) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_function" and value.target in ops


def _schema_arguments(node: fx.Node) -> list:
    schema = getattr(node.target, "_schema", None)
    return list(schema.arguments) if schema is not None else []


def _argument(node: fx.Node, key: int | str) -> Any:
    """An argument of ``node`` by position or by schema name, positional or keyword, else its default."""
    arguments = _schema_arguments(node)
    names = [argument.name for argument in arguments]
    position = key if isinstance(key, int) else (names.index(key) if key in names else None)
    if position is not None and position < len(node.args):
        return node.args[position]
    name = key if isinstance(key, str) else (names[key] if key < len(names) else None)
    if name in node.kwargs:
        return node.kwargs[name]
    return _schema_default(node, name) if name is not None else None


def _schema_default(node: fx.Node, name: str) -> Any:
    return next((argument.default_value for argument in _schema_arguments(node)
                 if argument.name == name and argument.has_default_value()), None)


def _parameter_2d(value: Any, sources: Mapping[fx.Node, InputSource]) -> str | None:
    source = sources.get(value) if isinstance(value, fx.Node) else None
    if source is None or source.kind != "parameter":
        return None
    val = value.meta.get("val")
    return source.target if val is not None and val.dim() == 2 else None


def _describe(value: Any, sources: Mapping[fx.Node, InputSource]) -> str:
    """A few words on what ``value`` is, for a NoMatch reason: "2-D buffer x.mask", "view_5, computed by
    aten.view"."""
    if not isinstance(value, fx.Node):
        return f"the constant {value!r}"
    source = sources.get(value)
    if source is None:
        return f"input {value.name}" if value.op == "placeholder" else f"{value.name}, computed by {_op_name(value)}"
    val = value.meta.get("val")
    dims = f"{val.dim()}-D " if isinstance(val, torch.Tensor) else ""
    named = source.target if source.kind in ("parameter", "buffer") and isinstance(source.target, str) else value.name
    return f"{dims}{'input' if source.kind == 'user' else source.kind} {named}"


def _op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "__name__", str(target))
    overload = getattr(target, "_overloadpacket", None)
    if overload is not None:  # aten.matmul.default -> "aten.matmul"
        return f"{target.namespace}.{overload.__name__}"
    return name


def _names(ops: Collection) -> str:
    return "/".join(sorted({op._overloadpacket.__name__ for op in ops}))


def _ordinal(position: int) -> str:
    return ("first", "second", "third", "fourth")[position] if position < 4 else f"argument {position}"


def _report(family: str, form: str, node: fx.Node, result: Any) -> None:
    """Count a candidate and log, at DEBUG, what it matched or why it was rejected."""
    matched = not isinstance(result, NoMatch)
    debug.count(family, form, "matched" if matched else "rejected")
    if not debug.logger.isEnabledFor(logging.DEBUG):
        return
    if not matched:
        detail = f"no: {result.reason}"
    elif isinstance(result, LinearMatch):
        detail = (f"yes: site {result.path}, weight {result.weight_fqn} {result.form.layout}, "
                  f"{result.in_features} -> {result.out_features}")
    elif isinstance(result, (ConvMatch, EmbeddingMatch)):
        detail = f"yes: site {result.path}, weight {result.weight_fqn}"
    else:
        detail = (f"yes: query {result.query.name}, key {result.key.name}, value {result.value.name}, "
                  f"output {result.output.name}")
    debug.logger.debug("%s %s: %s at node %s (in %s): %s", family.replace("_", " "), form, _op_name(node),
                       node.name, module_path_of(node) or "<root>", detail)
