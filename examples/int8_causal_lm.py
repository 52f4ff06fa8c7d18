"""LoRA on an int8 causal language model, on the CPU, end to end.

1. Build a small OPT-style model from a config (hidden 256, 4 layers, a character vocabulary) and train it
   briefly in full precision on a repetitive text, so that it is a language model and not noise.
2. Save it, and load it back quantized to int8 with transformers' ``BitsAndBytesConfig`` (bitsandbytes).
3. ``fxpeft.transform`` it with LoRA on every linear and train the adapters on a small text task (animal
   sounds); the int8 weights stay frozen and int8.
4. Save the adapter (PEFT's layout), load it onto a fresh int8 base, check both give the same logits, and
   print greedy continuations from the reloaded model.

Run ``python examples/int8_causal_lm.py`` (a few minutes on two cores), or ``--quick`` (fewer steps: the loss
drops, the continuations are not all right yet) for the test suite.
Needs ``bitsandbytes`` (its CPU backend) and ``tqdm``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import tempfile
from pathlib import Path

import torch
import transformers as tf
from tqdm import tqdm
from transformers import BitsAndBytesConfig

import fxpeft

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,:;!?'-\n"
PAD, BOS = 0, 1  # token ids; characters start at 2
PRETRAIN_TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "a stitch in time saves nine. "
                 + "the early bird catches the worm. " * 2 + "all that glitters is not gold. ")
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "mouse": "squeak"}
TASK = [f"the {animal} says {sound}." for animal, sound in SOUNDS.items()]
PROMPTS = ["the dog says", "the owl says", "the duck says"]


def encode(text: str) -> list[int]:
    return [BOS] + [ALPHABET.index(c) + 2 for c in text]


def decode(ids) -> str:
    return "".join(ALPHABET[i - 2] for i in ids if i >= 2)


def config() -> tf.OPTConfig:
    return tf.OPTConfig(vocab_size=len(ALPHABET) + 2, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                        num_attention_heads=4, word_embed_proj_dim=256, max_position_embeddings=256,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS)


def pretrain_batch(rng: random.Random, batch: int, length: int) -> dict:
    stream = encode(PRETRAIN_TEXT * 4)[1:]
    rows = []
    for _ in range(batch):
        start = rng.randrange(len(stream) - length)
        rows.append([BOS] + stream[start:start + length - 1])
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def task_batch(rng: random.Random, batch: int) -> dict:
    """Padded sentences of the task; padding is masked out of attention and loss (label -100)."""
    sentences = [encode(rng.choice(TASK)) for _ in range(batch)]
    width = max(map(len, sentences))
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, sentence in enumerate(sentences):
        ids[row, :len(sentence)] = torch.tensor(sentence)
        mask[row, :len(sentence)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def task_loss(model) -> float:
    """Mean loss over every task sentence (eval mode), one sentence at a time."""
    model.eval()
    losses = []
    for sentence in TASK:
        ids = torch.tensor([encode(sentence)])
        losses.append(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy(model, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy decoding by calling the model on the whole sequence each step (no cache): stops at '.'."""
    model.eval()
    ids = encode(prompt)
    for _ in range(max_new_tokens):
        inputs = torch.tensor([ids])
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == ALPHABET.index(".") + 2:
            break
    return decode(ids[len(encode(prompt)):])


def pretrain(steps: int, batch: int, seed: int) -> tf.OPTForCausalLM:
    torch.manual_seed(seed)
    model = tf.OPTForCausalLM(config())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    progress = tqdm(range(steps), desc="pretraining (fp32)")
    for _ in progress:
        loss = model(**pretrain_batch(rng, batch=batch, length=48)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    print(f"pretrained in full precision: final loss {loss.item():.3f} (uniform guessing: "
          f"{math.log(config().vocab_size):.3f})")
    return model


def load_int8(directory: Path):
    return tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                   dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the test suite)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the model and adapter (default: a "
                                                               "temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per call
    tf.logging.set_verbosity_error()
    out = args.out or Path(tempfile.mkdtemp(prefix="fxpeft-int8-"))
    pretrain_steps, pretrain_batch, lora_steps, lora_lr = (60, 8, 120, 2e-3) if args.quick else (300, 16, 400, 2e-3)

    base = pretrain(pretrain_steps, pretrain_batch, args.seed)
    base.save_pretrained(out / "base")
    del base

    model = load_int8(out / "base")
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    packed = q_proj.weight.detach().clone()
    print(f"reloaded in int8: {type(q_proj).__module__}.{type(q_proj).__name__}, weight {packed.dtype}")

    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets="all-linear", r=16, alpha=32)])
    adapted.print_trainable_parameters()
    before = task_loss(adapted)
    print(f"before LoRA: {PROMPTS[0]!r} -> {greedy(adapted, PROMPTS[0])!r}")

    adapted.train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=lora_lr)
    rng = random.Random(args.seed)
    progress = tqdm(range(lora_steps), desc="LoRA on the int8 model")
    for _ in progress:
        loss = adapted(**task_batch(rng, batch=8)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    after = task_loss(adapted)
    print(f"task loss before LoRA training: {before:.3f}, after: {after:.3f}")
    assert torch.equal(q_proj.weight, packed) and q_proj.weight.dtype == torch.int8
    print("int8 base weights unchanged: yes")

    adapted.save_adapter(out / "adapter")
    size = sum(f.stat().st_size for f in (out / "adapter").iterdir()) / 2**20
    print(f"adapter saved to {out / 'adapter'}: {size:.2f} MB")

    reloaded = fxpeft.load_adapter(load_int8(out / "base"), out / "adapter")
    reloaded.eval()
    adapted.eval()
    ids = torch.tensor([encode(TASK[0])])
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=ids).logits, adapted(input_ids=ids).logits)
    print(f"reloaded adapter on a fresh int8 base: {'identical' if same else 'DIFFERENT'} logits")
    for prompt in PROMPTS:
        print(f"generated: {prompt!r} -> {greedy(reloaded, prompt)!r}")


if __name__ == "__main__":
    main()
