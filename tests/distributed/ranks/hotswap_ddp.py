"""DDP over a model prepared for hot swap (run by tests/distributed/test_ddp.py::test_hot_swap_under_ddp).

With one adapter and no free slot nothing needs dropping, so DDP trains it as usual. With a free slot, the gated graph
(what a compiled model runs) gives the slot a zero gradient that has to be dropped after backward, which DDP's
averaged gradients would overwrite: the model refuses such training, with UnsupportedError, on every rank at the same
point of backward. (Eager calls run the folded graph, in which a free slot gets no gradient at all: DDP then needs
``find_unused_parameters=True``, as for any unused parameter.) The cases run in that order (trained,
trained eagerly with a free slot, refused); each rank reports losses, the slots that moved and the refusal's message.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from fxpeft.errors import UnsupportedError
from tests.distributed.ranks.common import global_batches, loss_of, main, rows_for, start, tiny_llama


def body() -> dict:
    rank, world = start()
    batches = global_batches(2)
    adapted = tiny_llama()
    adapted.prepare_hotswap(max_rank=8, slots=0)
    losses, moved = _train(adapted, DistributedDataParallel(adapted), batches, rank, world)
    eager = tiny_llama()  # a free slot, eager calls (the folded graph): the slot is an unused parameter to DDP
    eager.prepare_hotswap(max_rank=8, slots=1)
    eager_losses, eager_moved = _train(eager, DistributedDataParallel(eager, find_unused_parameters=True), batches,
                                       rank, world)
    spare = tiny_llama()
    spare.prepare_hotswap(max_rank=8, slots=1)
    spare.fold_gates = False  # the gated graph, as compiled: the free slot gets a gradient (zeros) to drop
    refused = None
    try:
        loss_of(DistributedDataParallel(spare), rows_for(rank, world, batches[0])).backward()
    except UnsupportedError as error:
        refused = str(error)
    return {"world": world, "losses": losses, "moved": moved, "eager_losses": eager_losses,
            "eager_moved": eager_moved, "refused": refused}


def _train(adapted, model, batches, rank: int, world: int) -> tuple[list[float], list[str]]:
    """Two AdamW steps (weight decay: a slot given a zero gradient would move); the losses and the slots that moved."""
    before = {name: p.detach().clone() for name, p in adapted.named_parameters() if "_hotswap_slots" in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = loss_of(model, rows_for(rank, world, batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    moved = sorted({name.split(".")[1] for name, p in adapted.named_parameters()
                    if name in before and not torch.equal(p, before[name])})
    return losses, moved


if __name__ == "__main__":
    main(body)
