"""Rank script: the tiny llama sharded per layer with ``fxpeft.distributed.fully_shard`` (FSDP2), against one process.

``fsdp.py MODE FOLDER``: rank 0 saves the seeded tiny llama (``tests.models.hf_model``) to ``FOLDER`` in safetensors
(bfloat16 for MODE ``bf16``); every rank then builds it on the meta device (``accelerate.init_empty_weights``), adapts
it, shards it (``plain``; ``offload``: ``CPUOffloadPolicy``; ``bf16``: a bf16 base under ``MixedPrecisionPolicy`` with
float32 reduction, adapters float32), loads its own rows of the weights, and trains 3 AdamW steps on its share of
each global batch. The reference is one process on the real weights, over the same shares of each global batch (the
mean of the shares' losses, gradients accumulated), so that a bf16 forward sees the same shapes as the ranks'.

MODE ``resume``: 2 steps, ``save_training_state`` and ``save_adapter``; then a new sharded model loads the state and
takes step 3. Rank 0 also reads the saved adapter with PEFT (``PeftModel.from_pretrained``) and with fxpeft.

Reported per rank: losses (averaged over ranks) and the reference's, the gathered final adapter against the
reference's, local/total base parameter elements and the bytes of storage behind them, the dtypes, and what the
checks found.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as tf
from accelerate import init_empty_weights
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

import fxpeft
import fxpeft.distributed as fd
from fxpeft.errors import UnsupportedError
from tests.distributed.ranks.common import LORA, global_batches, main, rows_for, start
from tests.models import hf_model

STEPS = 3


def build(folder: Path, dtype: torch.dtype, meta: bool) -> fxpeft.AdaptedModel:
    """The saved llama adapted with LoRA on q/v, its adapter tensors drawn from seed 1; on meta or real weights."""
    if meta:
        with init_empty_weights():  # as from_pretrained builds it: rotary frequencies stay float32
            model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        model = tf.LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    example = torch.zeros(2, 10, dtype=torch.long)
    adapted = fxpeft.transform(model, [fxpeft.LoRA(**LORA)], example_kwargs=dict(input_ids=example, labels=example))
    adapted.train()
    return adapted


@torch.no_grad()
def draw_adapter(adapted) -> None:
    """Every adapter tensor drawn from seed 1 (B too, so that A's gradient is not zero at the first step); a sharded
    tensor takes its rows of the same draw."""
    generator = torch.Generator().manual_seed(1)
    for site in adapted.site_modules():
        for parameter in site.parameters():
            whole = torch.randn(parameter.shape, generator=generator) * 0.1
            local, start = fd.local_shard(parameter)
            local.copy_(whole[start:start + local.shape[0]])


def sharded(folder: Path, mode: str, dtype: torch.dtype) -> tuple[fxpeft.AdaptedModel, fd.MemoryPlan]:
    """The model built on meta, sharded and filled; and the memory plan of that model made before sharding it."""
    adapted = build(folder, dtype, meta=True)
    plan = fd.plan_memory(adapted, dist.get_world_size(), "fsdp2-offload" if mode == "offload" else "fsdp2",
                          rank=dist.get_rank())
    policies = {"offload": dict(offload_policy=CPUOffloadPolicy()),
                "bf16": dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))}
    fd.fully_shard(adapted, **policies.get(mode, {}))
    fd.load_sharded_weights(adapted, folder)
    draw_adapter(adapted)
    return adapted, plan


def optimizer_of(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def reference(folder: Path, dtype: torch.dtype, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process on the real weights over the same shares: losses (mean of shares), the final adapter by PEFT key."""
    model = build(folder, dtype, meta=False)
    draw_adapter(model)
    optimizer = optimizer_of(model)
    losses = []
    for batch in global_batches(STEPS):
        total = 0.0
        for rank in range(world):
            loss = model(input_ids=rows_for(rank, world, batch), labels=rows_for(rank, world, batch)).loss / world
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {key: value.detach().clone() for key, value in model.adapter_state_dict().items()}


def train(adapted, optimizer, rank: int, world: int, steps: range) -> list[float]:
    losses = []
    for batch in global_batches(STEPS)[steps.start:steps.stop]:
        rows = rows_for(rank, world, batch)
        loss = adapted(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def gathered_adapter(adapted) -> dict[str, torch.Tensor]:
    with fd.gathered_adapters(adapted):
        return {key: value.detach().clone() for key, value in adapted.adapter_state_dict().items()}


def largest_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    return max((ours[key].float() - theirs[key].float()).abs().max().item() for key in ours)


def storage_report(adapted, plan: fd.MemoryPlan) -> dict:
    base = list(adapted.base_model.parameters())
    local = [p.to_local() for p in base]
    adapters = [p.to_local() for p in adapted.adapters.parameters()]
    return {"planned_base_bytes": plan.device.base_weights + plan.cpu.base_weights,
            "planned_adapter_bytes": plan.device.adapter_weights + plan.cpu.adapter_weights,
            "adapter_storage_bytes": sum(t.untyped_storage().nbytes() for t in adapters),
            "local_elements": sum(t.numel() for t in local), "total_elements": sum(p.numel() for p in base),
            "local_storage_bytes": sum(t.untyped_storage().nbytes() for t in local),
            "total_bytes": sum(p.numel() * p.element_size() for p in base),
            "base_devices": sorted({t.device.type for t in local}),
            "adapter_dtypes": sorted({str(p.dtype) for p in adapted.adapters.parameters()}),
            "base_dtypes": sorted({str(p.dtype) for p in base})}


def peft_reads(folder: Path, saved: Path, dtype: torch.dtype, expected: dict[str, torch.Tensor]) -> dict:
    """Rank 0: the saved adapter read by PEFT and by fxpeft, against the gathered one."""
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(folder, dtype=dtype), saved)
    state = {f"base_model.model.{key.removeprefix('base_model.model.')}": value
             for key, value in theirs.state_dict().items() if "lora_" in key}
    state = {key.replace(".default.", "."): value for key, value in state.items()}
    ours = fxpeft.load_adapter(tf.LlamaForCausalLM.from_pretrained(folder, dtype=dtype), saved)
    return {"peft_difference": largest_difference(state, expected),
            "fxpeft_difference": largest_difference(ours.adapter_state_dict(), expected),
            "file_bytes": (saved / "adapter_model.safetensors").stat().st_size}


def refusals(adapted) -> list[str]:
    """What a sharded model refuses (merge, a new adapter), each with fxpeft's error and nothing changed."""
    refused = []
    for what, call in (("merge", adapted.merge),
                       ("add_adapter", lambda: adapted.add_adapter("other", [fxpeft.LoRA(targets=["k_proj"], r=2)]))):
        try:
            call()
        except UnsupportedError as error:
            assert "sharded with FSDP2" in str(error), error
            refused.append(what)
    assert list(adapted.adapters) == ["default"] and not adapted.merged_adapters
    return refused


def failed_save(adapted, folder: Path) -> str:
    """A save that fails on rank 0 (its target is a file) raises on every rank, not only there: no rank hangs at the
    next collective. Returns the error's type name."""
    blocker = folder / "not_a_folder"
    if dist.get_rank() == 0:
        blocker.write_text("a file where the adapter folder should go")
    dist.barrier()
    try:
        fd.save_adapter(adapted, blocker)
    except Exception as error:  # rank 0: the writer's own error; the others: fxpeft's, naming rank 0's
        dist.barrier()  # every rank got here: the collective after the failure does not hang
        return "rank 0 error" if dist.get_rank() == 0 else type(error).__name__
    raise AssertionError("a save into a file path did not fail")


def body() -> dict:
    rank, world = start()
    mode, folder = sys.argv[1], Path(sys.argv[2])
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    if rank == 0:
        hf_model("llama").to(dtype).save_pretrained(folder)
    dist.barrier()
    expected_losses, expected_adapter = reference(folder, dtype, world)
    adapted, plan = sharded(folder, mode, dtype)
    report = storage_report(adapted, plan)
    optimizer = optimizer_of(adapted)
    if mode != "resume":
        losses = train(adapted, optimizer, rank, world, range(0, STEPS))
    else:
        losses = train(adapted, optimizer, rank, world, range(0, 2))
        fd.save_training_state(adapted, optimizer, folder / "state")
        fd.save_adapter(adapted, folder / "adapter")
        del adapted, optimizer
        adapted, _ = sharded(folder, mode, dtype)
        optimizer = optimizer_of(adapted)
        fd.load_training_state(adapted, optimizer, folder / "state")
        losses += train(adapted, optimizer, rank, world, range(2, STEPS))
    final = gathered_adapter(adapted)
    result = {"mode": mode, "losses": losses, "expected_losses": expected_losses,
              "adapter_difference": largest_difference(final, expected_adapter), **report}
    if mode == "resume":
        result["refused"] = refusals(adapted)
        result["failed_save"] = failed_save(adapted, folder)
        fd.save_adapter(adapted, folder / "final")
        if rank == 0:
            result.update(peft_reads(folder, folder / "final", dtype, final))
    return result


if __name__ == "__main__":
    main(body)
