"""How long ``fxpeft.verify`` takes on the graph of a 7B llama (planned on the meta device, no weights).

The model is LlamaConfig's 7B shape (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocabulary
32000) built under ``torch.device("meta")``, so nothing is allocated; LoRA goes on q_proj and v_proj. The
check captures the base model afresh (the bulk of the time), matches the ~2,200-node graphs and the merged
graph node for node, and checks the adapter's declared sites and shapes. Weights and outputs are skipped
on the meta device (the report says so). It must finish in under a minute.

    python benchmarks/check_7b.py
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft
from fxpeft.verification import verify

LIMIT_SECONDS = 60.0


def main() -> int:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    start = time.perf_counter()
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base.eval()
    parameters = sum(p.numel() for p in base.parameters())
    print(f"built {type(base).__name__} on meta: {parameters / 1e9:.2f}B parameters "
          f"[{time.perf_counter() - start:.1f}s]")

    start = time.perf_counter()
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=16, alpha=32)])
    nodes = len(adapted.programs()[0].graph.nodes)
    print(f"setup (not part of the check): transform, one capture, {nodes} nodes in the adapted graph "
          f"[{time.perf_counter() - start:.1f}s]")

    start = time.perf_counter()
    report = verify(base, adapted)
    elapsed = time.perf_counter() - start
    print(report.summary())
    print("times:", ", ".join(f"{check.name} {check.seconds:.2f}s" for check in report.checks))
    print(f"check total: {elapsed:.1f}s (limit {LIMIT_SECONDS:.0f}s)")
    if not report.ok:
        print("FAILED: the check found differences on an untouched model")
        return 1
    if elapsed > LIMIT_SECONDS:
        print("FAILED: over the time limit")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
