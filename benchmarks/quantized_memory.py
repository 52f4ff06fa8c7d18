"""Peak memory (RSS) of a LoRA training step on an fp32, an int8 and a 4-bit base of the same model, fxpeft next
to PEFT. Every run is a fresh subprocess::

    python benchmarks/quantized_memory.py            # llama-like, hidden 1024, 8 layers (~100M linear weights)
    python benchmarks/quantized_memory.py --quick    # hidden 512, 4 layers

The parent builds the model from a config (seeded), saves it once in full precision, and each child loads it
(int8 / 4-bit through transformers' ``BitsAndBytesConfig``, nf4 with float32 compute), adapts it with LoRA
(r=16 on every linear but the head) and runs two training steps (forward with labels, backward, AdamW on the
adapters). The first step warms up (fxpeft's graph for this argument set, AdamW's state); the second is
measured: garbage is collected, glibc's free lists are trimmed (``malloc_trim``), the kernel's high-water mark is reset
(``/proc/self/clear_refs``) and read back after the step (``VmHWM``). Reported per run, in MiB:

- ``before``: resident memory before the measured step (imports, model, adapter, optimizer state, graphs);
- ``step peak``: the high-water mark during the measured step;
- ``lifetime``: the process's peak over its whole life (``ru_maxrss``: loading and quantizing included);
- ``file-backed``: the part of ``before`` that is pages of mapped files (``RssFile``). Loading quantized,
  transformers reads the full-precision checkpoint through a memory map that stays open (the tensors left in
  full precision, embeddings and head, are views of it), so the checkpoint pages it touched while quantizing
  stay resident as clean file pages (the kernel drops them under memory pressure). They are the same for
  both libraries, but they make a quantized base look bigger than it is next to the fp32 one: compare runs
  on the same base, or subtract this column.

Peaks vary by a few percent from run to run (allocator behaviour): use ``--repeats 3`` for medians.

Runs: ``fxpeft``; ``peft`` as the same computation (``prepare_model_for_kbit_training`` with
``use_gradient_checkpointing=False`` on the quantized bases); and ``peft+ckpt``, PEFT's QLoRA default
(``prepare_model_for_kbit_training()``: activation checkpointing, which recomputes each layer in backward
and so trades time for activation memory; fxpeft has no checkpointing). Every child imports both libraries,
so the baselines are equal. The check at the end: fxpeft's 4-bit step does not exceed PEFT's like-for-like
(``peft``) step. Linux only (``/proc``). The full size takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BASES = ("fp32", "int8", "4bit")
RUNS = ("fxpeft", "peft", "peft+ckpt")
MIB = 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()  # graph capture leaves reference cycles behind; both libraries get the same treatment
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _config(quick: bool):
    import transformers as tf

    hidden, layers = (512, 4) if quick else (1024, 8)
    return tf.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=8192,
                          max_position_embeddings=512, tie_word_embeddings=False)


def child(base: str, run: str, directory: str, batch: int, seq: int) -> dict:
    import bitsandbytes  # noqa: F401  (imported by every run, so the baselines are equal)
    import peft
    import torch
    import transformers as tf
    from transformers import BitsAndBytesConfig

    import fxpeft

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    imported = _rss_kib("VmRSS")
    quantization = {"fp32": None, "int8": BitsAndBytesConfig(load_in_8bit=True),
                    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)}[base]
    model = tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if run == "fxpeft":
        model = fxpeft.transform(model, [fxpeft.LoRA(targets="all-linear", r=16, alpha=32)], example_kwargs=data)
    else:
        if base != "fp32":
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=run == "peft+ckpt",
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif run == "peft+ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    _reset_peak()
    before = _rss_kib("VmRSS")
    file_backed = _rss_kib("RssFile")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {"base": base, "run": run, "imported": imported / 1024, "before": before / 1024, "peak": peak / 1024,
            "file": file_backed / 1024,
            "lifetime": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model (hidden 512, 4 layers)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case; the summary takes the median")
    parser.add_argument("--child", nargs=3, metavar=("BASE", "RUN", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, batch=args.batch, seq=args.seq)))
        return

    import torch
    import transformers as tf

    config = _config(args.quick)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1")
    results = []
    with tempfile.TemporaryDirectory(prefix="fxpeft-bench-") as directory:
        torch.manual_seed(0)
        tf.LlamaForCausalLM(config).save_pretrained(directory)
        linear = sum(p.numel() for n, p in tf.LlamaForCausalLM(config).named_parameters()
                     if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
        print(f"llama-like model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
              f"{linear / 1e6:.1f}M parameters in the quantizable linears; batch {args.batch} x seq {args.seq}")
        for base, run, _ in itertools.product(BASES, RUNS, range(args.repeats)):
            command = [sys.executable, __file__, "--child", base, run, directory, "--batch", str(args.batch),
                       "--seq", str(args.seq)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{base}/{run} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {base:5s} {run:10s} before {r['before']:7.0f}  step peak {r['peak']:7.0f}  "
                  f"(+{r['peak'] - r['before']:5.0f})  lifetime {r['lifetime']:7.0f}  "
                  f"file-backed {r['file']:5.0f} MiB  step {r['step_s']:.2f} s", flush=True)
    peak = {(base, run): statistics.median(r["peak"] for r in results if (r["base"], r["run"]) == (base, run))
            for base, run in itertools.product(BASES, RUNS)}
    print("\nstep peak RSS, MiB (lower is better):")
    print(f"  {'base':6s}" + "".join(f"{run:>12s}" for run in RUNS))
    for base in BASES:
        print(f"  {base:6s}" + "".join(f"{peak[(base, run)]:12.0f}" for run in RUNS))
    ok = peak[("4bit", "fxpeft")] <= peak[("4bit", "peft")]
    print(f"\n4-bit step: fxpeft {peak[('4bit', 'fxpeft')]:.0f} MiB vs PEFT {peak[('4bit', 'peft')]:.0f} MiB "
          f"(same computation): {'not above' if ok else 'ABOVE'} PEFT's; PEFT with activation checkpointing: "
          f"{peak[('4bit', 'peft+ckpt')]:.0f} MiB.")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
