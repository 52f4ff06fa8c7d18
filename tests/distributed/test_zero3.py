"""DeepSpeed ZeRO-3 with ``offload_param: cpu``, base weights gathered per layer by
``fxpeft.distributed.zero3.prepare_zero3``, on 2 gloo ranks against one process (issue 19, item 5).

The launched test needs ``deepspeed`` (0.19.8 tried; on CPU it JIT-builds a small shared-memory op with g++ and ninja on
first use) in the interpreter running the tests: ``tests/distributed/ranks/zero3.py`` imports it on every rank.
"""

from __future__ import annotations

import pytest
import torch

import fxpeft
from fxpeft.distributed.zero3 import GatherLedger, Zero3Layer, prepare_zero3
from fxpeft.errors import FxpeftError
from fxpeft.runtime.layer_units import LayerWeights, gathered_layer_count
from tests.distributed.launch import run_ranks
from tests.models import hf_inputs, hf_model


def test_zero3_training_equals_one_process_and_saves_once(tmp_path):
    """3 AdamW steps on each rank's half of a global batch: the losses and the final adapter equal one process
    without DeepSpeed over the same halves; fxpeft never holds more than the root and one layer gathered (the whole
    base is the root and four); the model prepares itself on its first call (no prepare_zero3 in the script); the
    adapter saved once by fxpeft.distributed.save_adapter is read by PEFT with every value equal."""
    results = run_ranks("zero3.py", str(tmp_path), timeout=170)
    for result in results:
        assert result["partitioned_after_initialize"] and result["partitioned_after_training"]
        assert result["losses"] == pytest.approx(result["expected_losses"], rel=1e-6, abs=1e-6)
        assert result["adapter_difference"] <= 1e-6 and result["adapter_moved"] > 1e-3
        # What fxpeft held gathered at once: the root, one layer (a layer's backward gathers after the next one's
        # released: fxpeft/runtime/layer_units.py) and DeepSpeed's buffer of one parameter in flight.
        bound = result["root_bytes"] + result["layer_bytes"] + result["largest_parameter_bytes"]
        assert result["peak_gathered_bytes"] <= bound < result["base_bytes"]
        assert result["held_after_backward"] == 0 and result["held_after_training"] == 0
        # Independently of that count: no weight of a layer stays whole after its forward through a view autograd
        # saved for the backward (the views are there: their storage holds 0 bytes until the backward refills it).
        assert result["saved_layer_storages"] > 0 and result["saved_layer_bytes_after_forward"] == 0
        assert result["layers"] == [f"model.layers.{i}" for i in range(4)]
        assert result["held_after_eval"] == 0 and result["partitioned_after_eval"]  # no_grad: released at its end
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["eval_loss"] == results[1]["eval_loss"]
    zero = results[0]
    assert zero["peft_difference"] == 0.0
    lora_values = 4 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # A and B of q and v in four layers
    assert zero["file_bytes"] >= 4 * lora_values  # every float32 tensor whole: not a partition, not an empty file


def test_prepare_without_deepspeed_changes_nothing():
    """Before deepspeed.initialize (no partitioned parameter) the layered graph gathers nothing and computes what the
    flat one does; a second call returns what the first set up."""
    inputs = hf_inputs("llama")
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2),
                               example_kwargs=inputs)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.copy_(torch.randn_like(parameter))
    expected = adapted(**inputs).logits
    units = prepare_zero3(adapted)
    assert prepare_zero3(adapted) is units
    assert list(units.layers) == ["model.layers.0", "model.layers.1"]
    assert all(isinstance(layer, LayerWeights) for layer in units.layers.values())
    assert gathered_layer_count(adapted.programs()[0].graph_module) == 0  # the flat graph is kept for inspection
    calls = []
    for key, layer in units.layers.items():  # the layered graph gathers each layer through its Zero3Layer
        layer.gather = lambda key=key, gather=layer.gather: (calls.append(key), gather())
    torch.testing.assert_close(adapted(**inputs).logits, expected, rtol=0, atol=0)
    assert calls == ["model.layers.0", "model.layers.1"]
    assert units.ledger.peak_bytes == 0 and units.ledger.gathers == 0


def test_refusals():
    with pytest.raises(FxpeftError, match="transform returned"):
        prepare_zero3(hf_model("llama"))
    layer = Zero3Layer(torch.nn.Linear(2, 2), GatherLedger())
    layer.gather()  # parameters DeepSpeed does not partition are left alone
    layer.release()
