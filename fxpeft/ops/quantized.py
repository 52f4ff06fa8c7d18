"""Quantized linears (bitsandbytes ``Linear8bitLt`` and ``Linear4bit``) as linear sites of their own.

``torch.export`` cannot trace through bitsandbytes' ``Int8Params`` / ``Params4bit`` (CAPTURE-FACTS), and
tracing into a quantized layer would spell its kernels out in the graph anyway. So every such layer is
captured as **one node** of a custom op, which the site finder reads as a linear site (form
``"quantized"``) and which LoRA adapts like any other linear::

    y = fxpeft.quantized_linear(x, weight, bias, model, path, in_features, out_features)

- *forward*: the layer's own ``forward``, so bitsandbytes' own choices hold (int8's training and inference
  kernels, outlier threshold, 4-bit compute dtype) and the numbers are PEFT's on the same layer.
- *backward*: to ``x`` only, with the weight dequantized the way bitsandbytes' autograd does it (nothing of
  the layer is saved for backward but the packed weight, as in bitsandbytes); to ``bias`` only when a rule
  made it trainable (a copy fed in instead of the layer's bias).
- *fake*: ``x.shape[:-1] + (out_features,)`` in ``x``'s dtype: bitsandbytes returns the input's dtype.

**How capture gets there** (``fxpeft.capture.quantized_calls``): for the duration of the export, each
layer's slot in its parent module holds a small stand-in that calls the op, and the layers are put back in
``finally``. The stand-in owns a plain-tensor alias of the packed weight and the layer's own bias parameter, so
export lifts them under the layer's names (``<path>.weight``, ``<path>.bias``) and at call time the adapted model feeds
the layer's live tensors, as it does every parameter. The alternatives were worse: torch.export has no
leaf-module option in non-strict mode, a forward hook cannot skip the traced forward, patching the classes
would change every instance in the process, and exporting a shallow copy of the module tree breaks models
whose ``forward`` was bound to the original instance (accelerate's hooks).

**How the op finds the layer**: ``model`` is a token naming the base model in a weak registry and ``path``
is the layer's module path in it, looked up at each call (a layer replaced later, by a merge or
:func:`dequantize`, is picked up). The op's weight input is the live packed weight the adapted model
resolved, and the op checks it is the layer's: a graph fed another model's tensors (a deep copy of the
adapted model, or ``load_base_model`` with another quantized model) fails with an error instead of computing
with the first model's layers; :func:`rebind` points the graphs at a replacement base model. The registry
holds neither models nor layers alive.

Merging into a quantized weight dequantizes it, adds the update and quantizes again in place (with a
:class:`QuantizedMergeWarning` stating the measured rounding error); :func:`unmerge_delta` restores the
original quantized tensors exactly. :func:`dequantize` turns the quantized layers into ``nn.Linear`` in full
precision, after which a merge is exact (:func:`merge_and_dequantize`).
"""

from __future__ import annotations

import copy
import itertools
import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from fxpeft.errors import FxpeftError, UnsupportedError

__all__ = ["QUANTIZED_LINEAR", "QuantizedMergeWarning", "quantized_kind", "check_quantized_layer", "model_token",
           "rebind", "require_bitsandbytes", "quantize_linear", "dequantized_weight", "merge_delta", "unmerge_delta",
           "dequantize", "merge_and_dequantize"]

_INSTALL = ("Install it with `pip install bitsandbytes` (version 0.45 or newer; its CPU backend needs no GPU), "
            "or leave out the quantization.")


class QuantizedMergeWarning(UserWarning):
    """A LoRA update was merged into a quantized weight, which rounds it (the message says by how much)."""


# -- bitsandbytes, imported only where a model uses it -----------------------------------------------------
def require_bitsandbytes(device: torch.device | str | None = None):
    """The ``bitsandbytes`` module, checked to run on ``device``; else :class:`UnsupportedError` saying why."""
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library raising at import
        raise UnsupportedError(f"Quantization needs the bitsandbytes package, which could not be imported "
                               f"({type(error).__name__}: {error}). {_INSTALL}") from error
    if device is not None:
        device = torch.device(device)
        if device.type == "meta":
            raise UnsupportedError(
                "Cannot quantize weights on the meta device (they have no values yet): load the real weights "
                "first, or load the model quantized with transformers' BitsAndBytesConfig.")
        try:
            bnb.functional.quantize_4bit(torch.zeros(64, device=device), quant_type="nf4")
            bnb.functional.int8_vectorwise_quant(torch.zeros(1, 64, device=device, dtype=torch.float16))
        except Exception as error:
            raise UnsupportedError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize on {device} here "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}). "
                "Use a device its backend supports (CPU, CUDA, XPU), or upgrade it: `pip install -U "
                "bitsandbytes`.") from error
    return bnb


def quantized_kind(module: nn.Module) -> str | None:
    """``"int8"`` for a bitsandbytes ``Linear8bitLt``, ``"4bit"`` for a ``Linear4bit``, else None.

    Never imports bitsandbytes: a model cannot hold its layers unless it was imported already."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    return None


def _holds_quantized_tensors(module: nn.Module) -> bool:
    """Whether ``module`` itself holds a bitsandbytes parameter class, which export cannot trace."""
    return any(type(p).__module__.startswith("bitsandbytes") for p in module.parameters(recurse=False))


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def check_quantized_layer(path: str, module: nn.Module) -> str | None:
    """``module``'s quantized kind (``"int8"``, ``"4bit"``) or None for a plain layer; UnsupportedError, naming
    ``path``, for a layer that holds quantized tensors of a kind fxpeft does not know."""
    kind = quantized_kind(module)
    if kind is None:
        if _holds_quantized_tensors(module):
            raise UnsupportedError(
                f"{path or 'The model'} is a {_type_name(module)}, a quantized layer type fxpeft does not know "
                "(it holds bitsandbytes quantized tensors, which cannot be captured as a graph). fxpeft adapts "
                "bitsandbytes.nn.Linear8bitLt and bitsandbytes.nn.Linear4bit (and their subclasses); load the "
                "model with transformers' BitsAndBytesConfig, or use fxpeft.Quantize on the full-precision model.")
        return None
    if kind == "int8" and module.state.has_fp16_weights:
        raise UnsupportedError(
            f"{path} is a Linear8bitLt with has_fp16_weights=True (its weights train in 16 bits): fxpeft adapts "
            "frozen int8 layers only; load with llm_int8_has_fp16_weight=False (the default).")
    if not path:
        raise UnsupportedError(f"The model itself is a {_type_name(module)}: fxpeft adapts quantized layers "
                               "inside a model; wrap it in an nn.Module (e.g. nn.Sequential(layer)).")
    return kind


# -- the registry: base model by token, weakly -----------------------------------------------------------
_MODELS: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
_TOKENS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_COUNTER = itertools.count()


def model_token(model: nn.Module) -> str:
    """The token the op uses to find ``model`` (the same one for every capture of it)."""
    token = _TOKENS.get(model)
    if token is None:
        token = f"{type(model).__name__}#{next(_COUNTER)}"
        _TOKENS[model] = token
        _MODELS[token] = model
    return token


def rebind(old: nn.Module, new: nn.Module) -> None:
    """Graphs captured from ``old`` find their quantized layers in ``new`` from now on (for
    ``AdaptedModel.load_base_model``, which replaces the base model by one of the same structure)."""
    token = _TOKENS.get(old)
    if token is not None:
        _MODELS[token] = new
        _TOKENS[new] = token


def _layer(model: str, path: str, weight: torch.Tensor) -> nn.Module:
    base = _MODELS.get(model)
    if base is None:
        raise FxpeftError(f"The base model this graph was captured from ({model}) no longer exists; transform "
                          "the model you are using with fxpeft.transform again.")
    layer = base.get_submodule(path)
    own = getattr(layer, "weight", None)
    if not isinstance(own, torch.Tensor) or own.data_ptr() != weight.data_ptr():
        raise FxpeftError(
            f"The graph's quantized layer {path} was fed a weight that is not the weight of {path} in the base "
            f"model it was captured from ({model}). This happens when an adapted model over a quantized base "
            "is deep-copied or given another base model: transform that model with fxpeft.transform (and load "
            "the adapter into it) instead.")
    return layer


# -- the ops ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxpeft::quantized_linear", mutates_args=())
def _quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], model: str, path: str,
                      in_features: int, out_features: int) -> torch.Tensor:
    layer = _layer(model, path, weight)
    own_bias = getattr(layer, "bias", None)
    # A trained copy of the bias (LoRA bias="lora_only"/"all") arrives instead of the layer's own: the layer
    # adds its own, so add the difference. Compared before the call: int8 may re-cast its bias in place.
    swapped = bias is not None and own_bias is not None and bias.data_ptr() != own_bias.data_ptr()
    _keep_repackable(layer)
    with torch.no_grad():
        y = layer(x)
        if swapped:
            y = y + (bias - own_bias).to(y.dtype)
    return y


@_quantized_linear.register_fake
def _(x, weight, bias, model, path, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("fxpeft::quantized_linear_grad", mutates_args=())
def _quantized_linear_grad(grad: torch.Tensor, weight: torch.Tensor, model: str, path: str, in_features: int,
                           dtype: torch.dtype) -> torch.Tensor:
    return _input_grad(_layer(model, path, weight), grad, dtype)


@_quantized_linear_grad.register_fake
def _(grad, weight, model, path, in_features, dtype):
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, model, path, in_features, _ = inputs
    ctx.save_for_backward(weight)
    ctx.call = (model, path, in_features, x.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    (weight,) = ctx.saved_tensors
    model, path, in_features, x_dtype, bias_dtype = ctx.call
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fxpeft.quantized_linear_grad(grad, weight, model, path, in_features, x_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, None, grad_bias, None, None, None, None


_quantized_linear.register_autograd(_backward, setup_context=_setup_context)

QUANTIZED_LINEAR = torch.ops.fxpeft.quantized_linear.default
"""The op node target a quantized linear site is captured as (see the module docstring)."""


def _input_grad(layer: nn.Module, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad @ W`` with ``W`` dequantized as bitsandbytes' own backward does it (same ops, same order)."""
    kind = quantized_kind(layer)
    if kind == "int8":  # MatMul8bitLt / MatMul8bitFp.backward
        cb, scb = _int8_state(layer)
        weight = cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad.to(dtype), weight)
    if kind == "4bit":  # Linear4bit casts x to its compute dtype; MatMul4Bit.backward dequantizes to it
        compute = layer.compute_dtype or dtype
        grad = grad.to(compute)
        return torch.matmul(grad, _dequantize_4bit(layer).to(compute)).to(dtype)
    weight = layer.weight  # a layer dequantized since capture (an nn.Linear)
    return torch.matmul(grad.to(weight.dtype), weight).to(dtype)


def _int8_state(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB, SCB)``: before its first forward a Linear8bitLt keeps them on its weight, after it in ``state``."""
    state, weight = layer.state, layer.weight
    cb = state.CB if state.CB is not None else weight.data
    scb = state.SCB if state.SCB is not None else weight.SCB
    return cb, scb


def _dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as F

    weight, state = _unpacked_4bit(layer)
    return F.dequantize_4bit(weight, state)


def _keep_repackable(layer: nn.Module) -> None:
    """Turn bitsandbytes' AVX512-BF16 repacking off for a 4-bit layer whose shape it cannot repack.

    bitsandbytes 0.50 repacks a Linear4bit on its first eval-mode call without autograd on such a CPU, and fails
    inside (a reshape to ``[out, in // blocksize]``) when ``in_features`` is not a multiple of the block size or
    ``out_features`` not of 32; such a layer runs bitsandbytes' generic CPU path instead, as on any other CPU."""
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        return
    state = getattr(layer.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return
    out_features, in_features = state.shape[0], state.shape[-1]
    if out_features % 32 or in_features % 2 or in_features % state.blocksize:
        layer.support_avx512bf16_for_cpu = False


def _unpacked_4bit(layer: nn.Module) -> tuple[torch.Tensor, object]:
    """The 4-bit layer's ``(weight, quant_state)`` in bitsandbytes' own layout, without changing the layer.

    On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without autograd repacks its weight for
    that CPU's kernel (``[out, in/2]``, absmax in bfloat16, double quantization folded in) and flags its
    ``quant_state``; bitsandbytes' inverse turns that back, but rewrites the state object it is given, so it gets
    a copy here. Without double quantization, bitsandbytes 0.50's inverse leaves the block scales as repacked
    (``[in/blocksize, out]``, bfloat16), which its dequantization would read in the wrong order (and a merge could
    not quantize into): they are put back in block order here, in float32 (the values the kernel used).
    Elsewhere the layer's own tensors come back as they are."""
    weight, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight, state = _convert_weight_packed_for_cpu_inverse(weight, copy.copy(state))
        if state.absmax.dim() == 2:  # still [in/blocksize, out]: block order is row by row of [out, in]
            state.absmax = state.absmax.T.reshape(-1).float()
    return weight, state


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight in full precision, ``[out_features, in_features]`` (float32 for int8, the
    original dtype for 4-bit)."""
    kind = quantized_kind(layer)
    if kind == "int8":
        cb, scb = _int8_state(layer)
        return cb.float() * scb.float().unsqueeze(1) * (1.0 / 127.0)
    if kind == "4bit":
        return _dequantize_4bit(layer)
    return layer.weight.detach()


# -- quantizing a full-precision linear (the Quantize rule) --------------------------------------------------
def quantize_linear(module: nn.Module, *, bits: int, quant_type: str = "nf4", double_quant: bool = False,
                    compute_dtype: torch.dtype = torch.float32, threshold: float = 6.0,
                    transposed: bool = False) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weight quantized, built as transformers' BitsAndBytesConfig
    loading builds it (same classes, same arguments, so the same packed values). ``transposed``: the weight
    is stored ``[in, out]`` (transformers' ``Conv1D``). The bias parameter is shared, not copied; the
    full-precision weight is not kept by the new layer."""
    weight = module.weight.detach()
    device = weight.device
    bnb = require_bitsandbytes(device)
    if transposed:
        weight = weight.T.contiguous()
    out_features, in_features = weight.shape
    has_bias = getattr(module, "bias", None) is not None
    with torch.device("meta"):
        if bits == 8:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, has_bias, has_fp16_weights=False,
                                        threshold=threshold)
        else:
            layer = bnb.nn.Linear4bit(in_features, out_features, has_bias, compute_dtype,
                                      compress_statistics=double_quant, quant_type=quant_type,
                                      quant_storage=torch.uint8)
    if bits == 8:
        # Int8Params quantizes inside ``.to()`` only when its data starts on the CPU (as transformers' loader
        # has it); a weight already on the GPU would stay full precision until the first forward.
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(device)
    if has_bias:
        layer.bias = module.bias
    layer.train(module.training)
    return layer


# -- merging --------------------------------------------------------------------------------------------------
def _quantized_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Every distinct tensor holding the layer's quantized state (the ones a re-quantization writes)."""
    if quantized_kind(layer) == "int8":
        state, weight = layer.state, layer.weight
        candidates = [weight.data, getattr(weight, "CB", None), state.CB, getattr(weight, "SCB", None), state.SCB]
    else:
        state = layer.weight.quant_state
        candidates = [layer.weight.data, state.absmax, getattr(state, "offset", None)]
        nested = getattr(state, "state2", None)  # gone once bitsandbytes repacked the layer for its CPU kernel
        if nested is not None:
            candidates += [nested.absmax]
    unique: dict[tuple, torch.Tensor] = {}
    for tensor in candidates:
        if isinstance(tensor, torch.Tensor):
            unique.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)), tensor)
    return list(unique.values())


@torch.no_grad()
def _requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` into the layer's own tensors, in place (same shapes): nothing holding them changes."""
    import bitsandbytes.functional as F

    if quantized_kind(layer) == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(weight.to(torch.float16))  # as Int8Params quantizes
        for tensor in _quantized_tensors(layer):
            tensor.copy_(cb if tensor.dtype == torch.int8 else scb.to(tensor.dtype))
        return
    param = layer.weight
    state = param.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # merge_delta puts the layer back in bitsandbytes' layout
        param.data, state = _unpacked_4bit(layer)
        param.quant_state = state
    packed, new = F.quantize_4bit(weight.to(state.dtype), blocksize=state.blocksize, compress_statistics=state.nested,
                                  quant_type=state.quant_type, quant_storage=param.data.dtype)
    param.data.copy_(packed.view_as(param.data))
    state.absmax.copy_(new.absmax)
    if state.nested:
        state.offset.copy_(new.offset)
        state.state2.absmax.copy_(new.state2.absmax)


@torch.no_grad()
def merge_delta(base_model: nn.Module, path: str, delta: torch.Tensor):
    """Add ``delta`` (``[out, in]``) to the quantized layer at ``path``: dequantize, add, quantize again. Warns with
    the measured rounding error. Returns what :func:`unmerge_delta` needs to restore the layer exactly: copies of
    its quantized tensors (int8, rewritten in place), or (4-bit) its packed weight and quantization state as they
    were, whichever layout bitsandbytes had them in (see :func:`_unpacked_4bit`): a fraction of the
    full-precision weight's size."""
    layer = base_model.get_submodule(path)
    kind = quantized_kind(layer)
    if kind is None:
        raise FxpeftError(f"{path} is not a quantized layer.")
    if kind == "int8":
        saved = [tensor.clone() for tensor in _quantized_tensors(layer)]
    else:
        saved = (layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
        layer.weight.data, layer.weight.quant_state = _unpacked_4bit(layer)  # quantize again in bitsandbytes' layout
    target = dequantized_weight(layer).float() + delta.float()
    _requantize(layer, target)
    error = dequantized_weight(layer).float() - target
    update = delta.float().norm().item()
    warnings.warn(QuantizedMergeWarning(
        f"Merged into the {kind} weight of {path} by dequantizing, adding the update and quantizing again: the "
        f"re-quantized weight is off the exact sum by up to {error.abs().max().item():.3g} "
        f"(relative error {error.norm().item() / max(target.norm().item(), 1e-30):.2%} of the weight, "
        f"{error.norm().item() / max(update, 1e-30):.0%} of the update's norm). unmerge() restores the original "
        "exactly; fxpeft.ops.quantized.merge_and_dequantize(adapted) merges without rounding, in full precision."),
        stacklevel=3)
    return saved


@torch.no_grad()
def unmerge_delta(base_model: nn.Module, path: str, saved) -> None:
    """Undo :func:`merge_delta`: the layer's quantized state is the one from before the merge, exactly."""
    layer = base_model.get_submodule(path)
    if isinstance(saved, tuple):  # 4-bit: the weight's data and state as they were (the parameter object stays)
        layer.weight.data, layer.weight.quant_state = saved[0].clone(), copy.deepcopy(saved[1])
        return
    for tensor, original in zip(_quantized_tensors(layer), saved, strict=True):
        tensor.copy_(original)


# -- back to full precision ------------------------------------------------------------------------------------
@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer of ``model`` (or of an adapted model's base) by an ``nn.Linear`` holding
    its dequantized weight (in ``dtype``; default float32 for int8, the original dtype for 4-bit) and the
    same bias parameter. Returns the model. An adapted model keeps working: its graph finds the new layers.

    The dequantized weights are the quantized values, not the original full-precision ones."""
    base = getattr(model, "base_model", model) if hasattr(model, "adapters") else model
    for path, layer in list(base.named_modules()):
        if quantized_kind(layer) is None:
            continue
        weight = dequantized_weight(layer)
        weight = weight.to(dtype) if dtype is not None else weight
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        linear.train(layer.training)
        parent, _, name = path.rpartition(".")
        setattr(base.get_submodule(parent), name, linear)
    return model


def merge_and_dequantize(adapted, dtype: torch.dtype | None = None) -> nn.Module:
    """A full-precision model with the adapters merged exactly: :func:`dequantize` the adapted model's base,
    then ``merge_and_unload()``. The adapted model must not be used after (as with ``merge_and_unload``)."""
    dequantize(adapted.base_model, dtype)
    return adapted.merge_and_unload()
