"""Where the time goes: the profiles behind the targets that ``python -m benchmarks`` reports as missed.

    python -m benchmarks.breakdown step [--workload b] [--rounds 5]    # one training step, by kind of work (CPU)
    python -m benchmarks.breakdown cold [--workload a]                 # the first compiled step, by phase

``step`` builds the contenders as ``python -m benchmarks`` does (same weights, same batch), warms them up, times
unprofiled steps round-robin (``step_ms``), then profiles one step of each per round with ``torch.profiler``
(Inductor's C++ kernels profiled too) and splits its CPU time by kind of work: the base model's matmuls, the
adapters' matmuls (an operand of rank ``r``), the drawing of dropout masks (eager ``bernoulli_``; under
Inductor the kernels that draw them, together with what they fuse), attention, AdamW, and the rest. Each
figure is a median over rounds (Inductor's kernel profiling is compiled in for the timed steps too; with no
profiler running it costs a check per kernel call). A compiled contender named with the suffix
``fallback_random`` is compiled with Inductor's ``fallback_random`` option (random numbers drawn by ATen's
kernels, as in eager mode).

``cold`` runs ``python -m benchmarks.isolated first-step`` (fresh process, cold Inductor cache) for each
compiled contender and splits the time to the first step: adapting the model (fxpeft's capture), dynamo's
tracing, AOT autograd, Inductor's forward and backward compiles, and the C++ kernel compiles inside them.

Both write ``results/<date>-breakdown-<step|cold>-<workload>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import statistics
from pathlib import Path

from .isolated import run_child
from .report import write_atomically
from .timing import interleaved

__all__ = ["step_breakdown", "cold_breakdown"]

RESULTS = Path(__file__).resolve().parent / "results"
STEP_CONTENDERS = ("base eager", "PEFT eager", "fxpeft eager", "base compiled", "PEFT compiled", "fxpeft compiled")
COLD_CONTENDERS = ("base compiled", "PEFT compiled", "fxpeft compiled")
FALLBACK_RANDOM = "fallback_random"
KINDS = ("base matmuls", "adapter matmuls", "dropout masks", "attention", "AdamW", "other ops and kernels",
         "framework")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_DRAWS_MASK = re.compile(r"bernoulli|dropout_noise|native_dropout(?!_backward)")
# Profiler events that only wrap others (their self time is Python and dispatch): counted as "framework".
_WRAPPERS = ("## Call CompiledFxGraph", "CompiledFunction", "Torch-Compiled Region", "TorchDynamo", "autograd::",
             "torch::autograd", "Pregraph bytecode", "Optimizer.zero_grad")


def _kind(event, rank: int) -> str:
    """Which kind of work a profiler event's self time is."""
    name = event.name
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "AdamW"
        parent = parent.cpu_parent
    if name in _MATMULS:
        operands = [shape for shape in (event.input_shapes or [])[:2] if len(shape) == 2]
        return "adapter matmuls" if any(rank in shape for shape in operands) else "base matmuls"
    if _DRAWS_MASK.search(name):
        return "dropout masks"
    if "scaled_dot_product" in name:
        return "attention"
    if name.startswith("Optimizer.step"):
        return "AdamW"
    if name.startswith(_WRAPPERS):
        return "framework"
    return "other ops and kernels"


def _profiled_step(contender, batch, rank: int) -> dict[str, float]:
    """Milliseconds of self CPU time of one training step, by kind of work."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        contender.train_step(batch)
    split = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        split[_kind(event, rank)] += event.self_cpu_time_total / 1e3
    return split


def step_breakdown(workload_key: str, rounds: int, names=STEP_CONTENDERS) -> dict:
    """Per-step milliseconds of each contender by kind of work (CPU, medians over ``rounds``)."""
    import torch
    import torch._inductor.config as inductor_config

    from .contenders import build
    from .workloads import WORKLOADS, sizes_for

    inductor_config.cpp.enable_kernel_profile = True  # Inductor's C++ kernels appear in the profile by name
    workload, sizes = WORKLOADS[workload_key], sizes_for(False)
    batch = workload.batch(sizes)
    contenders = build([name.removesuffix(" " + FALLBACK_RANDOM) for name in names], workload.build(sizes),
                       workload, batch, training=True)
    for name, contender in zip(names, contenders):
        if name.endswith(FALLBACK_RANDOM):
            contender.name = name
            contender.call = torch.compile(contender.module, fullgraph=contender.kind == "fxpeft", dynamic=True,
                                           options={FALLBACK_RANDOM: True})
    walls = interleaved({c.name: functools.partial(c.train_step, batch) for c in contenders}, reps=2 * rounds,
                        warmup=3, sync=lambda: None)
    splits: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    for round_ in range(rounds):
        for contender in contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]:
            splits[contender.name].append(_profiled_step(contender, batch, workload.r))
    rows = {name: {"step_ms": statistics.median(walls[name]) * 1e3,
                   **{kind: statistics.median(s[kind] for s in splits[name]) for kind in KINDS}}
            for name in splits}
    return {"workload": workload_key, "rank": workload.r, "rounds": rounds, "threads": torch.get_num_threads(),
            "rows": rows}


def cold_breakdown(workload_key: str, names=COLD_CONTENDERS) -> dict:
    """The phases of each compiled contender's first training step, each in a fresh process."""
    rows = {}
    for name in names:
        result = run_child("first-step", "--workload", workload_key, "--contender", name, "--steps", "0")
        rows[name] = {"first_step_s": result["first_step_s"], **result["phases"]}
    return {"workload": workload_key, "rows": rows}


def _markdown(kind: str, data: dict, meta: dict) -> str:
    rows = data["rows"]
    if kind == "step":
        columns = ["step_ms", *KINDS]
        title = (f"Training step ({data['workload']}), CPU self time by kind of work, ms per step "
                 f"(medians of {data['rounds']} profiled rounds; `step_ms`: median unprofiled wall time of "
                 f"{2 * data['rounds']} interleaved steps)")
        note = ("`dropout masks`: eager `bernoulli_`; compiled, the Inductor kernels that draw masks, with the "
                "work they fuse (RMSNorm, SiLU). `adapter matmuls`: an operand of rank r. `framework`: Python, "
                "dispatch and compiled-graph wrappers.")
    else:
        columns = ["first_step_s", "adapt_s", "dynamo_s", "aot_autograd_s", "inductor_forward_s",
                   "inductor_backward_s", "cpp_compiles_s", "cpp_compiles", "restarts"]
        title = f"Time to the first compiled training step ({data['workload']}), fresh process, cold cache, s"
        note = ("`adapt_s`: get_peft_model or fxpeft.transform (capture). `cpp_compiles_s`: the summed time of "
                "Inductor's C++ kernel compiles, which run partly in parallel inside the Inductor phases. "
                "`restarts`: dynamo starting a frame's trace again.")
    lines = [f"## {title}", "", f"`{meta['command']}`; {meta['machine']}; torch {meta['torch']}.", "",
             "| contender | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, row in rows.items():
        cells = [f"{row.get(c, 0):.0f}" if isinstance(row.get(c, 0), int) else f"{row.get(c, 0):.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", note, ""])


def main(argv: list[str] | None = None) -> int:
    import os
    import platform
    import sys

    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["step", "cold"])
    parser.add_argument("--workload", help="a, b, c or d (default: b for step, a for cold)")
    parser.add_argument("--rounds", type=int, default=5, help="step: profiled rounds per contender")
    parser.add_argument("--only", help="comma-separated contender names (default: all of the kind)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    workload = args.workload or ("b" if args.what == "step" else "a")
    default = STEP_CONTENDERS if args.what == "step" else COLD_CONTENDERS
    names = [n.strip() for n in args.only.split(",")] if args.only else list(default)
    data = step_breakdown(workload, args.rounds, names) if args.what == "step" else cold_breakdown(workload, names)
    meta = {"command": "python -m benchmarks.breakdown " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"}
    markdown = _markdown(args.what, data, meta)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-breakdown-{args.what}-{workload}"
    for path, text in ((stem.with_suffix(".json"), json.dumps({"meta": meta, **data}, indent=1)),
                       (stem.with_suffix(".md"), markdown)):
        write_atomically(path, lambda partial, text=text: partial.write_text(text))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
