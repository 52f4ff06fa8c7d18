"""FSDP2 per layer (``fxpeft.distributed.fully_shard``) on 2 gloo ranks against one process (issue 19, items 2, 3, 6).

Each test launches ``tests/distributed/ranks/fsdp.py`` under torchrun (tests/distributed/launch.py): the tiny llama is
built on the meta device on every rank, sharded per layer, filled from safetensors rank by rank, and trained 3 AdamW
steps on its half of each global batch. The reference is one process on the real weights over the same halves.
"""

from __future__ import annotations

import pytest
import torch

import fxpeft
import fxpeft.distributed as fd
from fxpeft.errors import FxpeftError
from tests.distributed.launch import run_ranks
from tests.models import hf_model


def _launch(mode: str, tmp_path) -> list[dict]:
    return run_ranks("fsdp.py", mode, str(tmp_path / "model"), timeout=170)


def _check_training(results: list[dict]) -> None:
    for result in results:
        assert result["losses"] == pytest.approx(result["expected_losses"], rel=1e-6, abs=1e-6)
        assert result["adapter_difference"] <= 1e-6
        # Each rank holds its half of every base tensor (the tiny llama's dims split evenly: no padding), and the
        # storage behind those halves is no more than that: no rank keeps the whole base.
        assert 2 * result["local_elements"] == result["total_elements"]
        assert 2 * result["local_storage_bytes"] == result["total_bytes"]
        # fxpeft.distributed.plan_memory, made before sharding, says what each rank then holds.
        assert result["planned_base_bytes"] == result["local_storage_bytes"]
        assert result["planned_adapter_bytes"] == result["adapter_storage_bytes"]
    assert results[0]["losses"] == results[1]["losses"]


def test_sharded_training_with_cpu_offload_equals_one_process(tmp_path):
    results = _launch("offload", tmp_path)
    _check_training(results)
    assert all(result["base_devices"] == ["cpu"] for result in results)


def test_bf16_base_with_float32_adapters(tmp_path):
    results = _launch("bf16", tmp_path)
    _check_training(results)
    for result in results:
        assert result["base_dtypes"] == ["torch.bfloat16"] and result["adapter_dtypes"] == ["torch.float32"]


def test_resume_and_files_both_ways(tmp_path):
    """Two steps, save, a new sharded model resumes from the files and takes the third: as if never interrupted (so
    plain FSDP2 training equals one process too). The adapter file written once from the gathered shards is read by
    PEFT and by fxpeft with every value equal."""
    results = _launch("resume", tmp_path)
    _check_training(results)
    zero = results[0]
    assert zero["peft_difference"] == 0.0 and zero["fxpeft_difference"] == 0.0
    assert all(result["refused"] == ["merge", "add_adapter"] for result in results)
    assert [result["failed_save"] for result in results] == ["rank 0 error", "FxpeftError"]
    lora_values = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # A and B of q and v in two layers
    assert zero["file_bytes"] >= 4 * lora_values  # every float32 tensor whole: not a shard, not an empty file


def test_refusals_without_a_process_group():
    model = hf_model("llama")
    with pytest.raises(FxpeftError, match="transform returned"):
        fd.fully_shard(model)
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj"], r=2))
    assert not torch.distributed.is_initialized()
    with pytest.raises(FxpeftError, match="process group"):
        fd.fully_shard(adapted)
    assert list(fd.layer_modules(adapted)) == ["model.layers.0", "model.layers.1"]


def test_other_families_shard_per_layer_and_train_as_one_process():
    """GPT-2 and T5 (encoder and decoder blocks): one FSDP2 unit per numbered layer, found in the graph."""
    results = run_ranks("fsdp_families.py", timeout=170)
    layers = {"gpt2": ["transformer.h.0", "transformer.h.1"],
              "t5": ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]}
    for result in results:
        for family, expected in layers.items():
            assert result[family]["layers"] == expected
            assert result[family]["losses"] == pytest.approx(result[family]["expected_losses"], rel=1e-5)
            assert result[family]["adapter_difference"] <= 1e-6, (family, result[family])
