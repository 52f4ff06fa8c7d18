"""Rank script: Accelerate's own FSDP2 preparation (``FullyShardedDataParallelPlugin(fsdp_version=2)``,
transformer-based auto wrap) of an fxpeft-adapted model, against one process.

Accelerate 1.15 switches to FSDP only on accelerator devices: on a CPU host it silently keeps DDP (pinned in
tests/distributed/test_accelerate.py). To run its FSDP2 code path here all the same, this script sets the accelerator's
shared state to FSDP with the plugin after ``Accelerator(cpu=True)``, the state it has on GPUs; ``prepare`` then runs
``fsdp2_prepare_model`` as it does there: ``fully_shard`` on every module of the model's ``_no_split_modules`` classes
(the llama's decoder layers, inside ``adapted.base_model``), then on the root, and it swaps the optimizer's parameters
for the shards. fxpeft sees on its next call that its layers were sharded by someone else and runs them as gathered
layers (fxpeft/runtime/layer_units.py).

``accelerate_fsdp2.py FOLDER``: trains 3 AdamW steps through Accelerate's prepared dataloader (each rank's half of each
global batch) and reports losses and the gathered adapter against one process (tests/distributed/ranks/fsdp.py's
reference), and how the model was sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

from tests.distributed.ranks.common import global_batches, main, start
from tests.distributed.ranks.fsdp import STEPS, build, draw_adapter, gathered_adapter, largest_difference, reference
from tests.models import hf_model


def body() -> dict:
    rank, world = start()
    folder = Path(sys.argv[1])
    if rank == 0:
        hf_model("llama").save_pretrained(folder)
    dist.barrier()
    expected_losses, expected_adapter = reference(folder, torch.float32, world)

    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_ram_efficient_loading=False)
    accelerator.state.distributed_type = DistributedType.FSDP  # what Accelerate sets on GPUs (see the docstring)
    accelerator.state.fsdp_plugin = plugin
    adapted = build(folder, torch.float32, meta=False)
    draw_adapter(adapted)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    rows = global_batches(STEPS).reshape(-1, global_batches(STEPS).shape[-1])  # batch i of 2 rows: rank i % 2
    loader = torch.utils.data.DataLoader(rows, batch_size=rows.shape[0] // STEPS // world)
    model, optimizer, loader = accelerator.prepare(adapted, optimizer, loader)
    sharded = sorted(path for path, module in adapted.base_model.named_modules() if isinstance(module, FSDPModule))
    losses = []
    for batch in loader:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return {"losses": losses, "expected_losses": expected_losses, "sharded_layers": sharded,
            "root_sharded": isinstance(model, FSDPModule),
            "adapter_difference": largest_difference(gathered_adapter(adapted), expected_adapter),
            "base_fraction": sum(p.to_local().numel() for p in adapted.base_model.parameters())
            / sum(p.numel() for p in adapted.base_model.parameters())}


if __name__ == "__main__":
    main(body)
