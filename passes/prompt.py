"""Prompt tuning as a graph rewrite: learned virtual-token embeddings in front of the token embeddings.

PEFT runs the base model as ``model(inputs_embeds=cat(prompt, embed(input_ids)), attention_mask=cat(ones, mask),
labels=cat(-100, labels))``. The captured graph was traced for ``input_ids`` of some length ``s``, and every later
shape in it (position ids, the causal mask, reshapes, the loss) is computed from ``sym_size`` of the sequence
*inputs*. So the pass does not chase those sizes one by one; it makes the graph's sequence inputs ``n`` tokens
longer where they enter, and swaps the prompt in right after the token embedding::

    ids'    = cat(full([b, n], v), input_ids)[order]     every use of input_ids reads ids'
    mask'   = cat(ones([b, n]), attention_mask)[order]   (if the call has a mask)
    types'  = cat(zeros([b, n]), token_type_ids)[order]  (if the call has token types, as PEFT does)
    labels' = cat(full([b, n], -100), labels)[order]     (decoder-only token labels, as PEFT does)
    E       = embedding(W, ids')                         the token embedding, found from data flow
    E'      = where(virtual position, prompt, E)         every use of E reads E'

Everything downstream then sees a sequence of ``n + s`` tokens, exactly what PEFT's ``inputs_embeds`` call
builds: real tokens get positions after the prompt (PEFT's convention) from the model's own position code, the
causal mask covers the prompt, and nothing is specialised to a size (no re-capture, no recompile). The token
embedding is found by data flow alone: the ``aten.embedding`` whose indices come from the ``input_ids`` input.

``order`` (a per-row gather, :func:`_placement`) is the identity unless a row is left-padded: then the prompt
goes right before the row's first real token instead of before its padding. Rows without left padding are
PEFT's layout exactly; a left-padded row gives the same results as the same row unpadded (PEFT's do not: its
prompt sits before the padding, at a distance from the tokens that depends on the pad count). Without an
attention mask there is no padding to see, and the prompt is a plain ``cat`` in front.

Models with a learned position table (gpt2, bert) limit ``n + s``: the pass reads the table's length from the
graph (an embedding indexed by ``arange``/a position buffer, not by any input) and raises
:class:`fxpeft.errors.RuleError` at transform time when the prompt alone fills it, and when a call's inputs
would run past it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import SiteModule
from fxpeft.errors import NoMatchError, RuleError, UnsupportedError
from fxpeft.graph.program import Program
from fxpeft.formats.prompt_learning import PromptLearningCodec
from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.formats.prompt_learning import transformer_submodules
from fxpeft.rules import PromptTuning

__all__ = ["TokenInputs", "find_token_inputs", "extend_sequence", "position_limit", "PromptEmbedding",
           "apply_prompt_tuning", "virtual_dtype", "is_encoder_decoder"]

aten = torch.ops.aten
_MAX = 9223372036854775807  # ``slice``'s open end, as export writes it
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
          aten.alias.default, aten.clone.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


# -- finding the token inputs -----------------------------------------------------------------------------
@dataclasses.dataclass
class TokenInputs:
    """The graph's token-sequence inputs: ``input_ids`` and the token embedding it feeds, plus the
    sequence-aligned inputs that travel with it (``attention_mask``, ``token_type_ids``, ``labels``...)."""

    ids: fx.Node
    embedding: fx.Node
    weight_fqn: str
    inputs: dict[str, fx.Node]  # every user input placeholder by keyword name


def _user_inputs(program: Program) -> dict[str, fx.Node]:
    """User input placeholders by the keyword argument they are fed from."""
    users = [node for node, source in zip(program.placeholders(), program.sources) if source.kind == "user"]
    if len(users) == len(program.kwarg_names):
        return dict(zip(program.kwarg_names, users))
    return {node.name: node for node in users}


def _fed_by(node: Any, source: fx.Node) -> bool:
    """``node`` is ``source`` seen through views, reshapes and casts only."""
    for _ in range(8):
        if node is source:
            return True
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _VIEWS:
            return False
        node = node.args[0]
    return False


def find_token_inputs(program: Program, rule_name: str) -> TokenInputs:
    """The ``input_ids`` input and the ``aten.embedding`` it indexes (no module names involved)."""
    inputs = _user_inputs(program)
    ids = inputs.get("input_ids")
    if ids is None:
        raise NoMatchError(
            f"{rule_name}: the captured call has no `input_ids` (its inputs: {sorted(inputs)}); virtual tokens go in "
            "front of token embeddings, so call the model with input_ids.", candidates=sorted(inputs))
    sources = program.source_map()
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and _fed_by(node.args[1], ids):
            weight = sources.get(getattr(node.args[0], "name", ""))
            if weight is not None and weight.kind == "parameter":
                found.append((node, weight.target))
    if len(found) != 1:
        raise NoMatchError(f"{rule_name}: expected one token embedding indexed by input_ids in the graph, found "
                           f"{len(found)} ({[fqn for _, fqn in found]}).", candidates=[fqn for _, fqn in found])
    node, fqn = found[0]
    return TokenInputs(ids, node, fqn, inputs)


# Ops a position index goes through from ``arange`` or a position buffer to a learned position table. Bucketed
# relative positions (t5: abs, log, where) and gathered token types (bert) leave this set, so they do not count.
_POSITION_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.add.Tensor, aten.add.Scalar,
                 aten.sub.Tensor, aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default, aten.view.default,
                 aten.reshape.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                 aten.contiguous.default, aten.clone.default}


def position_limit(program: Program) -> int | None:
    """Rows of the model's learned position table (None for rotary or relative positions).

    A learned position table is an ``aten.embedding`` whose indices come from ``arange`` or a position buffer
    through index arithmetic only, never from an input's values."""
    sources = program.source_map()
    limits = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        frontier, seen, ok, rooted = [node.args[1]], set(), True, False
        while frontier and ok:
            current = frontier.pop()
            if not isinstance(current, fx.Node) or current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder":
                kind = getattr(sources.get(current.name), "kind", None)
                ok = kind in ("buffer", "constant")
                rooted = rooted or ok
            elif current.op == "call_function" and current.target in _POSITION_OPS:
                rooted = rooted or current.target in (aten.arange.default, aten.arange.start, aten.arange.start_step)
                frontier += [a for a in current.args if isinstance(a, fx.Node) and
                             isinstance(a.meta.get("val"), torch.Tensor)]
            elif current.op == "call_function" and current.target is aten.sym_size.int:
                continue
            else:
                ok = False
        weight = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if ok and rooted and weight is not None:
            limits.append(int(weight.shape[0]))
    return min(limits) if limits else None


def _check_length(ids: torch.Tensor, limit: int, virtual: int) -> torch.Tensor:
    """Graph node: fail clearly, not with an index error deep in torch, when the prompt overruns positions."""
    if ids.shape[1] > limit:
        raise RuleError(
            f"With {virtual} virtual tokens this call has {ids.shape[1]} positions, but the model's position table "
            f"has {limit}: use inputs of at most {limit - virtual} tokens, or fewer virtual tokens.")
    return ids


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def virtual_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT keeps prompt parameters in float32 over half-precision bases."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _placement(graph: fx.Graph, mask: fx.Node, length: fx.Node, n: int) -> fx.Node:
    """[b, n + s] source index into ``cat(head[n], tokens[s])`` for each output position.

    The virtual tokens go right before each row's first real token: after left padding (``p`` leading zeros in
    the mask) that is position ``p``, otherwise 0, where PEFT puts them. So a left-padded row sees its prompt at
    the same distance as the unpadded row does, and rows without left padding are exactly PEFT's layout."""
    call = graph.call_function
    leading = call(aten.eq.Scalar, (call(aten.cumsum.default, (call(aten.ne.Scalar, (mask, 0)), 1)), 0))
    pads = call(aten.sum.dim_IntList, (leading, [1], True))
    where = call(aten.unsqueeze.default, (call(aten.arange.default, (length,), {"device": mask.meta["val"].device}), 0))
    inside = call(aten.where.self, (call(aten.lt.Tensor, (where, call(aten.add.Tensor, (pads, n)))),
                                    call(aten.sub.Tensor, (where, pads)), where))
    return call(aten.where.self, (call(aten.lt.Tensor, (where, pads)), call(aten.add.Tensor, (where, n)), inside))


def extend_sequence(ctx: RewriteContext, tokens: TokenInputs, n: int, virtual: Callable[[fx.Graph], fx.Node],
                    tag: dict, extend_labels: bool) -> None:
    """Make every sequence input ``n`` tokens longer and put ``virtual()`` ([n, d], inserted by the caller's
    callback) in place of the token embeddings at the new positions. See the module docstring."""
    program, graph = ctx.program, ctx.program.graph
    if "position_ids" in tokens.inputs:
        raise UnsupportedError(f"{tag['method']}: the call passes position_ids; PEFT ignores them for virtual-token "
                               "methods (the model numbers the prompt and tokens itself). Call without position_ids.")
    limit = position_limit(program)
    if limit is not None and n >= limit:
        raise RuleError(f"{tag['method']}: {n} virtual tokens fill the model's position table ({limit} positions), "
                        f"leaving no room for the input; use fewer than {limit} virtual tokens.")
    before = set(graph.nodes)
    call = graph.call_function
    first = next(node for node in graph.nodes if node.op != "placeholder")
    pad = getattr(getattr(ctx.base_model, "config", None), "pad_token_id", None)
    fills = {"input_ids": 1 if pad == 0 else 0, "attention_mask": 1, "token_type_ids": 0}
    if extend_labels:
        fills["labels"] = -100
    extended = {name: tokens.inputs[name] for name in fills if name in tokens.inputs and
                isinstance(tokens.inputs[name].meta.get("val"), torch.Tensor) and tokens.inputs[name].meta["val"].dim() == 2}
    mask = extended.get("attention_mask")
    order = None
    replacements = {}
    with graph.inserting_before(first):
        for name, node in extended.items():
            value = node.meta["val"]
            head = call(aten.full.default, ([call(aten.sym_size.int, (node, 0)), n], fills[name]),
                        {"dtype": value.dtype, "device": value.device})
            longer = call(aten.cat.default, ([head, node], 1))
            if mask is not None:
                if order is None:
                    order = _placement(graph, mask, call(aten.sym_size.int, (longer, 1)), n)
                longer = call(aten.gather.default, (longer, 1, order))
            if name == "input_ids" and limit is not None:
                longer = call(_check_length, (longer, limit, n))
            replacements[node] = longer
    inserted = set(graph.nodes) - before
    for node, longer in replacements.items():
        node.replace_all_uses_with(longer, delete_user_cb=lambda user: user not in inserted)
    embedding = tokens.embedding
    with graph.inserting_before(embedding.next):
        batch = call(aten.sym_size.int, (embedding, 0))
        prompt = call(aten.to.dtype, (virtual(graph), embedding.meta["val"].dtype))
        rows = call(aten.expand.default, (call(aten.unsqueeze.default, (prompt, 0)), [batch, -1, -1]))
        if order is None:  # no mask, so no padding to place around: PEFT's layout
            joined = call(aten.cat.default, ([rows, call(aten.slice.Tensor, (embedding, 1, n, _MAX))], 1))
        else:
            picked = call(aten.unsqueeze.default, (call(aten.clamp.default, (order, None, n - 1)), -1))
            picked = call(aten.expand.default, (picked, [-1, -1, embedding.meta["val"].shape[-1]]))
            is_virtual = call(aten.unsqueeze.default, (call(aten.lt.Scalar, (order, n)), -1))
            joined = call(aten.where.self, (is_virtual, call(aten.gather.default, (rows, 1, picked)), embedding))
    inserted = set(graph.nodes) - before
    embedding.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in inserted)
    for node in inserted:
        node.meta["fxpeft"] = tag


# -- the site module ----------------------------------------------------------------------------------------
class PromptEmbedding(SiteModule):
    """PEFT's ``PromptEmbedding``: ``weight`` [total_virtual_tokens, token_dim], saved as ``prompt_embeddings``.

    ``total_virtual_tokens`` is ``n * num_transformer_submodules`` as in PEFT (``2n`` for encoder-decoder models,
    whose second half PEFT keeps but never uses for prompt tuning)."""

    def __init__(self, path: str, rule: PromptTuning, total: int, word_embeddings: torch.Tensor,
                 dtype: torch.dtype):
        super().__init__()
        self.path = path
        self.rule = rule
        self._word_embeddings = [word_embeddings]  # not a submodule: only to initialise from
        self.weight = nn.Parameter(torch.empty(total, word_embeddings.shape[1], dtype=dtype,
                                               device=word_embeddings.device))
        self.reset_parameters()

    def _init_ids(self, total: int) -> torch.Tensor | None:
        rule = self.rule
        if rule.init == "vocab":
            return torch.randint(0, self._word_embeddings[0].shape[0], (total,), dtype=torch.long)
        if rule.init == "text":
            tokenizer = rule.tokenizer
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            ids = list(tokenizer(rule.init_text)["input_ids"])
            ids = (ids * math.ceil(total / len(ids)))[:total]
            return torch.tensor(ids, dtype=torch.long)
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        ids = self._init_ids(self.weight.shape[0])
        if ids is None:
            nn.init.normal_(self.weight)  # nn.Embedding's initialisation, PEFT's "RANDOM"
        else:
            table = self._word_embeddings[0]
            self.weight.copy_(table[ids.to(table.device)].to(self.weight.dtype))

    def virtual_embeddings(self) -> torch.Tensor:
        return self.weight

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.weight}


def prepend_virtual_tokens(ctx: RewriteContext, rule, kind: str, attribute: str, method: str, make_site) -> None:
    """Shared by prompt tuning and p-tuning: the site module (``make_site(path, total_rows, token_table)``)
    supplies ``attribute``, whose first ``num_virtual_tokens`` rows go in front of the token embeddings."""
    tokens = find_token_inputs(ctx.program, type(rule).__name__)
    table = ctx.base_model.get_parameter(tokens.weight_fqn)
    total = rule.num_virtual_tokens * transformer_submodules(ctx.base_model)  # PEFT keeps 2n rows for seq2seq
    path = tokens.weight_fqn.rpartition(".")[0]
    ctx.site(path, kind, lambda: make_site(path, total, table))
    rows = ctx.adapter_input(path, kind, attribute)
    n = rule.num_virtual_tokens

    def virtual(graph: fx.Graph) -> fx.Node:
        return graph.call_function(aten.slice.Tensor, (rows, 0, 0, n)) if total != n else rows

    tag = {"adapter": ctx.adapter_name, "site": path, "method": method}
    extend_sequence(ctx, tokens, n, virtual, tag, extend_labels=not is_encoder_decoder(ctx.base_model))


def apply_prompt_tuning(rule: PromptTuning, ctx: RewriteContext) -> None:
    """Put ``rule.num_virtual_tokens`` learned embeddings in front of the token embeddings."""
    prepend_virtual_tokens(ctx, rule, "prompt", "weight", "prompt_tuning", lambda path, total, table: PromptEmbedding(
        path, rule, total, table, virtual_dtype(table.dtype)))


class PromptTuningMethod(Method):
    """PromptTuning: virtual tokens are part of the graph, so they apply to every call and row (not gateable)."""

    rule_type = PromptTuning
    tag = "prompt_tuning"
    codec = PromptLearningCodec("PROMPT_TUNING")
    gateable = False

    def rewrite(self, rule: PromptTuning, ctx: RewriteContext) -> None:
        apply_prompt_tuning(rule, ctx)


register_method(PromptTuningMethod())
