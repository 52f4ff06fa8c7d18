"""LoRA against DoRA (``use_dora=True``): one training step of the llama-like workload (a), side by side.

    python -m benchmarks.dora --quick          # tiny sizes (workload (a) at --quick size), compiled included
    python -m benchmarks.dora --reps 5         # full sizes

Contenders, each on its own copy of one base model: fxpeft LoRA and DoRA, eager and compiled
(``torch.compile(fullgraph=True, dynamic=True)``), and PEFT LoRA and DoRA, eager. Each DoRA figure's ratio is to the
LoRA contender of the same library and mode, per repetition (round-robin, as every comparison here). DoRA's weight
norm ``||W + s B A||`` is recomputed every step (PEFT does it in Python; fxpeft's graph reads the base weight as an
input, so a compiled step can fuse the norm with the rest). Target (issue 17): fxpeft DoRA compiled at most 1.10x
fxpeft LoRA compiled. Writes ``results/<date>-<device>-dora.{json,md,png}``.

:func:`dora` is a comparison like those of ``benchmarks.comparisons`` (``Options`` in, ``Section`` out).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import torch

from . import contenders as C
from .comparisons import Options
from .report import Section, Target
from .standalone import run_script
from .timing import figure
from .workloads import WORKLOADS, Workload, sizes_for

__all__ = ["dora", "main"]



@dataclasses.dataclass(frozen=True)
class DoraWorkload(Workload):
    """A workload with ``use_dora`` on its LoRA rule and PEFT config."""

    use_dora: bool = False

    def rule(self):
        return dataclasses.replace(super().rule(), use_dora=self.use_dora)

    def peft_config(self):
        config = super().peft_config()
        config.use_dora = self.use_dora
        return config


def _contender(name: str, kind: str, compiled: bool, model, workload: Workload, batch) -> C.Contender:
    contender = C.Contender(name, kind, False, compiled, C.adapt(kind, copy.deepcopy(model), workload, batch, True))
    return C.finish(contender, training=True)


def dora(opts: Options) -> Section:
    """Training step time of LoRA and DoRA, fxpeft eager and compiled and PEFT eager (the module docstring)."""
    torch._dynamo.reset()
    base_workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    fields = {field.name: getattr(base_workload, field.name) for field in dataclasses.fields(base_workload)}
    variants = {"LoRA": DoraWorkload(**fields, use_dora=False), "DoRA": DoraWorkload(**fields, use_dora=True)}
    model = base_workload.build(sizes, opts.device)
    batch = base_workload.batch(sizes, device=opts.device)
    quick = f"--quick sizes (hidden {sizes.hidden}, {sizes.layers} layers), " if opts.quick else ""
    section = Section("dora", f"Training step, LoRA vs DoRA: {base_workload.title} (DoRA: use_dora=True), {quick}"
                      f"batch {sizes.batch} x {sizes.seq}, forward + loss + backward + AdamW")
    modes = [("fxpeft", False), ("PEFT", False)] + ([("fxpeft", True)] if opts.compile else [])
    built = [_contender(f"{kind} {method} {'compiled' if compiled else 'eager'}", kind, compiled, model, workload,
                        batch)
             for kind, compiled in modes for method, workload in variants.items()]
    times = opts.timed({c.name: functools.partial(c.train_step, batch) for c in built})
    for name, samples in times.items():
        reference = name.replace("DoRA", "LoRA") if "DoRA" in name else None
        section.figures.append(figure(name, "step", "ms", samples, reference,
                                      times.get(reference) if reference else None, scale=1e3))

    def ratio(name: str) -> float | None:
        found = section.find(name)
        return None if found is None else found.ratio

    def between(mine: str, theirs: str) -> float | None:
        a, b = section.find(mine), section.find(theirs)
        return None if a is None or b is None else a.median / b.median

    section.targets += [
        Target.at_most("fxpeft DoRA compiled / fxpeft LoRA compiled", ratio("fxpeft DoRA compiled"), 1.10),
        Target.below("fxpeft DoRA compiled / PEFT DoRA eager", between("fxpeft DoRA compiled", "PEFT DoRA eager"),
                     1.0, note="ratio of medians"),
    ]
    shown = [f"{name} {_shown(ratio(name.replace(' ', ' DoRA ')))}"
             for name in ("PEFT eager", "fxpeft eager", "fxpeft compiled")]
    section.notes.append("DoRA / LoRA, per repetition: " + ", ".join(shown))
    if not opts.compile:
        section.notes.append("compiled contenders skipped (--eager-only)")
    return section


def _shown(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # --quick sizes say so in the result's title and meta; --quick keeps the compiled contenders
    return run_script("benchmarks.dora", __doc__, dora, "{device}-dora", argv,
                      quick_help="workload (a) at --quick sizes", quick_reps=3, warmup=2, quick_compiles=True)

if __name__ == "__main__":
    raise SystemExit(main())
