"""Prefix tuning as a graph rewrite: learned keys and values in front of each attention op's own.

PEFT calls the base model with ``past_key_values`` holding the prefix, so the model behaves as if ``n`` tokens
were already cached: every attention op sees ``n + s`` keys, real tokens take positions ``n .. n + s - 1``, and
the attention mask gets ``n`` ones in front. That goes through the model's cache classes, which change from one
transformers release to the next. This pass writes the same computation into the captured graph, without them.

**Keys and values.** At each selected attention op, ``cat(prefix, k)`` and ``cat(prefix, v)`` along the key
axis, with the prefix laid out as the op's keys are (``[b, h, n, d]``, transposed for an eager ``q @ k^T``,
``[b * h, n, d]`` for bloom). Prefixes are stored at the key/value head count and repeated per query group as
the model repeats its keys (grouped-query attention).

**Everything that depends on the sequence length** (positions, the causal mask, T5's relative position bias,
bloom's alibi, OPT's mask-derived positions) is computed in the graph from the sequence size and the attention
mask, never from the token values: call that the *shape machinery*. A cached call computes it for ``n + s``
tokens and keeps the last ``s`` query rows. So the pass copies the machinery, feeds the copy ``s + n`` for the
sequence size and ``cat(ones[b, n], attention_mask)`` for the mask, and where a copy meets the token data slices
it back to the last ``s`` rows: every sequence axis for positions, every axis but the key axis for a mask or
bias that reaches the attention scores (it then covers ``n + s`` keys, the prefix included). No module names,
no per-model code: masks in any form (boolean, additive float, none with ``is_causal``) and any position scheme
follow from the model's own code. The machinery is told apart from the data by data flow: a node is data when
a token input's values reach it (sizes read with ``sym_size`` do not count).

The prefixed sequence is the query sequence of the selected ops: by default the self-attention ops of the
stack that produces the outputs (for an encoder-decoder model, the decoder, as PEFT does; cross-attention is
left alone, as in PEFT).

**Parameters** are PEFT's ``PrefixEncoder``: ``prompt_embeddings`` ``[n, layers * 2 * kv_dim]``, laid out per
layer as key then value, or with ``projection`` an embedding ``[n, kv_dim]`` through ``linear -> tanh ->
linear``; PEFT saves the encoder's *output* under ``prompt_embeddings``, fxpeft also its weights under
``fxpeft.prefix_encoder.`` keys (PEFT ignores them), so training can resume (:class:`PrefixTuningCodec`, PEFT's
``PREFIX_TUNING``; a file without them, PEFT's own, loads as the plain prefix it is, as PEFT reloads it).

**Tags.** Inserted nodes carry ``method="prefix_tuning"`` at the site ``prefix_encoder`` (the one site module),
in these roles::

    mask         the prefixed sequence's attention mask with n ones in front
    shift        the shape machinery recomputed for s + n tokens (``size + n`` and the copied nodes)
    unshift      a slice back to the last s positions where the shifted machinery meets the data
    check        check_positions: the prefix, or a call's error when inputs overrun the position table
    prefix       the prefix viewed per layer ([n, layers * 2, kv_heads, head_dim]) and the batch size
    key, value   a layer's prefix laid out like the op's keys (values) and put in front of them
    causal_mask  the [s, n + s] mask that replaces ``is_causal`` at an SDPA op without a mask
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import CachedTokens, SiteModule, adapter_dtype, init_like_linear
from fxpeft.errors import NoMatchError, UnsupportedError
from fxpeft.formats.peft import bool_field, check_size, int_field
from fxpeft.formats.prompt_learning import VirtualTokenCodec, model_dims, sizes_bound, transformer_submodules
from fxpeft.graph.selectors import select_paths
from fxpeft.graph.sites import AttentionOp
from fxpeft.graph.tokens import OPEN_END, check_positions, positions_left, user_inputs
from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import PrefixTuning

__all__ = ["PrefixEncoder", "PrefixTuningCodec", "PrefixTuningMethod", "apply_prefix_tuning", "prefixable_ops"]

aten = torch.ops.aten
_SAVE_PREFIX = "fxpeft.prefix_encoder."
_SITE_PATH = "prefix_encoder"


# -- the site module ----------------------------------------------------------------------------------------
class PrefixEncoder(SiteModule):
    """PEFT's ``PrefixEncoder``: the prefix ``[n, layers * 2 * kv_dim]``, as a table or through a projection."""

    def __init__(self, rule: PrefixTuning, layers: int, token_dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.path = _SITE_PATH
        n, width = rule.num_virtual_tokens, layers * 2 * token_dim
        factory = {"device": device, "dtype": dtype}
        self.projected = rule.projection is not None
        if self.projected:
            hidden = token_dim if rule.projection is True else int(rule.projection)
            self.embedding = nn.Parameter(torch.empty(n, token_dim, **factory))
            self.transform_0_weight = nn.Parameter(torch.empty(hidden, token_dim, **factory))
            self.transform_0_bias = nn.Parameter(torch.empty(hidden, **factory))
            self.transform_2_weight = nn.Parameter(torch.empty(width, hidden, **factory))
            self.transform_2_bias = nn.Parameter(torch.empty(width, **factory))
        else:
            self.embedding = nn.Parameter(torch.empty(n, width, **factory))
        self.count = n
        # How a KV cache's layers read the prefix, set by the pass from the graph (see cached_tokens).
        self.kv_heads, self.head_dim = 0, 0
        self.cache_pairs: list[int] | None = None  # stored (key, value) pair of each cache layer
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's defaults, as PEFT's modules get them: a normal embedding, uniform linears."""
        if self.embedding.device.type == "meta":
            return
        nn.init.normal_(self.embedding)
        if self.projected:
            for index in (0, 2):
                init_like_linear(getattr(self, f"transform_{index}_weight"), getattr(self, f"transform_{index}_bias"))

    @property
    def prefix(self) -> torch.Tensor:
        """``[n, layers * 2 * kv_dim]``: every layer's prefix keys and values."""
        if not self.projected:
            return self.embedding
        hidden = torch.tanh(nn.functional.linear(self.embedding, self.transform_0_weight, self.transform_0_bias))
        return nn.functional.linear(hidden, self.transform_2_weight, self.transform_2_bias)

    def cached_tokens(self) -> CachedTokens:
        """The prefix as a KV cache holds it: per cache layer (the selected attention ops in graph order),
        ``[kv_heads, n, head_dim]`` keys and values, as PEFT's ``get_prompt`` lays them out."""
        if self.cache_pairs is None:
            raise UnsupportedError(
                "PrefixTuning with `targets` on some attention ops cannot be put in a KV cache, whose every layer "
                "holds the same past: generate with a prefix on every self-attention op (no targets), or run the "
                "model without a cache.")
        return CachedTokens(self.count, keys_values=self._keys_values)

    def _keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = self.prefix.view(self.count, -1, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [(pairs[2 * pair], pairs[2 * pair + 1]) for pair in self.cache_pairs]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's ``prompt_embeddings`` (the prefix), and the projection's weights under ``fxpeft.`` keys."""
        state = {"prompt_embeddings": self.prefix}
        if self.projected:
            state[f"{_SAVE_PREFIX}embedding.weight"] = self.embedding
            for index in (0, 2):
                for kind in ("weight", "bias"):
                    state[f"{_SAVE_PREFIX}transform.{index}.{kind}"] = getattr(self, f"transform_{index}_{kind}")
        return state

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The prefix itself, or with a projection its weights (the prefix follows from them)."""
        if not self.projected:
            return super().load_peft_state_dict(state)
        for key, value in self.peft_state_dict().items():  # the projection's weights; the prefix follows
            if key != "prompt_embeddings" and key in state:
                value.copy_(state[key].to(value.device, value.dtype))


# -- which attention ops, and their layout -------------------------------------------------------------------
def _seq_dims(node: fx.Node, symbol) -> list[int]:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return []
    return [i for i, size in enumerate(value.shape) if _same(size, symbol)]


def _same(size, symbol) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr == symbol


def _query_symbol(op: AttentionOp):
    """The sympy symbol of the op's query sequence length (``q`` is ``[..., s, d]``), or None if static."""
    value = op.query.meta.get("val")
    size = value.shape[-2] if isinstance(value, torch.Tensor) and value.dim() >= 2 else None
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _key_axis(op: AttentionOp, symbol) -> int | None:
    dims = _seq_dims(op.key, symbol)
    return dims[-1] - op.key.meta["val"].dim() if len(dims) == 1 else None


def prefixable_ops(ops: list[AttentionOp]) -> list[AttentionOp]:
    """Self-attention ops (queries and keys of one sequence) of the last stack in the graph: the stack that
    produces the outputs. For an encoder-decoder model, the decoder's self-attention, as PEFT prefixes."""
    own = [op for op in ops if _query_symbol(op) is not None and _key_axis(op, _query_symbol(op)) is not None]
    if not own:
        return []
    symbol = _query_symbol(own[-1])
    return [op for op in own if _query_symbol(op) == symbol]


@dataclasses.dataclass
class _Layout:
    layers: int  # PEFT's num_layers: pairs of (key, value) prefixes stored
    heads: int  # key/value heads stored
    head_dim: int
    submodules: int  # PEFT's num_transformer_submodules

    @property
    def token_dim(self) -> int:
        return self.heads * self.head_dim

    def pair_of(self, layer: int) -> int:
        """The stored (key, value) pair layer ``layer`` reads. PEFT doubles the list for encoder-decoder models
        and hands each decoder layer every fourth entry, so layer ``l`` reads pair ``2l mod layers`` there."""
        return (2 * layer) % self.layers if self.submodules == 2 else layer


def _layout(ctx: RewriteContext, ops: list[AttentionOp]) -> _Layout:
    value = ops[0].value.meta["val"]
    head_dim = int(value.shape[-1])
    if getattr(ctx.base_model, "config", None) is not None:
        dims = model_dims(ctx.base_model, key_value=True)
        heads, layers = dims["num_attention_heads"], dims["num_layers"]
        key = ops[0].key.meta["val"]
        if key.dim() == 4 and int(key.shape[1]) < heads:  # multi-query keys the config does not describe (falcon)
            heads = int(key.shape[1])
            dims["token_dim"] = heads * head_dim
        if dims["token_dim"] != heads * head_dim:
            raise UnsupportedError(
                f"PrefixTuning: the config's key/value width ({dims['token_dim']} = {heads} heads) does not match the "
                f"attention ops' head size {head_dim}; PEFT's prefix layout needs heads * head_dim == token_dim.")
        return _Layout(max(layers, len(ops)), heads, head_dim, transformer_submodules(ctx.base_model))
    if value.dim() != 4:
        raise UnsupportedError("PrefixTuning: without a transformers config the attention ops' values must be "
                               "[batch, heads, seq, head_dim] to read the head count from.")
    return _Layout(len(ops), int(value.shape[1]), head_dim, 1)


# -- the shape machinery ------------------------------------------------------------------------------------
def _is_symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat))


def _data_nodes(graph: fx.Graph, data_roots: set[fx.Node]) -> set[fx.Node]:
    """Nodes a token input's *values* reach (size reads excluded)."""
    data = set(data_roots)
    for node in graph.nodes:
        if node in data or node.op != "call_function" or _is_symbolic(node):
            continue
        if any(source in data for source in node.all_input_nodes):
            data.add(node)
    return data


def _shift_machinery(ctx: RewriteContext, symbol, n: int, mask: fx.Node | None, data: set[fx.Node],
                     score_users: set[fx.Node]) -> None:
    """Recompute the shape machinery for ``s + n`` tokens and slice it back where it meets the data (see the
    module docstring)."""
    graph = ctx.program.graph
    shifted: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "placeholder" or node.op == "output" or node in data and not _is_symbolic(node):
            if node is mask:
                with graph.inserting_before(next(x for x in graph.nodes if x.op != "placeholder")):
                    batch = graph.call_function(aten.sym_size.int, (node, 0))
                    ones = graph.call_function(aten.full.default, ([batch, n], 1), {
                        "dtype": node.meta["val"].dtype, "device": node.meta["val"].device})
                    shifted[node] = graph.call_function(aten.cat.default, ([ones, node], 1))
                for new in (batch, ones, shifted[node]):
                    ctx.tag(new, _SITE_PATH, "mask")
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and value.node.expr == symbol:
            with graph.inserting_after(node):
                shifted[node] = graph.call_function(operator.add, (node, n))
            ctx.tag(shifted[node], _SITE_PATH, "shift")
            continue
        if not any(source in shifted for source in node.all_input_nodes):
            continue
        with graph.inserting_after(node):
            copy = graph.node_copy(node, lambda source: shifted.get(source, source))
        copy.meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}
        shifted[node] = ctx.tag(copy, _SITE_PATH, "shift")
    # Where a shifted tensor meets the data, slice it back to the last ``s`` positions.
    for original, copy in shifted.items():
        if original.op == "placeholder" or not isinstance(original.meta.get("val"), torch.Tensor):
            continue
        users = [user for user in original.users if user in data or user.op == "output"]
        if not users:
            continue
        dims = _seq_dims(original, symbol)
        for user in users:
            keep = dims[-1:] if user in score_users else []
            sliced = copy
            with graph.inserting_before(user):
                for dim in dims:
                    if dim not in keep:
                        sliced = ctx.tag(graph.call_function(aten.slice.Tensor, (sliced, dim, n, OPEN_END)),
                                         _SITE_PATH, "unshift")
            user.replace_input_with(original, sliced)


def _score_users(op: AttentionOp) -> set[fx.Node]:
    """Nodes where a mask or bias joins the op's attention scores: the SDPA node, or (eager form) the nodes
    between the ``q @ k`` product and the softmax, the product included (bloom's ``baddbmm`` adds alibi)."""
    if op.form == "sdpa":
        return {op.output}
    between, frontier = {op.scores}, [op.scores]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user is not op.softmax and user not in between and _reaches(user, op.softmax):
                between.add(user)
                frontier.append(user)
    return between


def _reaches(node: fx.Node, target: fx.Node, depth: int = 12) -> bool:
    frontier = [node]
    for _ in range(depth):
        if target in frontier:
            return True
        frontier = [user for current in frontier for user in current.users]
    return target in frontier


# -- keys and values ------------------------------------------------------------------------------------------
def _prefix_like(graph: fx.Graph, rows: fx.Node, tensor: fx.Node, axis: int, layout: _Layout, batch: fx.Node,
                 query_heads: int, n: int) -> fx.Node:
    """``rows`` ([n, kv_heads, head_dim]) laid out like ``tensor``'s keys or values, ``axis`` its key axis."""
    call = graph.call_function
    value = tensor.meta["val"]
    heads = call(aten.permute.default, (rows, [1, 0, 2]))  # [kv_heads, n, d]
    if query_heads != layout.heads:
        heads = call(aten.repeat_interleave.self_int, (heads, query_heads // layout.heads, 0))
    d = layout.head_dim
    if value.dim() == 4:
        laid = call(aten.expand.default, (call(aten.unsqueeze.default, (heads, 0)), [batch, query_heads, n, d]))
    elif value.dim() == 3:
        laid = call(aten.reshape.default, (call(aten.expand.default, (
            call(aten.unsqueeze.default, (heads, 0)), [batch, query_heads, n, d])), [-1, n, d]))
    else:
        raise UnsupportedError(f"PrefixTuning: attention keys of rank {value.dim()} are not supported.")
    if axis == -1:
        laid = call(aten.transpose.int, (laid, -1, -2))
    return call(aten.to.dtype, (laid, value.dtype))


def _query_heads(op: AttentionOp, ctx: RewriteContext, layout: _Layout) -> int:
    value = op.key.meta["val"]
    if value.dim() == 4:
        return int(value.shape[1])
    return model_dims(ctx.base_model)["num_attention_heads"] if getattr(ctx.base_model, "config", None) is not None \
        else layout.heads


def _causal_mask(graph: fx.Graph, sdpa: fx.Node, n: int) -> fx.Node:
    """``[s, n + s]`` boolean mask: every query sees the prefix and the tokens up to its own."""
    call = graph.call_function
    query = sdpa.args[0]
    s = call(aten.sym_size.int, (query, query.meta["val"].dim() - 2))
    device = query.meta["val"].device
    rows = call(aten.unsqueeze.default, (call(aten.arange.default, (s,), {"device": device}), 1))
    cols = call(aten.unsqueeze.default, (call(aten.arange.default, (call(operator.add, (s, n)),),
                                                {"device": device}), 0))
    return call(aten.le.Tensor, (cols, call(aten.add.Tensor, (rows, n))))


def _tag_inserted(ctx: RewriteContext, before: set[fx.Node], role: str) -> None:
    """Tag the nodes inserted since ``before`` (the graph's nodes then) in ``role``."""
    for node in set(ctx.program.graph.nodes) - before:
        ctx.tag(node, _SITE_PATH, role)


def _extend_keys(ctx: RewriteContext, op: AttentionOp, per_layer: fx.Node, layer: int, layout: _Layout, n: int,
                 symbol, batch: fx.Node) -> None:
    """``cat(prefix, k)`` and ``cat(prefix, v)`` at one op; ``per_layer`` is the prefix as
    ``[n, layers * 2, kv_heads, head_dim]``."""
    graph = ctx.program.graph
    call = graph.call_function
    axis = _key_axis(op, symbol)
    value_axis = _seq_dims(op.value, symbol)
    if axis is None or len(value_axis) != 1:
        raise UnsupportedError(f"PrefixTuning: cannot find the key axis of the attention op at {op.path or '<root>'}.")
    pair = layout.pair_of(layer)
    heads = _query_heads(op, ctx, layout)
    reads_keys = op.scores if op.form == "eager" else op.output

    def extended(source: fx.Node, user: fx.Node, offset: int, axis: int, role: str) -> None:
        before = set(graph.nodes)
        with graph.inserting_before(user):
            rows = call(aten.select.int, (per_layer, 1, 2 * pair + offset))
            joined = call(aten.cat.default, ([_prefix_like(graph, rows, source, axis, layout, batch, heads, n),
                                              source], axis))
        user.replace_input_with(source, joined)
        _tag_inserted(ctx, before, role)

    extended(op.key, reads_keys, 0, axis, "key")
    extended(op.value, op.output, 1, value_axis[0] - op.value.meta["val"].dim(), "value")
    if op.form == "sdpa":
        mask = op.output.args[3] if len(op.output.args) > 3 else op.output.kwargs.get("attn_mask")
        causal = op.output.args[5] if len(op.output.args) > 5 else op.output.kwargs.get("is_causal", False)
        if mask is None and causal:
            before = set(graph.nodes)
            with graph.inserting_before(op.output):
                mask = _causal_mask(graph, op.output, n)
            _tag_inserted(ctx, before, "causal_mask")
            args = list(op.output.args) + [None] * max(0, 6 - len(op.output.args))
            args[3], args[5] = mask, False
            op.output.args = tuple(args)
            op.output.kwargs = {k: v for k, v in op.output.kwargs.items() if k not in ("attn_mask", "is_causal")}


# -- the pass -------------------------------------------------------------------------------------------------
def _prefixed_mask(ctx: RewriteContext, symbol) -> fx.Node | None:
    """The attention-mask input of the prefixed sequence (``attention_mask``, or ``decoder_attention_mask`` for
    an encoder-decoder model's decoder), if the call has one."""
    inputs = user_inputs(ctx.program)
    for name in ("attention_mask", "decoder_attention_mask"):
        node = inputs.get(name)
        value = node.meta.get("val") if node is not None else None
        if isinstance(value, torch.Tensor) and value.dim() == 2 and _same(value.shape[1], symbol):
            return node
    return None


def apply_prefix_tuning(rule: PrefixTuning, ctx: RewriteContext) -> None:
    """Put ``rule.num_virtual_tokens`` learned keys and values in front of every selected attention op's.

    A graph captured with a KV cache is left alone: there the prefix is the cache's first ``n`` positions
    (:meth:`PrefixEncoder.cached_tokens`, put there by fxpeft/runtime/virtual_tokens.py), as in PEFT."""
    if ctx.program.reads_cache:
        return
    if not ctx.attention_ops:
        raise NoMatchError("PrefixTuning: the captured graph has no attention op (no scaled_dot_product_attention "
                           "and no matmul -> softmax -> matmul pattern), so there is nothing to put a prefix in "
                           "front of. Use LoRA or PromptTuning for this model.")
    default = prefixable_ops(ctx.attention_ops)
    if not default:
        raise NoMatchError("PrefixTuning: none of the graph's attention ops attends over its own (dynamic-length) "
                           "sequence, so none can take a prefix.")
    ops = default
    if rule.targets is not None:
        by_path = {op.path: op for op in default}
        paths = select_paths(rule.targets, None, list(by_path), what="self-attention op", rule="PrefixTuning",
                             get_module=ctx.get_module)
        ops = [by_path[path] for path in paths]
    ctx.adapter.selected[rule] = [op.path for op in ops]
    layers = {id(op): index for index, op in enumerate(default)}
    layout = _layout(ctx, default)
    n = rule.num_virtual_tokens
    symbol = _query_symbol(default[-1])
    program, graph = ctx.program, ctx.program.graph
    limit = positions_left(program, rule)

    device = ops[0].value.meta["val"].device
    dtype = adapter_dtype(ops[0].value.meta["val"].dtype)
    site = ctx.site(_SITE_PATH, "prefix", lambda: PrefixEncoder(rule, layout.layers, layout.token_dim, device, dtype))
    site.kv_heads, site.head_dim = layout.heads, layout.head_dim
    site.cache_pairs = [layout.pair_of(layer) for layer in range(len(default))] if len(ops) == len(default) else None
    prefix = ctx.adapter_input(_SITE_PATH, "prefix", "prefix")

    inputs = user_inputs(program)
    mask = _prefixed_mask(ctx, symbol)
    data_roots = {node for node in inputs.values() if node is not mask}
    data = _data_nodes(graph, data_roots | {prefix})
    score_users = set().union(*(_score_users(op) for op in ops))
    _shift_machinery(ctx, symbol, n, mask, data, score_users)

    first = next(node for node in graph.nodes if node.op != "placeholder")
    carrier = next(node for node in inputs.values() if isinstance(node.meta.get("val"), torch.Tensor))
    with graph.inserting_before(first):
        batch = ctx.tag(graph.call_function(aten.sym_size.int, (carrier, 0)), _SITE_PATH, "prefix")
        sequence = next((node for node in inputs.values() if _seq_dims(node, symbol)), None)
        if limit is not None and sequence is not None:
            prefix = ctx.tag(graph.call_function(check_positions, (prefix, sequence, _seq_dims(sequence, symbol)[0],
                                                                   limit, n)), _SITE_PATH, "check")
        per_layer = ctx.tag(graph.call_function(aten.view.default, (prefix, [n, layout.layers * 2, layout.heads,
                                                                             layout.head_dim])), _SITE_PATH, "prefix")
    for op in ops:
        _extend_keys(ctx, op, per_layer, layers[id(op)], layout, n, symbol, batch)


class PrefixTuningCodec(VirtualTokenCodec):
    """``peft_type`` PREFIX_TUNING (PEFT's ``PrefixTuningConfig``): the projection, and the key/value heads' sizes
    as the model dims.

    PEFT saves the projection's output only, and reloads that as a plain prefix; fxpeft's own files keep the
    projection's weights (``fxpeft.prefix_encoder.`` keys), so training resumes through it. A file without them
    is read as a plain prefix. ``targets`` are not recorded (PEFT's config has no field for them)."""

    peft_types = ("PREFIX_TUNING",)
    key_value_dims = True

    def method_fields(self, rule: PrefixTuning, common: dict[str, Any]) -> dict[str, Any]:
        """``prefix_projection`` and ``encoder_hidden_size`` (the key/value width unless the rule gives one)."""
        projection = rule.projection
        default_width = projection is None or projection is True
        return {"prefix_projection": projection is not None,
                "encoder_hidden_size": common["token_dim"] if default_width else projection}

    def rule_from_config(self, config: dict[str, Any], num_virtual_tokens: int,
                         saved_keys: set[str] | None) -> PrefixTuning:
        """A :class:`~fxpeft.rules.PrefixTuning` rule, with the projection only where its weights can be loaded."""
        projected = bool_field(config, "prefix_projection", False) and (
            saved_keys is None or any(key.startswith(_SAVE_PREFIX) for key in saved_keys))
        if not projected:
            return PrefixTuning(num_virtual_tokens)
        hidden = int_field(config, "encoder_hidden_size", None) or int_field(config, "token_dim")
        check_size("encoder_hidden_size", hidden, sizes_bound(saved_keys, _SAVE_PREFIX),
                   "the largest dimension of the file's prefix-encoder tensors")
        return PrefixTuning(num_virtual_tokens, projection=hidden)


class PrefixTuningMethod(Method):
    """PrefixTuning: virtual tokens are part of the graph, so they apply to every call and row (not gateable)."""

    rule_type = PrefixTuning
    tag = "prefix_tuning"
    codec = PrefixTuningCodec()
    gateable = False

    def rewrite(self, rule: PrefixTuning, ctx: RewriteContext) -> None:
        """:func:`apply_prefix_tuning`."""
        apply_prefix_tuning(rule, ctx)


register_method(PrefixTuningMethod())
