"""Training a mixed-adapter batch (``adapter_names``, one adapter per row) against training one adapter.

    python -m benchmarks.mixed_training --quick                   # tiny sizes, eager only (a smoke run)
    python -m benchmarks.mixed_training --clock cpu --threads 1   # full sizes, eager and compiled

One training step (forward, loss, backward, AdamW) of workload (a)'s llama-like model (hidden 512, LoRA r=8 on
q/v) on a batch of 16 rows, fxpeft eager and compiled (``torch.compile(fullgraph=True, dynamic=True)``, Inductor),
each on its own copy of one seeded base model:

- ``1 adapter``: the model holds one adapter, every row uses it (a plain call);
- ``16 adapters``: the model holds 16 adapters (all trainable), row i uses adapter i (``adapter_names``): the train
  graph's mixed-batch form, one gathered product per shared site (fxpeft/runtime/mixed_batch.py,
  passes/lora/mixed_batch.py);
- ``16 adapters gated``: the same model and call running the train graph itself, one gated branch per adapter at
  every site (what such a call ran before the gathered form served training): the baseline that shows the gain.
  The benchmark selects it by dropping the program's derived mixed train graph (a private attribute, for this
  comparison only).

Every contender of a mode is timed round-robin in one process and the ratios are medians of per-repetition ratios
against the same mode's ``1 adapter`` (benchmarks/timing.py); ``--clock cpu`` times the process's CPU time, blind
to other processes on a loaded machine. Target (issue 20, item 4): 16 adapters <= 1.15x one adapter, eager and
compiled. PEFT cannot train a mixed batch (its forward refuses ``adapter_names`` in training): the benchmark calls
it once and records its error. Writes ``results/<date>-mixed-training<suffix>.{json,md,png}``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Callable

import torch

from . import contenders as C
from .comparisons import Options, hold_adapters
from .report import Section, Target
from .standalone import run_script
from .timing import figure
from .workloads import WORKLOADS, Workload, sizes_for

__all__ = ["mixed_training", "main"]

ADAPTERS = 16
SHAPES = ("1 adapter", "16 adapters", "16 adapters gated")


def _contender(shape: str, mode: str, model: torch.nn.Module, workload: Workload,
               batch: dict[str, torch.Tensor]) -> tuple[C.Contender, dict[str, torch.Tensor]]:
    """One contender on its own copy of ``model`` and the batch it trains on (with its ``adapter_names``)."""
    contender = C.start(f"fxpeft {mode}", copy.deepcopy(model), workload, batch, training=True)
    contender.name = f"fxpeft {mode}, {shape}"
    rows = batch["input_ids"].shape[0]
    if shape == "1 adapter":
        C.same_adapter_weights([contender])
        return C.finish(contender, training=True), batch
    names = hold_adapters([contender], workload, ADAPTERS)  # seeded: both 16-adapter shapes get equal weights
    contender.module.set_adapter(names)  # every adapter trainable (the optimizer takes them all)
    if shape.endswith("gated"):
        contender.module.gather_mixed_batches = False  # the gated train graph serves adapter_names calls
    C.finish(contender, training=True)
    row_names = [names[row % len(names)] for row in range(rows)]
    return contender, {**batch, **C.mixed_batch_kwargs(contender, row_names)}


def _gathered_sites(contender: C.Contender, mixed: bool) -> int:
    """How many sites the train graph that ``contender``'s calls run gathers (two batched products each)."""
    program = contender.module.programs()[0]
    mixed = mixed and contender.module.gather_mixed_batches
    module = program.module_for(True, program.device, mixed_batch=mixed)
    return sum(node.target is torch.ops.aten.bmm.default for node in module.graph.nodes) // 2


def _peft_refuses(model: torch.nn.Module, workload: Workload, batch: dict[str, torch.Tensor]) -> str:
    """What PEFT says when asked to train a mixed batch (two adapters, one per half of the rows)."""
    contender = C.start("PEFT eager", copy.deepcopy(model), workload, batch, training=True)
    C.add_adapter(contender, "other", workload)
    contender.module.train()
    rows = batch["input_ids"].shape[0]
    try:
        contender.module(**batch, adapter_names=["default"] * (rows // 2) + ["other"] * (rows - rows // 2))
    except Exception as error:  # PEFT's ValueError: adapter_names in training mode
        return f"PEFT refuses: {type(error).__name__}: {str(error)[:200]}"
    return "PEFT ran the mixed batch in training (unexpected: check this row)"


def mixed_training(opts: Options, log: Callable[[str], None] = print) -> Section:
    """Step times of one adapter, 16 mixed adapters (gathered) and 16 mixed adapters (gated), eager and compiled."""
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    batch = workload.batch(sizes, sizes.mixed_batch, sizes.mixed_seq, device=opts.device)
    section = Section("mixed_training", f"Mixed-adapter training step: {workload.title}, batch {sizes.mixed_batch} x "
                      f"{sizes.mixed_seq}, forward + loss + backward + AdamW; 16 adapters: one per row")
    modes = ("eager", "compiled") if opts.compile else ("eager",)
    for mode in modes:
        torch._dynamo.reset()
        built: dict[str, tuple[C.Contender, dict]] = {}
        for shape in SHAPES:
            contender, inputs = _contender(shape, mode, model, workload, batch)
            built[shape] = contender, inputs
            loss = float(contender.train_step(inputs))  # first step: compiles, and a check of what it computes
            section.notes.append(f"{contender.name}: first loss {loss:.6f}; sites gathered in the train graph it "
                                 f"runs: {_gathered_sites(contender, 'adapter_names' in inputs)}")
            log(f"built {contender.name}")
        times = opts.timed({shape: (lambda c=c, i=i: c.train_step(i)) for shape, (c, i) in built.items()})
        for shape, samples in times.items():
            reference = f"fxpeft {mode}, 1 adapter"
            section.figures.append(figure(f"fxpeft {mode}, {shape}", "step", "ms", samples,
                                          reference if shape != "1 adapter" else None, times["1 adapter"], scale=1e3))
        gathered = section.find(f"fxpeft {mode}, 16 adapters")
        gated = section.find(f"fxpeft {mode}, 16 adapters gated")
        section.targets.append(Target.at_most(f"{mode}: 16 adapters (one per row) / 1 adapter", gathered.ratio, 1.15,
                                              note="median of per-repetition ratios"))
        section.notes.append(f"{mode}: the gated form (before) costs {gated.ratio:.3f}x one adapter, the gathered "
                             f"form {gathered.ratio:.3f}x")
    section.notes.append(_peft_refuses(model, workload, batch))
    section.notes.append("the 16-adapter contenders hold the same seeded weights: their first losses must agree")
    if not opts.compile:
        section.notes.append("compiled contenders skipped (--eager-only or --quick)")
    return section


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")  # PEFT's and transformers' notes on every step would bury the log
    return run_script("benchmarks.mixed_training", __doc__, lambda opts: mixed_training(opts, log=_log),
                      "mixed-training", argv)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

if __name__ == "__main__":
    raise SystemExit(main())
