"""Generation through transformers' own ``GenerationMixin``, every model call a captured, rewritten graph.

``AdaptedModel.generate`` hands its arguments to a :class:`Generation`: a ``GenerationMixin`` whose model call is
the adapted model, so that greedy search, sampling, beam search, logits processors, stopping criteria,
streamers and output classes are transformers' own, and their results are what transformers gives. Each call
``generate`` makes (the prefill with an empty ``DynamicCache``, then one decode step per token with the filled
cache) is a signature of the adapted model like any other: captured once with the cache as graph inputs and
outputs (:mod:`fxpeft.capture.caches`), rewritten by the same rules, reading the same adapter tensors. A new
prompt length, batch size or past length runs the same graphs.

A mixed batch (``generate(adapter_names=[...])``, one adapter per prompt) gives the Generation the per-prompt adapter
indices once. transformers expands the batch for beams and ``num_return_sequences`` (each prompt repeated ``k``
times, consecutively, and beam search reorders beams only within a prompt's group), so every model call repeats each
index ``k = call's batch / prompts`` times in place: row ``i`` of any call runs prompt ``i // k``'s adapter. The
indices are a tensor, so a new pattern of names is new data for the same graphs.

A static cache (``generate(cache_implementation="static")``, or a ``StaticCache`` passed as ``cache``; decoder-only
models, full-attention layers) is allocated before the prefill (the graph cannot allocate it lazily, as transformers
does inside the model) and checked against the prompt and the new tokens asked for (a
:class:`~fxpeft.errors.GenerationError` before any token when it is too short). Each step gets ``generate``'s 2D
padding mask padded to the cache's size instead of transformers' 4D mask (:func:`static_inputs`), so the prefill
and every decode step are one signature, one graph, with the cache's size symbolic. Compiled decoding follows
transformers: when its rule holds (:meth:`Generation._valid_auto_compile_criteria`: a static cache, and a GPU or a
``compile_config`` with ``_compile_all_devices``), the decode steps run ``torch.compile`` of the adapted model's
call (the prefill runs eagerly and captures the graph first). That compiled call is made once per compile
configuration and kept across ``generate`` calls (:func:`compiled_call`); adapters switched, disabled or rescaled,
new ``adapter_names`` patterns (a tensor), new prompts and larger caches are data to it, and recompile nothing.

What ``generate`` reads from the model besides its call comes from the base model: its config and
``generation_config``, the signature of its ``forward`` (which inputs ``generate`` prepares), and the hooks
that prepare those inputs (``prepare_inputs_for_generation``, ``_update_model_kwargs_for_generation``,
``_prepare_cache_for_generation``: they shape inputs and never run the model, so a model class that overrides
them keeps its own; fxpeft adds to the first and the last for static caches). The base model's methods are called,
never replaced.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import MutableMapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.generation import CompileConfig, GenerationMixin
from transformers.modeling_outputs import BaseModelOutput

from fxpeft.capture.caches import (
    check_static_cache,
    is_cache,
    is_static_cache,
    static_cache_length,
    static_cache_of,
    write_back_static,
)
from fxpeft.errors import FxpeftError, GenerationError, UnsupportedError

__all__ = ["AdaptedEncoder", "Generation", "call_batch", "compiled_call", "expand_rows", "static_inputs",
           "update_caches_in_place"]

# The base model's hooks that prepare a step's inputs (never running the model): a model class may override them.
# (prepare_inputs_for_generation and _prepare_cache_for_generation are the base model's too, wrapped for static
# caches: see Generation.)
_PREPARATION_HOOKS = ("_update_model_kwargs_for_generation", "_supports_default_dynamic_cache")
# One compiled model call per compile configuration, for every adapted model (see compiled_call).
_COMPILED_CALLS: dict[str, Callable[..., Any]] = {}


def update_caches_in_place(inputs: dict[str, Any], output: Any) -> Any:
    """After a call that passed a KV cache: the cache object passed in holds what the graph returned, and the
    output names that object, as after the eager model's call (its forward updates the cache in place).

    A graph is functional (it returns the new cache's tensors), but callers keep the object they passed:
    ``generate`` for a user's own cache, a loop that calls the model with the same cache each step."""
    given = [value for value in inputs.values() if is_cache(value)]
    if not given or not isinstance(output, MutableMapping):
        return output
    for name, value in list(output.items()):
        if not is_cache(value):
            continue
        for cache in given:
            if type(cache) is type(value) and cache is not value:
                if is_static_cache(cache):  # its tensors keep their storage (compiled decoding relies on it)
                    write_back_static(cache, value)
                else:
                    vars(cache).update(vars(value))
                output[name] = cache
                break
    return output


def call_batch(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call: the rows of its ids or embeddings (else of its first tensor argument);
    None when no argument is a tensor with a batch dimension."""
    named = [kwargs.get(name) for name in ("input_ids", "inputs_embeds")]
    for value in [*args, *named, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def expand_rows(indices: torch.Tensor, batch: int | None) -> torch.Tensor:
    """Per-prompt ``indices`` for a call of ``batch`` rows where transformers repeated each prompt ``k`` times
    consecutively (beams, ``num_return_sequences``): each index repeated ``k`` times in place."""
    prompts = indices.shape[0]
    if batch is None or batch == prompts:
        return indices
    if batch % prompts:
        raise FxpeftError(
            f"generate(adapter_names=...): a model call has a batch of {batch} rows, which is not a multiple of the "
            f"{prompts} adapter names given, so the rows cannot be matched to their prompts' adapters. transformers "
            "repeats each prompt for num_beams and num_return_sequences; a batch grown another way (e.g. a custom "
            "prepare_inputs_for_generation) cannot take adapter_names: generate each adapter's rows separately.")
    return indices.repeat_interleave(batch // prompts)


def static_inputs(inputs: dict[str, Any], attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """A step's prepared inputs with a static cache, as fxpeft's graphs take them: ``attention_mask`` is
    ``generate``'s 2D padding mask (as long as the tokens so far) padded with zeros to the cache's size, in place of
    the 4D mask transformers builds for compileable caches, so that one graph (whose mask and cache share one
    symbolic length) serves the prefill and every decode step; the model builds the same 4D mask from it inside the
    graph. Where ``generate`` dropped the mask (no padding), a mask of ones: positions past the written ones are
    hidden by causality anyway, and every batch then runs the same graph (and compiled code) with or without
    padding. Other inputs are returned as they are."""
    cache = static_cache_of(inputs)
    if cache is None or not is_static_cache(cache):
        return inputs
    length = static_cache_length(cache)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        mask = F.pad(attention_mask, (0, length - attention_mask.shape[1]))
    else:
        keys = cache.layers[0].keys
        mask = torch.ones(keys.shape[0], length, dtype=torch.long, device=keys.device)
    return {**inputs, "attention_mask": mask}


def _run_model(model: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return model(*args, **kwargs)


def compiled_call(compile_config: CompileConfig) -> Callable[..., Any]:
    """``torch.compile`` of a call of a model: ``compiled_call(config)(model, args, kwargs)`` is ``model(*args,
    **kwargs)`` compiled with ``config`` (transformers' ``CompileConfig``). Made once per configuration and kept, so
    that every ``generate`` call (and every adapted model: dynamo guards on the model it is given) reuses its
    compiled code instead of compiling a new wrapper."""
    key = repr(sorted(compile_config.to_dict().items()))
    if key not in _COMPILED_CALLS:
        _COMPILED_CALLS[key] = torch.compile(_run_model, **compile_config.to_dict())
    return _COMPILED_CALLS[key]


def _mark_cache_length_dynamic(kwargs: dict[str, Any]) -> None:
    """Let a compiled decode step keep the static cache's size symbolic (the cache's keys and values, and the mask
    that spans it): a later ``generate`` with a longer prompt or more new tokens gets a larger cache and must not
    compile again."""
    cache = static_cache_of(kwargs)
    if cache is None:
        return
    for layer in cache.layers:
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        torch._dynamo.maybe_mark_dynamic(mask, 1)


class AdaptedEncoder:
    """What ``Generation.get_encoder()`` gives: called as the base model's encoder is (``generate`` fills the
    arguments its ``forward`` takes), it runs ``call`` (the adapted model's call) with those arguments and a
    one-token ``decoder_input_ids``, and returns the encoder's part of the output as a ``BaseModelOutput``."""

    def __init__(self, call: Callable[..., Any], encoder: torch.nn.Module, accepted: set[str]):
        self._call = call
        self._accepted = accepted

        def forward(*args, **kwargs):
            return self._encode(*args, **kwargs)

        forward.__signature__ = inspect.signature(encoder.forward)
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _encode(self, *args, **kwargs) -> BaseModelOutput:
        if args:
            raise FxpeftError("The adapted encoder takes keyword arguments only (as generate() passes them).")
        kwargs.pop("return_dict", None)
        for flag in ("output_attentions", "output_hidden_states"):  # asked for only when True: one signature
            if not kwargs.get(flag):
                kwargs.pop(flag, None)
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        unknown = sorted(set(kwargs) - self._accepted)
        if unknown:
            raise FxpeftError(f"generate(): the encoder's arguments {unknown} are not arguments of the model's own "
                              "forward, so the adapted model cannot run its encoder with them.")
        batch = call_batch((), kwargs) or 1
        device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        decoder_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # any token: its output is dropped
        output = self._call(**kwargs, decoder_input_ids=decoder_ids)
        return BaseModelOutput(last_hidden_state=output["encoder_last_hidden_state"],
                               hidden_states=output.get("encoder_hidden_states"),
                               attentions=output.get("encoder_attentions"))


class Generation(GenerationMixin):
    """``generate`` over the adapted model: transformers' decoding loops, each model call a graph of ``model``.

    ``model`` is the adapted model (called with the base model's arguments), ``base_model`` the model it adapts.
    ``adapter_indices`` (optional, one index per prompt, as ``AdaptedModel.adapter_indices`` gives them): each call
    passes them to ``model`` as ``adapter_names``, expanded to the call's batch (see the module docstring).
    ``reserved_positions``: cache positions ``model`` fills itself in front of the prompt (virtual tokens), which a
    static cache must hold besides the prompt and the new tokens. Made for one ``generate`` call; it holds no state
    of its own."""

    def __init__(self, model: Callable[..., Any], base_model: torch.nn.Module,
                 adapter_indices: torch.Tensor | None = None, reserved_positions: int = 0):
        self._model = model
        self._base = base_model
        self._adapter_indices = adapter_indices
        self._reserved = reserved_positions
        for name in _PREPARATION_HOOKS:
            if hasattr(base_model, name):
                setattr(self, name, getattr(base_model, name))

        def forward(*args, **kwargs):
            return self._call(*args, **kwargs)

        # generate() reads the forward's parameters to decide which inputs to prepare (attention_mask,
        # position_ids, logits_to_keep): they are the base model's.
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward
        self._takes_mask = "attention_mask" in forward.__signature__.parameters

    # -- what transformers reads from the model -----------------------------------------------------------
    @property
    def config(self):
        return self._base.config

    @property
    def generation_config(self):
        return self._base.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self._base.generation_config = value

    @property
    def device(self) -> torch.device:
        return self._base.device

    @property
    def dtype(self) -> torch.dtype:
        return self._base.dtype

    @property
    def main_input_name(self) -> str:
        return self._base.main_input_name

    def get_encoder(self, modality: str | None = None) -> AdaptedEncoder:
        """The encoder ``generate`` runs once per call (encoder-decoder models): the adapted model's call with the
        encoder's arguments, see :class:`AdaptedEncoder`."""
        encoder = self._base.get_encoder() if modality is None else self._base.get_encoder(modality=modality)
        accepted = set(inspect.signature(self._base.forward).parameters)
        return AdaptedEncoder(self._call, encoder, accepted)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args, **kwargs) -> dict[str, Any]:
        """The base model's inputs for a step, with a static cache's mask as :func:`static_inputs` gives it."""
        inputs = self._base.prepare_inputs_for_generation(input_ids, *args, **kwargs)
        return static_inputs(inputs, kwargs.get("attention_mask")) if self._takes_mask else inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict[str, Any], generation_mode,
                                      batch_size: int, max_cache_length: int, *args, **kwargs) -> None:
        """The base model's hook (the cache ``generate`` asks for, or the user's; a static cache it makes holds the
        reserved positions too), then, for a static cache, the checks and the allocation a graph needs before the
        prefill (see :meth:`_prepare_static_cache_tensors`)."""
        needed = max_cache_length + self._reserved
        self._base._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                 needed, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if is_cache(cache) and static_cache_of({"cache": cache}) is not None:
            rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
            self._prepare_static_cache_tensors(cache, rows, needed)

    def _prepare_static_cache_tensors(self, cache: Any, rows: int, needed: int) -> None:
        """Before any token: refuse a static cache that an encoder-decoder model would use, or with layers fxpeft
        does not capture (sliding windows; :func:`~fxpeft.capture.caches.check_static_cache`), or shorter than
        ``needed`` (prompt and new tokens: a :class:`~fxpeft.errors.GenerationError`, where transformers would fail
        or overwrite mid-generation); and allocate its tensors now for ``rows`` rows (transformers allocates them
        lazily on the first update, inside the model, which a graph cannot do)."""
        if not is_static_cache(cache) or self.config.is_encoder_decoder:
            raise UnsupportedError(
                "generate() with a static cache is supported for decoder-only models; leave the cache to generate() "
                "without cache_implementation (a DynamicCache) for this encoder-decoder model.")
        if static_cache_length(cache) < needed:
            virtual = f" and {self._reserved} virtual tokens" if self._reserved else ""
            raise GenerationError(
                f"generate(): the StaticCache holds {static_cache_length(cache)} positions, but the prompt and the new "
                f"tokens asked for{virtual} need {needed}: make the cache with max_cache_len >= {needed}, ask for "
                "fewer new tokens, or pass cache_implementation='static' and let generate() size it.")
        if not cache.is_initialized:
            shape = self._base._get_static_cache_init_shape()
            if shape is None:
                raise UnsupportedError(
                    f"generate() with a static cache: transformers cannot allocate a StaticCache ahead of time for "
                    f"{type(self._base).__name__} (layers on several devices, or distinct key and value sizes); leave "
                    "the cache to generate() without cache_implementation (a DynamicCache).")
            cache.early_initialization(batch_size=rows, num_heads=shape[0], head_dim=shape[1], dtype=self.dtype,
                                       device=self.device)
        check_static_cache("cache", cache)

    @property
    def _is_stateful(self) -> bool:
        return getattr(self._base, "_is_stateful", False)

    def __getattr__(self, name: str) -> Any:
        """Other attributes ``generate`` may read (``hf_quantizer``, ``hf_device_map``, ``is_remote_code``,
        ``get_input_embeddings``, ...) are the base model's."""
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._base, name)

    # -- the model call -------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _call(self, *args, **kwargs):
        return self._run(self._model, *args, **kwargs)

    def _run(self, model: Callable[..., Any], *args, **kwargs):
        """One model call of ``generate``, made by ``model`` (the adapted model, or its compiled call)."""
        # generate() asks for return_dict=True at every call; the graphs of a model that returns its output class
        # by default give it anyway (and a captured call's keyword arguments must be forward's own parameters).
        if kwargs.get("return_dict") is True and getattr(self.config, "return_dict", True):
            del kwargs["return_dict"]
        if self._adapter_indices is not None:
            kwargs["adapter_names"] = expand_rows(self._adapter_indices, call_batch(args, kwargs))
        return model(*args, **kwargs)

    def get_compiled_call(self, compile_config: CompileConfig | None = None) -> Callable[..., Any]:
        """The decode step, compiled: what transformers calls for every step after the prefill when
        :meth:`_valid_auto_compile_criteria` holds (a static cache; see the module docstring). The prefill stays
        eager, so the graph it captures exists before the compiled call runs it; the compiled code is kept across
        ``generate`` calls (:func:`compiled_call`)."""
        default = getattr(self._base, "_default_compile_config", CompileConfig)
        compiled = compiled_call(compile_config or default())

        def compiled_model(*args, **kwargs):
            _mark_cache_length_dynamic(kwargs)
            return compiled(self._model, args, kwargs)

        return functools.partial(self._run, compiled_model)

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """transformers' rule (a compileable cache such as ``StaticCache``; a GPU, or ``compile_config`` with
        ``_compile_all_devices`` set; no quantizer that forbids it; ``disable_compile`` unset), unless the adapted
        model's own call is compiled already (``adapted.compile()``, or ``nn.Module.compile``)."""
        if getattr(self._model, "compiled_in_place", False) or getattr(self._model, "_compiled_call_impl", None):
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    @contextlib.contextmanager
    def _optimize_model_for_decode(self):
        # transformers switches the experts implementation of MoE models for decoding; a captured graph's is fixed.
        yield
