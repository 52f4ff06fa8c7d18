"""Time to the first compiled training step: PEFT compiled, fxpeft flat compiled, fxpeft regional (``.compile()``).

    python -m benchmarks.first_step                  # 4 and 12 layers, cold and warm caches, one fresh process each
    python -m benchmarks.first_step --layers 4 --quick
    python -m benchmarks.first_step --repeats 3         # each figure the median of 3 (a loaded machine)

Each measurement is ``benchmarks.isolated first-step`` in a fresh interpreter: workload (a) (llama-like, hidden
512, LoRA r=8 on q/v, no dropout) at the given depth, from the base model to the end of its first training step
(adapt, capture, compile, forward, backward, AdamW). *Cold*: empty Inductor and fxpeft capture caches (a user's first
run); *warm*: a second process with the same cache folders (a user's second run). Contenders alternate, so machine
load falls on them alike; with ``--repeats``, the table gives medians. The first step's losses must agree (same
seed, same weights, zero-initialised B). Writes ``results/<date>-first-step.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
from pathlib import Path

from .isolated import run_child
from .report import write_atomically
from .workloads import LAYERS_VARIABLE

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("PEFT compiled", "fxpeft compiled", "fxpeft regional compiled")


def measure(layers: int, contender: str, quick: bool, device: str = "cpu") -> list[dict]:
    """The cold and the warm run of one contender at one depth (two fresh processes sharing cache folders)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxpeft-first-step-") as cache:
        env = {LAYERS_VARIABLE: str(layers), "FXPEFT_CACHE": os.path.join(cache, "captures")}
        for phase in ("cold", "warm"):
            row = run_child("first-step", "--workload", "a", "--contender", contender, "--steps", "0", "--device",
                            device, *(["--quick"] if quick else []), cache_dir=cache, env=env)
            rows.append(dict(row, contender=contender, cache=phase, load_1min=os.getloadavg()[0]))
            print(f"{layers} layers, {contender}, {phase}: {row['first_step_s']:.1f} s "
                  f"(loss {row['first_loss']:.6f}, load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def _median(rows: list[dict], layers: int, phase: str, contender: str) -> float:
    return statistics.median(r["first_step_s"] for r in rows
                             if r["layers"] == layers and r["cache"] == phase and r["contender"] == contender)


def table(rows: list[dict], depths: list[int]) -> str:
    lines = ["| layers | cache | PEFT compiled | fxpeft flat compiled | fxpeft regional | flat / PEFT | "
             "regional / PEFT | first losses |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for layers in depths:
        for phase in ("cold", "warm"):
            peft, flat, regional = (_median(rows, layers, phase, name) for name in CONTENDERS)
            losses = {f"{r['first_loss']:.6f}" for r in rows if r["layers"] == layers and r["cache"] == phase}
            lines.append(f"| {layers} | {phase} | {peft:.1f} s | {flat:.1f} s | {regional:.1f} s | {flat / peft:.2f} | "
                         f"{regional / peft:.2f} | {', '.join(sorted(losses))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_step", description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--quick", action="store_true", help="the smoke-test sizes (hidden 64)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each figure (the table: medians)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder for the result files")
    args = parser.parse_args()
    rows: list[dict] = []
    for repeat in range(args.repeats):
        for turn, layers in enumerate(args.layers):
            order = CONTENDERS if (turn + repeat) % 2 == 0 else CONTENDERS[::-1]  # alternate who goes first
            for contender in order:
                rows.extend(dict(row, repeat=repeat) for row in measure(layers, contender, args.quick, args.device))
    for layers in args.layers:
        losses = [r["first_loss"] for r in rows if r["layers"] == layers]
        if max(losses) - min(losses) > 1e-4 * max(1.0, abs(losses[0])):
            raise SystemExit(f"first losses disagree at {layers} layers: {losses}")
    text = table(rows, args.layers)
    print(text)
    device = "2-core CPU" if args.device == "cpu" else args.device
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"{datetime.date.today().isoformat()}-first-step{'-quick' if args.quick else ''}"
                       f"{'-cuda' if args.device == 'cuda' else ''}")
    title = (f"Time to the first compiled training step (adapt, capture, compile, step), fresh process, {device}; "
             "cold: empty Inductor and capture caches, warm: second run with the same caches "
             f"(`python -m benchmarks.first_step --repeats {args.repeats}`; medians of {args.repeats}). Mean 1-minute "
             f"load during the runs: {sum(r['load_1min'] for r in rows) / len(rows):.1f}.\n\n")
    write_atomically(stem.with_suffix(".md"), lambda path: path.write_text(title + text + "\n"))
    write_atomically(stem.with_suffix(".json"), lambda path: path.write_text(json.dumps(rows, indent=1) + "\n"))


if __name__ == "__main__":
    main()
