"""Virtual-token methods on a small causal LM: prefix tuning, prompt tuning and p-tuning, trained and compared.

A small llama is built from a config (no download) and kept frozen; each method learns only its virtual
tokens (p-tuning: their encoder; prefix tuning: keys and values at every attention layer, optionally through
PEFT's projection). The task is the simplest steering a prompt exists for: after a random
sequence of tokens and a separator, the model must answer the task's code word (a fixed token its random
weights never favour). Only the answer position carries a label (``-100`` elsewhere), so the printed loss is
the answer's cross-entropy: it starts at chance (~ln 64 = 4.2) and a few hundred steps take it towards zero;
``--quick`` runs a short smoke version (CI).

Run::

    python examples/prefix_and_prompt.py            # 300 steps per method
    python examples/prefix_and_prompt.py --quick    # 30 steps per method
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

import fxpeft
from fxpeft.rules import PrefixTuning, PromptTuning, PTuning

VOCAB, SEQ, SEPARATOR = 64, 12, 1
ANSWER = 10


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            initializer_range=0.2)  # wide enough logits for a frozen head to be confident
    return tf.AutoModelForCausalLM.from_config(config)


def batch(size: int, generator: torch.Generator) -> dict:
    """Rows ``[content..., SEP, ANSWER]`` of random content."""
    content = torch.randint(20, VOCAB, (size, SEQ - 2), generator=generator)
    ids = torch.cat([content, torch.full((size, 1), SEPARATOR), torch.full((size, 1), ANSWER)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@torch.no_grad()
def accuracy(adapted, inputs: dict) -> float:
    logits = adapted(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return (logits[:, -2].argmax(-1) == inputs["input_ids"][:, -1]).float().mean().item()


def train(name: str, rule, steps: int, batch_size: int = 16, lr: float = 0.1) -> list[float]:
    started = time.perf_counter()
    adapted = fxpeft.transform(base_model(), [rule], example_kwargs=batch(2, torch.Generator().manual_seed(9)))
    adapted.train()
    parameters = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(1)
    held_out = batch(256, torch.Generator().manual_seed(2))
    adapted.eval()
    before = accuracy(adapted, held_out)
    adapted.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = adapted(**batch(batch_size, generator)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    adapted.eval()
    after = accuracy(adapted, held_out)
    every = max(1, steps // 10)
    curve = " ".join(f"{sum(losses[i:i + every]) / len(losses[i:i + every]):.3f}" for i in range(0, steps, every))
    print(f"{name:<22} {sum(p.numel() for p in parameters):>7} trainable  loss curve: {curve}")
    print(f"{'':<22} held-out answer accuracy {before:.2f} -> {after:.2f}  ({time.perf_counter() - started:.0f} s)")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (30 if args.quick else 300)
    torch.manual_seed(0)
    results = {
        "prefix tuning": train("prefix tuning", PrefixTuning(num_virtual_tokens=8), steps, lr=3e-2),
        "prefix (projection)": train("prefix (projection)", PrefixTuning(8, projection=64), steps, lr=3e-3),
        "prompt tuning": train("prompt tuning", PromptTuning(num_virtual_tokens=8), steps),
        "prompt tuning (vocab)": train("prompt tuning (vocab)", PromptTuning(8, init="vocab"), steps),
        "p-tuning (mlp)": train("p-tuning (mlp)", PTuning(8, encoder="mlp", encoder_hidden_size=64), steps,
                                lr=1e-2),
    }
    for name, losses in results.items():
        head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        if not tail < head:
            raise SystemExit(f"{name}: the loss did not go down ({head:.3f} -> {tail:.3f})")


if __name__ == "__main__":
    main()
