"""The command line every standalone in-process benchmark script shares (``benchmarks.methods``, ``benchmarks.dora``,
``benchmarks.mixed_training``): its options, the run's :class:`Options`, one section timed and written as
``results/<stem>.{json,md,png}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from .comparisons import Options
from .report import Report, Section, run_meta

__all__ = ["run_script"]

RESULTS = Path(__file__).resolve().parent / "results"


def run_script(module: str, doc: str, section: Callable[[Options], Section], stem: str,
               argv: list[str] | None = None, *, quick_help: str = "tiny sizes, eager only", quick_reps: int = 2,
               warmup: int = 1, quick_compiles: bool = False) -> int:
    """Parse ``argv`` for ``python -m <module>`` (``doc``: its help), run ``section(options)`` and write its result
    files as ``<date>-<stem><--suffix>``, where ``stem`` may name ``{device}``. ``--quick`` runs ``quick_reps``
    repetitions and, unless ``quick_compiles``, no compiled contender."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default 5; --quick {quick_reps})")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--eager-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--suffix", default="", help="added to the result files' names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder for the result files")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (quick_reps if args.quick else 5)
    compiled = not (args.eager_only or (args.quick and not quick_compiles))
    opts = Options(quick=args.quick, reps=reps, warmup=args.warmup, device=args.device, compile=compiled,
                   threads=torch.get_num_threads(), clock=args.clock)
    command = f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = run_meta(command, args.device, reps, args.warmup, args.quick, args.clock, [module.rsplit(".", 1)[-1]])
    result = section(opts)
    print(result.markdown())
    report = Report(meta, [result], [], [])
    name = f"{meta['date']}-{stem.format(device=args.device)}{args.suffix}"
    print("wrote " + ", ".join(str(p) for p in report.write(args.out, name)))
    return 0
