"""Image classification: adapt a vision transformer to new classes with LoRA on its attention, save it, load it back.

The images are scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797 greyscale 8x8 scans that
the package ships, so nothing is downloaded). No pretrained vision transformer installs offline, so the example
makes its own base model first, the way a hub checkpoint is made, only small:

1. **Pretraining.** A small ``ViTForImageClassification`` (transformers' ViT, built from a ``ViTConfig``: 2x2
   patches, 2 layers, hidden size 64) is trained in full on the digits 0-4. Its backbone (``model.vit``, without the
   head) is saved with ``save_pretrained``, like a checkpoint published without a classifier.
2. **The job: digits 5-9**, classes the backbone never saw. ``ViTForImageClassification.from_pretrained`` loads the
   backbone with a new five-way classifier head (randomly initialised). ``fxpeft.transform`` rewrites it with two
   rules: ``fxpeft.LoRA`` on the attention's query and value projections (``q_proj``, ``v_proj``: transformers 5
   names them so in ViT; the roles ``"attention.query"``, ``"attention.value"`` select the same linears) and
   ``fxpeft.Trainable`` for the classifier head (PEFT's ``modules_to_save``). The backbone's weights are frozen and
   never written.
3. Held-out accuracy before and after training (a seeded split of the digits 5-9 into training and held-out images).
   The adapted model takes the base model's arguments (``pixel_values``, ``labels``) and returns its output
   (``.loss``, ``.logits``).
4. ``save_adapter`` writes PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``);
   ``fxpeft.load_adapter`` puts it on a freshly loaded backbone (whose head is again random, another one) and the
   reloaded model gives exactly the trained model's predictions. Where ``peft`` is installed, PEFT's
   ``PeftModel.from_pretrained`` loads the same folder and predicts the same.

Run it (``--quick``, the shortened run the tests use, takes about 12 s of one CPU core, the full run about 15 s; more
on a busy machine)::

    python examples/image_classification.py [--quick] [--out DIR] [--base-out DIR]

On a machine shared with other busy jobs, ``OMP_NUM_THREADS=1`` can be several times faster than letting torch's
threads compete for the same cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import ViTConfig, ViTForImageClassification

import fxpeft

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "image_classification"
DEFAULT_BASE_OUT = HERE / "out" / "image_classification_base"
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TASK_DIGITS = (5, 6, 7, 8, 9)
HELD_OUT = 300  # images of the digits 5-9 kept out of training (of about 900)
RULES = [
    fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05),
    fxpeft.Trainable(targets=["classifier"]),
]


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters; ``--quick`` trains for fewer epochs, with the same everything else."""

    pretrain_epochs: int
    epochs: int
    batch_size: int = 32
    pretrain_learning_rate: float = 1e-3
    learning_rate: float = 2e-2  # LoRA and a new head take a larger rate than full training
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class Images:
    """A set of images (``pixels``: N x 1 x 8 x 8, scaled to [-1, 1]) and their class indices (``labels``: N)."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


# -- inputs -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``--quick`` (short CI run), ``--out DIR``, ``--base-out DIR``, ``--epochs N``,
    ``--seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to save the adapter (default {DEFAULT_OUT})")
    parser.add_argument("--base-out", type=Path, default=DEFAULT_BASE_OUT,
                        help=f"where to save the pretrained backbone (default {DEFAULT_BASE_OUT})")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of LoRA training epochs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_digit_images(seed: int) -> tuple[Images, Images, Images]:
    """scikit-learn's digits as (pretraining set: every 0-4, training set and held-out set: the 5-9 split at random
    with ``seed``). Labels are indices into :data:`PRETRAIN_DIGITS` or :data:`TASK_DIGITS`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - the examples' environment has it
        raise SystemExit("this example reads scikit-learn's digits: pip install scikit-learn") from error
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> -1..1
    targets = torch.tensor(digits.target)
    source = targets < len(PRETRAIN_DIGITS)
    pretrain = Images(pixels[source], targets[source])
    task_pixels, task_labels = pixels[~source], targets[~source] - len(PRETRAIN_DIGITS)
    order = torch.randperm(len(task_labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:-HELD_OUT], order[-HELD_OUT:]
    return pretrain, Images(task_pixels[train], task_labels[train]), Images(task_pixels[test], task_labels[test])


def label_names(digits: tuple[int, ...]) -> dict:
    """The config's label fields for classifying ``digits`` (class ``i`` is ``digits[i]``)."""
    return {"num_labels": len(digits), "id2label": {i: str(digit) for i, digit in enumerate(digits)},
            "label2id": {str(digit): i for i, digit in enumerate(digits)}}


def new_vit(digits: tuple[int, ...]) -> ViTForImageClassification:
    """A new (randomly initialised) small ViT for 8x8 greyscale images: 16 patches of 2x2 pixels, 2 layers, hidden
    size 64, 4 heads; a head for ``digits``."""
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, **label_names(digits))
    return ViTForImageClassification(config)


def load_base_model(folder: Path) -> ViTForImageClassification:
    """The pretrained backbone with a new five-way head for the digits 5-9 (randomly initialised)."""
    return ViTForImageClassification.from_pretrained(folder, **label_names(TASK_DIGITS))


def batches(images: Images, batch_size: int, generator: torch.Generator):
    """Yield shuffled (pixels, labels) batches, one pass over ``images``."""
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        yield images.pixels[chosen], images.labels[chosen]


# -- training and evaluation --------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: Images, batch_size: int = 100) -> torch.Tensor:
    """Logits for every image, in eval mode (no dropout)."""
    model.eval()
    chunks = [model(pixel_values=images.pixels[i:i + batch_size]).logits for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def accuracy(predictions: torch.Tensor, images: Images) -> float:
    """Fraction of images whose label is the predicted one."""
    return (predictions == images.labels).float().mean().item()


def train(model: torch.nn.Module, images: Images, epochs: int, learning_rate: float, settings: Settings,
          desc: str) -> float:
    """Train ``model``'s trainable parameters with AdamW (linear decay), showing a progress bar; returns the last
    epoch's mean loss."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=settings.weight_decay)
    steps = epochs * -(-len(images) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    epoch_loss = float("nan")
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            losses = []
            for pixels, labels in batches(images, settings.batch_size, generator):
                loss = model(pixel_values=pixels, labels=labels).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            epoch_loss = sum(losses) / len(losses)
    return epoch_loss


def pretrain_backbone(pretrain_set: Images, settings: Settings, folder: Path) -> None:
    """Stage 1: train a new ViT in full on the digits 0-4 and save its backbone (no head) to ``folder``."""
    model = new_vit(PRETRAIN_DIGITS)
    print(f"pretraining the base model on the digits 0-4 ({len(pretrain_set)} images, all "
          f"{sum(p.numel() for p in model.parameters()):,d} parameters): {settings.pretrain_epochs} epochs")
    started = time.perf_counter()
    loss = train(model, pretrain_set, settings.pretrain_epochs, settings.pretrain_learning_rate, settings,
                 "pretraining")
    model.vit.save_pretrained(folder)
    print(f"pretraining took {time.perf_counter() - started:.1f}s (last epoch's mean loss {loss:.4f}); backbone "
          f"saved to {folder}")


# -- reporting ----------------------------------------------------------------------------------------
def folder_size(path: Path) -> int:
    """Bytes taken by the files in a folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report_accuracy(when: str, predictions: torch.Tensor, images: Images) -> float:
    """Print and return held-out accuracy."""
    value = accuracy(predictions, images)
    correct = round(value * len(images))
    print(f"held-out accuracy {when}: {value:.3f} ({correct}/{len(images)})")
    return value


def show_per_digit(predictions: torch.Tensor, images: Images) -> None:
    """Print the reloaded model's held-out accuracy for each digit."""
    parts = []
    for index, digit in enumerate(TASK_DIGITS):
        chosen = images.labels == index
        parts.append(f"{digit}: {(predictions[chosen] == index).sum().item()}/{chosen.sum().item()}")
    print(f"held-out images right, per digit: {', '.join(parts)}")


# -- the job ------------------------------------------------------------------------------------------
def fine_tune(adapted: fxpeft.AdaptedModel, train_set: Images, test_set: Images, settings: Settings,
              mode: str) -> torch.Tensor:
    """Held-out accuracy before, training, held-out accuracy after; returns the trained model's held-out logits.

    The first training step is slower: ``labels`` is an argument the adapted model has not been called with yet, so
    that call captures and rewrites the graph once more (sizes never trigger a capture, only new names)."""
    report_accuracy("before training", predict_logits(adapted, test_set).argmax(-1), test_set)
    print(f"training ({mode}) on the digits 5-9: {len(train_set)} images, {settings.epochs} epochs, "
          f"batch {settings.batch_size}, AdamW lr {settings.learning_rate} (linear decay)")
    started = time.perf_counter()
    loss = train(adapted, train_set, settings.epochs, settings.learning_rate, settings, "training")
    print(f"training took {time.perf_counter() - started:.1f}s; last epoch's mean loss {loss:.4f}")
    logits = predict_logits(adapted, test_set)
    report_accuracy("after training", logits.argmax(-1), test_set)
    return logits


def save(adapted: fxpeft.AdaptedModel, out: Path, base_folder: Path) -> None:
    """Save the adapter in PEFT's layout and print its size next to the base model's."""
    adapted.save_adapter(out)
    adapter_size, base_size = folder_size(out), folder_size(base_folder)
    print(f"adapter saved to {out}: {megabytes(adapter_size)} on disk vs {megabytes(base_size)} for the pretrained "
          f"backbone's folder ({100 * adapter_size / base_size:.1f}%; a tiny backbone, so a large share)")


def megabytes(size: int) -> str:
    """A byte count as MB with three decimals (this example's files are small)."""
    return f"{size / 1e6:.3f} MB"


def reload_and_compare(out: Path, base_folder: Path, test_set: Images, logits: torch.Tensor) -> None:
    """Load the saved adapter onto a freshly loaded backbone; its predictions must be the trained model's. Then, where
    PEFT is installed, load the same folder with ``PeftModel.from_pretrained``."""
    torch.manual_seed(12345)  # another random head than the trained model's base had
    reloaded = fxpeft.load_adapter(load_base_model(base_folder), out)
    reloaded_logits = predict_logits(reloaded, test_set)
    if not torch.equal(reloaded_logits.argmax(-1), logits.argmax(-1)):
        raise SystemExit("the reloaded adapter predicts differently from the trained model")
    difference = (reloaded_logits - logits).abs().max().item()
    print(f"reloaded adapter on a fresh base model: identical predictions on all {len(test_set)} held-out images "
          f"(max logit difference {difference:.1e})")
    show_per_digit(reloaded_logits.argmax(-1), test_set)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft imports it: "no `kernels` package" on CPU
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft's call
    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipping the PeftModel.from_pretrained check")
        return
    peft_logits = predict_logits(PeftModel.from_pretrained(load_base_model(base_folder), out), test_set)
    if not torch.equal(peft_logits.argmax(-1), logits.argmax(-1)):
        raise SystemExit("PEFT's PeftModel.from_pretrained predicts differently from the trained model")
    print(f"PEFT's PeftModel.from_pretrained on the same folder: identical predictions "
          f"(max logit difference {(peft_logits - logits).abs().max().item():.1e})")


def main(argv: list[str] | None = None) -> int:
    """Pretrain the backbone, fine-tune with LoRA, evaluate, save, reload and compare; returns the exit status."""
    args = parse_args(argv)
    settings = Settings(pretrain_epochs=5 if args.quick else 10, epochs=args.epochs or (8 if args.quick else 20),
                        seed=args.seed)
    transformers.utils.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)

    pretrain_set, train_set, test_set = load_digit_images(settings.seed)
    print(f"data: scikit-learn's 8x8 digits; {len(pretrain_set)} images of 0-4 for pretraining, "
          f"{len(train_set)} training / {len(test_set)} held-out images of 5-9 for the job")
    pretrain_backbone(pretrain_set, settings, args.base_out)
    base = load_base_model(args.base_out)
    print(f"base model: {type(base).__name__} from {args.base_out} (classifier head for 5-9 newly initialised)")

    adapted = fxpeft.transform(base, RULES)
    adapted.print_trainable_parameters()
    logits = fine_tune(adapted, train_set, test_set, settings, "quick" if args.quick else "full")
    save(adapted, args.out, args.base_out)
    reload_and_compare(args.out, args.base_out, test_set, logits)
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
