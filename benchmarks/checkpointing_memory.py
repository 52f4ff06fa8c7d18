"""Memory kept for backward with and without activation checkpointing, fxpeft next to PEFT.

    python -m benchmarks.checkpointing_memory              # the tiny llama and workload (a), ~2 min on 2 cores
    python -m benchmarks.checkpointing_memory --sizes tiny # the tiny llama only (~30 s)

Per size, every contender adapts the same seeded llama-like model (workload (a): LoRA r=8 on q/v, alpha 16), runs
one training step to warm up (fxpeft captures the call's signature), then one measured step on the same batch:

- ``saved``: the bytes of every tensor autograd saves for backward, summed as a ``saved_tensors_hooks`` pack hook
  sees them (the issue's measure); weights that a layer saves (and fxpeft's layers take as inputs) count too;
- ``activations``: the same tensors, each storage once, leaving out the model's own parameters and buffers (they are
  in memory anyway): the activation memory that backward needs;
- ``after forward``: the bytes the forward allocated and had not freed when it returned (the profiler's CPU
  memory events): activations, what checkpointed layers keep outside saved tensors, and the outputs (logits, loss);
  what a training step holds at its peak, less the weights;
- ``step``: the median time of 3 plain training steps (forward and backward, no hook, no profiler): what the
  recomputation costs (process CPU time with ``--threads 1``, else wall time).

Contenders: PEFT, PEFT with ``gradient_checkpointing_enable()`` (transformers' default, non-reentrant), fxpeft,
fxpeft with ``gradient_checkpointing_enable()``, and fxpeft over a base model whose checkpointing was enabled before
``transform`` (the flag carries over). Each row also says whether the measured step's loss and LoRA gradients equal
the same library's run without checkpointing (they must: recomputation changes no number). Writes
``results/<date>-<device>-checkpointing.{json,md}``. Target: fxpeft with checkpointing keeps no more activations for
backward than PEFT with checkpointing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

import fxpeft

from .report import write_atomically
from .workloads import FULL, WORKLOADS, Sizes

RESULTS = Path(__file__).resolve().parent / "results"
KIB = 1024
# tiny: the tests' tiny llama (tests/models.py) with a longer batch; a: workload (a), whose 32000-word logits and
# their log-softmax are most of what even a checkpointed step keeps.
TINY = Sizes(hidden=64, layers=2, heads=4, intermediate=128, vocab=128, batch=4, seq=64, mixed_batch=1, mixed_seq=1,
             new_tokens=1)
SIZES = {"tiny": TINY, "a": FULL}
CONTENDERS = ("PEFT", "PEFT + checkpointing", "fxpeft", "fxpeft + checkpointing", "fxpeft, base flag set")


def _adapt(name: str, sizes: Sizes, example: dict[str, torch.Tensor]) -> torch.nn.Module:
    workload = WORKLOADS["a"]
    model = workload.build(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24: gradient_checkpointing_* are aliases
        if name.startswith("PEFT"):
            from peft import get_peft_model

            adapted = get_peft_model(model, workload.peft_config())
            if name.endswith("checkpointing"):
                adapted.gradient_checkpointing_enable()
        else:
            if name.endswith("base flag set"):
                model.gradient_checkpointing_enable()
            adapted = fxpeft.transform(model, [workload.rule()], example_kwargs=example)
            if name.endswith("checkpointing"):
                adapted.gradient_checkpointing_enable()
    return adapted.train()


def _storages(module: torch.nn.Module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in (*module.parameters(), *module.buffers())}


def _measure(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One training step's forward under a pack hook and the profiler's memory events, then its backward."""
    weights = _storages(model)
    raw = [0]
    activations: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        raw[0] += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            activations[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch).loss
    after_forward = sum(event.self_cpu_memory_usage for event in profiler.events())
    start = time.perf_counter()
    loss.backward()
    backward_s = time.perf_counter() - start
    grads = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
             if parameter.grad is not None}
    return {"saved_kib": raw[0] / KIB, "activations_kib": sum(activations.values()) / KIB,
            "after_forward_kib": after_forward / KIB, "backward_s": backward_s, "loss": loss.item(), "grads": grads}


def _step_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], clock: Callable[[], float]) -> float:
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = clock()
        model(**batch).loss.backward()
        times.append(clock() - start)
    return statistics.median(times)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two gradient sets (inf when they name different parameters)."""
    if a.keys() != b.keys() or not a:
        return float("inf")
    return max((a[name] - b[name]).abs().max().item() for name in a)


def run_size(label: str, sizes: Sizes, log: Callable[[str], None],
             clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    workload = WORKLOADS["a"]
    batch = workload.batch(sizes)
    rows = []
    for name in CONTENDERS:
        model = _adapt(name, sizes, batch)
        _measure(model, batch)  # warm-up: fxpeft captures this signature, PEFT and autograd allocate once
        result = _measure(model, batch)
        result["step_s"] = _step_seconds(model, batch, clock)
        result.update(size=label, contender=name, is_checkpointing=name != "PEFT" and name != "fxpeft")
        rows.append(result)
        log(f"{label} {name}: saved {result['saved_kib']:.0f} KiB, activations {result['activations_kib']:.0f} KiB, "
            f"after forward {result['after_forward_kib']:.0f} KiB")
        del model
    reference = {"PEFT": rows[0], "fxpeft": rows[2]}
    for row in rows:
        plain = reference["PEFT" if row["contender"].startswith("PEFT") else "fxpeft"]
        row["loss_diff_vs_plain"] = abs(row["loss"] - plain["loss"])
        row["grad_diff_vs_plain"] = _same(row["grads"], plain["grads"])
    for row in rows:
        del row["grads"]
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | contender | saved (issue's sum) | activations for backward | held after forward | "
             "vs. same library without | vs. PEFT, same mode | step | max grad diff vs. without |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        same_size = [r for r in rows if r["size"] == row["size"]]
        by_name = {r["contender"]: r for r in same_size}
        plain = by_name["PEFT" if row["contender"].startswith("PEFT") else "fxpeft"]
        peft = by_name["PEFT + checkpointing" if row["is_checkpointing"] else "PEFT"]
        lines.append(
            f"| {row['size']} | {row['contender']} | {row['saved_kib']:.0f} KiB | {row['activations_kib']:.0f} KiB | "
            f"{row['after_forward_kib']:.0f} KiB | {row['activations_kib'] / plain['activations_kib']:.2f}x | "
            f"{row['activations_kib'] / peft['activations_kib']:.2f}x | {1000 * row['step_s']:.0f} ms | "
            f"{row['grad_diff_vs_plain']:.1e} |")
    return "\n".join(lines)


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for size in dict.fromkeys(row["size"] for row in rows):
        by_name = {r["contender"]: r for r in rows if r["size"] == size}
        ours, theirs = by_name["fxpeft + checkpointing"], by_name["PEFT + checkpointing"]
        verdict = "pass" if ours["activations_kib"] <= theirs["activations_kib"] else "MISS"
        lines.append(f"- {size}: fxpeft with checkpointing keeps {ours['activations_kib']:.0f} KiB of activations "
                     f"for backward, PEFT with checkpointing {theirs['activations_kib']:.0f} KiB "
                     f"({ours['activations_kib'] / theirs['activations_kib']:.2f}x; target <= 1.00x): {verdict}")
        exact = all(r["grad_diff_vs_plain"] == 0.0 and r["loss_diff_vs_plain"] == 0.0 for r in by_name.values())
        lines.append(f"- {size}: losses and LoRA gradients with checkpointing equal those without, bit for bit: "
                     f"{'yes' if exact else 'no (see the last column)'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpointing_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "a"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rows = [row for label in args.sizes for row in run_size(label, SIZES[label], print, clock)]
    sizes = ", ".join(f"{label}: hidden {SIZES[label].hidden}, {SIZES[label].layers} layers, vocabulary "
                      f"{SIZES[label].vocab}, batch {SIZES[label].batch} x {SIZES[label].seq}" for label in args.sizes)
    clock_name = "process CPU time" if clock is time.process_time else "wall time"
    title = (f"Memory kept for backward, llama-like, LoRA r=8 on q/v, fp32, CPU ({sizes}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), step times in {clock_name}; "
             f"`python -m benchmarks.checkpointing_memory {' '.join(argv or sys.argv[1:])}`)\n\n")
    text = title + _table(rows) + "\n\n" + "\n".join(_targets(rows)) + "\n"
    print(text)
    stem = args.out / f"{datetime.date.today().isoformat()}-cpu-checkpointing"
    write_atomically(stem.with_suffix(".md"), lambda path: path.write_text(text))
    write_atomically(stem.with_suffix(".json"), lambda path: path.write_text(json.dumps(rows, indent=1) + "\n"))


if __name__ == "__main__":
    main()
