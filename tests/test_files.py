"""Adapter files in PEFT's on-disk layout, both ways (fxpeft/formats/, passes/lora/codec.py).

Every cross-library test runs the ``peft`` package on the same tiny model: PEFT loads what fxpeft saves
and fxpeft loads what PEFT saves, with equal logits. Failures (wrong base, truncated or unsafe files,
unsupported fields, a write that fails half way) must be clear errors that leave models and folders as
they were.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft.errors import AdapterLoadError, AdapterSaveError, UnsupportedError
from fxpeft.formats.files import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from tests.limits import FileSizeLimit
from tests.models import AUTO_CLASS, CONFIGS, hf_inputs, hf_model, mlp
from tests.passes.peft_reference import call, randomize_peft

INPUTS = hf_inputs("llama")
TARGETS = ["q_proj", "v_proj"]
X = (torch.randn(5, 16, generator=torch.Generator().manual_seed(2)),)


def randomize(adapted: fxpeft.AdaptedModel, seed: int = 3, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(adapted.adapters[adapted.active_adapter].peft_state_dict().items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {name: (t.detach().clone(), t.requires_grad) for name, t in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> None:
    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before)
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].requires_grad == requires_grad, name


def files_in(folder: pathlib.Path) -> dict[str, bytes]:
    return {item.name: item.read_bytes() for item in folder.iterdir()}


# -- cached models and folders (capture costs seconds) ---------------------------------------------------------
@pytest.fixture(scope="module")
def fx_adapted():
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=TARGETS, r=4, alpha=8)], example_kwargs=INPUTS)
    randomize(adapted)
    return adapted.eval()


@pytest.fixture(scope="module")
def fx_dir(fx_adapted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fxpeft") / "adapter"
    fx_adapted.save_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def peft_model():
    model = peft.get_peft_model(hf_model("llama"), peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8))
    randomize_peft(model, seed=8)
    return model.eval()


@pytest.fixture(scope="module")
def peft_dir(peft_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mlp_adapted():
    """A small adapter whose weights file (~12 KB) is much larger than its config (~1 KB)."""
    adapted = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1", "fc2"], r=64, alpha=16)], example_inputs=X)
    randomize(adapted)
    return adapted.eval()


# -- the layout ----------------------------------------------------------------------------------------------
def test_save_writes_peft_layout(fx_adapted, fx_dir):
    assert sorted(os.listdir(fx_dir)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(os.listdir(fx_dir.parent)) == [fx_dir.name]  # no staging folder left behind
    saved = load_file(fx_dir / WEIGHTS_NAME)
    ours = fx_adapted.adapter_state_dict()
    assert sorted(saved) == sorted(ours)
    for key, value in ours.items():
        assert torch.equal(saved[key], value), key
    config = peft.LoraConfig.from_pretrained(fx_dir)
    assert (config.peft_type, config.r, config.lora_alpha, config.bias) == (peft.PeftType.LORA, 4, 8, "none")
    assert set(config.target_modules) == set(TARGETS)
    assert config.task_type == "CAUSAL_LM"


def test_peft_loads_an_fxpeft_adapter(fx_adapted, fx_dir):
    loaded = peft.PeftModel.from_pretrained(hf_model("llama"), fx_dir).eval()
    with torch.no_grad():
        ours, theirs = call(fx_adapted, INPUTS), call(loaded, INPUTS)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(theirs, call(hf_model("llama"), INPUTS), atol=1e-4)


def test_fxpeft_loads_a_peft_adapter(peft_model, peft_dir):
    loaded = fxpeft.load_adapter(hf_model("llama"), peft_dir, example_kwargs=INPUTS).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, INPUTS), call(peft_model, INPUTS), rtol=1e-5, atol=1e-6)
    assert not any(t.requires_grad for t in loaded.parameters())  # PEFT's default: is_trainable=False
    assert loaded.get_nb_trainable_parameters() == (0, peft_model.get_nb_trainable_parameters()[1])


def test_round_trip_is_identical(fx_adapted, fx_dir):
    loaded = fxpeft.load_adapter(hf_model("llama"), fx_dir, is_trainable=True, example_kwargs=INPUTS).eval()
    for key, value in fx_adapted.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(call(loaded, INPUTS), call(fx_adapted, INPUTS))
    assert loaded.get_nb_trainable_parameters() == fx_adapted.get_nb_trainable_parameters()


def test_modules_to_save_round_trip_with_peft(tmp_path):
    """bert with a trained classifier head: PEFT reads fxpeft's file, fxpeft reads it back."""
    inputs = hf_inputs("bert")
    adapted = fxpeft.transform(hf_model("bert"), [fxpeft.LoRA(targets=["query", "value"], r=4, alpha=8),
                                                  fxpeft.Trainable(targets=["classifier"])], example_kwargs=inputs)
    randomize(adapted, scale=0.3)
    adapted.eval()
    adapted.save_adapter(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    theirs = peft.PeftModel.from_pretrained(hf_model("bert"), tmp_path).eval()
    with torch.no_grad():
        expected = call(adapted, inputs)
        torch.testing.assert_close(call(theirs, inputs), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, call(hf_model("bert"), inputs), atol=1e-4)
    assert sorted(peft.get_peft_model_state_dict(theirs)) == sorted(adapted.adapter_state_dict())
    again = fxpeft.load_adapter(hf_model("bert"), tmp_path, example_kwargs=inputs).eval()
    with torch.no_grad():
        assert torch.equal(call(again, inputs), expected)


# -- loading what does not fit ---------------------------------------------------------------------------------
def test_wrong_base_is_a_clear_error_and_changes_nothing(fx_dir):
    config = CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    torch.manual_seed(0)
    other = AUTO_CLASS["llama"].from_config(config).eval()
    other.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern, to see it restored as it was
    before = snapshot(other)
    with pytest.raises(AdapterLoadError) as info:
        fxpeft.load_adapter(other, fx_dir, example_kwargs=INPUTS)
    message = str(info.value)
    assert "shape mismatch at base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "file has [4, 64], the model needs [4, 32]" in message
    assert len(info.value.mismatches) == 8  # A and B of q_proj and v_proj in 2 layers
    assert_unchanged(other, before)


def test_adapter_for_missing_modules_is_a_clear_error(tmp_path, fx_dir):
    shutil.copytree(fx_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["target_modules"] = ["q_projection"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    base = hf_model("llama")
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="q_projection"):
        fxpeft.load_adapter(base, tmp_path, example_kwargs=INPUTS)
    assert_unchanged(base, before)


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_truncated_weights_are_a_clear_error(tmp_path, fx_dir, keep):
    shutil.copytree(fx_dir, tmp_path, dirs_exist_ok=True)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    base = hf_model("llama")
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        fxpeft.load_adapter(base, tmp_path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("field, value", [("lora_bias", True),
                                          ("layer_replication", [[0, 1]]), ("init_lora_weights", "pissa"),
                                          ("peft_type", "OFT")])
def test_unsupported_config_field_is_named(tmp_path, peft_dir, field, value):
    shutil.copytree(peft_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    base = hf_model("llama")
    before = snapshot(base)
    with pytest.raises(UnsupportedError, match=field):
        fxpeft.load_adapter(base, tmp_path)
    assert_unchanged(base, before)


def test_defaults_peft_writes_are_accepted(tmp_path):
    """Every field PEFT 0.21 writes at its default loads (no false 'unsupported')."""
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8, bias="lora_only"))
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = fxpeft.load_adapter(mlp(), tmp_path, example_inputs=X).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*X), theirs.eval()(*X), rtol=1e-6, atol=1e-7)


# -- the legacy pickle format -------------------------------------------------------------------------------------
def test_legacy_bin_is_loaded(tmp_path, mlp_adapted):
    state = {key: value.clone() for key, value in mlp_adapted.adapter_state_dict().items()}
    mlp_adapted.save_adapter(tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    torch.save(state, tmp_path / LEGACY_WEIGHTS_NAME)
    loaded = fxpeft.load_adapter(mlp(), tmp_path, example_inputs=X).eval()
    with torch.no_grad():
        assert torch.equal(loaded(*X), mlp_adapted(*X))


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: what weights_only=True must refuse to do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_legacy_bin_is_read_with_weights_only(tmp_path, mlp_adapted):
    mlp_adapted.save_adapter(tmp_path / "adapter")
    os.remove(tmp_path / "adapter" / WEIGHTS_NAME)
    marker = tmp_path / "code-ran"
    state = dict(mlp_adapted.adapter_state_dict())
    state["base_model.model.fc1.lora_A.weight"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, tmp_path / "adapter" / LEGACY_WEIGHTS_NAME)
    with pytest.raises(AdapterLoadError, match="weights_only=True"):
        fxpeft.load_adapter(mlp(), tmp_path / "adapter", example_inputs=X)
    assert not marker.exists()


# -- saving that fails -------------------------------------------------------------------------------------------
def test_failed_save_leaves_no_folder(tmp_path, mlp_adapted):
    target = tmp_path / "out" / "adapter"
    with FileSizeLimit(4096), pytest.raises(AdapterSaveError, match="Could not write"):
        mlp_adapted.save_adapter(target)
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == []  # no staging folder either


def test_failed_save_over_an_existing_adapter_keeps_it(tmp_path, mlp_adapted):
    small = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=X)
    small.save_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").write_text("notes\n")
    before = files_in(tmp_path / "adapter")
    with FileSizeLimit(4096), pytest.raises(AdapterSaveError):
        mlp_adapted.save_adapter(tmp_path / "adapter")
    assert files_in(tmp_path / "adapter") == before
    assert os.listdir(tmp_path) == ["adapter"]
    # Without the limit the same save replaces the adapter and keeps the README.
    mlp_adapted.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "README.md").read_text() == "notes\n"
    assert sorted(load_file(tmp_path / "adapter" / WEIGHTS_NAME)) == sorted(mlp_adapted.adapter_state_dict())
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["r"] == 64
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_onto_a_file_is_a_clear_error(tmp_path, mlp_adapted):
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(AdapterSaveError, match="is a file"):
        mlp_adapted.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_over_a_folder_in_the_way_changes_nothing(tmp_path, mlp_adapted):
    small = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=X)
    small.save_adapter(tmp_path / "adapter")
    os.remove(tmp_path / "adapter" / WEIGHTS_NAME)
    (tmp_path / "adapter" / WEIGHTS_NAME).mkdir()
    (tmp_path / "adapter" / WEIGHTS_NAME / "x").write_text("in the way")
    config = (tmp_path / "adapter" / CONFIG_NAME).read_bytes()
    with pytest.raises(AdapterSaveError, match="folders named"):
        mlp_adapted.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / CONFIG_NAME).read_bytes() == config
    assert os.listdir(tmp_path) == ["adapter"]


def test_unsaveable_adapter_writes_nothing(tmp_path):
    two = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"]), fxpeft.LoRA(targets=["fc2"], r=2)], example_inputs=X)
    with pytest.raises(UnsupportedError, match="one LoRA rule"):
        two.save_adapter(tmp_path / "adapter")
    assert os.listdir(tmp_path) == []
