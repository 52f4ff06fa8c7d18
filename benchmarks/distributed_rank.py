"""Rank script of ``benchmarks/distributed.py``: one contender's LoRA training steps on one rank, measured.

    PYTHONPATH=. FXPEFT_RANK_OUT=/tmp/out python -m torch.distributed.run --nproc_per_node 2 \\
        --master_addr 127.0.0.1 benchmarks/distributed_rank.py fxpeft-fsdp2 FOLDER --steps 5

``FOLDER`` holds the llama ``save_pretrained`` wrote (safetensors). Contenders (``CONTENDERS``):

- ``fxpeft-ddp`` / ``peft-ddp``: every rank loads the whole model (``from_pretrained``), adapts it (``fxpeft.transform``
  / ``peft.get_peft_model``) and wraps it in ``DistributedDataParallel``: the base replicated, as DDP requires.
- ``fxpeft-fsdp2`` / ``fxpeft-fsdp2-offload``: built on the meta device (``accelerate.init_empty_weights``), adapted
  (the training signature, ``labels`` included, captured before sharding), ``fxpeft.distributed.fully_shard``
  (``offload_policy=CPUOffloadPolicy()``), then ``fxpeft.distributed.load_sharded_weights``: each rank reads its rows.
- ``peft-fsdp2`` / ``peft-fsdp2-offload``: built on meta, ``get_peft_model``, torch's ``fully_shard`` on each decoder
  layer and then on the PEFT model (the root), ``to_empty``, then :func:`load_peft_shards` (below) copies each rank's
  rows from the file. On a machine without an accelerator FSDP2 refuses a pinned ``CPUOffloadPolicy``, so PEFT's gets
  ``pin_memory=False`` (fxpeft's ``fully_shard`` does the same by itself).

Every contender gets the same LoRA (r=16, alpha 32, dropout 0, q/k/v/o_proj) with the same non-zero weights (each
tensor drawn from a seed of its PEFT key, a shard taking its rows of the draw), the same rows of data (rank ``r`` of
step ``s``: seeded by ``(s, r)``) and AdamW. Per rank it reports (``FXPEFT_RANK_OUT/rank<r>.json``, written by
``tests/distributed/ranks/common.finish``): the first step's loss averaged over the ranks, the step times (forward,
loss, backward, ``optimizer.step``, ``zero_grad``; ``time.perf_counter``, and the process's CPU time,
``time.process_time``, which other processes on the cores do not stretch), RSS just before the first step, the peak
RSS at the end (``ru_maxrss``, and ``VmHWM``), the bytes of parameter storage the rank holds (each storage once; a
shard's local tensor) and the seconds from the start to the first step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as tf
from accelerate import init_empty_weights
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor

import fxpeft
import fxpeft.distributed as fd
from fxpeft.distributed.sharding import read_local_rows
from tests.distributed.ranks.common import main, start

CONTENDERS = ("fxpeft-ddp", "fxpeft-fsdp2", "fxpeft-fsdp2-offload", "peft-ddp", "peft-fsdp2", "peft-fsdp2-offload")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 16, 32


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=128)
    return parser.parse_args(argv)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's ``VmRSS`` (or ``VmHWM``) from ``/proc/self/status``, in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def rows(step: int, rank: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Rank ``rank``'s token ids at ``step``: the same on every contender and at every world size."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1000 * step + rank))


def draw(key: str, shape) -> torch.Tensor:
    """The whole value of the adapter tensor saved under PEFT's ``key``: seeded by the key, so every contender and
    every rank draws the same."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(zlib.crc32(key.encode()))) * 0.02


@torch.no_grad()
def fill(parameter: torch.Tensor, whole: torch.Tensor) -> None:
    """``whole`` into ``parameter``, or into this rank's rows of it when it is a shard."""
    local, start_row = fd.local_shard(parameter)
    local.copy_(whole[start_row:start_row + local.shape[0]] if local.dim() else whole)


def peft_key(name: str) -> str:
    """A PEFT model's parameter name as ``save_pretrained`` keys it (the adapter name dropped)."""
    return name.replace(".default.", ".")


def base_key(name: str) -> str:
    """A PEFT model's base parameter name as the base model's file keys it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def build(kind: str, folder: Path, meta: bool, example: torch.Tensor) -> torch.nn.Module:
    config = tf.AutoConfig.from_pretrained(folder)
    if meta:
        with init_empty_weights():  # buffers (rotary frequencies) stay real
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if kind == "fxpeft":
        rule = fxpeft.LoRA(targets=TARGETS, r=RANK, alpha=ALPHA, dropout=0.0)
        adapted = fxpeft.transform(model, [rule], example_kwargs=dict(input_ids=example, labels=example))
    else:
        from peft import LoraConfig, get_peft_model

        adapted = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=RANK,
                                                   lora_alpha=ALPHA, lora_dropout=0.0))
    adapted.train()
    return adapted


def draw_adapters(kind: str, model: torch.nn.Module) -> None:
    if kind == "fxpeft":
        for key, parameter in model.adapters["default"].peft_state_dict().items():
            fill(parameter, draw(key, parameter.shape))
        return
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            fill(parameter, draw(peft_key(name), parameter.shape))


@torch.no_grad()
def load_peft_shards(model: torch.nn.Module, folder: Path) -> None:
    """Fill a PEFT model built on meta and sharded with FSDP2 from the base's safetensors, each rank reading only its
    rows (``fxpeft.distributed.local_shard``); buffers that ``init_empty_weights`` kept real are put back after
    ``to_empty`` (which gives every tensor new, uninitialised storage); adapters are drawn afterwards."""

    kept = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.device.type != "meta"}
    model.to_empty(device="cpu")
    for name, buffer in kept.items():
        model.get_buffer(name).copy_(buffer)
    wanted = {base_key(name): p for name, p in model.named_parameters() if "lora_" not in name}
    read_local_rows(sorted(folder.glob("*.safetensors")), wanted)
    if wanted:
        raise RuntimeError(f"{folder} lacks {sorted(wanted)[:6]}")


def shard_peft(model: torch.nn.Module, offload: bool) -> None:
    policy = dict(offload_policy=CPUOffloadPolicy(pin_memory=False)) if offload else {}
    for layer in model.base_model.model.model.layers:
        torch_fully_shard(layer, **policy)
    torch_fully_shard(model, **policy)


def storage_bytes(model: torch.nn.Module, kind: str) -> dict[str, int]:
    """Bytes of the storages behind this rank's parameters (a shard's local tensor; each storage counted once),
    base and adapters apart."""
    seen: set[int] = set()
    sizes = {"base": 0, "adapters": 0}
    adapter_ids = {id(p) for p in model.adapters.parameters()} if kind == "fxpeft" else \
        {id(p) for name, p in model.named_parameters() if "lora_" in name}
    for parameter in model.parameters():
        local, _ = fd.local_shard(parameter)
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        sizes["adapters" if id(parameter) in adapter_ids else "base"] += storage.nbytes()
    return sizes


@torch.no_grad()
def adapter_checksum(model: torch.nn.Module, kind: str) -> float:
    """The sum of squares of every adapter element (shards summed over the ranks): equal for equal adapters."""
    tensors = list(model.adapters.parameters()) if kind == "fxpeft" else \
        [p for name, p in model.named_parameters() if "lora_" in name]
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        total += fd.local_shard(tensor)[0].double().square().sum()
    if any(isinstance(t, DTensor) for t in tensors):
        dist.all_reduce(total)
    return total.item()


def body() -> dict:
    began = time.perf_counter()
    args = parse()
    _, _ = start(init=False)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rank, world = dist.get_rank(), dist.get_world_size()
    kind, _, how = args.contender.partition("-")
    vocab = tf.AutoConfig.from_pretrained(args.folder).vocab_size
    example = rows(0, 0, args.batch, args.seq, vocab)
    sharded = how.startswith("fsdp2")
    model = build(kind, args.folder, meta=sharded, example=example)
    if not sharded:
        draw_adapters(kind, model)
    elif kind == "fxpeft":
        fd.fully_shard(model, **(dict(offload_policy=CPUOffloadPolicy()) if how.endswith("offload") else {}))
        fd.load_sharded_weights(model, args.folder)
        draw_adapters(kind, model)
    else:
        shard_peft(model, offload=how.endswith("offload"))
        load_peft_shards(model, args.folder)
        draw_adapters(kind, model)
    held = storage_bytes(model, kind)
    checksum = adapter_checksum(model, kind)
    trained = [p for p in model.parameters() if p.requires_grad]
    runner = torch.nn.parallel.DistributedDataParallel(model) if how == "ddp" else model
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    dist.barrier()
    rss_before = rss_mb()
    setup_s = time.perf_counter() - began
    times, cpu_times, first_loss = [], [], None
    for step in range(args.warmup + args.steps):
        ids = rows(step, rank, args.batch, args.seq, vocab)
        tic, cpu_tic = time.perf_counter(), time.process_time()
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)
        if step == 0:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            first_loss = mean.item() / world
    return {"contender": args.contender, "world": world, "first_loss": first_loss,
            "step_s": times[args.warmup:], "warmup_s": times[:args.warmup],
            "step_cpu_s": cpu_times[args.warmup:], "setup_s": setup_s,
            "rss_before_first_step_mb": rss_before, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024 / 1e6, "vm_hwm_mb": rss_mb("VmHWM"), "base_param_bytes": held["base"],
            "adapter_param_bytes": held["adapters"], "trainable": sum(p.numel() for p in trained),
            "adapter_checksum": checksum, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    os.environ.setdefault("FXPEFT_CACHE", "off")
    main(body)
