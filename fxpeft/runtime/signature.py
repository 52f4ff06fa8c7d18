"""The adapted model's class per base model class: ``forward`` with the base model's signature (plus
``adapter_names``), so that libraries which read it from the *class* see the base model's arguments.

transformers' ``Trainer`` keeps only the dataset columns named by ``inspect.signature(model.forward)``, finds the
label columns and whether the model can return a loss from ``inspect.signature(type(model).forward)``, and passes
``num_items_in_batch`` when the model's ``accepts_loss_kwargs`` (or its ``**kwargs``) say the loss takes it. The
adapted model's own ``forward(*args, adapter_names=None, **kwargs)`` names nothing, so for each base model class
:func:`adapted_class` makes (once, cached) a subclass of the adapted model class whose ``forward`` is the same
function with the base forward's signature and ``adapter_names`` (keyword-only) as its ``__signature__``. Its name
is ``Adapted<BaseClass>`` (``find_labels`` looks for ``QuestionAnswering`` in it). It also carries what Trainer reads
from a transformers model to pass and count loss arguments: ``accepts_loss_kwargs`` (the base class's, else whether
its forward takes ``**kwargs``), ``loss_type`` (the base model's) and ``_get_name()``: the base class's name, by which
Trainer's label smoothing recognises a causal LM (whose labels it shifts); the printed form still reads
``Adapted<BaseClass>(...)``.

Such a class is made at run time, so pickle cannot find it by name: an instance pickles as
``(instance_of, (adapted model class, base model class), state)`` (see :func:`reduce`), and unpickling makes or
finds the same class again. Nothing else about pickling (what the state holds) is decided here.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

from torch import nn

__all__ = ["adapted_class", "base_class_of", "instance_of", "reduce"]

_BASE_CLASS = "_fxpeft_base_class"  # class attribute of a generated class: the base model class it was made for


@functools.lru_cache(maxsize=None)
def adapted_class(adapted: type, base: type) -> type:
    """The subclass of ``adapted`` (the adapted model class) for base models of class ``base``, made once."""
    forward = _copy(adapted.forward)
    forward.__signature__ = _with_adapter_names(inspect.signature(base.forward))
    namespace = {
        "__module__": adapted.__module__,
        "__doc__": f"{adapted.__name__} over a {base.__module__}.{base.__qualname__} (fxpeft/runtime/signature.py).",
        "forward": forward,
        # Trainer passes num_items_in_batch to forward when this is true: as the base model would take it.
        "accepts_loss_kwargs": getattr(base, "accepts_loss_kwargs", _var_keyword(forward.__signature__)),
        # Trainer counts the tokens of a causal LM's loss over labels[..., 1:] when the loss type says it shifts.
        "loss_type": property(_loss_type, doc="The base model's ``loss_type`` (transformers' Trainer reads it)."),
        # Trainer's label smoothing shifts the labels of models whose _get_name() is a causal LM class's name; the
        # printed form keeps the generated class's name.
        "_get_name": lambda self: base.__name__,
        "__repr__": lambda self: "Adapted" + nn.Module.__repr__(self),
        _BASE_CLASS: base,
    }
    cls = type(f"Adapted{base.__name__}", (adapted,), namespace)
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    return cls


def base_class_of(cls: type) -> type | None:
    """The base model class a class made by :func:`adapted_class` is for; None for any other class."""
    return cls.__dict__.get(_BASE_CLASS)


def instance_of(adapted: type, base: type) -> Any:
    """An empty instance of ``adapted_class(adapted, base)``: unpickling's first step (its state is set after)."""
    cls = adapted_class(adapted, base)
    return cls.__new__(cls)


def reduce(obj: Any) -> tuple | None:
    """``obj.__reduce_ex__``'s value for an instance of a class made by :func:`adapted_class` (None for others):
    rebuilt by :func:`instance_of` from the adapted model class and the base model class, both importable, then
    given ``obj.__getstate__()``."""
    base = base_class_of(type(obj))
    if base is None:
        return None
    return instance_of, (type(obj).__mro__[1], base), obj.__getstate__()


def _copy(function: types.FunctionType) -> types.FunctionType:
    """A new function object running ``function``'s code (so it can carry its own ``__signature__``): no extra call
    frame in eager calls or in what torch.compile traces."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = dict(function.__kwdefaults__ or {})
    copy.__dict__.update(function.__dict__)
    copy.__doc__ = function.__doc__
    return copy


def _var_keyword(signature: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def _loss_type(self) -> str | None:
    return getattr(self.base_model, "loss_type", None)


def _with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` (a forward's, ``self`` first) with ``adapter_names=None`` keyword-only, before ``**kwargs``."""
    parameters = [p for p in signature.parameters.values() if p.name != "adapter_names"]
    adapter_names = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    return signature.replace(parameters=[*parameters[:at], adapter_names, *parameters[at:]],
                             return_annotation=signature.return_annotation)
