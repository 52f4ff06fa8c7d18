"""TRL's ``SFTTrainer`` over an adapted model: :class:`AdapterSFTTrainer` (needs the ``trl`` package).

TRL 1.x's ``SFTTrainer`` gives the model a *fused LM head* (``trl.trainer.utils.add_fused_lm_head``): it replaces
the model's ``forward`` by one that, called with ``fused_lm_head=True``, runs ``model.base_model`` (a transformers
model's backbone) and the output embedding itself, in chunks, and returns per-token log-probabilities
(``FusedCausalLMOutput``) from which ``SFTTrainer.compute_loss`` takes its loss and metrics. On an adapted model
``base_model`` is the whole un-adapted model, so that forward cannot run it (and would leave the adapters out):
the adapters live in the adapted model's one graph, which computes the logits. :class:`AdapterSFTTrainer` replaces
that forward, on the adapted model it trains, by :func:`fused_head_from_logits`: the same fields computed from the
adapted model's logits (so TRL's loss, ``dft`` loss, entropy and token accuracy are as TRL computes them, at the
memory cost of materialized logits), and adds :class:`~fxpeft.integrations.trainer.AdapterCheckpoints`. Example::

    trainer = AdapterSFTTrainer(model=adapted, args=SFTConfig(output_dir="out"), train_dataset=data,
                                processing_class=tokenizer)
    trainer.train()
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import trl
from trl.trainer.utils import FusedCausalLMOutput

from fxpeft.integrations.trainer import AdapterCheckpoints
from fxpeft.model import AdaptedModel

__all__ = ["AdapterSFTTrainer", "fused_head_from_logits"]


class AdapterSFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` for adapted models: TRL's fused LM head computed from the adapted model's logits
    (:func:`fused_head_from_logits`), and adapter checkpoints in PEFT's layout (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adapted = self._adapted_model()
        if adapted is not None:
            fused_head_from_logits(adapted)


def fused_head_from_logits(adapted: AdaptedModel) -> None:
    """Give ``adapted`` a ``forward`` that takes TRL's ``fused_lm_head`` keyword: with ``fused_lm_head=True`` it
    returns TRL's ``FusedCausalLMOutput`` (log-probabilities of the labels, entropy, whether each label is the top
    token, the label mask and the loss), computed in float32 from the adapted model's logits; otherwise it is the
    adapted model's own ``forward``. Replaces the ``forward`` TRL's ``add_fused_lm_head`` set on the instance."""
    cls_forward = type(adapted).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = {name: value for name, value in (("labels", labels), ("num_items_in_batch", num_items_in_batch))
                     if value is not None}
            return cls_forward(self, *args, **kwargs, **extra)
        kwargs["use_cache"] = False
        logits = cls_forward(self, *args, **kwargs).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        return _per_token(logits, labels.to(logits.device), num_items_in_batch)

    adapted.__dict__["forward"] = types.MethodType(forward, adapted)


def _per_token(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any) -> FusedCausalLMOutput:
    """TRL's per-token fields of next-token ``logits`` ``[batch, seq, vocab]`` for ``labels`` ``[batch, seq]``."""
    mask = labels != -100
    log_softmax = torch.log_softmax(logits.float(), dim=-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1).masked_fill(~mask, 0)
        is_top1 = (logits.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                               label_mask=mask)
