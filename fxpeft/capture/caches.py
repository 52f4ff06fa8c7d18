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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from transformers.cache_utils import Cache
from transformers.integrations.executorch import register_dynamic_cache_export_support

from fxpeft.errors import UnsupportedError

__all__ = ["is_cache", "carries_cache", "register_cache_pytrees", "check_cache_arguments",
           "cache_dynamic_shapes", "resize_cache_call"]

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
        _registered = True


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
    leaves, spec = pytree.tree_flatten(value)
    shapes = iter([{dim: Dim.AUTO for dim in _cache_dims(leaf)} or None if isinstance(leaf, torch.Tensor) else None
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


def _past_length(kwargs: dict[str, Any]) -> int:
    lengths = [leaf.shape[_LENGTH_DIM] for value in kwargs.values() if is_cache(value)
               for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor) and leaf.dim() == 4]
    return max(lengths, default=0)


def resize_cache_call(kwargs: dict[str, Any], sequence_dims) -> dict[str, Any]:
    """A call carrying a filled cache, resized so that batch, query length and past length are each at least 2.

    ``sequence_dims(name, tensor)`` says which dimensions of a plain argument vary (batch, and sequence for ids,
    masks and embeddings). A sequence dimension as long as the query becomes the new query length; one as long as
    past plus query (an attention mask) becomes the new past plus query; cache tensors get the new past length."""
    past = _past_length(kwargs)
    sequences = [value.shape[1] for name, value in kwargs.items()
                 if isinstance(value, torch.Tensor) and 1 in sequence_dims(name, value)]
    if not past or not sequences:
        return kwargs
    query = min(sequences)
    batch = next((value.shape[0] for value in pytree.tree_leaves(kwargs)
                  if isinstance(value, torch.Tensor) and value.dim()), 1)
    new_batch, new_query, new_past = max(batch, 2), max(query, 2), max(past, 2)
    lengths = {query: new_query, query + past: new_query + new_past}

    def plain(name: str, value: torch.Tensor) -> torch.Tensor:
        dims = sequence_dims(name, value)
        if 0 in dims and value.shape[0] == batch:
            value = _resized(value, 0, new_batch)
        if 1 in dims:
            value = _resized(value, 1, lengths.get(value.shape[1], max(value.shape[1], 2)))
        return value

    def cached(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dims = _cache_dims(value)
        if 0 in dims and value.shape[0] == batch:
            value = _resized(value, 0, new_batch)
        if _LENGTH_DIM in dims:
            value = _resized(value, _LENGTH_DIM, value.shape[_LENGTH_DIM] + new_past - past)
        return value

    resized = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            resized[name] = plain(name, value)
        elif is_cache(value):
            resized[name] = pytree.tree_map(cached, value)
        else:
            resized[name] = value
    return resized
