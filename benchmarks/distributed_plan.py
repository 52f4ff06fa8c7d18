"""Memory per rank on paper (:func:`fxpeft.distributed.planning.plan_memory`): the README's tables.

    python -m benchmarks.distributed_plan              # prints the tables, writes results/<date>-distributed-plan.md
    python -m benchmarks.distributed_plan --out -      # prints only

(a) T0_3B as PEFT's ``peft_lora_seq2seq_accelerate_ds_zero3_offload.py`` trains it: LoRA r=8 on every attention's
``q`` and ``v``, a float32 base, one GPU, next to PEFT's published figures. Two configs: T5-LM XL's (d_model 2048,
d_ff 5120, d_kv 64, gated-GELU, untied head), which T0_3B's model card says it starts from, and whose LoRA is the
19 MB checkpoint PEFT's README reports; and the one fxpeft's issue 19 gives (d_model 1024, d_ff 16384, d_kv 128:
t5-3b's shape, a 24 MB LoRA). Both are ~2.8B parameters.
(b) A 70B llama (Llama-3-70B's shape), bf16 base, LoRA r=16 on every projection, 8 ranks.

Models are built on the ``meta`` device and LoRA is counted from their modules (no capture), so this takes seconds.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import transformers as tf

import fxpeft
from fxpeft.distributed.planning import GIB, ParameterSpec, plan_memory, plan_parameters, plans_table
from fxpeft.passes.lora.sizes import lora_parameter_specs

from .report import write_atomically

RESULTS = Path(__file__).resolve().parent / "results"

# PEFT's README (peft 0.21.2's METADATA: T0_3B on ought/raft/twitter_complaints, one A100 80GB).
PEFT_FIGURES = ("PEFT's published figures for T0_3B on one A100 80GB: full fine-tuning 47.14 GB GPU / 2.96 GB CPU; "
                "PEFT-LoRA PyTorch 14.4 GB GPU / 2.96 GB CPU; PEFT-LoRA + DeepSpeed ZeRO-3 CPU offload 9.8 GB GPU / "
                "17.8 GB CPU; a 19 MB LoRA checkpoint. They are measured process totals (activations, DeepSpeed's "
                "buffers and the process itself included); the plans below count parameters, gradients and "
                "optimizer state only.")


def t5_configs() -> dict[str, tf.T5Config]:
    """The two T0_3B shapes (see the module docstring)."""
    common = dict(num_heads=32, num_layers=24, vocab_size=32128, decoder_start_token_id=0)
    return {"T0_3B as T5-LM XL (d_model 2048, d_ff 5120)": tf.T5Config(
                d_model=2048, d_ff=5120, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common),
            "issue 19's config (d_model 1024, d_ff 16384: t5-3b's shape)": tf.T5Config(
                d_model=1024, d_ff=16384, d_kv=128, **common)}


def llama_70b_config() -> tf.LlamaConfig:
    """Llama-3-70B's shape."""
    return tf.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def on_meta(auto, config, dtype: torch.dtype) -> torch.nn.Module:
    """``auto.from_config(config)`` with every tensor on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


def full_finetuning(model: torch.nn.Module, world_size: int, policy: str):
    """Every base parameter trainable with AdamW: the plan PEFT's full fine-tuning figure is about."""
    specs = [ParameterSpec(name, tuple(p.shape), p.element_size(), trainable=True) for name, p in
             model.named_parameters()]
    return plan_parameters(specs, world_size, policy)


def t0_section() -> list[str]:
    lines = ["## (a) T0_3B, LoRA r=8 on q and v (PEFT's seq2seq ZeRO-3 offload example), float32 base, 1 rank", "",
             PEFT_FIGURES, ""]
    rule = fxpeft.LoRA(targets=["q", "v"], r=8, alpha=32)
    for label, config in t5_configs().items():
        model = on_meta(tf.AutoModelForSeq2SeqLM, config, torch.float32)
        lora = lora_parameter_specs(model, rule)
        plans = {policy: plan_memory(model, 1, policy, adapters=lora) for policy in ("ddp", "fsdp2", "fsdp2-offload")}
        full = full_finetuning(model, 1, "ddp")
        first = plans["ddp"]
        lines += [f"### {label}: {first.base_parameters / 1e9:.2f}B base parameters, "
                  f"{first.adapter_parameters / 1e6:.2f}M LoRA parameters ({first.adapter_parameters * 4 / 1e6:.1f} "
                  f"MB in float32), {first.layers} layers", "",
                  plans_table({**plans, "full FT (ddp)": full}), "",
                  f"Peak device, parameters only: LoRA fsdp2-offload {plans['fsdp2-offload'].peak_device / 1e9:.2f} "
                  f"GB (PEFT + ZeRO-3 offload measured 9.8 GB with activations); LoRA in one process (ddp without "
                  f"its buckets) {first.device.total / 1e9:.2f} GB (PEFT-LoRA PyTorch measured 14.4 GB); full "
                  "fine-tuning in one process "
                  f"(no DDP buckets): weights, gradients and AdamW states {full.device.total / 1e9:.2f} GB (PEFT "
                  f"measured 47.14 GB). CPU, LoRA fsdp2-offload: "
                  f"{plans['fsdp2-offload'].cpu.total / 1e9:.2f} GB (PEFT + ZeRO-3 offload measured 17.8 GB, "
                  "the whole process).", ""]
    return lines


def llama_section() -> list[str]:
    rule = fxpeft.LoRA(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=16,
                       alpha=32)
    model = on_meta(tf.AutoModelForCausalLM, llama_70b_config(), torch.bfloat16)
    lora = lora_parameter_specs(model, rule)
    plans = {policy: plan_memory(model, 8, policy, adapters=lora) for policy in ("ddp", "fsdp2", "fsdp2-offload")}
    first = plans["fsdp2"]
    offload = plans["fsdp2-offload"]
    return ["## (b) 70B llama (hidden 8192, 80 layers, GQA 64/8, vocab 128256), bf16 base, LoRA r=16 on "
            "q,k,v,o,gate,up,down, 8 ranks", "",
            f"{first.base_parameters / 1e9:.2f}B base parameters, {first.adapter_parameters / 1e6:.1f}M LoRA "
            f"parameters (float32), {first.layers} layers. GiB per rank:", "",
            plans_table(plans), "",
            f"Peak device terms (fsdp2): root unsharded for the whole step {first.root_unsharded / GIB:.2f} GiB "
            f"(embeddings, head, every adapter), adapter gradients at full size {first.full_gradients / GIB:.2f} GiB"
            f", two layers unsharded {first.layers_unsharded / GIB:.2f} GiB. With offload, 8 ranks on one host "
            f"hold {8 * offload.cpu.total / GIB:.1f} GiB of CPU memory between them.", ""]


def report() -> str:
    """The whole markdown report."""
    return "\n".join(["# Memory per rank, planned (fxpeft.distributed.planning.plan_memory)", "",
                      f"torch {torch.__version__}, transformers {tf.__version__}. Planned, not measured; GiB = 2^30 "
                      "bytes, GB = 10^9 bytes.", "",
                      "- Activations, all-gather staging buffers and allocator fragmentation are not planned.",
                      "- FSDP2 (fully_shard per numbered layer, and at the root for embeddings, final norms, head "
                      "and every adapter): each rank allocates ceil(rows / N) rows of every parameter (padded); "
                      "AdamW keeps 2 states per trained element, in its dtype (float32 adapters).",
                      "- Peak device, fsdp2: steady device + root unsharded (the whole step) + gradients at full "
                      "size (the root reduce-scatters them once, after the backward) + max(two layers unsharded, "
                      "reduce-scatter input). ddp: steady + DDP's buckets (a copy of the gradients).", "",
                      *t0_section(), *llama_section()])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where to write the markdown ('-': nowhere; default: "
                                                    "results/<date>-distributed-plan.md)")
    args = parser.parse_args(argv)
    text = report()
    print(text)
    if args.out != "-":
        out = Path(args.out) if args.out else RESULTS / f"{datetime.date.today().isoformat()}-distributed-plan.md"
        write_atomically(out, lambda path: path.write_text(text + "\n"))
        print(f"\nwrote {out}")
    return text


if __name__ == "__main__":
    main()
