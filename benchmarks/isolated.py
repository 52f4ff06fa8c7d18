"""Measurements that need a process of their own: peak memory (RSS peaks never go down) and cold starts.

The parent runs ``python -m benchmarks.isolated <what> ...`` with an empty Inductor cache directory; the
child prints one JSON line. Every child imports the same libraries (torch, transformers, peft, fxpeft)
before its baseline, so the contenders' memory figures differ only by what they do.

    python -m benchmarks.isolated first-step --workload a --contender "fxpeft compiled" [--quick]
    python -m benchmarks.isolated meta-7b
    python -m benchmarks.isolated first-inference --layers 12 [--share]   (for benchmarks/shared_layers.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_child"]

_ROOT = Path(__file__).resolve().parent.parent


def run_child(*args: str, timeout: float = 1800, cache_dir: str | None = None, env: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter with a cold Inductor cache; returns its JSON line.

    ``cache_dir``: the Inductor cache to use instead of an empty temporary one (a second run with the same folder
    measures a warm cache); ``env``: more environment variables for the child."""
    with tempfile.TemporaryDirectory(prefix="fxpeft-bench-") as temporary:
        cache = cache_dir or temporary
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache, **(env or {}))
        done = subprocess.run([sys.executable, "-m", "benchmarks.isolated", *args], cwd=_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmarks.isolated {' '.join(args)} failed ({done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mib() -> float | None:
    """Resident memory now (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def _peak_rss_mib() -> float:
    """This process's peak RSS. On Linux, VmHWM: ``ru_maxrss`` is wrong here, because exec carries the
    high-water mark of the image it replaces (the parent's, forked) into the new program's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> bool:
    """Start the kernel's high-water mark again from the current RSS (Linux: ``/proc/self/clear_refs``),
    after handing freed heap back to the kernel (glibc's ``malloc_trim``), so that memory freed by capture or
    compilation does not count as the step's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def first_step(workload_key: str, contender_name: str, quick: bool, device: str, steps: int) -> dict:
    """Time from the base model to the end of its first training step (adapt, capture, compile, step); then
    the peak RSS of the process, and of ``steps`` more training steps alone (warm: graphs, compiled code and
    AdamW state exist, so this is the memory a training run holds, without one-off capture/compile costs)."""
    import peft  # noqa: F401  (imported by every child alike)
    import torch

    from .contenders import finish, start
    from .workloads import WORKLOADS, sizes_for

    workload, sizes = WORKLOADS[workload_key], sizes_for(quick)
    model = workload.build(sizes, device)
    batch = workload.batch(sizes, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    baseline = _rss_mib()
    began = time.perf_counter()
    contender = start(contender_name, model, workload, batch, training=True)
    adapted = time.perf_counter() - began
    contender = finish(contender, training=True)
    first_loss = contender.train_step(batch).item()
    sync()
    first = time.perf_counter() - began
    phases = dict(compile_phases(), adapt_s=adapted)
    setup_peak = _peak_rss_mib()
    reset = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        contender.train_step(batch)
    sync()
    step_peak = _peak_rss_mib()
    result = {"first_step_s": first, "first_loss": first_loss, "layers": sizes.layers,
              "peak_rss_mib": max(setup_peak, step_peak), "baseline_rss_mib": baseline,
              "step_peak_rss_mib": step_peak if reset else None, "phases": phases}
    if device == "cuda":
        result["step_peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# torch._dynamo's per-phase timers (``dynamo_timed``) whose sums make the phases of a cold compile.
_PHASES = {
    "dynamo_s": ["bytecode_tracing"],
    "aot_autograd_s": ["aot_collect_metadata", "aot_trace_joint_graph", "_recursive_joint_graph_passes",
                       "min_cut_rematerialization_partition"],
    "inductor_forward_s": ["compile_fx.<locals>.fw_compiler_base"],
    "inductor_backward_s": ["compile_fx.<locals>.bw_compiler"],
    "cpp_compiles_s": ["compile_file"],  # C++ kernel compiles; partly in parallel workers, so not wall time
    "compile_total_s": ["_compile.compile_inner"],
}


def compile_phases() -> dict:
    """Seconds this process spent in each phase of torch.compile so far, from torch._dynamo's own timers
    (an internal table: phases it lacks on another torch version read 0), with the number of C++ kernel
    compiles and of dynamo's restarts of a frame (``compile_attempt_1`` and later)."""
    import torch._dynamo.utils as dynamo_utils

    metrics = getattr(dynamo_utils, "compilation_time_metrics", {})
    phases = {name: sum(sum(metrics.get(key, [])) for key in keys) for name, keys in _PHASES.items()}
    phases["cpp_compiles"] = len(metrics.get("compile_file", []))
    phases["restarts"] = sum(len(values) for key, values in metrics.items()
                             if key.startswith("compile_attempt_") and key != "compile_attempt_0")
    return phases


def meta_7b() -> dict:
    """fxpeft.transform of a 7B llama built on the meta device: seconds and peak RSS."""
    import peft  # noqa: F401
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxpeft

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    baseline = _rss_mib()
    began = time.perf_counter()
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)])
    seconds = time.perf_counter() - began
    return {"transform_s": seconds, "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": baseline,
            "parameters": sum(p.numel() for p in model.parameters()),
            "lora_sites": len(list(adapted.site_modules()))}


def first_inference(layers: int, share: bool, device: str) -> dict:
    """Seconds of the first compiled inference call (trace and compile included) of workload (a) at ``layers``
    deep, with or without shared layer regions (``compile_layers_once``); logits checked against eager."""
    import dataclasses

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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolated")
    parser.add_argument("what", choices=["first-step", "meta-7b", "first-inference"])
    parser.add_argument("--workload", default="a")
    parser.add_argument("--contender", default="fxpeft eager")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--layers", type=int, default=4, help="first-inference: depth of workload (a)")
    parser.add_argument("--share", action="store_true", help="first-inference: compile_layers_once = True")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what == "first-step":
        result = first_step(args.workload, args.contender, args.quick, args.device, args.steps)
    elif args.what == "first-inference":
        result = first_inference(args.layers, args.share, args.device)
    else:
        result = meta_7b()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
