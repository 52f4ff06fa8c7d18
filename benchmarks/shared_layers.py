"""Cold compile time of inference with and without shared layer regions (``compile_layers_once``).

    python -m benchmarks.shared_layers                 # 4 and 12 layers, flat and shared, one fresh process each
    python -m benchmarks.shared_layers --layers 4 8 16 --device cuda

Each measurement runs in a fresh interpreter with an empty Inductor cache (``benchmarks.isolated
first-inference``): the llama-like model of workload (a) at the given depth, LoRA q/v, ``eval()``,
``torch.compile(fullgraph=True, dynamic=True)``, and the seconds of its first call under ``torch.no_grad()``
(trace and compile included). The logits are checked against the eager call. Writes
``results/<date>-shared-layers.{json,md}``. Training is not measured: training calls always compile the flat
graph (see ``AdaptedModel.compile_layers_once``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from .isolated import run_child
from .report import write_atomically

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_layers", description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    rows = [run_child("first-inference", "--layers", str(layers), "--device", args.device,
                      *(["--share"] if share else []))
            for layers in args.layers for share in (False, True)]
    lines = ["| layers | flat | shared | shared / flat | max abs diff vs eager |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for layers in args.layers:
        flat, shared = (next(r for r in rows if r["layers"] == layers and r["shared"] is s) for s in (False, True))
        lines.append(f"| {layers} | {flat['first_call_s']:.1f} s | {shared['first_call_s']:.1f} s | "
                     f"{shared['first_call_s'] / flat['first_call_s']:.2f} | "
                     f"{max(flat['max_abs_diff_vs_eager'], shared['max_abs_diff_vs_eager']):.1e} |")
    table = "\n".join(lines)
    print(table)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-shared-layers{'-cuda' if args.device == 'cuda' else ''}"
    title = (f"First compiled inference call, fresh process, cold Inductor cache ({args.device}; "
             f"`python -m benchmarks.shared_layers`)\n\n")
    write_atomically(stem.with_suffix(".md"), lambda path: path.write_text(title + table + "\n"))
    write_atomically(stem.with_suffix(".json"), lambda path: path.write_text(json.dumps(rows, indent=1) + "\n"))


if __name__ == "__main__":
    main()
