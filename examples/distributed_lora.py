"""The quickstart's fine-tune, sharded per layer over several processes with FSDP2.

Same job, model and rules as examples/quickstart.py (pretrained MiniLM, LoRA on query/value, a trained classifier
head), run data-parallel: ``fxpeft.distributed.fully_shard`` gives each process 1/N of every frozen base weight (one
FSDP2 unit per encoder layer, found in the graph) and 1/N of the adapters; each process trains on its share of every
global batch, FSDP2 reduce-scatters the adapters' gradients, and ``fxpeft.distributed.save_adapter`` writes the
adapter once, whole, in PEFT's layout. Rank 0 then loads it onto a fresh base model in one process and checks that
the predictions are the sharded model's.

Run it with 2 processes on this machine's CPUs (gloo; on GPUs, nccl, one GPU per process)::

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/distributed_lora.py [--quick] [--out DIR]

``--quick`` (the tests' run) trains 3 epochs, about a minute on two cores. ``--report FILE``: rank 0 writes the
numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from customer_messages import folder_size, megabytes, model_folder
from quickstart import RULES, Settings, accuracy, batches, encode, load_base_model, load_messages, predict_logits
from transformers import AutoTokenizer

import fxpeft
import fxpeft.distributed as fd

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "distributed_lora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"adapter folder (default {DEFAULT_OUT})")
    parser.add_argument("--report", type=Path, default=None, help="rank 0 writes the results here as JSON")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def say(*args) -> None:
    """Print on rank 0 only."""
    if dist.get_rank() == 0:
        print(*args, flush=True)


def train(adapted, tokenizer, examples, settings: Settings) -> list[float]:
    """AdamW over the global batches; each rank takes every N-th message of a batch. Returns each epoch's mean loss
    over all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(examples) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng = random.Random(settings.seed)  # the same order on every rank
    adapted.train()
    epoch_losses = []
    for _ in range(settings.epochs):
        total = torch.zeros(2)
        for batch in batches(examples, settings.batch_size, rng):
            mine = batch[rank::world]
            labels = torch.tensor([example.label for example in mine])
            loss = adapted(**encode(tokenizer, [example.text for example in mine]), labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            total += torch.tensor([loss.item(), 1.0])
        dist.all_reduce(total)
        epoch_losses.append((total[0] / total[1]).item())
        say(f"epoch {len(epoch_losses)}: mean loss {epoch_losses[-1]:.4f}")
    return epoch_losses


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    settings = Settings(epochs=3 if args.quick else 10, seed=args.seed)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()

    folder = model_folder()
    train_set, test_set = load_messages()
    texts = [example.text for example in test_set]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(settings.seed)  # the same new classifier head and adapter on every rank
    example = encode(tokenizer, texts[:2])
    adapted = fxpeft.transform(load_base_model(folder), RULES,
                               example_kwargs={**example, "labels": torch.zeros(2, dtype=torch.long)})
    before = accuracy(predict_logits(adapted, tokenizer, texts).argmax(-1), test_set)  # captures the eval call too
    say(f"{world} processes; held-out accuracy before training: {before:.3f}")

    fd.fully_shard(adapted)
    base = list(adapted.base_model.parameters())
    held = sum(p.to_local().numel() for p in base) / sum(p.numel() for p in base)
    say(f"sharded per layer: {len(fd.layer_modules(adapted))} layers; each rank holds {held:.1%} of the base weights")
    losses = train(adapted, tokenizer, train_set, settings)
    logits = predict_logits(adapted, tokenizer, texts)
    after = accuracy(logits.argmax(-1), test_set)
    say(f"held-out accuracy after training: {after:.3f}")

    fd.save_adapter(adapted, args.out)
    result = {"world_size": world, "accuracy_before": before, "accuracy_after": after, "epoch_losses": losses,
              "base_fraction_per_rank": held, "seconds": time.perf_counter() - started}
    if rank == 0:
        reloaded = fxpeft.load_adapter(load_base_model(folder), args.out)
        reloaded_logits = predict_logits(reloaded, tokenizer, texts)
        result["reload_max_logit_difference"] = (reloaded_logits - logits).abs().max().item()
        result["reload_same_predictions"] = torch.equal(reloaded_logits.argmax(-1), logits.argmax(-1))
        result["adapter_mb"] = folder_size(args.out) / 1e6
        say(f"adapter saved once to {args.out} ({megabytes(folder_size(args.out))}); reloaded in one process: "
            f"same predictions {result['reload_same_predictions']}, max logit difference "
            f"{result['reload_max_logit_difference']:.1e}")
        if args.report:
            args.report.write_text(json.dumps(result))
    say(f"done in {result['seconds']:.1f}s")
    return result


if __name__ == "__main__":
    outcome = main()
    dist.barrier()  # then a hard exit: gloo's teardown aborts a few runs in a hundred otherwise
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if outcome["accuracy_after"] > outcome["accuracy_before"] else 1)
