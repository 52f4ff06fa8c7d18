"""Cold compile time of inference with and without shared layer regions (``compile_layers_once``).

    python -m benchmarks.shared_layers                 # 4 and 12 layers, flat and shared, one fresh process each
    python -m benchmarks.shared_layers --layers 4 8 16 --device cuda

Each measurement runs in a fresh interpreter with an empty Inductor cache: the llama-like model of workload (a)
at the given depth, LoRA q/v, ``eval()``, ``torch.compile(fullgraph=True, dynamic=True)``, and the seconds of
its first call under ``torch.no_grad()`` (trace and compile included). The logits are checked against the eager
call. Writes ``results/<date>-shared-layers.{json,md}``. Training is not measured: training calls always compile
the flat graph (see ``AdaptedModel.compile_layers_once``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import _atomic

RESULTS = Path(__file__).resolve().parent / "results"


def _measure(layers: int, share: bool, device: str) -> dict:
    import torch

    import fxpeft

    from .workloads import FULL, WORKLOADS

    sizes = dataclasses.replace(FULL, layers=layers)
    workload = WORKLOADS["a"]
    model = workload.build(sizes, device)
    batch = workload.batch(sizes, labels=False, device=device)
    adapted = fxpeft.transform(model, [workload.rule()], example_kwargs=batch).to(device).eval()
    adapted.compile_layers_once = share
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        eager = adapted(**batch).logits
        compiled = torch.compile(adapted, fullgraph=True, dynamic=True)
        began = time.perf_counter()
        logits = compiled(**batch).logits
        sync()
        seconds = time.perf_counter() - began
    return {"layers": layers, "shared": share, "first_call_s": seconds,
            "max_abs_diff_vs_eager": (logits - eager).abs().max().item()}


def _fresh(layers: int, share: bool, device: str) -> dict:
    """``_measure`` in a fresh interpreter with an empty Inductor cache."""
    with tempfile.TemporaryDirectory(prefix="fxpeft-shared-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
        args = [sys.executable, "-m", "benchmarks.shared_layers", "--child", str(layers), str(int(share)), device]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_layers", description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layers, share, device = args.child
        print(json.dumps(_measure(int(layers), share == "1", device)))
        return
    rows = [_fresh(layers, share, args.device) for layers in args.layers for share in (False, True)]
    lines = ["| layers | flat | shared | shared / flat | max abs diff vs eager |", "| ---: | ---: | ---: | ---: | ---: |"]
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
    _atomic(stem.with_suffix(".md"), lambda path: path.write_text(title + table + "\n"))
    _atomic(stem.with_suffix(".json"), lambda path: path.write_text(json.dumps(rows, indent=1) + "\n"))


if __name__ == "__main__":
    main()
