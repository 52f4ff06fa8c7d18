"""DDP over an adapted model: what it communicates and what it computes (run by tests/distributed/test_ddp.py).

Each rank wraps the same adapted tiny llama in ``DistributedDataParallel`` and trains ``STEPS`` steps on its half
of each global batch. A communication hook counts the bytes of every bucket DDP all-reduces (then runs DDP's own
allreduce hook, so the training is unchanged) and records which parameters the buckets hold: DDP builds buckets
from parameters that require grad only, so a frozen base weight in a bucket, or a step's bytes above the adapter
gradients' bytes, would mean the base model's gradients travel too. Rank 0 then runs the single-process reference
(same model, whole global batches) for the test to compare with.

Argument: the optimizer (``sgd`` or ``adamw``).
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from tests.distributed.ranks.common import (
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


def body() -> dict:
    rank, world = start()
    optimizer = sys.argv[1] if len(sys.argv) > 1 else "sgd"
    adapted = tiny_llama()
    before = frozen_state(adapted)
    names = {id(p): name for name, p in adapted.named_parameters()}
    ddp = DistributedDataParallel(adapted)
    sent = {"bytes": 0, "buckets": 0}
    bucketed: set[str] = set()

    def counting_hook(state, bucket):
        buffer = bucket.buffer()
        sent["bytes"] += buffer.numel() * buffer.element_size()
        sent["buckets"] += 1
        bucketed.update(names[id(p)] for p in bucket.parameters())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    opt = make_optimizer(optimizer, ddp.parameters())  # frozen ones get no .grad, so the optimizer skips them
    losses, step_bytes, step_buckets = [], [], []
    for batch in global_batches(STEPS):
        sent.update(bytes=0, buckets=0)
        opt.zero_grad()
        loss = loss_of(ddp, rows_for(rank, world, batch))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step_bytes.append(sent["bytes"])
        step_buckets.append(sent["buckets"])
    result = {
        "world": world,
        "losses": losses,
        "step_bytes": step_bytes,
        "step_buckets": step_buckets,
        "bucketed": sorted(bucketed),
        "trainable": [name for name, _ in trainable(adapted)],
        "trainable_bytes": sum(p.numel() * p.element_size() for _, p in trainable(adapted)),
        "trainable_numel": sum(p.numel() for _, p in trainable(adapted)),
        "frozen_count": sum(1 for p in adapted.parameters() if not p.requires_grad),
        "frozen_changed": unchanged(adapted, before),
        "frozen_with_grad": sorted(n for n, p in adapted.named_parameters()
                                   if not p.requires_grad and p.grad is not None),
        "adapter": adapter_lists(adapted),
    }
    if rank == 0:
        result["reference"] = reference_run(optimizer, STEPS)
    return result


if __name__ == "__main__":
    main(body)
