"""fxpeft.distributed.planning: bytes per rank on paper, checked against sums computed another way.

The padding rule (every rank allocates ``ceil(rows / N)`` rows; AdamW's states are unpadded) was also checked
against real FSDP2 on 3 gloo ranks of the tiny llama (per-rank sharded storage, gradients and AdamW states equal to
the plan byte for byte); that run is not a test here (multi-process, slow).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxpeft
import fxpeft.distributed as fd
from fxpeft.distributed.planning import (
    POLICIES,
    ROOT,
    MemoryPlan,
    ParameterSpec,
    layer_groups,
    parameter_specs,
    plan_memory,
    plan_parameters,
    plans_table,
    shard_rows,
)
from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.passes.lora.sizes import lora_parameter_specs
from tests.models import hf_model

RULE = fxpeft.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=4, rank_pattern={"down_proj": 2})


@pytest.fixture(scope="module")
def adapted():
    return fxpeft.transform(hf_model("llama"), [RULE])


def _padded_bytes(tensor: torch.Tensor, world_size: int) -> int:
    """What FSDP2 allocates per rank, worked out as its source does: ``torch.chunk`` and the first chunk's size."""
    whole = torch.empty(tensor.shape or (1,), dtype=tensor.dtype, device="meta")
    return torch.chunk(whole, world_size, dim=0)[0].numel() * tensor.element_size()


def _rank_bytes(tensor: torch.Tensor, world_size: int, rank: int) -> int:
    """The rows ``rank`` really holds (its ``torch.chunk`` piece, or none)."""
    chunks = torch.chunk(torch.empty(tensor.shape or (1,), device="meta"), world_size, dim=0)
    return chunks[rank].numel() * tensor.element_size() if rank < len(chunks) else 0


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_bytes_equal_sums_over_the_model(adapted, world_size):
    base = list(adapted.base_model.parameters())
    lora = list(adapted.adapters.parameters())
    plan = plan_memory(adapted, world_size, "fsdp2")
    assert plan.device.base_weights == sum(_padded_bytes(p, world_size) for p in base)
    assert plan.device.adapter_weights == sum(_padded_bytes(p, world_size) for p in lora)
    assert plan.device.gradients == plan.device.adapter_weights  # padded reduce-scatter output, fp32 like the weights
    assert plan.device.optimizer_states == 2 * sum(_rank_bytes(p, world_size, 0) for p in lora)
    assert plan.cpu.total == 0
    assert plan.adapter_parameters == plan.trainable_parameters == sum(p.numel() for p in lora)
    assert plan.base_parameters == sum(p.numel() for p in base)
    assert plan.layers == 2
    root_names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    named = dict(adapted.base_model.named_parameters())
    unsharded = sum(_padded_bytes(named[n], world_size) * world_size for n in root_names)
    assert plan.root_unsharded == unsharded + sum(_padded_bytes(p, world_size) * world_size for p in lora)
    layer = sum(_padded_bytes(p, world_size) * world_size for p in adapted.base_model.model.layers[0].parameters())
    assert plan.layers_unsharded == 2 * layer
    assert plan.full_gradients == sum(p.numel() * p.element_size() for p in lora)
    assert plan.peak_device == plan.device.total + plan.root_unsharded + plan.full_gradients + max(
        plan.layers_unsharded, plan.reduce_buffer)


def test_lora_adapters_are_float32_and_base_dtype_is_kept():
    model = hf_model("llama").to(torch.bfloat16)
    specs = parameter_specs(model) + lora_parameter_specs(model, RULE)
    assert {s.itemsize for s in specs if not s.adapter} == {2}
    assert {s.itemsize for s in specs if s.adapter} == {4}


@pytest.mark.parametrize("world_size", [2, 3, 5, 7])
def test_sharded_bytes_over_ranks_add_up_to_the_whole(adapted, world_size):
    whole = plan_memory(adapted, 1, "fsdp2")
    plans = [plan_memory(adapted, world_size, "fsdp2", rank=rank) for rank in range(world_size)]
    padding = sum((math.ceil(p.shape[0] / world_size) * world_size - p.shape[0]) * math.prod(p.shape[1:]) *
                  p.element_size() for p in adapted.base_model.parameters())
    assert sum(p.device.base_weights for p in plans) == whole.device.base_weights + padding
    assert all(p.device.base_weights == plans[0].device.base_weights for p in plans)  # every rank pads
    assert sum(p.device.optimizer_states for p in plans) == whole.device.optimizer_states  # unpadded: exact
    offload = [plan_memory(adapted, world_size, "fsdp2-offload", rank=rank) for rank in range(world_size)]
    assert sum(p.cpu.gradients for p in offload) == whole.device.gradients  # CPU copies of the unpadded views


def test_one_rank_fsdp2_equals_ddp_for_the_weights(adapted):
    ddp, fsdp = plan_memory(adapted, 1, "ddp"), plan_memory(adapted, 1, "fsdp2")
    assert ddp.device == fsdp.device
    assert ddp.cpu == fsdp.cpu
    assert plan_memory(adapted, 4, "ddp").device == ddp.device  # replicated: the rank count changes nothing
    assert ddp.peak_device == ddp.device.total + ddp.device.gradients  # DDP's buckets
    assert fsdp.peak_device > ddp.peak_device  # FSDP2 all-gathers into copies even on one rank


@pytest.mark.parametrize("world_size", [1, 4])
def test_offload_moves_bytes_from_the_device_to_cpu(adapted, world_size):
    fsdp = plan_memory(adapted, world_size, "fsdp2")
    offload = plan_memory(adapted, world_size, "fsdp2-offload")
    assert offload.device.total == 0
    assert offload.cpu.base_weights == fsdp.device.base_weights
    assert offload.cpu.adapter_weights == fsdp.device.adapter_weights
    assert offload.cpu.optimizer_states == fsdp.device.optimizer_states
    assert offload.cpu.gradients <= fsdp.device.gradients  # unpadded CPU copies
    assert offload.peak_device == fsdp.peak_device - fsdp.device.total


def test_analytic_lora_count_equals_a_real_transform(adapted):
    real = sorted(tuple(p.shape) for p in adapted.adapters.parameters())
    counted = sorted(s.shape for s in lora_parameter_specs(hf_model("llama"), RULE))
    assert counted == real
    base = hf_model("llama")
    assert plan_memory(base, 3, "fsdp2", adapters=lora_parameter_specs(base, RULE)) == plan_memory(adapted, 3, "fsdp2")


def test_analytic_all_linear_on_meta_equals_a_transform_on_meta():
    rule = fxpeft.LoRA(targets="all-linear", r=2, layers=[1], exclude=["o_proj"])
    with torch.device("meta"):
        model = hf_model("llama")
    adapted = fxpeft.transform(model, [rule])  # a capture on meta: no tensor allocated
    real = sorted(tuple(p.shape) for p in adapted.adapters.parameters())
    assert sorted(s.shape for s in lora_parameter_specs(model, rule)) == real
    assert all(s.group == ROOT for s in lora_parameter_specs(model, rule))
    counted = plan_memory(model, 2, "fsdp2-offload", adapters=lora_parameter_specs(model, rule))
    assert counted == plan_memory(adapted, 2, "fsdp2-offload")


def test_layer_groups_are_the_outermost_numbered_layers():
    assert layer_groups(hf_model("llama")) == ["model.layers.0", "model.layers.1"]
    t5 = hf_model("t5")  # block.N.layer.M stays inside block.N
    assert layer_groups(t5) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    tied = {s.name for s in parameter_specs(t5)}
    assert "shared.weight" in tied and "encoder.embed_tokens.weight" not in tied  # tied tensors count once


def test_adapted_layers_are_the_graphs_and_can_be_given(adapted):

    assert list(fd.layer_modules(adapted)) == layer_groups(adapted.base_model) == ["model.layers.0", "model.layers.1"]
    one = plan_memory(adapted, 2, "fsdp2", layers=["model.layers.1"])  # layer 0 stays with the root
    both = plan_memory(adapted, 2, "fsdp2")
    assert one.layers == 1 and one.device == both.device
    assert one.root_unsharded == both.root_unsharded + both.layers_unsharded // 2


def test_a_model_without_numbered_layers_is_planned_root_only():
    model = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    plan = plan_memory(model, 4, "fsdp2", adapters=lora_parameter_specs(model, fxpeft.LoRA(targets=["0", "2"], r=2)))
    assert plan.layers == 0 and plan.layers_unsharded == 0
    assert any("root-only" in note for note in plan.notes)
    assert plan.root_unsharded == sum(math.ceil(p.shape[0] / 4) * 4 * math.prod(p.shape[1:]) * 4 for p in
                                      [*model.parameters(), torch.empty(2, 10), torch.empty(7, 2),
                                       torch.empty(2, 7), torch.empty(3, 2)])


def test_full_finetuning_plan_from_a_plain_model():
    model = hf_model("llama")
    plan = plan_memory(model, 1, "ddp")  # every parameter requires grad: all of them train
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.device == type(plan.device)(params, 0, params, 2 * params)
    assert plan_memory(model, 1, "ddp", optimizer_states=0).device.optimizer_states == 0


def test_table_prints_gib_and_the_notes(adapted):
    plan = plan_memory(adapted, 2, "fsdp2-offload", title="tiny llama")
    text = str(plan)
    assert text == plan.table()
    assert text.startswith("**tiny llama**") and "| fsdp2-offload, rank 0 of 2 | device GiB | CPU GiB |" in text
    assert "Activations" in text and "not planned" in text
    both = plans_table({"a": plan, "b": plan_memory(adapted, 2, "ddp")})
    assert both.splitlines()[0] == "| GiB per rank | a: device | a: CPU | b: device | b: CPU |"
    assert isinstance(plan, MemoryPlan)
    with pytest.raises(AttributeError):
        plan.policy = "ddp"  # frozen


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "world_size"), (dict(world_size=-2), "world_size"), (dict(world_size=True), "world_size"),
    (dict(world_size=2.0), "world_size"), (dict(world_size=2, policy="zero3"), "Unknown policy"),
    (dict(world_size=2, rank=2), "rank"), (dict(world_size=2, rank=-1), "rank"),
    (dict(world_size=2, optimizer_states=-1), "optimizer_states"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(FxpeftError, match=match):
        plan_parameters([ParameterSpec("w", (4, 4), 4)], **kwargs)


def test_what_cannot_be_counted_without_a_capture_is_refused(adapted):
    model = hf_model("llama")
    with pytest.raises(FxpeftError, match="AdaptedModel brings its own"):
        plan_memory(adapted, 2, adapters=lora_parameter_specs(hf_model("llama"), RULE))
    for rule in (fxpeft.LoRA(targets=["attention.query"]), fxpeft.LoRA(targets=["q_proj"], use_dora=True),
                 fxpeft.LoRA(targets=["embed_tokens"])):
        with pytest.raises(UnsupportedError, match="adapted model"):
            lora_parameter_specs(model, rule)
    with pytest.raises(FxpeftError, match="select no linear"):
        lora_parameter_specs(model, fxpeft.LoRA(targets=["nothing_here"]))
    with pytest.raises(FxpeftError, match="nn.Module"):
        plan_memory("llama", 2)


@given(rows=st.integers(0, 10_000), world_size=st.integers(1, 512))
def test_shard_rows_is_torch_chunk(rows, world_size):
    padded, actual = shard_rows(rows, world_size, 0)
    actuals = [shard_rows(rows, world_size, rank)[1] for rank in range(world_size)]
    assert sum(actuals) == rows and padded * world_size - rows < world_size and padded == actual
    assert all(shard_rows(rows, world_size, rank)[0] == padded for rank in range(world_size))
    if rows and world_size <= 64:
        chunks = torch.chunk(torch.empty(rows, device="meta"), world_size)
        assert actuals == [c.numel() for c in chunks] + [0] * (world_size - len(chunks))


shapes = st.lists(st.integers(1, 300), min_size=0, max_size=3).map(tuple)
specs = st.lists(st.builds(ParameterSpec, name=st.just("p"), shape=shapes, itemsize=st.sampled_from([2, 4]),
                           group=st.sampled_from([ROOT, "layers.0", "layers.1"]), trainable=st.booleans(),
                           adapter=st.booleans()), min_size=1, max_size=8)


@given(specs=specs, world_size=st.integers(1, 64), policy=st.sampled_from(POLICIES))
def test_plans_add_up_over_ranks(specs, world_size, policy):
    plans = [plan_parameters(specs, world_size, policy, rank=rank) for rank in range(world_size)]
    trained = sum(s.numel * s.itemsize for s in specs if s.trainable)
    sharded = policy != "ddp"
    held = [p.device if policy != "fsdp2-offload" else p.cpu for p in plans]
    assert sum(h.optimizer_states for h in held) == 2 * trained * (1 if sharded else world_size)
    assert len({h.base_weights + h.adapter_weights for h in held}) == 1  # padded: the same on every rank
    assert max(p.peak_device for p in plans) == plans[0].peak_device  # rank 0 holds the most
    weights = sum(s.numel * s.itemsize for s in specs)
    assert plans[0].device.base_weights + plans[0].device.adapter_weights + plans[0].cpu.base_weights + \
        plans[0].cpu.adapter_weights >= (weights / world_size if sharded else weights)


def test_benchmark_prints_the_readme_tables(tmp_path, capsys):
    bench = importlib.import_module("benchmarks.distributed_plan")
    out = tmp_path / "plan.md"
    text = bench.main(["--out", str(out)])
    assert out.read_text() == text + "\n"
    assert "T0_3B" in text and "70B llama" in text and "9.8 GB" in text and "47.14 GB" in text
    assert "| **peak device (estimate)** |" in capsys.readouterr().out
