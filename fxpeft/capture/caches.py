"""KV caches as graph inputs: how a call that carries a transformers ``Cache`` is recognised and captured.

A call with a cache (``cache=DynamicCache(...)``, what ``generate`` passes at every step) is captured like any
other signature, with the cache as a pytree of tensors: a ``DynamicCache`` flattens into its key and value tensors,
one pair per layer holding them, so the graph reads the past keys and values as inputs and returns the new cache as
an output (functionally: the cache passed in is not written by the graph). The policy stays per *argument*, never
per architecture: a cache tensor is ``[batch, heads, length, head_dim]``, so its dimensions 0 and 2 vary.

The ``DynamicCache`` pytree is fxpeft's own (:func:`register_cache_pytrees`; it replaces transformers'
``register_dynamic_cache_export_support`` registration where that one came first). transformers' unflatten builds
each layer by ``update`` from an empty tensor: traced by export, every captured decode graph began with a
``cat(empty, past)`` per key and value tensor, and every rebuilt output cache copied each tensor once more. Here
the unflatten sets each layer's ``keys``/``values`` as they are (no op, no copy), and the context keeps what
shapes the graph besides the tensors: each layer's type (``DynamicLayer``, ``DynamicSlidingWindowLayer``,
``DummyLayer``; others are refused), whether it is initialized, a sliding window's size, and whether the cache
grows layers lazily. A sliding-window layer's written length (``cumulative_length``, a Python int) is not kept:
it is rebuilt as the length of its keys, as transformers' unflatten does. That is exact until the window fills;
after it, a layer holds the last ``window - 1`` positions and counts them from 0, a shifted frame in which the
sliding mask of a decode step is the same (rotary positions come from ``position_ids``, which ``generate``
passes); the behaviour of transformers' registration, kept.

The example a cache signature is captured with is the call itself, resized so that every varying dimension is
at least 2 (export fixes dimensions of size 0 and 1): a decode step (one query token, ``length`` past tokens,
perhaps one row) becomes two query tokens and, where needed, two past tokens and two rows, with the tensors that
span past and query (the attention mask) resized to match. The graph captured that way serves a query of any
length, so decode steps, chunked prefill and continuing from a cache all run it.

A ``StaticCache`` (``generate(cache_implementation="static")``, what ``torch.compile`` wants: fixed shapes) is a pytree
of each layer's keys, values and written length (``cumulative_length``, a tensor, so that positions are data). Its
keys and values are ``[batch, heads, max_cache_len, head_dim]``: their length is the cache's size, not its past, so
one graph serves the prefill and every decode step. Inside the graph the cache is rebuilt with layers that update
functionally (``index_copy`` at the written length, :class:`GraphStaticLayer`), so the graph returns the written
cache as new tensors and never mutates its inputs; :func:`write_back_static` copies them into the caller's cache
tensors, which keep their storage (as transformers' in-place ``StaticLayer.update`` does). A static call's example is
resized like a cache call's: batch and query at least 2, and the cache's size larger than the query, with the
attention masks that span it (a 2D mask as long as the cache: ``fxpeft.runtime.generation`` pads generate's masks so).

An encoder-decoder's cache (transformers' ``EncoderDecoderCache``) is a pytree of its two ``DynamicCache``: the
self-attention cache (the decoder's past) and the cross-attention cache (keys and values of the source, the
encoder's output), with which layers already hold their cross-attention keys (``is_updated``) as the node's
context: the first decoder step (computing them) and the later ones (reading them) are two structures, so two
graphs. In such a call the source's length is its own dimension: the cross-attention tensors, the encoder's output
passed back in (``encoder_outputs``, a model output, itself a pytree) and the arguments that generate gives the
encoder (every name but ``decoder_*``, transformers' own rule for which arguments are the decoder's) span it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.export import Dim
from transformers.cache_utils import (
    Cache,
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    EncoderDecoderCache,
    StaticCache,
    StaticLayer,
)
from transformers.utils import ModelOutput

from fxpeft.errors import FxpeftError, UnsupportedError

__all__ = ["is_cache", "carries_cache", "register_cache_pytrees", "register_dynamic_cache", "check_cache_arguments",
           "cache_dynamic_shapes", "resize_cache_call", "is_output_pytree", "output_dynamic_shapes", "widen_output",
           "is_static_cache", "static_cache_of", "static_cache_length", "check_static_cache", "GraphStaticLayer",
           "write_back_static"]

_LENGTH_DIM = 2  # [batch, heads, length, head_dim]
_registered = False


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers KV cache object."""
    return isinstance(value, Cache)


def carries_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a call passes a KV cache in one of its arguments."""
    return any(is_cache(value) for value in kwargs.values())


def register_cache_pytrees() -> None:
    """Make transformers' ``DynamicCache``, ``EncoderDecoderCache`` and ``StaticCache`` pytrees of their tensors
    (once per process), so that export can take them as inputs and give them as outputs. Done on the first call
    that asks for a cache, not on import: the registration is global to the process."""
    global _registered
    if not _registered:
        register_dynamic_cache()
        _register_encoder_decoder_cache()
        _register_static_cache()
        _registered = True


# -- dynamic caches ------------------------------------------------------------------------------------------------
_LAYER_TYPES = {cls.__name__: cls for cls in (DynamicLayer, DynamicSlidingWindowLayer, DummyLayer)}
_CONTEXT_FORMAT = "fxpeft.DynamicCache/1"  # the serialized context's format (to_dumpable_context)
_TENSOR_LISTS = ("key_cache", "value_cache")  # the two children, named as transformers' registration names them


def _layer_context(cache_index: int, layer: Any) -> tuple:
    """One layer's part of the context: ``(type, is_initialized, holds tensors, sliding window or None,
    records its past)``; raises :class:`~fxpeft.errors.UnsupportedError` for a layer type it cannot rebuild."""
    kind = type(layer).__name__
    if _LAYER_TYPES.get(kind) is not type(layer):
        raise UnsupportedError(
            f"DynamicCache layer {cache_index} is a {kind}: its pytree (fxpeft/capture/caches.py) holds "
            f"{sorted(_LAYER_TYPES)} layers only; this cache cannot be a graph input.")
    window = getattr(layer, "sliding_window", None)
    return kind, bool(layer.is_initialized), layer.keys is not None, window, bool(getattr(layer, "record_past", False))


def _dynamic_context(cache: DynamicCache) -> tuple:
    """What shapes a graph besides the tensors: whether the cache grows layers lazily, and each layer's context."""
    replicate = cache.layer_class_to_replicate
    if replicate not in (None, DynamicLayer):
        raise UnsupportedError(f"A DynamicCache that adds {replicate.__name__} layers lazily cannot be a graph input.")
    return replicate is not None, tuple(_layer_context(index, layer) for index, layer in enumerate(cache.layers))


def _dynamic_children(cache: DynamicCache) -> list[list[torch.Tensor]]:
    """``[[keys of each layer holding tensors], [their values]]``."""
    held = [layer for layer in cache.layers if layer.keys is not None]
    return [[layer.keys for layer in held], [layer.values for layer in held]]


def _flatten_dynamic(cache: DynamicCache):
    return _dynamic_children(cache), _dynamic_context(cache)


def _flatten_dynamic_with_keys(cache: DynamicCache):
    children, context = _flatten_dynamic(cache)
    return [(pytree.MappingKey(name), child) for name, child in zip(_TENSOR_LISTS, children)], context


def _flatten_dynamic_spec(cache: DynamicCache, spec: pytree.TreeSpec) -> list:
    """torch.fx's flatten against a known spec: the children, once the cache's context is the spec's."""
    children, context = _flatten_dynamic(cache)
    if context != spec.context:
        raise ValueError(f"DynamicCache layout {context} does not match the captured layout {spec.context}.")
    return children


def _rebuilt_layer(context: tuple, keys: torch.Tensor | None, values: torch.Tensor | None) -> Any:
    """A layer as ``context`` describes it, holding ``keys``/``values`` as they are (no update, no copy)."""
    kind, initialized, _, window, record_past = context
    layer = DynamicSlidingWindowLayer(sliding_window=window) if window is not None else _LAYER_TYPES[kind]()
    if kind == DummyLayer.__name__:
        return layer
    layer.is_initialized = initialized
    if keys is not None:
        layer.keys, layer.values, layer.device = keys, values, keys.device
    if window is not None:
        layer.record_past = record_past
        layer.cumulative_length = 0 if keys is None else keys.shape[_LENGTH_DIM]  # see the module docstring
    return layer


def _unflatten_dynamic(children, context) -> DynamicCache:
    """A ``DynamicCache`` whose layers hold the given tensors directly (see the module docstring)."""
    keys, values = (iter(child) for child in children)
    replicate, layers = context
    rebuilt = [_rebuilt_layer(layer, *((next(keys), next(values)) if layer[2] else (None, None)))
               for layer in layers]
    cache = DynamicCache.__new__(DynamicCache)
    if replicate:
        Cache.__init__(cache, layer_class_to_replicate=DynamicLayer)
        cache.layers = rebuilt
    else:
        Cache.__init__(cache, layers=rebuilt)
    return cache


def _dumpable_context(context) -> str:
    replicate, layers = context
    return json.dumps({"format": _CONTEXT_FORMAT, "replicate": replicate, "layers": [list(layer) for layer in layers]})


def _context_from_dumpable(dumped: str) -> tuple:
    loaded = json.loads(dumped)
    if not isinstance(loaded, dict) or loaded.get("format") != _CONTEXT_FORMAT:
        raise ValueError(f"A serialized DynamicCache context not in fxpeft's format ({_CONTEXT_FORMAT}): it was "
                         "saved with another DynamicCache pytree registration (e.g. transformers'); load it in a "
                         "process where that one is registered.")
    return bool(loaded["replicate"]), tuple(tuple(layer) for layer in loaded["layers"])


def register_dynamic_cache() -> None:
    """Register fxpeft's ``DynamicCache`` pytree (see the module docstring), replacing transformers'
    ``register_dynamic_cache_export_support`` registration if it came first; another registration (a library's
    own) is left as it is. Idempotent."""
    node = pytree.SUPPORTED_NODES.get(DynamicCache)
    register = pytree.register_pytree_node
    if node is not None:
        if node.unflatten_fn is _unflatten_dynamic or \
                getattr(node.unflatten_fn, "__module__", None) != "transformers.integrations.executorch":
            return
        # torch has no public way to replace a registration: these two replace it in the Python pytree, the one
        # export and fxpeft use (a C++ pytree, where present, keeps transformers' registration).
        pytree._deregister_pytree_node(DynamicCache)
        register = pytree._private_register_pytree_node
    register(DynamicCache, _flatten_dynamic, _unflatten_dynamic,
             serialized_type_name=f"{DynamicCache.__module__}.{DynamicCache.__name__}",
             to_dumpable_context=_dumpable_context, from_dumpable_context=_context_from_dumpable,
             flatten_with_keys_fn=_flatten_dynamic_with_keys)
    fx_pytree.register_pytree_flatten_spec(DynamicCache, _flatten_dynamic_spec)


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
    _register_once(EncoderDecoderCache, _flatten_encoder_decoder, _unflatten_encoder_decoder,
                   _flatten_encoder_decoder_with_keys)


def _register_once(cls: type, flatten, unflatten, flatten_with_keys) -> None:
    """Register ``cls`` as a pytree node unless something registered it already."""
    if cls in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__name__}",
                                flatten_with_keys_fn=flatten_with_keys)


# -- static caches -------------------------------------------------------------------------------------------------
def is_static_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers ``StaticCache`` (fixed-size keys and values, written in place)."""
    return isinstance(value, StaticCache)


def static_cache_of(kwargs: dict[str, Any]) -> StaticCache | None:
    """The ``StaticCache`` a call passes (directly, or as an encoder-decoder cache's part); None when it passes none."""
    for value in kwargs.values():
        parts = [value.self_attention_cache, value.cross_attention_cache] if isinstance(value, EncoderDecoderCache) \
            else [value]
        found = next((part for part in parts if is_static_cache(part)), None)
        if found is not None:
            return found
    return None


def static_cache_length(cache: StaticCache) -> int:
    """The number of positions a static cache holds (its ``max_cache_len``)."""
    return max(layer.max_cache_len for layer in cache.layers)


class GraphStaticLayer(StaticLayer):
    """A ``StaticLayer`` as a captured graph sees it: built from its three tensors, and updated functionally.

    ``update`` writes the new keys and values at the written length with ``index_copy`` (a new tensor, not
    transformers' in-place ``index_copy_``) and advances the length, so the graph returns the written cache
    instead of mutating its inputs (which capture refuses). Its size is read from its keys, so that it is the
    graph's symbolic length, not a constant."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cumulative_length: torch.Tensor):
        # Not StaticLayer.__init__: the tensors exist already (it would allocate them lazily on the first update).
        self.keys, self.values, self.cumulative_length = keys, values, cumulative_length
        self.is_initialized = keys is not None  # a cache not allocated yet is refused at capture
        self.device = cumulative_length.device

    @property
    def max_cache_len(self) -> int:
        return self.keys.shape[_LENGTH_DIM]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states``/``value_states`` ``[batch, heads, n, head_dim]`` at the next ``n`` positions."""
        positions = torch.arange(key_states.shape[_LENGTH_DIM], device=key_states.device) + self.cumulative_length
        self.keys = self.keys.index_copy(_LENGTH_DIM, positions, key_states)
        self.values = self.values.index_copy(_LENGTH_DIM, positions, value_states)
        self.cumulative_length = self.cumulative_length + key_states.shape[_LENGTH_DIM]
        return self.keys, self.values


def _static_children(cache: StaticCache) -> list[tuple]:
    return [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers]


def _layer_kind(layer: Any) -> str:
    return StaticLayer.__name__ if type(layer) in (StaticLayer, GraphStaticLayer) else type(layer).__name__


def _static_context(cache: StaticCache) -> tuple:
    """What shapes the graph besides the tensors: the layer types (a graph's own layers count as ``StaticLayer``)
    and whether each layer holds its tensors yet."""
    return tuple((_layer_kind(layer), bool(layer.is_initialized)) for layer in cache.layers)


def _flatten_static(cache: StaticCache):
    return _static_children(cache), _static_context(cache)


def _flatten_static_with_keys(cache: StaticCache):
    children = _static_children(cache)
    return [(pytree.SequenceKey(index), child) for index, child in enumerate(children)], _static_context(cache)


def _unflatten_static(children, context) -> StaticCache:
    """A ``StaticCache`` of :class:`GraphStaticLayer` (what a graph reads and returns; see the module docstring)."""
    cache = StaticCache.__new__(StaticCache)
    Cache.__init__(cache, layers=[GraphStaticLayer(*child) for child in children])
    return cache


def _register_static_cache() -> None:
    _register_once(StaticCache, _flatten_static, _unflatten_static, _flatten_static_with_keys)


def check_static_cache(name: str, cache: StaticCache) -> None:
    """Raise :class:`~fxpeft.errors.UnsupportedError` unless ``cache`` (the argument ``name``) is a static cache fxpeft
    captures: full-attention layers (``StaticLayer``), not offloaded; and :class:`~fxpeft.errors.FxpeftError` unless
    it holds its tensors already."""
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds:
        raise UnsupportedError(
            f"{name}=StaticCache with {kinds} layers: fxpeft captures static caches of full-attention layers "
            "(StaticLayer) only; sliding-window and other static layers are not supported yet. Leave the cache to "
            "generate() without cache_implementation (a DynamicCache).")
    if getattr(cache, "offloading", False):
        raise UnsupportedError(f"{name}: an offloaded StaticCache is not supported; use cache_implementation='static'.")
    if not cache.is_initialized:
        raise FxpeftError(
            f"{name}=StaticCache has not allocated its tensors yet (transformers allocates them on the first update, "
            "inside the model, which a captured graph cannot do). Call cache.early_initialization(batch_size, "
            "num_heads, head_dim, dtype, device) first, or let generate() make the cache "
            "(cache_implementation='static').")


def write_back_static(given: StaticCache, returned: StaticCache) -> None:
    """Copy the tensors of the cache a graph returned into the caller's cache, in place (its tensors keep their
    storage, as after transformers' in-place update), so that ``given`` holds the written cache."""
    for layer, new in zip(given.layers, returned.layers):
        for name in ("keys", "values", "cumulative_length"):
            target, source = getattr(layer, name), getattr(new, name)
            if target is not source:
                target.copy_(source)


def check_cache_arguments(kwargs: dict[str, Any]) -> None:
    """Raise :class:`~fxpeft.errors.UnsupportedError` for a cache that does not flatten into its tensors (export
    would take it as a constant, baking one call's cache into the graph), and for a static cache that
    :func:`check_static_cache` refuses."""
    for name, value in kwargs.items():
        if isinstance(value, EncoderDecoderCache) and static_cache_of({name: value}) is not None:
            raise UnsupportedError(
                f"{name}: a static cache in an encoder-decoder model is not supported yet. Leave the cache to "
                "generate() without cache_implementation (a DynamicCache).")
        if is_static_cache(value):
            check_static_cache(name, value)
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
    cross-attention cache keep the source's length (at least 2). A call with a static cache: see
    :func:`_resize_static_call`."""
    if static_cache_of(kwargs) is not None:
        return _resize_static_call(kwargs, sequence_dims)
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


def _resize_static_call(kwargs: dict[str, Any], sequence_dims) -> dict[str, Any]:
    """A call with a static cache, resized so that batch and query are at least 2 and the cache's size (``length``)
    exceeds the query: so export keeps all three symbolic and never equates the query with the cache's size.

    An attention mask (an argument named ``*attention_mask``) as long as the cache spans it and takes its new size;
    other sequence dimensions as long as the query take the new query length. The written lengths are kept: their
    values do not shape the graph."""
    cache = static_cache_of(kwargs)
    length = static_cache_length(cache)
    batch = cache.layers[0].keys.shape[0]
    spans = {name for name, value in kwargs.items() if isinstance(value, torch.Tensor)
             and name.endswith("attention_mask") and value.dim() == 2 and value.shape[1] == length}
    sequences = [value.shape[1] for name, value in kwargs.items()
                 if isinstance(value, torch.Tensor) and 1 in sequence_dims(name, value) and name not in spans]
    query = min(sequences, default=1)
    new_batch, new_query = max(batch, 2), max(query, 2)
    new_length = max(length, new_query + 1)

    def plain(name: str, value: torch.Tensor) -> torch.Tensor:
        dims = sequence_dims(name, value)
        if 0 in dims and value.shape[0] == batch:
            value = _resized(value, 0, new_batch)
        if 1 in dims:
            size = new_length if name in spans else new_query if value.shape[1] == query else None
            value = _resized(value, 1, size or max(value.shape[1], 2))
        return value

    def cached(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            value = _resized(_resized(value, 0, new_batch), _LENGTH_DIM, new_length)
        return value

    return {name: plain(name, value) if isinstance(value, torch.Tensor) else
            pytree.tree_map(cached, value) if is_static_cache(value) else value for name, value in kwargs.items()}
