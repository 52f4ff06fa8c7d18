"""torch.compile over the adapted model: whole graph, dynamic shapes, eager numerics, pinned recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fxpeft
from tests.models import hf_inputs, hf_model


def _inputs(batch: int, seq: int) -> dict:
    inputs = hf_inputs("llama", batch=batch, seq=seq, seed=batch * 100 + seq)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _lora_grads(adapted) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in adapted.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    counters.clear()
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    with torch.no_grad():  # a non-zero B, so the LoRA branch shows in the numbers
        for site in adapted.site_modules():
            site.lora_B.normal_(std=0.1)
    adapted.train()
    adapted(**_inputs(2, 8))  # the first call with labels captures that argument set, eagerly
    return adapted, torch.compile(adapted, fullgraph=True, dynamic=True)


def _step(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out


def test_compiled_matches_eager_and_never_recompiles_for_sizes_of_two_and_more(compiled):
    adapted, fast = compiled
    for batch, seq in [(2, 9), (3, 12), (4, 21), (2, 5)]:
        inputs = _inputs(batch, seq)
        eager_out = _step(adapted, inputs)
        eager_grads = _lora_grads(adapted)
        fast_out = _step(fast, inputs)
        torch.testing.assert_close(fast_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
        for name, grad in _lora_grads(adapted).items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


def test_size_one_costs_one_compile_each_once(compiled):
    """Dynamo specializes sizes 0 and 1: batch 1 and sequence 1 each cost one more graph, once.
    Recompiles are dynamo's guards, so the aot_eager backend shows them without Inductor's compile time."""
    adapted, _ = compiled
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(adapted, fullgraph=True, dynamic=True, backend="aot_eager")
    _step(fast, _inputs(2, 9))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1
    for batch, seq in [(1, 7), (1, 11), (3, 1), (2, 1)]:
        inputs = _inputs(batch, seq)
        torch.testing.assert_close(_step(fast, inputs).logits, adapted(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert sum(counters["graph_break"].values()) == 0


def test_compiled_lora_dropout_draws_the_eager_masks_on_the_cpu():
    """Under Inductor, LoRA's dropout draws its masks with ATen's ``bernoulli_``, as eager PyTorch (and so PEFT)
    does on the CPU (fxpeft.ops.dropout): same seed, same masks, so a compiled training step agrees with the eager one
    to rounding, gradients included; another seed gives other masks. (A plain in-graph ``bernoulli_`` made
    torch 2.13's Inductor multiply by uninitialised memory: this test caught it.)"""
    torch._dynamo.reset()
    rule = fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.25)
    adapted = fxpeft.transform(hf_model("llama"), [rule])
    with torch.no_grad():
        for site in adapted.site_modules():
            site.lora_B.normal_(std=0.5)
    adapted.train()
    fast = torch.compile(adapted, fullgraph=True, dynamic=True)
    inputs = _inputs(2, 9)
    torch.manual_seed(3)
    eager_out = _step(adapted, inputs)
    eager_grads = _lora_grads(adapted)
    torch.manual_seed(3)
    fast_out = _step(fast, inputs)
    assert torch.isfinite(fast_out.logits).all()
    torch.testing.assert_close(fast_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    for name, grad in _lora_grads(adapted).items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
    torch.manual_seed(4)
    assert not torch.allclose(fast(**inputs).logits, eager_out.logits, rtol=1e-3, atol=1e-3)
