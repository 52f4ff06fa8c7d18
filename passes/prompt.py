"""Prompt tuning as a graph rewrite: learned virtual-token embeddings in front of the token embeddings.

PEFT runs the base model as ``model(inputs_embeds=cat(prompt, embed(input_ids)), attention_mask=cat(ones, mask),
labels=cat(-100, labels))``. The captured graph was traced for ``input_ids`` of some length ``s``, and every later
shape in it (position ids, the causal mask, reshapes, the loss) is computed from ``sym_size`` of the sequence
*inputs*. So the pass does not chase those sizes one by one; it makes the graph's sequence inputs ``n`` tokens
longer where they enter, and swaps the prompt in right after the token embedding (found by data flow alone: the
``aten.embedding`` whose indices come from the ``input_ids`` input). That rewrite is shared with p-tuning and
lives in :func:`fxpeft.graph.tokens.extend_sequence`, which has the details.

Everything downstream then sees a sequence of ``n + s`` tokens, exactly what PEFT's ``inputs_embeds`` call
builds: real tokens get positions after the prompt (PEFT's convention) from the model's own position code, the
causal mask covers the prompt, and nothing is specialised to a size (no re-capture, no recompile). Rows without
left padding are PEFT's layout exactly; a left-padded row gets its prompt right before its first real token, so
it gives the same results as the same row unpadded (PEFT's do not: its prompt sits before the padding).

Models with a learned position table (gpt2, bert) limit ``n + s``: the pass raises
:class:`fxpeft.errors.RuleError` at transform time when the prompt alone fills the table, and when a call's
inputs would run past it.

Inserted nodes carry ``method="prompt_tuning"`` at the token embedding's module path, in the roles of
:mod:`fxpeft.graph.tokens`: ``extend`` (longer sequence inputs), ``check`` (the position-table check),
``prompt`` (the learned rows as ``[b, n, d]``), ``splice`` and ``embeddings`` (the prompt put into the token
embeddings; every user of the embedding reads the ``embeddings`` node).

Files: PEFT's ``PROMPT_TUNING`` config and its ``prompt_embeddings`` tensor (:class:`PromptTuningCodec`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers
from torch import nn

from fxpeft.adapters import CachedTokens, SiteModule, adapter_dtype
from fxpeft.formats.peft import str_field
from fxpeft.formats.prompt_learning import VirtualTokenCodec, transformer_submodules
from fxpeft.graph.tokens import prepend_virtual_tokens
from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import PromptTuning

__all__ = ["PromptEmbedding", "PromptTuningCodec", "PromptTuningMethod", "apply_prompt_tuning"]

_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # fxpeft's ``init`` -> PEFT's


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
                tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
            ids = list(tokenizer(rule.init_text)["input_ids"])
            ids = (ids * math.ceil(total / len(ids)))[:total]
            return torch.tensor(ids, dtype=torch.long)
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The rule's initialisation: normal (``random``), or rows of the token table (``vocab``, ``text``)."""
        if self.weight.device.type == "meta":
            return
        ids = self._init_ids(self.weight.shape[0])
        if ids is None:
            nn.init.normal_(self.weight)  # nn.Embedding's initialisation, PEFT's "RANDOM"
        else:
            table = self._word_embeddings[0]
            self.weight.copy_(table[ids.to(table.device)].to(self.weight.dtype))

    def cached_tokens(self) -> CachedTokens:
        """The first ``n`` rows, the ones in front of the token embeddings."""
        n = self.rule.num_virtual_tokens
        return CachedTokens(n, embeddings=lambda: self.weight[:n])

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The prompt under PEFT's key, ``prompt_embeddings``."""
        return {"prompt_embeddings": self.weight}


# -- the rewrite --------------------------------------------------------------------------------------------------
def apply_prompt_tuning(rule: PromptTuning, ctx: RewriteContext) -> None:
    """Put ``rule.num_virtual_tokens`` learned embeddings in front of the token embeddings."""
    total = rule.num_virtual_tokens * transformer_submodules(ctx.base_model)  # PEFT keeps 2n rows for seq2seq
    prepend_virtual_tokens(ctx, rule, "prompt", "weight", total, lambda path, table: PromptEmbedding(
        path, rule, total, table, adapter_dtype(table.dtype)))


# -- the file format ----------------------------------------------------------------------------------------------
class PromptTuningCodec(VirtualTokenCodec):
    """``peft_type`` PROMPT_TUNING (PEFT's ``PromptTuningConfig``): the initialisation and tokenizer fields.

    A ``text`` initialisation is read back as ``random``: the saved embeddings replace any initialisation, and
    ``text`` would need the tokenizer only to initialise."""

    peft_types = ("PROMPT_TUNING",)

    def method_fields(self, rule: PromptTuning, common: dict[str, Any]) -> dict[str, Any]:
        """``prompt_tuning_init``, its text, and the tokenizer's name (a tokenizer object's ``name_or_path``)."""
        tokenizer = rule.tokenizer if isinstance(rule.tokenizer, str) or rule.tokenizer is None else \
            getattr(rule.tokenizer, "name_or_path", None)
        return {"prompt_tuning_init": _INITS[rule.init], "prompt_tuning_init_text": rule.init_text,
                "tokenizer_name_or_path": tokenizer, "tokenizer_kwargs": None}

    def rule_from_config(self, config: dict[str, Any], num_virtual_tokens: int,
                         saved_keys: set[str] | None) -> PromptTuning:
        """A :class:`~fxpeft.rules.PromptTuning` rule with the config's initialisation (``text`` as ``random``)."""
        init = {value: key for key, value in _INITS.items()}.get(str_field(config, "prompt_tuning_init", "RANDOM"),
                                                                   "random")
        return PromptTuning(num_virtual_tokens, init="random" if init == "text" else init)


class PromptTuningMethod(Method):
    """PromptTuning: virtual tokens are part of the graph, so they apply to every call and row (not gateable)."""

    rule_type = PromptTuning
    tag = "prompt_tuning"
    codec = PromptTuningCodec()
    gateable = False

    def rewrite(self, rule: PromptTuning, ctx: RewriteContext) -> None:
        """:func:`apply_prompt_tuning`."""
        apply_prompt_tuning(rule, ctx)


register_method(PromptTuningMethod())
