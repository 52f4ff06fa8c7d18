"""Capture: any ``nn.Module`` to a lifted fx graph, with dynamic batch and sequence dimensions.

transformers 5 has no fx tracer and ``torch.fx.symbolic_trace`` fails on its models, so capture is
``torch.export.export(..., strict=False)``. The model is captured in train mode (so dropout appears in the
graph; :class:`fxpeft.program.Program` derives the eval twin) and with ``use_cache=False`` where the
forward takes it, unless the call asks for a KV cache (``use_cache=True`` or a cache passed in: see
:mod:`fxpeft.capture.caches`). The model's own mode is restored afterwards; its tensors are never copied.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from fxpeft.capture import disk_cache
from fxpeft.capture.arguments import bind_arguments, check_keywords, counts_as_data, keywords_as_parameters
from fxpeft.capture.caches import carries_cache, check_cache_arguments, register_cache_pytrees
from fxpeft.capture.example_inputs import default_example_kwargs, dynamic_shapes_for, is_hf_model, widen_example
from fxpeft.capture.grad_regions import inline_grad_regions
from fxpeft.capture.quantized_calls import quantized_layers_as_ops
from fxpeft.capture.tidy import drop_no_ops
from fxpeft.errors import CaptureError, FxpeftError
from fxpeft.graph.program import InputSource, Program, signature_key

__all__ = ["CAPTURE_LOCK", "capture", "is_hf_model", "forward_kwargs", "fixed_kwargs", "device_of"]

# Held by every capture, and by whoever captures and records a program in one step (AdaptedModel): re-entrant.
CAPTURE_LOCK = threading.RLock()

_INPUT_KIND_NAMES = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
    InputKind.CUSTOM_OBJ: "constant",
    InputKind.USER_INPUT: "user",
}


def forward_kwargs(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind a call's positional and keyword arguments to the names of ``model.forward``'s parameters (those that
    arrive through its ``**kwargs`` keep their own names; see :mod:`fxpeft.capture.arguments`). A per-batch count
    passed as a number (``num_items_in_batch=512``) becomes a 0-dim tensor: data of one graph, not a new signature."""
    return counts_as_data(bind_arguments(model, args, kwargs))


def _fixed_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """The arguments fxpeft sets in every call of ``model``: ``use_cache`` for transformers models that take it."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params and is_hf_model(model) else {}


def fixed_kwargs(model_fixed: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The fixed arguments of one call (``model_fixed``: what every call of the model fixes):
    ``use_cache=False``, so that graphs return no cache, unless the call asks for one with ``use_cache=True`` or
    by passing a cache (a generation step): then ``use_cache=True``, and the graph takes and returns its tensors."""
    if "use_cache" not in model_fixed:
        return model_fixed
    wants_cache = kwargs.get("use_cache") is True or carries_cache(kwargs)
    if wants_cache:
        register_cache_pytrees()
    return {"use_cache": wants_cache}


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else its first buffer; cpu for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def capture(model: torch.nn.Module, kwargs: dict[str, Any] | None = None, *,
            dynamic_shapes: dict[str, Any] | None = None) -> Program:
    """Capture ``model`` called with ``kwargs`` (built from its config for transformers models).

    Returns a :class:`Program` whose placeholders are fed from the model's parameters and buffers by name.
    Raises :class:`fxpeft.errors.CaptureError` when export fails, with the reason and what to pass.
    Captures run one at a time in a process (:data:`CAPTURE_LOCK`): ``torch.export`` keeps global state (its fake
    mode stack, the patches of non-strict tracing), so two at once in two threads break each other.
    """
    with CAPTURE_LOCK:
        return _capture(model, kwargs, dynamic_shapes)


def _capture(model: torch.nn.Module, kwargs: dict[str, Any] | None, dynamic_shapes: dict[str, Any] | None) -> Program:
    device = device_of(model)
    if kwargs is None:
        kwargs = default_example_kwargs(model, device)
    fixed = fixed_kwargs(_fixed_kwargs(model), kwargs)
    check_keywords(model, kwargs)
    check_cache_arguments(kwargs)
    call_kwargs = {**_unaliased(widen_example({k: v for k, v in kwargs.items() if v is not None})), **fixed}
    shapes = dynamic_shapes_for(call_kwargs)
    if dynamic_shapes is not None:
        shapes = _given_shapes(dynamic_shapes, shapes)
    # A capture seen before (by any process) comes from the disk cache, validated (fxpeft/capture/disk_cache.py).
    entry = disk_cache.entry_for(model, call_kwargs, shapes, is_hf_model(model))
    program = entry.load(model, tuple(call_kwargs), fixed, device) if entry is not None else None
    if program is None:
        program = _export(model, call_kwargs, shapes, fixed, device)
        if entry is not None:
            entry.store(program)
    program.key = signature_key(call_kwargs)
    program.reads_cache = carries_cache(call_kwargs)
    return program


def _export(model: torch.nn.Module, call_kwargs: dict[str, Any], shapes: dict[str, Any], fixed: dict[str, Any],
            device: torch.device) -> Program:
    was_training = model.training
    model.train()
    try:
        # Quantized (bitsandbytes) layers are captured as one op each, never traced into: fxpeft/ops/quantized.py.
        # Arguments of forward's **kwargs (output_hidden_states, ...) become parameters of their own for export.
        with quantized_layers_as_ops(model), keywords_as_parameters(model, list(call_kwargs)):
            exported = torch.export.export(model, (), call_kwargs, dynamic_shapes=shapes, strict=False)
    except FxpeftError:
        raise
    except Exception as error:  # export raises many error types; all mean the same thing to a user here
        names = ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}"
                          for k, v in call_kwargs.items())
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} called with ({names}): "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}\n"
            + _data_dependent_hint(error) +
            "If the model needs other inputs, pass them: fxpeft.transform(model, rules, example_inputs=(...)) "
            "for positional inputs or example_kwargs={...} for keyword inputs.") from error
    finally:
        model.train(was_training)
    inline_grad_regions(exported.graph_module)  # no_grad blocks: torch.compile refuses them as wrapped regions
    drop_no_ops(exported.graph_module)  # export's metadata checks and identity casts: eager cost, no value
    return _program_from_export(exported, tuple(call_kwargs), fixed, device)


def _given_shapes(given: dict[str, Any], automatic: dict[str, Any]) -> dict[str, Any]:
    """The ``dynamic_shapes`` a user gave (keyed by the call's keywords; those of ``**kwargs`` may also come nested
    under ``"kwargs"``, export's own form) over the automatic ones, which serve the arguments it does not name."""
    given = dict(given)
    nested = given.pop("kwargs", None) if "kwargs" not in automatic else None
    if isinstance(nested, dict):
        given.update(nested)
    return {name: given.get(name, shape) for name, shape in automatic.items()}


def _storage_of(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage().data_ptr() or id(tensor)
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, fake)
        return id(tensor._base if tensor._base is not None else tensor)


def _unaliased(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Clone every tensor argument that shares memory with an earlier one.

    Export gives aliased inputs one placeholder, so ``labels=input_ids`` in the example would make the
    graph read ``labels`` wherever it reads ``input_ids``, for every later call."""
    seen: set = set()
    result = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            storage = _storage_of(value)
            if storage in seen:
                value = value.clone()
            seen.add(_storage_of(value))
        result[name] = value
    return result


def _data_dependent_hint(error: BaseException) -> str:
    """Export cannot follow Python control flow on a tensor's *value*; no example input fixes that."""
    if "DataDependent" not in type(error).__name__ and "data-dependent" not in str(error):
        return ""
    return ("The forward branches on a tensor's value (e.g. `if x.sum() > 0:`), which a graph capture cannot "
            "follow whatever the inputs: express the branch with torch.where or torch.cond.\n")


def _program_from_export(exported, kwarg_names: tuple[str, ...], fixed: dict[str, Any],
                         device: torch.device) -> Program:
    signature = exported.graph_signature
    sources = []
    for spec in signature.input_specs:
        kind = _INPUT_KIND_NAMES.get(spec.kind)
        if kind is None:
            raise CaptureError(f"Exported program has an input of kind {spec.kind}, which fxpeft does not handle.")
        sources.append(InputSource(kind, spec.target if kind != "user" else None))
    mutated: dict[int, str] = {}
    user_outputs = 0
    for index, spec in enumerate(signature.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated[index] = spec.target
        elif spec.kind == OutputKind.USER_OUTPUT:
            user_outputs += 1
        else:
            raise CaptureError(f"Exported program has an output of kind {spec.kind}, which fxpeft does not handle; "
                               "a model that mutates its inputs in place cannot be captured.")
    return Program(
        graph_module=exported.graph_module,
        sources=sources,
        in_spec=exported.call_spec.in_spec,
        out_spec=exported.call_spec.out_spec,
        user_output_count=user_outputs,
        mutated_buffers=mutated,
        # Only the tensors fed as constants: export also lists non-persistent buffers (rotary ``inv_freq``)
        # here, but those are read from the model at each call, so a model planned on ``meta`` gets the
        # real ones once its weights are loaded instead of meta copies that cannot be moved.
        constants={source.target: exported.constants[source.target] for source in sources
                   if source.kind == "constant"},
        kwarg_names=kwarg_names,
        fixed_kwargs=fixed,
        device=device,
    )
