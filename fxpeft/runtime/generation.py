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

What ``generate`` reads from the model besides its call comes from the base model: its config and
``generation_config``, the signature of its ``forward`` (which inputs ``generate`` prepares), and the hooks
that prepare those inputs (``prepare_inputs_for_generation``, ``_update_model_kwargs_for_generation``,
``_prepare_cache_for_generation``: they shape inputs and never run the model, so a model class that overrides
them keeps its own). The base model's methods are called, never replaced.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import MutableMapping
from typing import Any, Callable

import torch
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput

from fxpeft.capture.caches import is_cache
from fxpeft.errors import FxpeftError

__all__ = ["AdaptedEncoder", "Generation", "call_batch", "expand_rows", "update_caches_in_place"]

# The base model's hooks that prepare a step's inputs (never running the model): a model class may override them.
_PREPARATION_HOOKS = ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation",
                      "_prepare_cache_for_generation", "_supports_default_dynamic_cache")


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
    Made for one ``generate`` call; it holds no state of its own."""

    def __init__(self, model: Callable[..., Any], base_model: torch.nn.Module,
                 adapter_indices: torch.Tensor | None = None):
        self._model = model
        self._base = base_model
        self._adapter_indices = adapter_indices
        for name in _PREPARATION_HOOKS:
            if hasattr(base_model, name):
                setattr(self, name, getattr(base_model, name))

        def forward(*args, **kwargs):
            return self._call(*args, **kwargs)

        # generate() reads the forward's parameters to decide which inputs to prepare (attention_mask,
        # position_ids, logits_to_keep): they are the base model's.
        forward.__signature__ = inspect.signature(base_model.forward)
        self.forward = forward

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
        # generate() asks for return_dict=True at every call; the graphs of a model that returns its output class
        # by default give it anyway (and a captured call's keyword arguments must be forward's own parameters).
        if kwargs.get("return_dict") is True and getattr(self.config, "return_dict", True):
            del kwargs["return_dict"]
        if self._adapter_indices is not None:
            kwargs["adapter_names"] = expand_rows(self._adapter_indices, call_batch(args, kwargs))
        return self._model(*args, **kwargs)

    def get_compiled_call(self, compile_config=None):
        """transformers compiles the model call itself for compileable caches; fxpeft's call is the graph, which
        ``torch.compile(adapted)`` compiles. Never reached while :meth:`_valid_auto_compile_criteria` is False."""
        return self.__call__

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        return False  # see get_compiled_call: the adapted model is compiled by its user, not inside generate

    @contextlib.contextmanager
    def _optimize_model_for_decode(self):
        # transformers switches the experts implementation of MoE models for decoding; a captured graph's is fixed.
        yield
