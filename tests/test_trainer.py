"""transformers' Trainer (and TRL's SFTTrainer) over adapted models, against PEFT's runs on the same weights.

A plain ``transformers.Trainer`` with default arguments trains and evaluates an adapted model: its class carries the
base model's forward signature (fxpeft/runtime/signature.py), so Trainer keeps the right columns, finds the labels
and passes ``num_items_in_batch``. Same base weights, same LoRA initialisation, same seed: the logged losses and the
trained adapter equal PEFT's through the same Trainer. ``AdapterTrainer`` checkpoints hold the adapters in PEFT's
layout and resume to the adapter an uninterrupted run reaches.
"""

from __future__ import annotations

import copy
import inspect
import os
import pickle

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.utils.generic import can_return_loss, find_labels
from trl import SFTConfig, SFTTrainer  # the `test` extra: a missing one fails, never skips

import fxpeft
from fxpeft.integrations.sft import AdapterSFTTrainer
from fxpeft.integrations.trainer import AdapterTrainer
from tests.models import hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = dict(r=4, alpha=8)


def _rows(count: int = 32, seq: int = 12) -> list[dict]:
    """Token runs (``k, k+1, ...``): learnable, so the loss falls. A string column Trainer must drop."""
    rows = []
    for i in range(count):
        ids = (torch.arange(seq) + 5 * i) % 126 + 2
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "note": "x"})
    return rows


def _args(folder, **overrides) -> TrainingArguments:
    """Default TrainingArguments but for what a test needs: a few steps, no reporting, the CPU, a log per step."""
    return TrainingArguments(**{"output_dir": str(folder), "max_steps": 8, "per_device_train_batch_size": 4,
                                "learning_rate": 2e-2, "report_to": [], "use_cpu": True, "logging_steps": 1,
                                "save_strategy": "no", "disable_tqdm": True, **overrides})


def _twins():
    """PEFT's LoRA and fxpeft's on identical tiny llamas, with identical (PEFT-initialised) adapter tensors."""
    theirs = get_peft_model(hf_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], **LORA)])
    ours.adapters["default"].load_peft_state_dict(get_peft_model_state_dict(theirs))
    return theirs, ours


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_same_adapter(theirs, ours, atol: float = 0.0) -> None:
    expected, actual = get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    assert sorted(expected) == sorted(actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


def test_trainer_reads_the_base_models_signature_from_the_adapted_class():
    base = hf_model("llama")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj"], r=2)])
    parameters = list(inspect.signature(adapted.forward).parameters)
    assert parameters[:-2] == list(inspect.signature(base.forward).parameters)[:-1]
    assert parameters[-2:] == ["adapter_names", "kwargs"]
    assert find_labels(type(adapted)) == find_labels(type(base)) == ["labels"]
    assert can_return_loss(type(adapted)) == can_return_loss(type(base))
    assert adapted.accepts_loss_kwargs and adapted.loss_type == base.loss_type
    assert type(adapted).__name__ == "AdaptedLlamaForCausalLM" and isinstance(adapted, fxpeft.AdaptedModel)
    again = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj"], r=2)])
    assert type(again) is type(adapted), "one class per base model class"
    assert type(copy.deepcopy(adapted)) is type(adapted)
    # The class is made at run time: pickle rebuilds it from the base class (AdaptedModel.__reduce_ex__).
    assert type(pickle.loads(pickle.dumps(adapted))) is type(adapted)


def test_trainer_with_gradient_accumulation_equals_peft(tmp_path):
    theirs, ours = _twins()
    runs = []
    for model, folder in ((theirs, "peft"), (ours, "fxpeft")):
        trainer = Trainer(model=model, args=_args(tmp_path / folder, gradient_accumulation_steps=2),
                          train_dataset=_rows(), eval_dataset=_rows(8))
        trainer.train()
        runs.append((trainer, trainer.evaluate()))
    (peft_trainer, peft_eval), (our_trainer, our_eval) = runs
    assert _losses(our_trainer) == _losses(peft_trainer)
    assert _losses(our_trainer)[-1] < _losses(our_trainer)[0] - 0.05, "the loss falls"
    assert our_eval["eval_loss"] == peft_eval["eval_loss"], "eval_loss without label_names, as for PEFT"
    _assert_same_adapter(theirs, ours)


def test_trainer_label_smoothing_shifts_causal_labels_as_for_peft(tmp_path):
    theirs, ours = _twins()
    losses = []
    for model, folder in ((theirs, "peft"), (ours, "fxpeft")):
        trainer = Trainer(model=model, args=_args(tmp_path / folder, label_smoothing_factor=0.1, max_steps=2),
                          train_dataset=_rows())
        trainer.train()
        losses.append(_losses(trainer))
    assert losses[1] == losses[0]


def test_trainer_bf16_autocast_on_the_cpu_trains_like_peft(tmp_path):
    theirs, ours = _twins()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16=True runs the model under
        assert ours(input_ids=_rows(1)[0]["input_ids"][None]).logits.dtype == torch.bfloat16
    losses = []
    for model, folder in ((theirs, "peft"), (ours, "fxpeft")):
        # SGD: bf16 gradients differ from PEFT's in rounding (the backward's order of sums), which Adam would amplify.
        trainer = Trainer(model=model, args=_args(tmp_path / folder, bf16=True, optim="sgd", learning_rate=2.0),
                          train_dataset=_rows())
        trainer.train()
        losses.append(_losses(trainer))
    assert losses[1][0] == losses[0][0], "the first step is PEFT's under autocast, bit for bit"
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=0)
    assert losses[1][-1] < losses[1][0] - 0.03
    _assert_same_adapter(theirs, ours, atol=1e-2)  # adapter values up to ~0.26: bf16 rounding, not a fault


def test_trainer_with_default_arguments_trains_and_evaluates_a_classifier(tmp_path):
    base = hf_model("bert")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["query", "value"], r=4), fxpeft.Trainable(["classifier"])])
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        ids = torch.randint(4, 128, (10,), generator=generator)
        ids[0] = 2 + i % 2  # the label is the first token
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": i % 2, "text": "x"})
    trainer = Trainer(model=adapted, args=TrainingArguments(output_dir=str(tmp_path), max_steps=12, report_to=[],
                                                            use_cpu=True, logging_steps=1, learning_rate=5e-3,
                                                            per_device_train_batch_size=8, disable_tqdm=True),
                      train_dataset=rows, eval_dataset=rows[:8])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.05
    assert not any(name.startswith("base_model.") for name, p in adapted.named_parameters() if p.requires_grad)


def test_adapter_checkpoints_load_in_fxpeft_and_peft_and_resume_exactly(tmp_path):
    def adapted_llama():
        model = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], **LORA)])
        model.add_adapter("other", [fxpeft.LoRA(targets=["q_proj"], r=2)])  # inactive: saved beside, frozen
        return model

    initial = adapted_llama().state_dict()
    run = adapted_llama()
    run.load_state_dict(initial)
    trainer = AdapterTrainer(model=run, args=_args(tmp_path / "run", save_strategy="steps", save_steps=4),
                             train_dataset=_rows())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-8"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "other", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files and "model.safetensors" not in files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint / "other"))

    ids = _rows(4)[3]["input_ids"].unsqueeze(0) + 1
    expected = run.eval()(input_ids=ids).logits
    ours = fxpeft.load_adapter(hf_model("llama"), checkpoint)
    theirs = PeftModel.from_pretrained(hf_model("llama"), checkpoint).eval()
    assert torch.equal(ours(input_ids=ids).logits, expected)
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    trainer.save_model(tmp_path / "final")
    assert fxpeft.load_adapter(hf_model("llama"), tmp_path / "final").adapter_state_dict().keys() == \
        run.adapter_state_dict().keys()

    resumed = adapted_llama()
    resumed.load_state_dict(initial)
    AdapterTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=_rows()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for name in ("default", "other"):
        final, again = run.adapter_state_dict(name), resumed.adapter_state_dict(name)
        assert all(torch.equal(final[key], again[key]) for key in final), name
    assert not any(p.requires_grad for p in resumed.adapters["other"].parameters())


def test_trl_sft_trainer_trains_an_adapted_model_like_peft(tmp_path):
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w1", pad_token="w0", eos_token="w2")
    texts = [" ".join(f"w{(7 * i + 3 * j) % 120 + 4}" for j in range(10 + i % 3)) for i in range(16)]
    theirs, ours = _twins()
    for model in (theirs.get_base_model(), ours.base_model):
        model.config.pad_token_id, model.config.eos_token_id = 0, 2
    runs = []
    for cls, model, folder in ((SFTTrainer, theirs, "peft"), (AdapterSFTTrainer, ours, "fxpeft")):
        # fp32 and SGD: TRL defaults to bf16 (autocast on the CPU), whose rounding Adam would amplify.
        config = SFTConfig(output_dir=str(tmp_path / folder), max_steps=6, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, bf16=False, report_to=[],
                           use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
        trainer = cls(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                      processing_class=tokenizer)
        trainer.train()
        runs.append(trainer.state.log_history[:-1])
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(torch.tensor([e[key] for e in runs[1]]), torch.tensor([e[key] for e in runs[0]]),
                                   rtol=1e-5, atol=1e-6, msg=key)
    assert runs[1][-1]["loss"] < runs[1][0]["loss"] - 0.2
    _assert_same_adapter(theirs, ours, atol=1e-6)
