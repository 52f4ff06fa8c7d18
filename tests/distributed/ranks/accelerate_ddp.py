"""Accelerate over an adapted model on 2 ranks (run by tests/distributed/test_accelerate.py).

Started by torchrun or by ``accelerate launch``; either way ``Accelerator`` reads the ranks from the environment
and, with ``cpu=True``, sets up gloo itself (so this script does not). ``prepare(model, optimizer, dataloader)``
wraps the model, and the dataloader over ``STEPS`` global batches (batch size ``GLOBAL_ROWS / world``) gives rank
``r`` rows ``r*2, r*2+1`` of each global batch: the same shard as :func:`common.rows_for`. 3 AdamW steps, then the
rank reports what Accelerate set up (distributed type, backend, the wrapper's class, DTensor parameters), the bytes a
DDP communication hook saw, its losses and adapter; rank 0 adds the single-process reference.

Resume: the state after step 2 is saved (``save_state``); after ``free_memory`` (which drops the prepared objects,
so that ``load_state`` has one model and one optimizer to fill, as saved), a second model, optimizer and dataloader
from fresh weights are prepared, loaded from it and trained on global batch 3: they must reach the adapter of the
uninterrupted run.

Flags: ``--default`` builds ``Accelerator()`` rather than ``Accelerator(cpu=True)``; ``--fsdp2`` passes
``FullyShardedDataParallelPlugin(fsdp_version=2)``; ``--no-resume`` skips the resume check.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tests.distributed.ranks.common import (
    GLOBAL_ROWS,
    adapter_lists,
    frozen_state,
    global_batches,
    loss_of,
    main,
    make_optimizer,
    reference_run,
    rows_for,
    start,
    tiny_llama,
    trainable,
    unchanged,
)

STEPS = 3


def _prepared(accelerator: Accelerator, world: int):
    """A fresh adapted model, AdamW and the dataloader over all global batches, through ``prepare``."""
    adapted = tiny_llama()
    opt = make_optimizer("adamw", [p for _, p in trainable(adapted)])
    rows = [{"input_ids": ids} for ids in global_batches(STEPS).reshape(-1, global_batches(1).shape[-1])]
    loader = DataLoader(rows, batch_size=GLOBAL_ROWS // world, shuffle=False)
    return adapted, *accelerator.prepare(adapted, opt, loader)


def _step(accelerator, model, opt, ids) -> float:
    opt.zero_grad()
    loss = loss_of(model, ids)
    accelerator.backward(loss)
    opt.step()
    return loss.item()


def body() -> dict:
    flags = set(sys.argv[1:])
    start(init=False)
    kwargs = {} if "--default" in flags else {"cpu": True}
    if "--fsdp2" in flags:
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(**kwargs)
    rank, world = accelerator.process_index, accelerator.num_processes
    adapted, model, opt, loader = _prepared(accelerator, world)
    before = frozen_state(adapted)
    sent = {"bytes": 0}
    if isinstance(model, DistributedDataParallel):
        def counting_hook(state, bucket):
            sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(dist.group.WORLD, counting_hook)
    batches = global_batches(STEPS)
    folder = os.path.join(os.environ["FXPEFT_RANK_OUT"], "state")  # the launcher's temporary folder
    losses, step_bytes, shards_ok = [], [], []
    for index, ids in enumerate(loader):
        shards_ok.append(torch.equal(ids["input_ids"], rows_for(rank, world, batches[index])))
        sent["bytes"] = 0
        losses.append(_step(accelerator, model, opt, ids["input_ids"]))
        step_bytes.append(sent["bytes"])
        if index == STEPS - 2 and "--no-resume" not in flags:
            accelerator.save_state(folder)
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "backend": accelerator.state.backend,
        "num_processes": world,
        "dist_initialized": dist.is_initialized(),
        "dist_world": dist.get_world_size() if dist.is_initialized() else 1,
        "wrapper": type(model).__name__,
        "fsdp_plugin": getattr(accelerator.state, "fsdp_plugin", None) is not None,
        "is_fsdp2": bool(getattr(accelerator, "is_fsdp2", False)),
        "dtensor_params": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
        "shards_ok": shards_ok,
        "losses": losses,
        "step_bytes": step_bytes,
        "trainable_bytes": sum(p.numel() * p.element_size() for _, p in trainable(adapted)),
        "frozen_changed": unchanged(adapted, before),
        "adapter": adapter_lists(accelerator.unwrap_model(model)),
    }
    if "--no-resume" not in flags:
        accelerator.free_memory()  # forget the first model and optimizer: load_state fills every prepared one
        fresh, model2, opt2, _ = _prepared(accelerator, world)
        result["fresh_differs"] = adapter_lists(fresh) != result["adapter"]
        accelerator.load_state(folder)
        result["resume_loss"] = _step(accelerator, model2, opt2, rows_for(rank, world, batches[STEPS - 1]))
        result["resumed_adapter"] = adapter_lists(accelerator.unwrap_model(model2))
    if rank == 0:
        result["reference"] = reference_run("adamw", STEPS)
    return result


if __name__ == "__main__":
    main(body)
