"""A call's arguments as capture takes them: bound to the names of the model's ``forward``, checked against what it
accepts, per-batch counts made data, and keyword extras (``**kwargs``) given names that ``torch.export`` accepts.

transformers models take many arguments through ``**kwargs`` (``output_hidden_states``, ``output_attentions``,
``num_items_in_batch``, ...; typed ``Unpack[TransformersKwargs]``) and ``return_dict`` through a decorator. Such a
model with ``**kwargs`` accepts its named parameters, the keys of its ``**kwargs`` annotation and of
``TransformersKwargs``, ``return_dict`` and the loss functions' ``shift_labels``. Anything else (and, for a model
without ``**kwargs``, anything but its parameters) is an :class:`~fxpeft.errors.ArgumentError` naming the accepted
ones, where the eager model would silently ignore it (a typo such as ``output_hiden_states=True`` would otherwise
pass unnoticed). A model that is not a transformers model and takes untyped ``**kwargs`` accepts any keyword.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from typing import Any, Iterator

import torch

from fxpeft.capture.example_inputs import is_hf_model
from fxpeft.errors import ArgumentError

__all__ = ["LOSS_COUNTS", "accepted_keywords", "bind_arguments", "check_keywords", "counts_as_data",
           "keywords_as_parameters"]

# Keyword arguments that are numbers which change from batch to batch (Trainer's token count for the loss): a
# Python number is made a 0-dim tensor, so that the graph reads it as data instead of capturing once per value.
LOSS_COUNTS = ("num_items_in_batch",)
_DECORATOR_KEYWORDS = ("return_dict",)  # consumed by transformers' ``can_return_tuple`` around forward
_LOSS_KEYWORDS = ("shift_labels",)  # what transformers' loss functions take from **kwargs (collators may pass it)


def _signature(model: torch.nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def _var_keyword(signature: inspect.Signature) -> inspect.Parameter | None:
    return next((p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def _named(signature: inspect.Signature) -> list[str]:
    return [name for name, p in signature.parameters.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def _typed_keys(annotation: Any) -> frozenset[str] | None:
    """The keys of a ``**kwargs: Unpack[SomeTypedDict]`` annotation; None when it names no TypedDict."""
    if typing.get_origin(annotation) is typing.Unpack:
        annotation = typing.get_args(annotation)[0]
    keys = getattr(annotation, "__required_keys__", None)
    if keys is None:
        return None
    return frozenset(keys) | frozenset(getattr(annotation, "__optional_keys__", ()))


def _transformers_keys() -> frozenset[str]:
    try:
        from transformers.utils.generic import TransformersKwargs  # optional dependency
    except ImportError:
        return frozenset()
    return _typed_keys(TransformersKwargs) or frozenset()


@functools.lru_cache(maxsize=256)
def _accepted(function: Any, bound: bool, hf_model: bool) -> frozenset[str] | None:
    signature = inspect.signature(function)
    named = frozenset(_named(signature)[1 if bound else 0:])
    extra = _var_keyword(signature)
    if extra is None:
        return named
    typed = _typed_keys(extra.annotation)
    if not hf_model:
        return None if typed is None else named | typed
    return named | (typed or frozenset()) | _transformers_keys() | frozenset(_DECORATOR_KEYWORDS + _LOSS_KEYWORDS)


def accepted_keywords(model: torch.nn.Module) -> frozenset[str] | None:
    """The keyword arguments ``model``'s forward accepts (see the module docstring); None: any keyword."""
    forward = model.forward
    function = getattr(forward, "__func__", None)  # a bound method: its function (its first parameter is self)
    return _accepted(forward if function is None else function, function is not None, is_hf_model(model))


def check_keywords(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Raise :class:`~fxpeft.errors.ArgumentError` for keywords of ``kwargs`` that ``model`` does not take."""
    accepted = accepted_keywords(model)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ArgumentError(
            f"{type(model).__name__}.forward does not take {', '.join(map(repr, unknown))}. It accepts: "
            f"{', '.join(sorted(accepted))} (and adapter_names, which the adapted model takes itself). "
            "Check the spelling, or leave the argument out.")


def bind_arguments(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's positional and keyword arguments as keyword arguments of ``model.forward`` (what arrives through
    its ``**kwargs`` stays a keyword of its own)."""
    if not args:
        return dict(kwargs)
    signature = _signature(model)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as error:
        check_keywords(model, kwargs)  # an unknown keyword: the error that names the accepted ones
        raise ArgumentError(f"{type(model).__name__}.forward{signature}: {error}.") from None
    merged = dict(bound.arguments)
    extra = _var_keyword(signature)
    if extra is not None and extra.name not in kwargs:
        merged.update(merged.pop(extra.name, {}))
    return merged


def counts_as_data(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each Python number in :data:`LOSS_COUNTS` as a 0-dim float32 tensor (on the device of the
    call's first tensor), so that a new count is new data for the same graph, not a new signature; float32 as
    ``Trainer`` passes it (its token count divided by the parallel group's size), so both share one graph. Dividing a
    float32 loss by the tensor gives what dividing it by the number gives."""
    counts = [name for name in LOSS_COUNTS if isinstance(kwargs.get(name), (int, float))
              and not isinstance(kwargs.get(name), bool)]
    if not counts:
        return kwargs
    device = next((value.device for value in kwargs.values() if isinstance(value, torch.Tensor)), None)
    return {name: torch.tensor(float(value), device=device) if name in counts else value
            for name, value in kwargs.items()}


@contextlib.contextmanager
def keywords_as_parameters(model: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """While capturing, give ``model`` a ``forward`` whose parameters are ``names`` (keyword-only) when some of them
    arrive through its ``**kwargs``.

    ``torch.export`` (torch 2.13) takes ``dynamic_shapes`` keyed by the forward's parameter names, with the
    ``**kwargs`` extras nested under ``"kwargs"``, but checks them against the call's keywords, flat, later on: no
    ``dynamic_shapes`` satisfies both once an extra is passed. With explicit parameters both agree. The instance
    attribute shadows the class's ``forward`` (which it calls) only for the capture, and is removed afterwards."""
    named = set(_named(_signature(model)))
    if all(name in named for name in names):
        yield
        return
    previous = model.__dict__.get("forward")
    original = model.forward

    def forward(**kwargs):
        return original(**kwargs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names])
    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        if previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = previous
