"""Virtual tokens (prompt tuning, P-tuning, prefix tuning) in calls that carry a KV cache: generation.

A graph captured without a cache puts its ``n`` virtual tokens in front of the sequence itself (passes/prompt.py,
passes/ptuning.py, passes/prefix.py). A call with a cache (every model call of ``generate``) follows PEFT's
convention instead: the virtual tokens are the cache's first ``n`` positions, so the graphs captured with a cache
leave them out (the passes skip them) and :func:`prepare_cached_call` puts them in before the graph runs:

- **The cache**, when it is empty (the prefill): prefix tuning's keys and values go in as they are; prompt and
  P-tuning rows are run through the adapted model once (a call with ``inputs_embeds`` at positions ``0 .. n-1``,
  the other adapters of the model applying to them as in the uncached graph) and their keys and values go in.
  Either is computed for one row and repeated for the call's batch. A cache that holds tokens already holds the
  virtual ones (the caller's contract, what ``generate`` keeps).
- **The attention mask** (the call's, which covers the real tokens only, as PEFT's does) gets ``n`` ones in front,
  and **position ids**, where the call gives them, move by ``n``: real tokens take positions ``n, n + 1, ...``, as
  in the uncached graph and PEFT's forward (the RoPE shift prefix tuning needs). Models that number tokens from
  the cache's length get the shift from the cache itself.
- **Encoder-decoder models with prompt or P-tuning** have the tokens in the encoder's input: the encoder runs the
  uncached graph (which adds them), and the decoder's cached calls get ``n`` ones in front of the encoder's
  ``attention_mask``. Prefix tuning there is the decoder's self-attention cache (``decoder_attention_mask``,
  ``decoder_position_ids``).

A left-padded row gets its virtual tokens right before its first real token in the uncached graph; in the cache
they come before the padding, which the mask hides: either way each row sees the prompt at the same distance as
the row without padding does, so padded and unpadded rows generate alike.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from transformers.cache_utils import EncoderDecoderCache

from fxpeft.adapters import CachedTokens, SiteModule
from fxpeft.capture.caches import is_cache
from fxpeft.errors import GenerationError, UnsupportedError
from fxpeft.runtime.generation import call_batch

__all__ = ["cache_argument", "cached_tokens_of", "prepare_cached_call", "self_attention_cache"]

# (keys, values) per cache layer, each [heads, n, head_dim]
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


def cached_tokens_of(sites: Iterable[SiteModule]) -> CachedTokens | None:
    """The virtual tokens the given sites (the active adapters') put in a KV cache; None when none does. More than
    one virtual-token site cannot share one cache prefix: a clear :class:`~fxpeft.errors.UnsupportedError`."""
    sites = list(sites)
    found = [(site, tokens) for site in sites if (tokens := site.cached_tokens()) is not None]
    if len(found) > 1:
        raise UnsupportedError(
            f"{len(found)} virtual-token sites ({[type(site).__name__ for site, _ in found]}) would each put tokens "
            "in front of the KV cache; a cached call (generate) takes one virtual-token method per adapter.")
    return found[0][1] if found else None


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` (transformers 5), else the older
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def self_attention_cache(cache: Any) -> Any:
    """The cache that holds the sequence's own past: an encoder-decoder cache's self-attention part, or the
    cache itself."""
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def _with_ones_in_front(kwargs: dict[str, Any], name: str, n: int) -> None:
    mask = kwargs.get(name)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs[name] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _fill(cache: Any, layers: KeysValues, batch: int, dtype: torch.dtype) -> None:
    for index, (keys, values) in enumerate(layers):
        rows = [tensor.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous() for tensor in (keys, values)]
        cache.update(*rows, index)


def _check_positions(limit: int | None, needed: int) -> None:
    if limit is not None and needed > limit:
        raise GenerationError(f"This call needs {needed} positions (virtual tokens, the cache's past and its own "
                              f"tokens), but the model's position table has {limit}: use a shorter input or fewer "
                              "new tokens.")


def prepare_cached_call(kwargs: dict[str, Any], tokens: CachedTokens, encoder_decoder: bool,
                        run_embeddings: Callable[[torch.Tensor], KeysValues], dtype: torch.dtype,
                        position_limit: int | None = None) -> dict[str, Any]:
    """A cached call's keyword arguments with ``tokens`` in place (see the module docstring): the cache filled if
    empty (in place: it is the caller's object), the mask and position ids shifted; a new dict.

    ``run_embeddings(rows)`` gives the keys and values of embedding rows ``[n, hidden]`` (the adapted model's own
    cached call); ``dtype`` is the cache's; ``position_limit`` the rows of a learned position table, if any."""
    kwargs = dict(kwargs)
    n = tokens.count
    if tokens.embeddings is not None and encoder_decoder:
        if "encoder_outputs" not in kwargs:
            raise UnsupportedError(
                f"A call with a KV cache runs only the decoder, but this one passes no `encoder_outputs`: the {n} "
                "virtual tokens of the encoder's input are added by the encoder's own (uncached) call. Pass the "
                "encoder's output (as generate does), or call without a cache.")
        _with_ones_in_front(kwargs, "attention_mask", n)
        return kwargs
    cache = self_attention_cache(next(value for value in kwargs.values() if is_cache(value)))
    batch = call_batch((), kwargs) or 1
    past = cache.get_seq_length()
    ids = kwargs.get("decoder_input_ids" if encoder_decoder else "input_ids")
    _check_positions(position_limit, (past or n) + (ids.shape[1] if isinstance(ids, torch.Tensor) else 0))
    if past == 0:
        layers = tokens.keys_values() if tokens.keys_values is not None else run_embeddings(tokens.embeddings())
        _fill(cache, layers, batch, dtype)
    mask, positions = ("decoder_attention_mask", "decoder_position_ids") if encoder_decoder else \
        ("attention_mask", "position_ids")
    _with_ones_in_front(kwargs, mask, n)
    if isinstance(kwargs.get(positions), torch.Tensor):
        kwargs[positions] = kwargs[positions] + n
    return kwargs
