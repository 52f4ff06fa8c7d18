"""KV caches as graph inputs: how a call that carries a transformers ``Cache`` is recognised and captured.

A call with a cache (``cache=DynamicCache(...)``, what ``generate`` passes at every step) is captured like any
other signature, with the cache as a pytree of tensors: transformers' own registration
(``register_dynamic_cache_export_support``) flattens a ``DynamicCache`` into its key and value tensors, one
pair per layer, so the graph reads the past keys and values as inputs and returns the new cache as an output
(functionally: the cache passed in is not written by the graph). The policy stays per *argument*, never per
architecture: a cache tensor is ``[batch, heads, length, head_dim]``, so its dimensions 0 and 2 vary.

The example a cache signature is captured with is the call itself, resized so that every varying dimension is
at least 2 (export fixes dimensions of size 0 and 1): a decode step (one query token, ``length`` past tokens,
perhaps one row) becomes two query tokens and, where needed, two past tokens and two rows, with the tensors that
span past and query (the attention mask) resized to match. The graph captured that way serves a query of any
length, so decode steps, chunked prefill and continuing from a cache all run it.

An encoder-decoder's cache (transformers' ``EncoderDecoderCache``) is a pytree of its two ``DynamicCache``: the
self-attention cache (the decoder's past) and the cross-attention cache (keys and values of the source, the
encoder's output), with which layers already hold their cross-attention keys (``is_updated``) as the node's
context: the first decoder step (computing them) and the later ones (reading them) are two structures, so two
graphs. In such a call the source's length is its own dimension: the cross-attention tensors, the encoder's output
passed back in (``encoder_outputs``, a model output, itself a pytree) and the arguments that generate gives the
encoder (every name but ``decoder_*``, transformers' own rule for which arguments are the decoder's) span it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.integrations.executorch import register_dynamic_cache_export_support
from transformers.utils import ModelOutput

from fxpeft.errors import UnsupportedError

__all__ = ["is_cache", "carries_cache", "register_cache_pytrees", "check_cache_arguments",
           "cache_dynamic_shapes", "resize_cache_call", "is_output_pytree", "output_dynamic_shapes", "widen_output"]

_LENGTH_DIM = 2  # [batch, heads, length, head_dim]
_registered = False


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers KV cache object."""
    return isinstance(value, Cache)


def carries_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a call passes a KV cache in one of its arguments."""
    return any(is_cache(value) for value in kwargs.values())


def register_cache_pytrees() -> None:
    """Make transformers' ``DynamicCache`` a pytree of its tensors (once per process), so that export can take it
    as an input and give it as an output. Done on the first call that asks for a cache, not on import: the
    registration is global to the process."""
    global _registered
    if not _registered:
        register_dynamic_cache_export_support()
        _register_encoder_decoder_cache()
        _registered = True


def _flatten_encoder_decoder(cache: EncoderDecoderCache):
    updated = tuple(sorted(cache.is_updated.items()))
    return [cache.self_attention_cache, cache.cross_attention_cache], updated


def _unflatten_encoder_decoder(children, context) -> EncoderDecoderCache:
    cache = EncoderDecoderCache(*children)
    cache.is_updated = dict(context)
    return cache


def _flatten_encoder_decoder_with_keys(cache: EncoderDecoderCache):
    children, context = _flatten_encoder_decoder(cache)
    keys = (pytree.GetAttrKey("self_attention_cache"), pytree.GetAttrKey("cross_attention_cache"))
    return list(zip(keys, children)), context


def _register_encoder_decoder_cache() -> None:
    """``EncoderDecoderCache`` as a pytree: its two caches, and ``is_updated`` as context (it steers Python control
    flow in the model: compute the cross-attention keys, or read them)."""
    if EncoderDecoderCache in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        EncoderDecoderCache, _flatten_encoder_decoder, _unflatten_encoder_decoder,
        serialized_type_name=f"{EncoderDecoderCache.__module__}.{EncoderDecoderCache.__name__}",
        flatten_with_keys_fn=_flatten_encoder_decoder_with_keys)


def check_cache_arguments(kwargs: dict[str, Any]) -> None:
    """Raise :class:`~fxpeft.errors.UnsupportedError` for a cache that does not flatten into its tensors: export
    would take it as a constant, baking one call's cache into the graph."""
    for name, value in kwargs.items():
        if is_cache(value) and pytree.tree_flatten(value)[1].is_leaf():
            raise UnsupportedError(
                f"{name}={type(value).__name__}: fxpeft captures KV caches that flatten into their tensors "
                "(DynamicCache); this cache type is not supported yet. Pass a DynamicCache, or leave the cache to "
                "generate() without cache_implementation.")


def _cache_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of one cache tensor that vary between calls: batch, and the length of a KV tensor."""
    return (0, _LENGTH_DIM) if tensor.dim() == 4 else (0,) if tensor.dim() else ()


def cache_dynamic_shapes(value: Any) -> Any:
    """``dynamic_shapes`` for a cache argument, shaped as export flattens it: the children of each pytree node
    (for a ``DynamicCache``: ``[[keys of each layer], [values of each layer]]``), a dims dict per tensor."""
    return _pytree_dynamic_shapes(value, _cache_dims)


def is_output_pytree(value: Any) -> bool:
    """Whether ``value`` is a model output passed back in as an argument (``encoder_outputs``): a transformers
    ``ModelOutput``, a pytree of ``[batch, sequence, ...]`` tensors."""
    return isinstance(value, ModelOutput)


def _output_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    return (0, 1) if tensor.dim() >= 2 else (0,) if tensor.dim() else ()


def output_dynamic_shapes(value: Any) -> Any:
    """``dynamic_shapes`` for a model output passed as an argument: batch and sequence of each tensor."""
    return _pytree_dynamic_shapes(value, _output_dims)


def widen_output(value: Any) -> Any:
    """A model output argument with its batch and sequence dimensions of size 1 repeated to 2 (see widen_example)."""
    def widen(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            for dim in _output_dims(leaf):
                leaf = _resized(leaf, dim, max(leaf.shape[dim], 2))
        return leaf
    return pytree.tree_map(widen, value)


def _pytree_dynamic_shapes(value: Any, dims_of) -> Any:
    leaves, spec = pytree.tree_flatten(value)
    shapes = iter([{dim: Dim.AUTO for dim in dims_of(leaf)} or None if isinstance(leaf, torch.Tensor) else None
                   for leaf in leaves])

    def build(node: pytree.TreeSpec) -> Any:
        if node.is_leaf():
            return next(shapes)
        children = [build(child) for child in node.children()]
        if node.type is dict:
            return dict(zip(node.context, children))
        return node.type(children) if node.type in (list, tuple) else children

    return build(spec)


def _resized(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` of ``size``, its entries repeated cyclically (values do not shape a graph)."""
    if tensor.shape[dim] == size:
        return tensor
    index = torch.arange(size, device=tensor.device) % tensor.shape[dim]
    return tensor.index_select(dim, index)


def _parts(value: Any, source: bool) -> list[Any]:
    """The caches within a cache argument that hold the decoder's past (``source=False``) or the source's keys and
    values (``source=True``: an encoder-decoder's cross-attention cache)."""
    if isinstance(value, EncoderDecoderCache):
        return [value.cross_attention_cache if source else value.self_attention_cache]
    return [] if source else [value]


def _lengths(parts: list[Any]) -> list[int]:
    return [leaf.shape[_LENGTH_DIM] for part in parts for leaf in pytree.tree_leaves(part)
            if isinstance(leaf, torch.Tensor) and leaf.dim() == 4]


def _past_length(kwargs: dict[str, Any]) -> int:
    return max(_lengths([part for value in kwargs.values() if is_cache(value) for part in _parts(value, False)]),
               default=0)


def _source_length(kwargs: dict[str, Any]) -> int | None:
    """The length of an encoder-decoder call's source (None for a decoder-only call)."""
    lengths = _lengths([part for value in kwargs.values() if is_cache(value) for part in _parts(value, True)])
    lengths += [leaf.shape[1] for value in kwargs.values() if is_output_pytree(value)
                for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2]
    return max(lengths, default=None)


def resize_cache_call(kwargs: dict[str, Any], sequence_dims) -> dict[str, Any]:
    """A call carrying a filled cache, resized so that batch, query length and past length are each at least 2.

    ``sequence_dims(name, tensor)`` says which dimensions of a plain argument vary (batch, and sequence for ids,
    masks and embeddings). A sequence dimension as long as the query becomes the new query length; one as long as
    past plus query (an attention mask) becomes the new past plus query; cache tensors get the new past length.
    In an encoder-decoder call, the source's arguments (all but ``decoder_*``), the encoder's output and the
    cross-attention cache keep the source's length (at least 2)."""
    past = _past_length(kwargs)
    source = _source_length(kwargs)

    def decoder_side(name: str) -> bool:
        return source is None or name.startswith("decoder_")

    sequences = [value.shape[1] for name, value in kwargs.items()
                 if isinstance(value, torch.Tensor) and 1 in sequence_dims(name, value) and decoder_side(name)]
    if not past or not sequences:
        return kwargs
    query = min(sequences)
    batch = next((value.shape[0] for value in pytree.tree_leaves(kwargs)
                  if isinstance(value, torch.Tensor) and value.dim()), 1)
    new_batch, new_query, new_past = max(batch, 2), max(query, 2), max(past, 2)
    new_source = max(source or 0, 2)
    lengths = {query: new_query, query + past: new_query + new_past}

    def plain(name: str, value: torch.Tensor) -> torch.Tensor:
        dims = sequence_dims(name, value)
        if 0 in dims and value.shape[0] == batch:
            value = _resized(value, 0, new_batch)
        if 1 in dims:
            size = lengths.get(value.shape[1]) if decoder_side(name) else \
                new_source if value.shape[1] == source else None
            value = _resized(value, 1, size or max(value.shape[1], 2))
        return value

    def cached(new_length) -> Any:
        def resize(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            dims = _cache_dims(value)
            if 0 in dims and value.shape[0] == batch:
                value = _resized(value, 0, new_batch)
            if _LENGTH_DIM in dims:
                value = _resized(value, _LENGTH_DIM, new_length(value.shape[_LENGTH_DIM]))
            return value
        return resize

    grow_past = cached(lambda length: length + new_past - past)

    def resize_cache(value: Any) -> Any:
        if isinstance(value, EncoderDecoderCache):
            resized = EncoderDecoderCache(pytree.tree_map(grow_past, value.self_attention_cache),
                                          pytree.tree_map(cached(lambda length: new_source),
                                                          value.cross_attention_cache))
            resized.is_updated = dict(value.is_updated)
            return resized
        return pytree.tree_map(grow_past, value)

    def output_leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim():
            if value.shape[0] == batch:
                value = _resized(value, 0, new_batch)
            if value.dim() >= 2 and value.shape[1] == source:
                value = _resized(value, 1, new_source)
        return value

    resized = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            resized[name] = plain(name, value)
        elif is_cache(value):
            resized[name] = resize_cache(value)
        elif is_output_pytree(value):
            resized[name] = pytree.tree_map(output_leaf, value)
        else:
            resized[name] = value
    return resized
