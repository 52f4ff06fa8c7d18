"""transformers' ``Trainer`` with adapter checkpoints: :class:`AdapterCheckpoints` and :class:`AdapterTrainer`.

A plain ``transformers.Trainer`` trains and evaluates an adapted model as it is (its ``forward`` carries the base
model's signature: fxpeft/runtime/signature.py), but it saves through ``save_pretrained`` only for ``PreTrainedModel``
and ``PeftModel`` instances. For any other module, a checkpoint or ``save_model()`` is ``model.safetensors`` with
the whole ``state_dict()`` (base model and adapters, no ``adapter_config.json``; safetensors refuses it for a model
with tied weights, such as gpt2), resumed with ``load_state_dict(strict=False)``.

:class:`AdapterCheckpoints` (a mixin, placed before the trainer class) makes checkpoints and ``save_model()`` write
the adapters in PEFT's layout instead, as PEFT's ``save_pretrained`` writes them (``default`` in the folder, every
other adapter in ``<folder>/<name>``), so that a checkpoint loads with :func:`fxpeft.load_adapter` and with
``peft.PeftModel.from_pretrained``; resuming (``train(resume_from_checkpoint=...)``) and
``load_best_model_at_end`` load the adapters back into the model in place
(:meth:`~fxpeft.AdaptedModel.load_adapter`), and the trainer restores optimizer, scheduler and RNG states as it
always does. A checkpoint written by a plain ``Trainer`` (``model.safetensors``) still resumes, the trainer's way.
Models that are not adapted models are saved and loaded by the trainer class unchanged. Example::

    trainer = AdapterTrainer(model=adapted, args=TrainingArguments(output_dir="out"), train_dataset=data)
    trainer.train()                                    # out/checkpoint-500/adapter_config.json, ...
    trainer.train(resume_from_checkpoint=True)         # the adapters, optimizer and schedule continue
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from fxpeft.formats.files import CONFIG_NAME, DEFAULT_ADAPTER
from fxpeft.model import AdaptedModel

__all__ = ["AdapterCheckpoints", "AdapterTrainer", "adapter_folders"]

_TRAINING_ARGS_NAME = "training_args.bin"  # what transformers.Trainer._save writes beside the model


def adapter_folders(folder) -> dict[str, Path]:
    """The adapters saved in ``folder`` in PEFT's layout: ``"default"`` for the folder itself, and each sub-folder
    holding an adapter under its own name."""
    folder = Path(folder)
    found = {DEFAULT_ADAPTER: folder} if (folder / CONFIG_NAME).is_file() else {}
    if folder.is_dir():
        found.update({sub.name: sub for sub in sorted(folder.iterdir())
                      if sub.is_dir() and (sub / CONFIG_NAME).is_file()})
    return found


class AdapterCheckpoints:
    """Mixin for ``transformers.Trainer`` and its subclasses: adapter checkpoints in PEFT's layout (see the module
    docstring). Put it first: ``class MyTrainer(AdapterCheckpoints, transformers.Trainer)``."""

    def _adapted_model(self, model=None) -> AdaptedModel | None:
        """The adapted model the trainer trains (unwrapped from DDP and torch.compile), or None."""
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, AdaptedModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write every adapter in PEFT's layout, the tokenizer or processor, and the training arguments."""
        adapted = self._adapted_model()
        if adapted is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        adapted.save_adapter(output_dir, list(adapted.adapters))
        tokenizer = getattr(self.data_collator, "tokenizer", None)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the checkpoint's adapters into the model in place (a plain Trainer checkpoint: the trainer's way)."""
        adapted = self._adapted_model(model)
        if adapted is None or not adapter_folders(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._load_adapters(adapted, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapters, in place."""
        adapted = self._adapted_model()
        best = self.state.best_model_checkpoint
        if adapted is None or best is None or not adapter_folders(best):
            return super()._load_best_model()
        self._load_adapters(adapted, best)

    @staticmethod
    def _load_adapters(adapted: AdaptedModel, folder) -> None:
        """Each adapter of ``folder`` into the adapter of its name, keeping whether it trains (a new name is added,
        inactive, as :meth:`~fxpeft.AdaptedModel.load_adapter` adds it)."""
        for name, place in adapter_folders(folder).items():
            trainable = name in adapted.adapters and not adapted.adapters[name].frozen
            adapted.load_adapter(place, name, is_trainable=trainable)


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model()`` hold an adapted model's adapters in PEFT's
    layout, and which resumes from them (see :class:`AdapterCheckpoints`)."""
