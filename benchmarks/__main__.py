"""``python -m benchmarks``: run the comparisons, print each table, write JSON, Markdown and a PNG chart."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from .comparisons import COMPARISONS, SLOW

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, tiny models, no compiled contenders (one cold "
                             "torch.compile alone takes longer than the whole run on a CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="with --quick: keep the compiled contenders (a longer smoke run of every code path)")
    parser.add_argument("--eager-only", action="store_true",
                        help="leave the compiled contenders out (each costs a cold torch.compile)")
    parser.add_argument("--reps", type=int, help="timed repetitions per contender (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; 1 with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's). On a shared machine use fewer threads than idle "
                             "cores: a descheduled OpenMP thread stalls every op, and timings turn bimodal")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what in-process comparisons time: elapsed time (default) or the process's CPU time, "
                             "blind to other processes taking the cores (use with --threads 1: with more threads it "
                             "also counts OpenMP threads spinning while they wait; CPU only)")
    parser.add_argument("--layers", type=int,
                        help="layers of every model (default 4; 2 with --quick): how costs grow with depth, e.g. "
                             "the time to the first compiled step")
    parser.add_argument("--only", help=f"comma-separated comparisons or prefixes of them: {', '.join(COMPARISONS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        if args.clock == "cpu":
            parser.error("--clock cpu: GPU work is not the process's CPU time; time it by the wall clock")
    wanted = [w.strip() for w in (args.only or "").split(",") if w.strip()]
    args.selected = [name for name in COMPARISONS if any(name.startswith(w) for w in wanted)] if wanted else \
        [name for name in COMPARISONS if not (args.quick and name in SLOW)]
    if not args.selected:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(COMPARISONS)}")
    return args


def _meta(args: argparse.Namespace, command: str) -> dict:
    import peft
    import torch
    import transformers

    import fxpeft

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "device": args.device, "device_name": device_name,
            "threads": torch.get_num_threads(), "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "fxpeft": fxpeft.__version__, "reps": args.reps, "warmup": args.warmup,
            "quick": args.quick, "clock": args.clock, "comparisons": args.selected}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers:
        from .workloads import LAYERS_VARIABLE

        os.environ[LAYERS_VARIABLE] = str(args.layers)
    from .comparisons import COMPARISONS, PENDING, SLOW, Options
    from .report import Report, targets_markdown

    # peft 0.21 calls a transformers method that transformers 5 deprecates: noise, not a finding.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    # Many models of the same classes get compiled in one process: keep dynamo from falling back to eager.
    setattr(torch._dynamo.config, "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
            else "cache_size_limit", 64)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    opts = Options(quick=args.quick, reps=args.reps, warmup=args.warmup, device=args.device,
                   compile=(args.compile or not args.quick) and not args.eager_only, threads=torch.get_num_threads(),
                   clock=args.clock)
    report = Report(_meta(args, command.strip()), [], list(PENDING), [])
    if args.quick and not args.only:
        report.skipped += [f"{name} (--quick): {why}; run it with --only {name}" for name, why in SLOW.items()]
    if not opts.compile:
        flag = "--eager-only" if args.eager_only else "--quick"
        report.skipped.append(f"compiled contenders ({flag}): a cold torch.compile of one model takes ~30-60 s "
                              "on a CPU; their targets show as not measured")
    print(f"{command.strip()}: {', '.join(args.selected)}; {args.reps} rep(s), {args.warmup} warm-up, "
          f"{args.device}, load average {report.meta['load_average']}", flush=True)
    failed = []
    for name in args.selected:
        began = time.perf_counter()
        try:
            section = COMPARISONS[name](opts)
        except Exception:  # one broken comparison must not lose the others' results
            traceback.print_exc()
            failed.append(name)
            report.skipped.append(f"{name}: failed with {traceback.format_exc().strip().splitlines()[-1]}")
            continue
        report.sections.append(section)
        print(f"\n{section.markdown()}[{name}: {time.perf_counter() - began:.0f} s]", flush=True)
    stem = report.meta["date"] + ("-quick" if args.quick else "") + ("-" + "-".join(args.selected) if args.only else "")
    paths = report.write(args.out, stem)
    print("\n### Targets\n\n" + targets_markdown(report.targets))
    print("\n".join([f"- pending: {p}" for p in report.pending] + [f"- skipped: {s}" for s in report.skipped]))
    if args.quick:
        print("(--quick is a smoke test of the code: its numbers and verdicts are not results)")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
