"""LoRA on embeddings (``nn.Embedding``), PEFT 0.21.2's ``lora.Embedding`` as graph nodes.

An embedding site (:class:`fxpeft.graph.sites.EmbeddingSite`) is an ``aten.embedding`` of the captured graph whose
weight is a 2-D model parameter. At ``y = embedding(W, ids)`` the branch is PEFT's ``forward`` / ``_embed``::

    after_A = embedding(A^T, ids, padding_idx, scale_grad_by_freq, sparse)     the base lookup's own arguments
    y'      = (y + (after_A @ B^T) * scaling).to(y.dtype)

``A`` is ``lora_embedding_A`` ``[r, num_embeddings]`` and ``B`` ``lora_embedding_B`` ``[embedding_dim, r]`` (PEFT's
keys have no ``.weight``). PEFT's oddities, matched: no dropout on this branch (PEFT builds a dropout layer and never
calls it) and no cast of the indices; ``A`` starts at zero and ``B`` normal (``init="default"``, ``"gaussian"`` and
``"orthogonal"`` alike: PEFT's ``reset_lora_parameters`` has one rule for embeddings), both ``torch.randn`` with
``init="random"``. A merge adds PEFT's ``(B @ A)^T * scaling`` to the weight, cast to its dtype first.

An embedding whose module scales its output (Bart's ``BartScaledWordEmbedding``, Gemma's ``embed_scale``) multiplies
the lookup's result after the op, so the branch, joined at the op, is scaled too: PEFT's ``adapter_output *
embed_scale``, up to the order of the rounding. Gating per batch row is a linear's: the lookup's result is
``[batch, ...]``, the branch starts from it in the active rows only (``RewriteContext.rows_on``).

A tied embedding (GPT-2's ``wte`` is ``lm_head``'s weight): LoRA applies at the embedding only, as in PEFT (whose
``lm_head`` keeps reading the untouched tensor). A merge would write the shared tensor and change the head too, so
fxpeft refuses it (fxpeft/shared_tensors.py), where PEFT merges silently. Refused at transform with an
UnsupportedError: DoRA (``use_dora=True``), an embedding with ``max_norm`` (the lookup renormalises its weight in
place) or ``sparse=True`` gradients, and a lookup whose result is not per batch row (GPT-2's ``wpe`` looks up
``[1, seq]`` positions shared by every row; PEFT adapts it, fxpeft's per-row gate cannot yet).
``add_weighted_adapter`` over an adapter with embedding sites is refused.

Files: PEFT's ``save_pretrained`` also writes a copy of the base embedding (``<path>.base_layer.weight``,
``save_embedding_layers`` for a target named ``embed_tokens``/``lm_head``); fxpeft reads such a file (the copy must
equal the base weight) and does not write the copy (PEFT loads fxpeft's folder without it). ``fxpeft check`` on
PEFT's folder accepts that copy when it equals the base weight and flags it when it differs. T5's and Bart's
``shared`` module is never called (the forward runs ``encoder.embed_tokens`` / ``decoder.embed_tokens``, tied to
it): PEFT wraps it to no effect, fxpeft finds no site there (NoMatchError); target ``embed_tokens``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxpeft.errors import UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.sites import EmbeddingSite
from fxpeft.passes.lora.joins import rejoin
from fxpeft.passes.lora.weights import LoraWeights
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["LoraEmbeddingWeights", "check_embedding_site", "insert_embedding_branch", "not_per_row", "EMBEDDING_ROLES"]

aten = torch.ops.aten

EMBEDDING_ROLES = ("embedding_A", "embedding_B")  # the tags of the lookup in A and the product with B


def not_per_row(ctx: RewriteContext, node: fx.Node) -> str | None:
    """Why ``node``'s value is not one entry per batch row (its leading dimension a fixed size while the call's inputs
    have a batch of any size: a position lookup shared by every row), or None. The gated branch needs rows."""
    val = node.meta.get("val")
    lead = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
    batches = [placeholder.meta["val"].shape[0] for placeholder, source in zip(ctx.program.placeholders(),
                                                                             ctx.program.sources)
               if source.kind == "user" and isinstance(placeholder.meta.get("val"), torch.Tensor)
               and placeholder.meta["val"].dim()]
    if lead is None or (isinstance(lead, int) and any(not isinstance(batch, int) for batch in batches)):
        return (f"its output has shape {list(val.shape) if isinstance(val, torch.Tensor) else None}, not one row per "
                "batch row (a lookup shared by every row, such as position embeddings)")
    return None


def check_embedding_site(rule: LoRA, site: EmbeddingSite, ctx: RewriteContext) -> None:
    """Refuse, before anything is built, an embedding PEFT's LoRA computes otherwise (the module docstring)."""
    where = f"LoRA at the embedding {site.path}"
    shared = next((reason for reason in map(lambda node: not_per_row(ctx, node), site.nodes) if reason), None)
    if shared:
        raise UnsupportedError(f"{where}: {shared}; fxpeft gates LoRA per batch row, so it cannot adapt it yet. "
                               "Exclude it from the targets.")
    if rule.use_dora:
        raise UnsupportedError(f"{where}: DoRA (use_dora=True) on embeddings is not supported yet; use "
                               "use_dora=False, or exclude the embeddings from this rule.")
    module = ctx.get_module(site.path)
    if site.sparse or (isinstance(module, nn.Embedding) and module.max_norm is not None):
        raise UnsupportedError(f"{where}: an embedding with max_norm or sparse gradients is not supported (its "
                               "lookup renormalises or sparsifies the weight it reads); exclude it from the targets.")


class LoraEmbeddingWeights(LoraWeights):
    """``lora_embedding_A`` ``[r, num_embeddings]``, ``lora_embedding_B`` ``[embedding_dim, r]`` and ``scaling`` for
    one embedding site (held as ``lora_A`` / ``lora_B``; saved under PEFT's keys)."""

    site_form = "embedding"

    def __init__(self, site: EmbeddingSite, rule: LoRA, device: torch.device, dtype: torch.dtype):
        super().__init__(site.path, site.num_embeddings, site.embedding_dim, rule, device, dtype)
        self.weight_fqn = site.weight_fqn
        self.padding_idx, self.scale_grad_by_freq = site.padding_idx, site.scale_grad_by_freq

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's: ``A = 0`` and ``B`` normal, or both ``torch.randn`` for ``init="random"``."""
        if self.lora_A.device.type == "meta":
            return
        self.scaling.fill_(self.scaling_value)
        if self.init == "random":
            self.lora_A.copy_(torch.randn(self.lora_A.shape))
            self.lora_B.copy_(torch.randn(self.lora_B.shape))
        else:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.path}"
        return {f"{prefix}.lora_embedding_A": self.lora_A, f"{prefix}.lora_embedding_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        """PEFT's ``Embedding.get_delta_weight``: ``(B @ A)^T * scaling``, ``[num_embeddings, embedding_dim]``."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def merged_delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.delta_weight().to(weight.dtype)  # PEFT's ``weight.data += delta.to(orig_dtype)``

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """The embedding's weight, right for this module's reads of it only (a tied head reads it too)."""
        return {self.weight_fqn: (f"{self.path}.{self.weight_fqn.rpartition('.')[2]}",)}


def insert_embedding_branch(ctx: RewriteContext, site: EmbeddingSite, node: fx.Node, inputs: dict[str, fx.Node],
                            weights: LoraEmbeddingWeights) -> None:
    """``y`` becomes ``(y + embedding(A^T, ids) @ B^T * scaling).to(y.dtype)`` after ``node`` (the module docstring)."""
    graph = ctx.program.graph
    call = graph.call_function
    ids = site.input_of(node)
    lora_dtype = weights.lora_A.dtype
    stack = node.meta.get("nn_module_stack")
    node = ctx.site_output(node)
    readers = set(node.users)
    role_a, role_b = EMBEDDING_ROLES
    with graph.inserting_before(node.next):
        table = ctx.tag(call(aten.t.default, (inputs["lora_A"],)), site.path, role_a)
        after_a = ctx.tag(call(aten.embedding.default, (table, ids, site.padding_idx, site.scale_grad_by_freq,
                                                        site.sparse)), site.path, role_a)
        h = ctx.rows_on(after_a, site.path)
        b_t = ctx.tag(call(aten.t.default, (inputs["lora_B"],)), site.path, role_b)
        b = ctx.tag(call(aten.matmul.default, (h, b_t)), site.path, role_b)
        delta = ctx.gated(b, inputs["scaling"], site.path, weights.scaling.dtype)
        total = ctx.tag(call(aten.add.Tensor, (node, delta)), site.path, tags.JOIN)
    rejoin(ctx, site.path, node, total, readers, lora_dtype, stack)
