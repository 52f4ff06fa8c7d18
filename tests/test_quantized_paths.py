"""The bitsandbytes paths fxpeft touches (int8; nf4 and fp4, with and without double quantization), a 4-bit layer
in each of its two CPU layouts, against what bitsandbytes' public API reports: ``Int8Params`` quantizing the
original weight, ``bitsandbytes.functional.dequantize_4bit`` / ``dequantize_blockwise`` with ``QuantState``'s
fields, ``Params4bit`` quantizing a merged weight, ``Linear4bit.state_dict()``, and the layers' own forward.

**The two layouts.** bitsandbytes 0.50 repacks a ``Linear4bit`` for its AVX512-BF16 CPU kernel in the layer's
forward (eval mode, no autograd, CPU input) when the layer's ``support_avx512bf16_for_cpu`` flag is on, which it
is where the CPU has the feature: the weight becomes ``[out, in/2]`` in the kernel's order, the block scales
``[in/blocksize, out]`` in bfloat16 (double quantization folded in), and ``quant_state.packing_format_for_cpu``
says so. Every 4-bit case runs in both layouts on every machine:

- ``plain``: the flag off on every layer, so nothing is repacked, whatever the CPU;
- ``repacked``: the flag forced on and an eval call, so bitsandbytes' own forward repacks the layer, whatever the
  CPU. Where the CPU lacks the feature the kernel for that layout is missing (bitsandbytes' generic
  ``gemv_4bit`` then reads the repacked bytes as plain ones: wrong numbers, no error), so there, and only there,
  the checks of the repacked layer's forward values cannot apply; everything fxpeft computes from the layout
  (the dequantized weight, gradients, merge, unmerge, ``merge_and_dequantize``) is checked on every machine.

The model is three linears with nothing between them: ``fc1`` [96 -> 128] (a shape bitsandbytes cannot repack,
96 not being a multiple of the 64-block: fxpeft turns the flag off for it, else the repacking would fail inside
bitsandbytes), ``fc2`` [128 -> 64] (repacked), ``head`` (full precision, as the Quantize rule leaves an output
layer). Being linear, its gradients need no forward values, which a repacked ``fc2`` without its kernel gets
wrong; ``fc2`` being last, nothing upstream of it needs them either. Its block scales range over a factor of
ten, so a scale applied to the wrong block is off by several times the tolerances here.
"""

from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb  # the `quantization` extra: a missing one fails, never skips
import bitsandbytes.functional as F
import pytest
import torch
from torch import nn

import fxpeft
from fxpeft.ops import quantized
from fxpeft.rules import Quantize
from tests.passes.test_lora import lora_sites

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

KERNEL = F.has_avx512bf16()  # bitsandbytes' own test: whether its CPU kernel for the repacked layout is there
SETTINGS = {"int8": dict(bits=8), "nf4": dict(bits=4), "nf4-double": dict(bits=4, double_quant=True),
            "fp4": dict(bits=4, quant_type="fp4"), "fp4-double": dict(bits=4, quant_type="fp4", double_quant=True)}
FOUR_BIT = ["nf4", "nf4-double", "fp4", "fp4-double"]
CASES = [("int8", "plain")] + [(kind, layout) for kind in FOUR_BIT for layout in ("plain", "repacked")]
PATHS = ("fc1", "fc2")
R, ALPHA = 2, 6
SCALING = ALPHA / R


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(96, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 8)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                out, inp = layer.weight.shape
                scales = torch.empty(out * inp // 64).uniform_(0.05, 0.5, generator=generator).repeat_interleave(64)
                layer.weight.copy_(torch.randn(out, inp, generator=generator) * scales.view(out, inp))

    def forward(self, x):
        return self.head(self.fc2(self.fc1(x)))


def build(kind: str):
    """``(model, adapted, originals)``: ``Net`` through ``[Quantize, LoRA(fc1, fc2)]`` with random ``lora_B``, and its
    full-precision weights from before."""
    model = Net()
    originals = {path: model.get_submodule(path).weight.detach().clone() for path in PATHS}
    adapted = fxpeft.transform(model, [Quantize(**SETTINGS[kind]), fxpeft.LoRA(targets=list(PATHS), r=R, alpha=ALPHA)],
                               example_inputs=(torch.randn(2, 96),))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in lora_sites(adapted).values():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.1)
    return model, adapted, originals


def packed(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def lay_out(model: nn.Module, adapted, layout: str) -> dict:
    """Put the 4-bit layers in ``layout`` (module docstring) by an eval call of the adapted model; returns each
    layer's ``(weight, quant_state)`` copied from before, in bitsandbytes' own layout."""
    layers = {path: model.get_submodule(path) for path in PATHS}
    before = {path: (layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
              for path, layer in layers.items()}
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = layout == "repacked"
    adapted.eval()
    with torch.no_grad():
        adapted(torch.randn(3, 96))
    assert not packed(layers["fc1"]) and not layers["fc1"].support_avx512bf16_for_cpu  # fxpeft turned it off
    assert packed(layers["fc2"]) == (layout == "repacked")
    return before


def scales(state) -> torch.Tensor:
    """A bitsandbytes-layout quant state's block scales in full precision (``QuantState`` fields, public functions)."""
    if state.nested:
        return F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def reference_weight(kind: str, layer: nn.Module, original: torch.Tensor, before) -> torch.Tensor:
    """The weight ``layer`` computes with, from bitsandbytes' public API only (what fxpeft's dequantized weight must
    be), checked against the layer's own forward by the tests.

    int8: ``Int8Params`` quantizing the original weight (``CB * SCB / 127``; the layer holds those bytes). 4-bit
    in bitsandbytes' layout: ``dequantize_4bit`` of the weight and quant state. Repacked: the same with the block
    scales rounded to bfloat16, the precision the repacked layout keeps them in; with double quantization, the
    weight as bitsandbytes' ``state_dict()`` gives it back in its layout (its scales quantized again, close to
    those)."""
    if kind == "int8":
        param = bnb.nn.Int8Params(original.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert torch.equal(layer.weight.data, param.data)
        return param.data.float() * param.SCB.float().unsqueeze(1) / 127
    data, state = before
    if not packed(layer):
        assert torch.equal(layer.weight.data, data)
        return F.dequantize_4bit(data, state)
    absmax = scales(state)
    kernel = F.dequantize_4bit(data, F.QuantState(absmax=absmax.bfloat16().float(), shape=state.shape, code=state.code,
                                                  blocksize=state.blocksize, quant_type=state.quant_type,
                                                  dtype=state.dtype))
    if not state.nested:
        # Not the state_dict: bitsandbytes 0.50 saves such a layer's scales in the repacked order.
        return kernel
    saved = copy.deepcopy(layer)
    saved.state_dict()  # bitsandbytes puts a repacked layer back in its own layout to save it
    assert not packed(saved)
    weight = F.dequantize_4bit(saved.weight.data, saved.weight.quant_state)
    block = absmax.repeat_interleave(state.blocksize).view(state.shape)
    assert ((weight - kernel).abs() <= 0.05 * block).all()  # scales quantized again: within 5% of each block's
    return weight


def held(layer: nn.Module) -> list:
    """What a 4-bit layer holds, as ``QuantState`` fields: packed bytes, scales, nested scales, layout."""
    state = layer.weight.quant_state
    nested = getattr(state, "state2", None)
    tensors = [layer.weight.data, state.absmax, state.offset, None if nested is None else nested.absmax]
    tensors = [t.clone() if isinstance(t, torch.Tensor) else t for t in tensors]
    return tensors + [state.nested, state.dtype, packed(layer)]


def assert_same_held(got: list, expected: list, what: str) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b), what


def float_model(weights: dict, model: nn.Module, lora: dict | None):
    """The reference: ``x -> head(fc2(fc1(x)))`` in float32 with the given weights, the layers' biases and, when
    ``lora`` maps paths to ``(A, B)``, LoRA's ``scaling * x A^T B^T``."""
    def run(x):
        for path in PATHS:
            layer = model.get_submodule(path)
            y = x @ weights[path].T + layer.bias
            if lora is not None:
                a, b = lora[path]
                y = y + SCALING * (x @ a.T @ b.T)
            x = y
        return model.head(x)
    return run


def assert_outputs(got: torch.Tensor, expected: torch.Tensor, bf16_kernel: bool) -> None:
    """Float32 compute matches to rounding; the repacked kernel computes in bfloat16 (0.3% here), while a block
    scale read for another block is tens of percent off."""
    if bf16_kernel:
        assert (got - expected).norm() <= 1e-2 * expected.norm(), ((got - expected).norm() / expected.norm()).item()
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, layout", CASES)
def test_dequantized_weight_outputs_and_gradients_are_bitsandbytes_own(kind, layout):
    """fxpeft's dequantized weight of each layer is the public reference's (exactly) and leaves the layer as it
    was; the layers' own forward computes with it; the adapted model's outputs (train and eval mode) and its
    gradients (input and LoRA) are those of a float32 model holding it."""
    model, adapted, originals = build(kind)
    before = lay_out(model, adapted, layout) if kind != "int8" else {path: None for path in PATHS}
    runs = layout == "plain" or KERNEL  # whether fc2 can compute right here (the repacked layout needs the kernel)
    repacked = layout == "repacked"
    weights = {}
    for path in PATHS:
        layer = model.get_submodule(path)
        holding = held(layer) if kind != "int8" else None
        weights[path] = reference_weight(kind, layer, originals[path], before[path])
        got = quantized.dequantized_weight(layer)
        if kind == "int8":  # the same product, in another order: to rounding
            torch.testing.assert_close(got, weights[path], rtol=1e-6, atol=0)
        else:
            assert torch.equal(got, weights[path]), path
            assert_same_held(held(layer), holding, f"dequantizing changed {path}")
        if path == "fc1" or runs:  # the layer's own forward (train mode: int8 computes with the weight there)
            layer.train()
            x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                assert_outputs(layer(x), x @ weights[path].T + layer.bias, repacked and path == "fc2")

    sites = lora_sites(adapted)
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    if runs:
        with torch.no_grad():
            expected = float_model(weights, model, {p: (s.lora_A, s.lora_B) for p, s in sites.items()})(x)
            for mode in (True, False) if kind != "int8" else (True,):  # int8 inference quantizes the input too
                adapted.train(mode)
                assert_outputs(adapted(x), expected, repacked)

    adapted.train()
    grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    x_ours = x.clone().requires_grad_()
    (adapted(x_ours) * grad).sum().backward()
    lora = {p: (s.lora_A.detach().clone().requires_grad_(), s.lora_B.detach().clone().requires_grad_())
            for p, s in sites.items()}
    x_ref = x.clone().requires_grad_()
    (float_model(weights, model, lora)(x_ref) * grad).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for path, site in sites.items():
        torch.testing.assert_close(site.lora_A.grad, lora[path][0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(site.lora_B.grad, lora[path][1].grad, rtol=1e-5, atol=1e-5)


def bitsandbytes_quantized(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized by ``Params4bit`` with the rule's settings (as loading a model with that weight would),
    dequantized by ``dequantize_4bit``."""
    settings = SETTINGS[kind]
    param = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64,
                              compress_statistics=settings.get("double_quant", False),
                              quant_type=settings.get("quant_type", "nf4")).to("cpu")
    return F.dequantize_4bit(param.data, param.quant_state)


@pytest.mark.parametrize("kind, layout", [case for case in CASES if case[0] != "int8"])
def test_merge_unmerge_and_merge_and_dequantize_from_each_layout(kind, layout):
    """From either layout: ``merge()`` leaves each layer in bitsandbytes' own layout holding ``Params4bit``'s
    quantization of ``W + scaling * B @ A`` (``W`` the reference weight), and the model computes with it;
    ``unmerge()`` gives back the bytes, scales and layout from before, exactly; ``merge_and_dequantize`` holds
    ``W + scaling * B @ A`` in full precision. (int8: tests/test_quantized.py, ``check_requantized_merge``.)"""
    model, adapted, originals = build(kind)
    before = lay_out(model, adapted, layout)
    runs = layout == "plain" or KERNEL
    sites = lora_sites(adapted)
    layers = {path: model.get_submodule(path) for path in PATHS}
    weights = {path: reference_weight(kind, layers[path], originals[path], before[path]) for path in PATHS}
    with torch.no_grad():
        exact = {path: weights[path] + SCALING * (site.lora_B @ site.lora_A) for path, site in sites.items()}
    expected = {path: bitsandbytes_quantized(kind, exact[path]) for path in PATHS}
    for path in PATHS:  # the update is many quantization steps wide somewhere: a merge of any other size shows
        assert not torch.equal(expected[path], bitsandbytes_quantized(kind, weights[path])), path
    holding = {path: held(layer) for path, layer in layers.items()}
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    adapted.train()  # nothing repacks in train mode, on any machine
    with torch.no_grad():
        unmerged = adapted(x) if runs else None

        with pytest.warns(quantized.QuantizedMergeWarning, match=r"off the exact sum by up to"):
            adapted.merge()
        for path, layer in layers.items():
            assert not packed(layer), path
            torch.testing.assert_close(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), expected[path],
                                       rtol=0, atol=1e-6, msg=lambda m, path=path: f"{path}: {m}")
        torch.testing.assert_close(adapted(x), float_model(expected, model, None)(x), rtol=1e-5, atol=1e-5)

        adapted.unmerge()
        for path, layer in layers.items():
            assert_same_held(held(layer), holding[path], f"unmerge did not restore {path}")
        if runs:
            assert torch.equal(adapted(x), unmerged)

        full = quantized.merge_and_dequantize(adapted)
        for path in PATHS:
            assert type(model.get_submodule(path)) is nn.Linear
            torch.testing.assert_close(model.get_submodule(path).weight, exact[path], rtol=0, atol=1e-6)
        torch.testing.assert_close(full(x), float_model(exact, model, None)(x), rtol=1e-5, atol=1e-5)
