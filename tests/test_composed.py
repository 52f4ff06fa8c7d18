"""Composed adapters (fxpeft/formats/composed.py): LoRA and a virtual-token method in one adapter, saved as two PEFT
folders (the LoRA part in the adapter's folder, the virtual tokens in ``<folder>/<method tag>``).

References are the ``peft`` package itself and fxpeft's adapters of one method: PEFT loads each part as the plain
adapter it is, with the outputs of an fxpeft adapter of that part alone; PEFT loading the LoRA part, merging it and
loading the virtual-token part on top gives the whole composed adapter's outputs; ``fxpeft.load_adapter`` reads the
folder back into one adapter with outputs equal bit for bit.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft.errors import AdapterLoadError, AdapterSaveError, UnsupportedError
from fxpeft.formats.files import CONFIG_NAME, WEIGHTS_NAME
from tests.models import hf_inputs, hf_model

VIRTUAL = {"prefix_tuning": fxpeft.PrefixTuning(3), "prompt_tuning": fxpeft.PromptTuning(3),
           "p_tuning": fxpeft.PTuning(3, encoder_hidden_size=16)}
LORA = fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2, alpha=4)


def randomize(adapted: fxpeft.AdaptedModel, seed: int = 3) -> fxpeft.AdaptedModel:
    """Give every adapter parameter random values, as training would (a fresh LoRA changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapted.eval()


def alone(family: str, rules: list, state: dict[str, torch.Tensor]) -> fxpeft.AdaptedModel:
    """An fxpeft adapter of ``rules`` only, with the composed adapter's tensors for them."""
    adapted = fxpeft.transform(hf_model(family), rules).eval()
    keys = adapted.adapters["default"].peft_keys()
    adapted.adapters["default"].load_peft_state_dict({key: value for key, value in state.items() if key in keys})
    return adapted


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and transformers' deprecation notes
        return model(**inputs).logits


@pytest.mark.parametrize("tag", sorted(VIRTUAL))
def test_lora_and_virtual_tokens_save_as_two_peft_folders(tag, tmp_path):
    inputs = hf_inputs("llama")
    rules = [LORA, VIRTUAL[tag], fxpeft.Trainable(targets=["lm_head"])]
    adapted = randomize(fxpeft.transform(hf_model("llama"), rules))
    ours = logits(adapted, inputs)
    adapted.save_adapter(tmp_path)

    # The layout: LoRA (with modules_to_save) in the folder, the virtual tokens in a sub-folder named by the method.
    main = json.loads((tmp_path / CONFIG_NAME).read_text())
    part = json.loads((tmp_path / tag / CONFIG_NAME).read_text())
    assert main["peft_type"] == "LORA" and main["modules_to_save"] == ["lm_head"]
    assert part["peft_type"] == {"prefix_tuning": "PREFIX_TUNING", "prompt_tuning": "PROMPT_TUNING",
                                 "p_tuning": "P_TUNING"}[tag]
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as file:
        assert json.loads(file.metadata()["fxpeft_parts"]) == [tag]
    assert "prompt_embeddings" in load_file(str(tmp_path / tag / WEIGHTS_NAME))
    assert not any(".lora_" in key for key in load_file(str(tmp_path / tag / WEIGHTS_NAME)))

    # fxpeft reads it back as one adapter, bit for bit.
    again = fxpeft.load_adapter(hf_model("llama"), tmp_path).eval()
    assert sorted(map(repr, again.adapters["default"].rules)) == sorted(map(repr, rules))
    assert torch.equal(logits(again, inputs), ours)

    # PEFT loads each part as the plain adapter it is, with fxpeft's outputs for that part alone.
    state = adapted.adapter_state_dict()
    lora_part = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path).eval()
    lora_only = alone("llama", [LORA, fxpeft.Trainable(targets=["lm_head"])], state)
    torch.testing.assert_close(logits(lora_part, inputs), logits(lora_only, inputs), rtol=1e-5, atol=1e-6)
    virtual_part = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path / tag).eval()
    virtual_only = alone("llama", [VIRTUAL[tag]], state)
    torch.testing.assert_close(logits(virtual_part, inputs), logits(virtual_only, inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(virtual_only, inputs), ours, atol=1e-3)  # each part alone is not the whole

    # And PEFT runs the whole adapter: the LoRA part merged, then the virtual tokens loaded on top.
    whole = peft.PeftModel.from_pretrained(lora_part.merge_and_unload(), tmp_path / tag).eval()
    torch.testing.assert_close(logits(whole, inputs), ours, rtol=1e-5, atol=1e-5)


def test_a_classifier_composed_adapter_gives_peft_the_trained_head_in_both_parts(tmp_path):
    """bert, LoRA + prompt tuning + a trained classifier: the LoRA part saves the classifier (modules_to_save); the
    prompt part, which PEFT's SEQ_CLS class loads with a classifier, holds the same trained head (as head copies that
    fxpeft's reader leaves out), so PEFT's merged-then-prompt model is the whole adapter."""
    inputs = hf_inputs("bert")
    rules = [fxpeft.LoRA(targets=["query", "value"], r=2), fxpeft.PromptTuning(2),
             fxpeft.Trainable(targets=["classifier"])]
    adapted = randomize(fxpeft.transform(hf_model("bert"), rules))
    ours = logits(adapted, inputs)
    adapted.save_adapter(tmp_path)
    part = load_file(str(tmp_path / "prompt_tuning" / WEIGHTS_NAME))
    copy = adapted.adapter_state_dict()["base_model.model.classifier.weight"]
    assert torch.equal(part["base_model.classifier.weight"], copy)
    assert not torch.equal(copy, hf_model("bert").classifier.weight)
    again = fxpeft.load_adapter(hf_model("bert"), tmp_path).eval()
    assert torch.equal(logits(again, inputs), ours)
    assert sorted(again.adapter_state_dict()) == sorted(adapted.adapter_state_dict())
    lora_part = peft.PeftModel.from_pretrained(hf_model("bert"), tmp_path).eval()
    whole = peft.PeftModel.from_pretrained(lora_part.merge_and_unload(), tmp_path / "prompt_tuning").eval()
    torch.testing.assert_close(logits(whole, inputs), ours, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_of_a_classifier_round_trips_without_a_trained_head(tmp_path):
    """PromptTuning alone on bert: the folder holds the base classifier for PEFT's SEQ_CLS class, which loads it
    with fxpeft's logits; fxpeft reads the same adapter back (no trained head appears)."""
    inputs = hf_inputs("bert")
    adapted = randomize(fxpeft.transform(hf_model("bert"), [fxpeft.PromptTuning(2)]))
    adapted.save_adapter(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert torch.equal(saved["base_model.classifier.weight"], hf_model("bert").classifier.weight)
    again = fxpeft.load_adapter(hf_model("bert"), tmp_path).eval()
    assert [type(rule) for rule in again.adapters["default"].rules] == [fxpeft.PromptTuning]
    assert sorted(again.adapter_state_dict()) == ["prompt_embeddings"]
    assert torch.equal(logits(again, inputs), logits(adapted, inputs))
    theirs = peft.PeftModel.from_pretrained(hf_model("bert"), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, inputs), logits(adapted, inputs), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """A saved LoRA + prefix-tuning adapter (a 1-layer llama)."""
    folder = tmp_path_factory.mktemp("composed") / "adapter"
    adapted = randomize(fxpeft.transform(hf_model("llama", layers=1), [LORA, fxpeft.PrefixTuning(2)]))
    adapted.save_adapter(folder)
    return folder


def copy_folder(source, target):
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(path.read_bytes())
    return target


def test_saving_a_plain_adapter_over_a_composed_one_drops_its_part(composed, tmp_path):
    folder = copy_folder(composed, tmp_path / "adapter")
    (folder / "README.md").write_text("notes")
    plain = randomize(fxpeft.transform(hf_model("llama", layers=1), [LORA]))
    plain.save_adapter(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    again = fxpeft.load_adapter(hf_model("llama", layers=1), folder)
    assert again.adapters["default"].rules == [LORA]


def test_a_part_folder_that_holds_another_adapter_is_not_overwritten(tmp_path):
    other = randomize(fxpeft.transform(hf_model("llama", layers=1), [LORA]))
    other.save_adapter(tmp_path / "adapter" / "prefix_tuning")
    before = (tmp_path / "adapter" / "prefix_tuning" / WEIGHTS_NAME).read_bytes()
    adapted = fxpeft.transform(hf_model("llama", layers=1), [LORA, fxpeft.PrefixTuning(2)])
    with pytest.raises(AdapterSaveError, match="prefix_tuning, which holds something else"):
        adapted.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "prefix_tuning" / WEIGHTS_NAME).read_bytes() == before
    assert not (tmp_path / "adapter" / CONFIG_NAME).exists()


def test_a_composed_folder_copied_without_its_part_is_a_clear_error(composed, tmp_path):
    folder = copy_folder(composed, tmp_path / "adapter")
    for path in (folder / "prefix_tuning").iterdir():
        path.unlink()
    (folder / "prefix_tuning").rmdir()
    with pytest.raises(AdapterLoadError, match="names 'prefix_tuning', a part of this adapter kept in that sub-folder"):
        fxpeft.load_adapter(hf_model("llama", layers=1), folder)


def test_part_names_from_a_strangers_file_are_plain_folder_names(composed, tmp_path):
    folder = copy_folder(composed, tmp_path / "adapter")
    state = load_file(str(folder / WEIGHTS_NAME))
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "fxpeft_parts": '["../../etc"]'})
    with pytest.raises(AdapterLoadError, match="not plain folder names"):
        fxpeft.load_adapter(hf_model("llama", layers=1), folder)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "fxpeft_parts": '{"a": 1}'})
    with pytest.raises(AdapterLoadError, match="must be a JSON list"):
        fxpeft.load_adapter(hf_model("llama", layers=1), folder)


def test_a_config_cannot_smuggle_rules_in(composed, tmp_path):
    """The in-memory field that carries a composed adapter's other rules is refused in a file."""
    folder = copy_folder(composed / "prefix_tuning", tmp_path / "prefix")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["fxpeft_composed_rules"] = [{"method": "lora", "targets": ["q_proj"], "r": 2}]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="not a field of PEFT's configs"):
        fxpeft.load_adapter(hf_model("llama", layers=1), folder)


def test_two_virtual_token_methods_in_one_adapter_cannot_be_saved(tmp_path):
    adapted = fxpeft.transform(hf_model("llama", layers=1), [fxpeft.PromptTuning(2), fxpeft.PrefixTuning(2)])
    with pytest.raises(UnsupportedError, match="beside one virtual-token method") as error:
        adapted.save_adapter(tmp_path / "adapter")
    assert "separate adapters" not in str(error.value)  # add_adapter refuses a virtual-token adapter beside another
    assert not (tmp_path / "adapter").exists()
