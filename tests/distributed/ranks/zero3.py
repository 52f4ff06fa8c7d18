"""Rank script: the tiny llama under DeepSpeed ZeRO-3 (``offload_param: cpu``), gathered per layer by
``fxpeft.distributed.zero3.prepare_zero3``, against one process without DeepSpeed.

``zero3.py FOLDER``: every rank builds the seeded tiny llama (4 layers) with LoRA on q/v (``LORA`` of
``tests.distributed.ranks.common``; adapter tensors drawn from seed 1, so that A's gradient is not zero at the first
step), captured once for its batch shape, goes through
``deepspeed.initialize`` (every parameter partitioned: ``stage3_param_persistence_threshold`` 0; the partitions in CPU
memory; torch's AdamW), prepares it, and trains 3 steps on its half of each global batch. The reference is one process
on the same model over the same halves (the mean of the halves' losses, gradients accumulated), as DeepSpeed averages
the ranks' gradients.

Measured on each rank: the peak bytes of weights held gathered at once (``GatherLedger``: root, the layer being run,
and DeepSpeed's buffer of the one parameter in flight) against the whole base's bytes, one layer's and the root's; and,
independently of that ledger, the bytes of layer-weight storage that the tensors autograd saved during the first
forward still hold when that forward returns (0 when every layer's weights were freed after its forward: a saved view
of a freed weight must not keep it whole until the backward).

At the end the adapter is gathered (``deepspeed.zero.GatheredParameters``), compared with the reference's, and saved
once from rank 0 in PEFT's layout; rank 0 reads it back with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: it picks its accelerator then
os.environ.setdefault("FXPEFT_CACHE", "off")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fxpeft  # noqa: E402
import fxpeft.distributed as fd  # noqa: E402
from fxpeft.distributed.zero3 import prepare_zero3  # noqa: E402
from tests.distributed.ranks.common import global_batches, main, rows_for, start, tiny_llama  # noqa: E402
from tests.models import hf_model  # noqa: E402

STEPS = 3
LAYERS = 4  # so that the root and the layers gathered at once are clearly less than the whole base
CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False},
                          "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                          "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0},
    "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "wall_clock_breakdown": False,
}


def optimizer_of(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def build(example: torch.Tensor) -> fxpeft.AdaptedModel:
    """The seeded tiny llama (``LAYERS`` layers) with LoRA on q/v, captured for ``example``'s shape with labels (one
    capture: a later one would read partitioned weights), every adapter tensor drawn from seed 1, train mode."""
    return tiny_llama(LAYERS, example)


def reference(model: fxpeft.AdaptedModel, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``model`` trained in this process, without DeepSpeed, over the same halves: losses (mean of the halves), the
    final adapter. The adapter is put back as it was before, for the DeepSpeed run (one capture serves both)."""
    initial = {key: value.detach().clone() for key, value in model.adapters.state_dict().items()}
    optimizer = optimizer_of(model)
    losses = []
    for batch in global_batches(STEPS):
        total = 0.0
        for rank in range(world):
            rows = rows_for(rank, world, batch)
            loss = model(input_ids=rows, labels=rows).loss / world
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    final = {key: value.detach().clone() for key, value in model.adapter_state_dict().items()}
    model.adapters.load_state_dict(initial)
    return losses, final


def whole_bytes(parameters) -> int:
    """Bytes of these parameters whole (ZeRO-3's ``ds_numel``: their size before partitioning)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters)


class SavedLayerWeights:
    """While active, keeps the storage of every tensor autograd saves that is a layer weight's gathered storage;
    :meth:`bytes` is what those storages hold now."""

    def __init__(self, layers):
        self.parameters = [p for layer in layers for p in layer.parameters()]
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if storage.nbytes() and any(p.data.numel() and p.data.untyped_storage().data_ptr() == pointer
                                    for p in self.parameters):
            self.storages[pointer] = storage
        return tensor

    def bytes(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())


def largest_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    return max((ours[key].float() - theirs[key].float()).abs().max().item() for key in ours)


def peft_difference(saved: Path, expected: dict[str, torch.Tensor]) -> float:
    """Rank 0: the saved adapter read by PEFT onto the seeded base, against the gathered one."""
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(hf_model("llama", layers=LAYERS), saved)
    state = {f"base_model.model.{key.removeprefix('base_model.model.')}".replace(".default.", "."): value
             for key, value in theirs.state_dict().items() if "lora_" in key}
    return largest_difference(state, expected)


def body() -> dict:
    rank, world = start()
    folder = Path(sys.argv[1])
    import deepspeed

    # DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce op (minutes on 2 cores) on the first
    # run on a machine: gloo's collectives serve here. DeepSpeed keeps edits to this table (deepspeed/ops/__init__.py).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    example = rows_for(rank, world, global_batches(1)[0])
    adapted = build(example)
    expected_losses, expected_adapter = reference(adapted, world)
    initial = {key: value.detach().clone() for key, value in adapted.adapter_state_dict().items()}
    base = list(adapted.base_model.parameters())
    engine, optimizer, _, _ = deepspeed.initialize(model=adapted, optimizer=optimizer_of(adapted), config=CONFIG)
    # No prepare_zero3 call here: the model's first call sees DeepSpeed's partitions and prepares itself, as it does
    # under Accelerate's or the Trainer's DeepSpeed plugin.
    layers = [adapted.base_model.get_submodule(key) for key in fd.layer_modules(adapted)]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    report = {"base_bytes": whole_bytes(base), "layer_bytes": max(whole_bytes(layer.parameters()) for layer in layers),
              "root_bytes": whole_bytes(p for p in adapted.parameters() if id(p) not in in_layers),
              "largest_parameter_bytes": max(whole_bytes([p]) for p in adapted.parameters()),
              "layers": list(fd.layer_modules(adapted)),
              "partitioned_after_initialize": all(p.numel() == 0 for p in adapted.parameters())}
    saved = SavedLayerWeights(layers)
    losses = []
    for step, batch in enumerate(global_batches(STEPS)):
        rows = rows_for(rank, world, batch)
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
                loss = engine(input_ids=rows, labels=rows).loss
            report["saved_layer_bytes_after_forward"] = saved.bytes()
            report["saved_layer_storages"] = len(saved.storages)
            units = prepare_zero3(engine)  # what the first call set up
            report["root_held_after_forward"] = len(units.root_held)
            saved.storages.clear()
        else:
            loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        report.setdefault("held_after_backward", units.ledger.held_bytes)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    report.update(peak_gathered_bytes=units.ledger.peak_bytes, held_after_training=units.ledger.held_bytes,
                  parameter_gathers=units.ledger.gathers,
                  partitioned_after_training=all(p.numel() == 0 for p in adapted.parameters()))
    engine.eval()  # a forward that records nothing releases everything when it returns
    with torch.no_grad():
        rows = global_batches(1)[0][:2]
        report["eval_loss"] = engine(input_ids=rows, labels=rows).loss.item()
    report["held_after_eval"] = units.ledger.held_bytes
    report["partitioned_after_eval"] = all(p.numel() == 0 for p in adapted.parameters())
    with fd.gathered_adapters(engine) as whole:
        final = {key: value.detach().clone() for key, value in whole.adapter_state_dict().items()}
    fd.save_adapter(engine, folder / "adapter")  # gathered, written once by rank 0
    result = {"losses": losses, "expected_losses": expected_losses,
              "adapter_difference": largest_difference(final, expected_adapter),
              "adapter_moved": largest_difference(final, initial), **report}
    if rank == 0:
        result["peft_difference"] = peft_difference(folder / "adapter", final)
        result["file_bytes"] = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    return result


if __name__ == "__main__":
    main(body)
