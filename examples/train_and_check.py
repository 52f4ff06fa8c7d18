"""Train a LoRA adapter for a few steps, save it, and check it as CI would: ``fxpeft.verify`` / ``fxpeft check``.

The job: a small causal language model (a 2-layer llama built from its config and saved as a model folder,
so it runs anywhere without downloads) learns to continue a counting pattern (each token is the previous
one plus one). What it shows:

1. ``fxpeft.transform`` adds LoRA to every linear layer but the output head; a plain AdamW loop
   trains it (the loss falls); ``save_adapter`` writes PEFT's layout.
2. ``fxpeft.verify(fresh_base, adapted)`` checks the *trained model in memory* against a freshly loaded
   base: every graph it captured (with and without ``labels``) is the base graph plus the declared LoRA
   nodes, training left the base weights byte for byte as they were, disabling the adapter gives the
   base model's outputs bit for bit, and merging gives the same outputs within rounding.
3. ``fxpeft.verify(fresh_base, "out/adapter")`` checks the *saved adapter*, as ``fxpeft check`` does in
   CI: only declared adapter tensors, shapes that fit the base, finite values, and the same graph and
   behaviour checks once it is put on the base.

Run it (about a minute on two CPU cores)::

    python examples/train_and_check.py [--out DIR] [--steps N]
    fxpeft check DIR/base DIR/adapter          # the same check from the command line (exit 0, 1 or 2)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

import fxpeft

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "train_and_check"
VOCAB = 128
RULES = [fxpeft.LoRA(targets="all-linear", r=8, alpha=16)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to save (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    return parser.parse_args(argv)


def save_base_model(folder: Path) -> None:
    """A small llama with seeded random weights, saved as an ordinary transformers model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def counting_batch(generator: torch.Generator, batch: int = 8, length: int = 16) -> torch.Tensor:
    """Sequences start, start+1, start+2, ... (mod the vocabulary): easy to learn, easy to see learnt."""
    starts = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (starts + torch.arange(length)) % VOCAB


def train(adapted: fxpeft.AdaptedModel, steps: int) -> tuple[float, float]:
    """AdamW on the adapter's parameters; returns the first and last loss."""
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    adapted.train()
    losses = []
    for _ in range(steps):
        ids = counting_batch(generator)
        loss = adapted(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    adapted.eval()
    return losses[0], losses[-1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    base_folder, adapter_folder = args.out / "base", args.out / "adapter"

    save_base_model(base_folder)
    adapted = fxpeft.transform(AutoModelForCausalLM.from_pretrained(base_folder), RULES)
    adapted.print_trainable_parameters()
    first, last = train(adapted, args.steps)
    print(f"trained {args.steps} steps: loss {first:.3f} -> {last:.3f}")
    adapted.save_adapter(adapter_folder)
    print(f"saved the base model to {base_folder} and the adapter to {adapter_folder}")

    print("\n== the trained model in memory, against a freshly loaded base ==")
    in_memory = fxpeft.verify(AutoModelForCausalLM.from_pretrained(base_folder), adapted)
    print(in_memory.summary())

    print("\n== the saved adapter, as `fxpeft check` sees it ==")
    saved = fxpeft.verify(AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder)
    print(saved.summary())

    print(f"\nthe same check from the command line (exit 0 when all holds, 1 when not, 2 on unusable inputs):\n"
          f"    fxpeft check {base_folder} {adapter_folder}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0 if in_memory.ok and saved.ok else 1


if __name__ == "__main__":
    sys.exit(main())
