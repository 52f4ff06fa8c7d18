"""fxpeft and PEFT LoRA training under DDP and FSDP2 on this machine's CPU, per rank (issue 19, item 7).

    python -m benchmarks.distributed                 # ~160M-parameter llama, worlds 1 and 2 (~10-15 min on 2 cores)
    python -m benchmarks.distributed --quick         # a tiny llama, 1 warm-up + 2 steps (a smoke run, ~1-2 min)
    python -m benchmarks.distributed --worlds 2 --contenders fxpeft-fsdp2,peft-fsdp2 --steps 9

A llama (hidden 1024, intermediate 2816, 8 layers, 16 heads, 8 kv heads, vocab 32000, float32: 159M parameters,
0.64 GB) is saved once with ``save_pretrained`` (safetensors) to a temporary folder; then, for each world size, each
contender of ``benchmarks/distributed_rank.py`` runs in its own ``torchrun`` launch on 127.0.0.1 (gloo, one torch
thread per rank, ``OMP_NUM_THREADS=1``; ``tests/distributed/launch.run_launcher`` starts it and collects each rank's
JSON): fxpeft and PEFT, each with DDP (the whole model loaded on every rank), FSDP2 per decoder layer, and FSDP2 with
``CPUOffloadPolicy`` (both FSDP2 forms built on the meta device and loaded shard by shard, so that no rank holds the
whole base). LoRA r=16 on q/k/v/o_proj, dropout 0, the same adapter weights and data everywhere; 2 x 128 tokens per
rank; AdamW. Per rank: step time (median of ``--steps`` after ``--warmup``), RSS before the first step, peak RSS,
bytes of parameter storage held; and every contender's first loss against fxpeft + DDP's at the same world size.

Writes ``results/<date>-cpu-distributed<suffix>.{json,md}`` (``--quick``: ``-quick``). The contenders run one after
another, not interleaved, so the step-time ratios are ratios of medians from separate launches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .report import run_meta, write_atomically

RESULTS = Path(__file__).resolve().parent / "results"
RANK_SCRIPT = Path(__file__).resolve().parent / "distributed_rank.py"
CONTENDERS = ("fxpeft-ddp", "fxpeft-fsdp2", "fxpeft-fsdp2-offload", "peft-ddp", "peft-fsdp2", "peft-fsdp2-offload")
MODES = (("ddp", "DDP"), ("fsdp2", "FSDP2"), ("fsdp2-offload", "FSDP2 + CPUOffloadPolicy"))
FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)


def save_model(folder: Path, quick: bool) -> dict:
    """The seeded llama, saved with ``save_pretrained`` (safetensors); its size."""
    import torch
    import transformers as tf

    config = tf.LlamaConfig(**(TINY if quick else FULL), max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    return {"config": {k: getattr(config, k) for k in TINY}, "parameters": parameters,
            "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def launch(contender: str, world: int, folder: Path, args) -> list[dict]:
    from tests.distributed.launch import run_launcher

    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq", str(args.seq)]
    return run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                      "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                                      str(RANK_SCRIPT), contender, str(folder), *extra],
                        world_size=world, timeout=args.timeout)


def summary(ranks: list[dict]) -> dict:
    """One contender at one world size: per-rank figures, and the worst rank's (slowest median, largest memory)."""
    per_rank = [{"step_ms": statistics.median(r["step_s"]) * 1e3, "step_ms_min": min(r["step_s"]) * 1e3,
                 "step_ms_max": max(r["step_s"]) * 1e3,
                 "step_cpu_ms": statistics.median(r["step_cpu_s"]) * 1e3,
                 "rss_before_mb": r["rss_before_first_step_mb"],
                 "peak_rss_mb": r["ru_maxrss_mb"], "vm_hwm_mb": r["vm_hwm_mb"],
                 "param_mb": (r["base_param_bytes"] + r["adapter_param_bytes"]) / 1e6,
                 "adapter_param_mb": r["adapter_param_bytes"] / 1e6, "setup_s": r["setup_s"]} for r in ranks]
    worst = {key: max(rank[key] for rank in per_rank) for key in per_rank[0]}
    return {"first_loss": ranks[0]["first_loss"], "adapter_checksum": ranks[0]["adapter_checksum"],
            "per_rank": per_rank, "worst": worst, "raw": ranks}


def _ratio(mine: float | None, theirs: float | None) -> str:
    return "" if mine is None or theirs is None or theirs == 0 else f"{mine / theirs:.2f}x"


def _cell(value: float | None, digits: int = 0, failed: bool = False) -> str:
    return ("failed" if failed else "not run") if value is None else f"{value:,.{digits}f}"


def markdown(meta: dict, model: dict, results: dict, failures: dict, worlds: list[int], load_end: str) -> str:
    m = meta
    lines = [f"## fxpeft + DDP / FSDP2 against PEFT, CPU, {m['date']}", "",
             f"`{m['command']}` on {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, peft "
             f"{m['peft']}, fxpeft {m['fxpeft']}. Load average {m['load_average']} at the start, {load_end} at the "
             f"end. Each contender in its own `torchrun` launch (gloo on 127.0.0.1), 1 torch thread per rank, "
             f"`OMP_NUM_THREADS=1`; step time: median of {m['reps']} steps after {m['warmup']} warm-up step(s).", ""]
    if m["quick"]:
        lines += ["**--quick: a tiny llama, a smoke test of the code: its numbers are not results.**", ""]
    c = model["config"]
    lines += [f"Model: llama, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
              f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads / {c['num_key_value_heads']} kv "
              f"heads, vocab {c['vocab_size']}, float32: {model['parameters'] / 1e6:.1f}M parameters, "
              f"{model['bytes'] / 1e6:.0f} MB, saved once with `save_pretrained`. LoRA r=16 (alpha 32, dropout 0) on "
              f"q/k/v/o_proj, the same adapter weights and data for every contender; {m['batch']} x {m['seq']} "
              "tokens per rank; AdamW. Memory and time per rank: the largest over the ranks (MB = 10^6 bytes).", ""]

    def get(world: int, name: str, key: str) -> float | None:
        found = results.get(str(world), {}).get(name)
        return None if found is None else found["worst"][key]

    metrics = (("step_ms", "step (ms)", 0), ("step_cpu_ms", "step, the process's CPU time (ms)", 0),
               ("peak_rss_mb", "peak RSS (MB)", 0),
               ("rss_before_mb", "RSS before step 1 (MB)", 0), ("param_mb", "parameters held (MB)", 1))
    for key, title, digits in metrics:
        lines += [f"### {title}", "", "| world | parallelism | fxpeft | PEFT | fxpeft / PEFT |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        for world in worlds:
            for mode, label in MODES:
                mine, theirs = get(world, f"fxpeft-{mode}", key), get(world, f"peft-{mode}", key)
                if mine is None and theirs is None and not {f"fxpeft-{mode}", f"peft-{mode}"} & set(
                        failures.get(str(world), {})):
                    continue
                lost = failures.get(str(world), {})
                lines.append(f"| {world} | {label} | {_cell(mine, digits, f'fxpeft-{mode}' in lost)} | "
                             f"{_cell(theirs, digits, f'peft-{mode}' in lost)} | "
                             f"{_ratio(mine, theirs)} |")
        lines.append("")
    lines += ["### First-step loss (mean over ranks) against fxpeft + DDP's at the same world size", "",
              "| world | contender | first loss | difference | adapter sum of squares |",
              "| ---: | --- | ---: | ---: | ---: |"]
    for world in worlds:
        reference = results.get(str(world), {}).get("fxpeft-ddp", {}).get("first_loss")
        for name, found in results.get(str(world), {}).items():
            loss = found["first_loss"]
            difference = "" if reference is None else f"{loss - reference:+.2e}"
            lines.append(f"| {world} | {name} | {loss:.7f} | {difference} | {found['adapter_checksum']:.6f} |")
    lines.append("")
    lines += ["### Per rank", "", "| world | contender | rank | step ms (min-max) | CPU ms | RSS before step 1 MB | "
              "ru_maxrss MB | VmHWM MB | parameters MB (adapters) | setup s |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for world in worlds:
        for name, found in results.get(str(world), {}).items():
            for rank, r in enumerate(found["per_rank"]):
                lines.append(f"| {world} | {name} | {rank} | {r['step_ms']:.0f} ({r['step_ms_min']:.0f}-"
                             f"{r['step_ms_max']:.0f}) | {r['step_cpu_ms']:.0f} | {r['rss_before_mb']:.0f} | "
                             f"{r['peak_rss_mb']:.0f} | "
                             f"{r['vm_hwm_mb']:.0f} | {r['param_mb']:.1f} ({r['adapter_param_mb']:.2f}) | "
                             f"{r['setup_s']:.1f} |")
    lines.append("")
    lines += ["### Reading these numbers", "",
              "- The ranks of a world-2 run are two processes on this machine's CPU cores, one torch thread each: "
              "on 2 cores they take both cores, and share them with anything else running (the load average above). "
              "A wall-clock step is then mostly waiting for a core; the process's CPU time (second table) is what "
              "one step costs. FSDP2 on a CPU all-gathers each layer's rows through gloo in forward and backward "
              "(copies of the whole base per step), which DDP, replicating the base, never does; "
              "`CPUOffloadPolicy` moves shards from CPU to CPU here (no accelerator).",
              "- Peak RSS is the process's high-water mark: the interpreter and libraries (about 0.45 GB), the "
              "parameters held, and each step's transient tensors (FSDP2: the root's embeddings and head and the "
              "layer being run, unsharded; activations), plus what glibc's allocator keeps after tensors are freed. "
              "`parameters held` is the steady state FSDP2 divides by the world size.", ""]
    for world, failed in failures.items():
        for name, error in failed.items():
            lines.append(f"- world {world}, {name}: failed: {error}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny llama, 1 warm-up and 2 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per launch (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 128; --quick 32)")
    parser.add_argument("--worlds", default="1,2", help="world sizes, comma-separated")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    parser.add_argument("--suffix", default="", help="added to the result files' names")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.seq = args.seq if args.seq is not None else (32 if args.quick else 128)
    worlds = [int(w) for w in args.worlds.split(",")]
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")

    import torch

    torch.set_num_threads(1)
    command = "python -m benchmarks.distributed " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = run_meta(command, "cpu", args.steps, args.warmup, args.quick, "wall", ["distributed"])
    meta.update(batch=2, seq=args.seq, worlds=worlds, contenders=contenders, uptime_start=_uptime())
    results: dict[str, dict] = {}
    failures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fxpeft-dist-bench-") as tmp:
        folder = Path(tmp) / "llama"
        model = save_model(folder, args.quick)
        print(f"saved {model['parameters'] / 1e6:.1f}M parameters to {folder}", file=sys.stderr, flush=True)
        for world in worlds:
            for name in contenders:
                started = datetime.datetime.now()
                try:
                    results.setdefault(str(world), {})[name] = summary(launch(name, world, folder, args))
                except (AssertionError, TimeoutError) as error:
                    text = str(error)
                    tail = [line for line in text.splitlines() if line.strip()][-3:]
                    failures.setdefault(str(world), {})[name] = " / ".join(tail)[-600:]
                    print(text[-4000:], file=sys.stderr, flush=True)
                took = (datetime.datetime.now() - started).total_seconds()
                found = results.get(str(world), {}).get(name)
                shown = "FAILED" if found is None else \
                    f"step {found['worst']['step_ms']:.0f} ms, peak {found['worst']['peak_rss_mb']:.0f} MB, " \
                    f"loss {found['first_loss']:.6f}"
                print(f"world {world} {name}: {shown} ({took:.0f} s)", file=sys.stderr, flush=True)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["load_average_end"] = load_end
    text = markdown(meta, model, results, failures, worlds, load_end)
    print(text)
    stem = f"{meta['date']}-cpu-distributed{'-quick' if args.quick else ''}{args.suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / f"{stem}.json", args.out / f"{stem}.md"]
    payload = {"meta": meta, "model": model, "results": results, "failures": failures}
    write_atomically(paths[0], lambda p: p.write_text(json.dumps(payload, indent=1) + "\n"))
    write_atomically(paths[1], lambda p: p.write_text(text))
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if failures else 0


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
