"""What every rank script shares: start-up, teardown, the tiny adapted llama and the data.

Start-up (:func:`start`): gloo on the launcher's ``MASTER_ADDR``/``MASTER_PORT``, one intra-op thread (the ranks
share the cores), fixed seeds, and a 60 s collective timeout so that a rank left waiting fails rather than hangs.

Teardown (:func:`finish`): the JSON result is written atomically (a temporary file, then ``os.replace``), so a
test never reads half a file; then ``barrier(); destroy_process_group(); os._exit(0)``. A plain
``destroy_process_group(); sys.exit()`` aborted 3 of 81 gloo runs with SIGABRT after the results were written
(../shared/FACTS-WAVE2.md): the barrier makes every rank arrive before any tears its pairs down, and ``os._exit``
skips the interpreter's teardown where the abort happened. :func:`main` runs a script's body so that an exception
prints its traceback and exits non-zero at once (torchrun then stops the other ranks): a failing rank never hangs.

The model (:func:`tiny_llama`): ``tests.models.hf_model("llama")`` (seeded) with LoRA on q/v, dropout 0 (so runs
are deterministic). LoRA's B starts at zero, which would make A's gradient zero on the first step and let a wrong
A-gradient reduction pass one step unnoticed; so every adapter tensor is re-drawn from a fixed seed, the same on
every rank and in every reference run.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import fxpeft
from tests.models import VOCAB, hf_model

GLOBAL_ROWS = 4  # rows per global batch (one optimizer step)
SEQ = 10
LORA = dict(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0)


def seed(value: int = 0) -> None:
    """The same seeds on every rank: model building and data must not depend on the rank."""
    random.seed(value)
    torch.manual_seed(value)


def start(init: bool = True) -> tuple[int, int]:
    """``(rank, world_size)`` after gloo's process group is up (``init=False``: leave that to the caller, e.g.
    ``Accelerator``); one torch thread and fixed seeds either way."""
    torch.set_num_threads(1)
    seed()
    if init and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _write(result: dict) -> None:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    out = Path(os.environ["FXPEFT_RANK_OUT"])
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, **result}))
    os.replace(tmp, out / f"rank{rank}.json")


def finish(result: dict) -> None:
    """Write this rank's result, then leave cleanly on every rank at once (never returns)."""
    _write(result)
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


def main(body) -> None:
    """Run ``body()`` (which returns this rank's result dict) and :func:`finish` with it; on any exception print
    the traceback and ``os._exit(1)`` without waiting for the other ranks."""
    try:
        result = body()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    finish(result)


def tiny_llama(layers: int = 2, example: torch.Tensor | None = None) -> fxpeft.AdaptedModel:
    """The tiny seeded llama with LoRA on q/v (dropout 0), every adapter tensor drawn from seed 1, train mode;
    ``example`` (token ids): captured for it with labels too (a model sharded later cannot capture)."""
    example_kwargs = None if example is None else dict(input_ids=example, labels=example)
    adapted = fxpeft.transform(hf_model("llama", layers=layers), [fxpeft.LoRA(**LORA)], example_kwargs=example_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in trainable(adapted):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    adapted.train()
    return adapted


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the trainable parameters, in registration order (the same on every rank)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every frozen parameter and buffer, to compare against after training."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of frozen parameters or buffers that differ from ``before`` (empty when none changed)."""
    after = frozen_state(model)
    return sorted(name for name in before if not torch.equal(before[name], after[name]))


def global_batches(steps: int) -> torch.Tensor:
    """``[steps, GLOBAL_ROWS, SEQ]`` token ids, fixed (seed 2), a different global batch for each step."""
    generator = torch.Generator().manual_seed(2)
    return torch.randint(2, VOCAB, (steps, GLOBAL_ROWS, SEQ), generator=generator)


def rows_for(rank: int, world: int, batch: torch.Tensor) -> torch.Tensor:
    """This rank's equal, contiguous share of a global batch's rows (rank 0 the first), as DDP samplers and
    Accelerate's batch sharding give them."""
    rows = batch.shape[0]
    assert rows % world == 0, f"{rows} rows do not split evenly over {world} ranks"
    share = rows // world
    return batch[rank * share:(rank + 1) * share]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss with labels = input ids: a mean over the (equal-length, unpadded) tokens, so the
    average of equal shards' losses is the global batch's loss and DDP's gradient average is its gradient."""
    return model(input_ids=ids, labels=ids).loss


def make_optimizer(name: str, parameters) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9) or ``adamw``; learning rates large enough that 3 steps move every adapter tensor."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=0.5, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.01)
    raise ValueError(name)


def reference_run(optimizer: str, steps: int) -> dict:
    """One process, no DDP: the same model and optimizer over each whole global batch. Its losses and final
    adapter are what a correct data-parallel run must reproduce."""
    seed()
    model = tiny_llama()
    initial = adapter_lists(model)
    opt = make_optimizer(optimizer, [p for _, p in trainable(model)])
    losses = []
    for batch in global_batches(steps):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "adapter": adapter_lists(model), "initial": initial}


def adapter_lists(model: torch.nn.Module) -> dict[str, list[float]]:
    """The trainable tensors as flat float lists keyed by name (``module.`` of a DDP wrapper stripped), for JSON."""
    return {name.removeprefix("module."): p.detach().flatten().tolist() for name, p in trainable(model)}
