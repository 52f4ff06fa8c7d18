"""What :class:`fxpeft.AdaptedModel` offers for generation: transformers' ``generate`` over its graphs.

:class:`GenerationMethods` is a mixin of the adapted model (it reads the model's adapters, flags and programs). The
decoding itself is transformers' own (:mod:`fxpeft.runtime.generation`); virtual tokens enter the KV cache through
:mod:`fxpeft.runtime.virtual_tokens`, and a request the model's positions cannot hold fails before any token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache

from fxpeft.adapters import CachedTokens
from fxpeft.capture.caches import is_cache
from fxpeft.errors import FxpeftError, GenerationError, UnsupportedError
from fxpeft.graph.tokens import is_encoder_decoder, position_limit
from fxpeft.runtime.gates import BASE
from fxpeft.runtime.generation import Generation, call_batch
from fxpeft.runtime.virtual_tokens import cache_argument, cached_tokens_of, prepare_cached_call, self_attention_cache

__all__ = ["GenerationMethods"]


class GenerationMethods:
    """``generate``, ``can_generate`` and ``generation_config`` of the adapted model, and the virtual-token cache
    handling its ``forward`` uses for calls with a KV cache (:meth:`_with_cached_tokens`)."""

    _filling_cache = False  # while _keys_values_of runs virtual tokens through the model
    _positions: tuple[int | None] | None = None  # see _position_limit

    def _cached_tokens(self) -> CachedTokens | None:
        """The active adapters' virtual tokens as a KV cache takes them (None without virtual tokens)."""
        return cached_tokens_of(site for name in self.active_adapters for site in self.adapters[name].site_modules())

    def _encoder_side(self, tokens: CachedTokens) -> bool:
        """Whether ``tokens`` are the encoder's (prompt rows of an encoder-decoder), not the cache's."""
        return tokens.embeddings is not None and is_encoder_decoder(self.base_model)

    def _with_cached_tokens(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A cached call's arguments with the active adapters' virtual tokens in the cache (fxpeft/runtime/
        virtual_tokens.py): filled on the first call, the mask and position ids shifted on every call."""
        tokens = self._cached_tokens()
        if tokens is None:
            return kwargs
        dtype = getattr(self.base_model, "dtype", torch.float32)
        return prepare_cached_call(kwargs, tokens, is_encoder_decoder(self.base_model), self._keys_values_of,
                                   dtype, self._position_limit())

    def _keys_values_of(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values ``[heads, n, head_dim]`` of embedding rows ``[n, hidden]`` at positions
        ``0 .. n-1``: one call of this model with ``inputs_embeds`` and an empty cache (its other adapters apply)."""
        table = self.base_model.get_input_embeddings().weight
        self._filling_cache = True
        try:
            output = self(inputs_embeds=rows.unsqueeze(0).to(table.dtype), use_cache=True,
                          **{cache_argument(self.base_model): DynamicCache()})
        finally:
            self._filling_cache = False
        cache = self_attention_cache(next(value for value in output.values() if is_cache(value)))
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]

    def _position_limit(self) -> int | None:
        """Rows of the model's learned position table (None for rotary or relative positions), read once."""
        if self._positions is None:
            self._positions = (position_limit(next(iter(self._programs.values()))),)
        return self._positions[0]

    def _check_generation_length(self, args: tuple, kwargs: dict[str, Any]) -> CachedTokens | None:
        """Before any token: a :class:`~fxpeft.errors.GenerationError` when the prompt, the virtual tokens and the
        new tokens ``generate`` is asked for overrun the model's learned position table. Returns the virtual
        tokens (:meth:`_cached_tokens`)."""
        tokens = self._cached_tokens()
        limit = self._position_limit()
        if limit is None:
            return tokens
        config = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        virtual = tokens.count if tokens is not None else 0
        if is_encoder_decoder(self.base_model):
            if tokens is None or self._encoder_side(tokens):
                return tokens  # the decoder's positions start at 0; the encoder's input is checked by its graph
            prompt = 1
        else:
            ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs_embeds"))
            prompt = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() > 1 else 0
        total = prompt + new if new is not None else kwargs.get("max_length", config.max_length)
        if virtual + total > limit:
            raise GenerationError(
                f"generate() would need {virtual + total} positions ({virtual} virtual tokens, a prompt of "
                f"{prompt} and up to {total - prompt} new tokens), but the model's position table has {limit}: "
                f"ask for at most {max(limit - virtual - prompt, 0)} new tokens or use a shorter prompt.")
        return tokens

    @property
    def generation_config(self):
        """The base model's ``GenerationConfig`` (what :meth:`generate` starts from), as PEFT's model shows it."""
        return self.base_model.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.base_model.generation_config = value

    def can_generate(self) -> bool:
        """Whether :meth:`generate` works here: a transformers model (decoder-only or encoder-decoder) that can
        generate."""
        can = getattr(self.base_model, "can_generate", None)
        return bool(can is not None and can())

    def generate(self, *args, adapter_names: Sequence[str] | torch.Tensor | None = None, **kwargs):
        """transformers' ``generate`` (same arguments, same results: greedy, sampling, beam search, streamers,
        ``return_dict_in_generate``...), every model call a captured graph with the adapters in it.

        The prefill and the decode steps are signatures of this model like any other call: captured once each,
        with the KV cache as graph inputs and outputs, then reused for every prompt length, batch size and past
        length (see fxpeft/runtime/generation.py). Active, merged and disabled adapters apply as in ``forward``.
        Call ``eval()`` first, as with any transformers model, unless you want dropout while generating. Example::

            adapted.eval()
            batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            ids = adapted.generate(**batch, max_new_tokens=32, do_sample=True, top_p=0.9)

        ``adapter_names`` (one adapter name per prompt, ``"__base__"`` for the base model; or the tensor
        :meth:`adapter_indices` gives) generates each row with its own adapter in one batch (multi-LoRA serving),
        through the same gathered per-row graphs as ``forward(adapter_names=...)``; beams and
        ``num_return_sequences`` keep each prompt's adapter. Example::

            adapted.generate(**batch, max_new_tokens=32, adapter_names=["french", "german", "__base__", "french"])
        """
        config = getattr(self.base_model, "config", None)
        if config is None or not hasattr(self.base_model, "generate"):
            raise UnsupportedError(f"generate(): the base model ({type(self.base_model).__name__}) is not a "
                                   "transformers model that generates.")
        if self._base_only:  # disable_adapters() with virtual-token adapters: the base model's own generate
            if adapter_names is not None:
                raise UnsupportedError("adapter_names cannot be used inside disable_adapters(): every row is the base "
                                       "model's there.")
            return self.base_model.generate(*args, **kwargs)
        indices = None if adapter_names is None else self._generation_indices(adapter_names, args, kwargs)
        tokens = self._check_generation_length(args, kwargs)
        in_cache = tokens.count if tokens is not None and not self._encoder_side(tokens) else 0
        return Generation(self, self.base_model, adapter_indices=indices,
                          reserved_positions=in_cache).generate(*args, **kwargs)

    def _generation_indices(self, adapter_names: Sequence[str] | torch.Tensor, args: tuple,
                            kwargs: dict[str, Any]) -> torch.Tensor:
        """``generate``'s ``adapter_names`` as the index tensor each model call expands to its batch, checked against
        the prompts before any token is produced (forward's rules: no merged adapters, no virtual tokens)."""
        self._check_gateable("generate(adapter_names=...)")
        if self._merged:
            raise FxpeftError(f"generate(adapter_names=...) cannot be used while adapters {self._merged} are merged; "
                              "call unmerge() first.")
        if isinstance(adapter_names, str):
            raise FxpeftError(f"generate(adapter_names={adapter_names!r}): give a list with one adapter name (or "
                              f"{BASE!r}) per prompt, or set_adapter({adapter_names!r}) for the whole batch.")
        indices = adapter_names if isinstance(adapter_names, torch.Tensor) else self.adapter_indices(adapter_names)
        prompts = call_batch(args, kwargs) or 1
        if indices.shape != (prompts,):
            raise FxpeftError(f"generate(): adapter_names has {indices.numel()} entries for a batch of {prompts} "
                              f"prompts; give one adapter name (or {BASE!r}) per prompt, before any expansion for "
                              "num_beams or num_return_sequences (fxpeft repeats them as transformers repeats the "
                              "prompts).")
        return indices
