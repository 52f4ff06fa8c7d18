"""The ``PreTrainedModel`` and ``PeftModel`` surface of the adapted model (fxpeft/runtime/peft_surface.py, and
``fxpeft.AutoAdapterModel`` in fxpeft/auto.py), held against transformers and peft themselves on tiny models.
"""

from __future__ import annotations

import copy
import json
import sys

import peft
import pytest
import torch
import transformers
from torch import nn

import fxpeft
from fxpeft.errors import AdapterLoadError, FxpeftError, UnsupportedError
from tests.models import VOCAB, hf_inputs, hf_model, mlp
from tests.passes.peft_reference import build_without_dropout, lora_twins

LORA = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)


def randomize(adapted: fxpeft.AdaptedModel, seed: int = 3, scale: float = 0.2) -> None:
    """Seeded random values in every adapter tensor (a fresh LoRA's B is zero: it would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(adapted.adapters.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny llama saved with transformers' save_pretrained: the folder adapters name as their base model."""
    folder = tmp_path_factory.mktemp("base") / "llama"
    build_without_dropout("llama").save_pretrained(folder)
    return folder


def load_base(folder) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


# -- what libraries read ------------------------------------------------------------------------------------------
def test_config_device_dtype_are_the_base_models():
    base = hf_model("llama")
    adapted = fxpeft.transform(base, peft.LoraConfig(**LORA))
    assert adapted.config is base.config
    assert (adapted.device, adapted.dtype) == (base.device, base.dtype)
    adapted.config.use_cache = False  # what Trainer and TRL write through model.config
    assert base.config.use_cache is False
    assert adapted.get_base_model() is base
    assert adapted.get_input_embeddings() is base.get_input_embeddings()
    assert adapted.get_output_embeddings() is base.get_output_embeddings() is base.lm_head


def test_dtype_of_a_half_precision_base_is_the_base_dtype():
    """transformers' meaning: the base parameters' dtype, though the adapters stay float32 (PEFT's autocast)."""
    base = hf_model("llama").to(torch.bfloat16)
    adapted = fxpeft.transform(base, peft.LoraConfig(**LORA))
    assert adapted.dtype == base.dtype == torch.bfloat16
    assert {p.dtype for p in adapted.adapters.parameters()} == {torch.float32}


def test_a_model_without_config_has_none():
    adapted = fxpeft.transform(mlp(), fxpeft.LoRA(targets=["fc1"]), example_inputs=torch.randn(2, 16))
    assert getattr(adapted, "config", None) is None and not hasattr(adapted, "config")
    assert (adapted.device, adapted.dtype) == (torch.device("cpu"), torch.float32)
    with pytest.raises(UnsupportedError, match="get_input_embeddings"):
        adapted.get_input_embeddings()


PEFT_CONFIGS = {
    "lora": peft.LoraConfig(**LORA, task_type="CAUSAL_LM", lora_dropout=0.1),
    "prompt": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True,
                                      encoder_hidden_size=16),
    "p-tuning": peft.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", encoder_hidden_size=16),
}


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_peft_config_equals_what_peft_holds(method):
    """``peft_config["default"]`` is a real PEFT config object equal, field by field, to the one PEFT's model holds
    after ``get_peft_model`` with the same config (PEFT fills in the model's sizes and the base's name too)."""
    config = PEFT_CONFIGS[method]
    ours = fxpeft.transform(hf_model("llama"), copy.deepcopy(config))
    theirs = peft.get_peft_model(hf_model("llama"), copy.deepcopy(config))
    held, expected = ours.peft_config["default"], theirs.peft_config["default"]
    assert type(held) is type(expected)
    assert held.to_dict() == expected.to_dict()
    assert ours.active_peft_config.to_dict() == expected.to_dict()


def test_peft_config_of_a_loaded_adapter_equals_peft_from_pretrained(tmp_path, saved_base):
    """A frozen adapter (loaded with is_trainable=False) holds inference_mode=True, as PEFT's from_pretrained."""
    trained = fxpeft.transform(load_base(saved_base), fxpeft.LoRA(targets=["q_proj"], r=2, bias="lora_only"))
    trained.save_pretrained(tmp_path)
    ours = fxpeft.AdaptedModel.from_pretrained(load_base(saved_base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_base(saved_base), tmp_path)
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()
    assert ours.peft_config["default"].inference_mode is True
    assert ours.peft_config["default"].base_model_name_or_path == str(saved_base)


def test_peft_config_without_peft_is_the_config_dict(monkeypatch):
    """Without the peft package, ``peft_config`` holds the same fields as plain dicts (adapter_config.json's)."""
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj"], r=2, alpha=4))
    expected = adapted.peft_config["default"]
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    held = adapted.peft_config["default"]
    assert isinstance(held, dict) and not isinstance(expected, dict)
    assert (held["peft_type"], held["r"], held["lora_alpha"], held["target_modules"]) == ("LORA", 2, 4, ["q_proj"])
    assert held["inference_mode"] is False and expected.inference_mode is False


# -- PEFT's save and load names ----------------------------------------------------------------------------------
def test_save_pretrained_loads_in_peft_with_equal_logits(tmp_path, saved_base):
    """Every adapter, as PEFT's save_pretrained writes them: "default" in the folder, others in sub-folders."""
    adapted = fxpeft.transform(load_base(saved_base), fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8))
    adapted.add_adapter("other", fxpeft.LoRA(targets=["k_proj"], r=2))
    randomize(adapted)
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(load_base(saved_base), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    inputs = hf_inputs("llama")
    for name in ("default", "other"):
        adapted.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(adapted.eval(), inputs), logits(theirs.eval(), inputs), atol=1e-5,
                                   rtol=1e-5)


def test_save_pretrained_options(tmp_path, saved_base):
    adapted = fxpeft.transform(load_base(saved_base), fxpeft.LoRA(targets=["q_proj"], r=2))
    adapted.add_adapter("other", fxpeft.LoRA(targets=["k_proj"], r=2))
    adapted.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    assert sorted(path.name for path in (tmp_path / "selected").iterdir()) == ["other"]  # PEFT: a sub-folder
    adapted.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(FxpeftError, match="nope"):
        adapted.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    with pytest.warns(UserWarning, match="safetensors"):
        adapted.save_pretrained(tmp_path / "bin", safe_serialization=False, state_dict=adapted.state_dict())
    assert (tmp_path / "bin" / "adapter_model.safetensors").is_file()


def test_adapted_model_from_pretrained_is_peft_model_from_pretrained(tmp_path, saved_base):
    """``AdaptedModel.from_pretrained(model, folder)``: PEFT's ``PeftModel.from_pretrained`` (a PEFT-saved folder)."""
    reference = peft.get_peft_model(load_base(saved_base), peft.LoraConfig(**LORA))
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.2)
    reference.save_pretrained(tmp_path)
    ours = fxpeft.AdaptedModel.from_pretrained(load_base(saved_base), tmp_path)
    assert ours.get_nb_trainable_parameters()[0] == 0  # frozen, as PEFT's is_trainable=False
    torch.testing.assert_close(logits(ours, hf_inputs("llama")), logits(reference.eval(), hf_inputs("llama")),
                               atol=1e-5, rtol=1e-5)
    trainable = fxpeft.AdaptedModel.from_pretrained(load_base(saved_base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    with pytest.raises(UnsupportedError, match="revision"):
        fxpeft.AdaptedModel.from_pretrained(load_base(saved_base), tmp_path, revision="main")
    with pytest.raises(AdapterLoadError, match="not a folder"):
        fxpeft.AdaptedModel.from_pretrained(load_base(saved_base), "someone/some-adapter")


def test_auto_adapter_model_loads_the_base_and_the_adapter(tmp_path, saved_base):
    adapted = fxpeft.transform(load_base(saved_base), peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    randomize(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = fxpeft.AutoAdapterModel.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded.base_model, transformers.LlamaForCausalLM)
    inputs = hf_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(adapted.eval(), inputs), atol=1e-6, rtol=1e-6)
    theirs = peft.PeftModel.from_pretrained(load_base(saved_base), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    trainable = fxpeft.AutoAdapterModel.from_pretrained(tmp_path / "adapter", is_trainable=True, adapter_name="mine")
    assert list(trainable.adapters) == ["mine"] and trainable.get_nb_trainable_parameters()[0] > 0


def test_auto_adapter_model_picks_the_task_class(tmp_path):
    """A sequence-classification adapter (task SEQ_CLS, its head trained) loads its base with
    AutoModelForSequenceClassification; the logits equal PEFT's loading of the same folders."""
    base = build_without_dropout("bert")
    base.save_pretrained(tmp_path / "base")
    load = transformers.AutoModelForSequenceClassification.from_pretrained
    adapted = fxpeft.transform(load(tmp_path / "base"), peft.LoraConfig(target_modules=["query"], r=2,
                                                                        task_type="SEQ_CLS"))
    randomize(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = fxpeft.AutoAdapterModel.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded.base_model, transformers.BertForSequenceClassification)
    theirs = peft.PeftModel.from_pretrained(load(tmp_path / "base").eval(), tmp_path / "adapter")
    inputs = hf_inputs("bert")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(loaded, inputs), logits(adapted.eval(), inputs), atol=1e-6, rtol=1e-6)


def test_auto_adapter_model_without_a_task_type(tmp_path):
    """No task_type: the class PEFT records in ``auto_mapping`` (a PEFT-saved gpt2 adapter), else the class the base
    model's config.json names (an fxpeft-saved bert adapter that leaves the classifier head as it is)."""
    build_without_dropout("gpt2").save_pretrained(tmp_path / "gpt2")
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                                 peft.LoraConfig(target_modules=["c_attn"], r=2))
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "gpt2-adapter")
    assert json.loads((tmp_path / "gpt2-adapter" / "adapter_config.json").read_text())["auto_mapping"]
    loaded = fxpeft.AutoAdapterModel.from_pretrained(tmp_path / "gpt2-adapter")
    assert type(loaded.base_model) is transformers.GPT2LMHeadModel
    inputs = hf_inputs("gpt2")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs.eval(), inputs), atol=1e-5, rtol=1e-5)

    build_without_dropout("bert").save_pretrained(tmp_path / "bert")
    adapted = fxpeft.transform(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert"),
                               fxpeft.LoRA(targets=["query"], r=2))
    randomize(adapted)
    adapted.save_pretrained(tmp_path / "bert-adapter")
    assert json.loads((tmp_path / "bert-adapter" / "adapter_config.json").read_text())["task_type"] is None
    loaded = fxpeft.AutoAdapterModel.from_pretrained(tmp_path / "bert-adapter")
    assert type(loaded.base_model) is transformers.BertForSequenceClassification
    torch.testing.assert_close(logits(loaded, hf_inputs("bert")), logits(adapted.eval(), hf_inputs("bert")))


def test_auto_adapter_model_resizes_for_a_saved_tokenizer_as_peft(tmp_path, saved_base):
    """A tokenizer saved beside the adapter with more tokens than the base's embeddings resizes them first, as PEFT's
    AutoPeftModelForCausalLM does (same seed: the same new rows; the same logits)."""
    from tokenizers import Tokenizer, models

    adapted = fxpeft.transform(load_base(saved_base), peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    randomize(adapted)
    adapted.save_pretrained(tmp_path)
    vocabulary = {f"t{i}": i for i in range(VOCAB + 4)}
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0"))
                                         ).save_pretrained(tmp_path)
    torch.manual_seed(0)
    ours = fxpeft.AutoAdapterModel.from_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.get_input_embeddings().weight.shape[0] == VOCAB + 4
    ids = torch.tensor([[VOCAB + 3, 5, VOCAB, 7]])
    torch.testing.assert_close(logits(ours, {"input_ids": ids}), logits(theirs, {"input_ids": ids}), atol=1e-5,
                               rtol=1e-5)


def test_auto_adapter_model_refuses_a_hub_name(tmp_path, saved_base):
    adapted = fxpeft.transform(load_base(saved_base), fxpeft.LoRA(targets=["q_proj"], r=2))
    adapted.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/model-7b"}))
    with pytest.raises(AdapterLoadError, match="'org/model-7b', which is not a local folder.*Hub"):
        fxpeft.AutoAdapterModel.from_pretrained(tmp_path)
    loaded = fxpeft.AutoAdapterModel.from_pretrained(tmp_path, base_model_name_or_path=saved_base)
    assert isinstance(loaded.base_model, transformers.LlamaForCausalLM)
    with pytest.raises(AdapterLoadError, match="not an adapter folder"):
        fxpeft.AutoAdapterModel.from_pretrained(saved_base)


# -- switching, merging, unloading --------------------------------------------------------------------------------
def test_disable_adapter_and_adapter_layers_as_peft():
    theirs, ours = lora_twins("llama", ["q_proj", "v_proj"], r=4, alpha=8)
    inputs = hf_inputs("llama")
    adapted_logits, base_logits = logits(ours, inputs), logits(ours.base_model, inputs)
    torch.testing.assert_close(adapted_logits, logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    with ours.disable_adapter():
        assert torch.equal(logits(ours, inputs), base_logits)
    assert torch.equal(logits(ours, inputs), adapted_logits)
    ours.disable_adapter_layers()
    theirs.disable_adapter_layers()
    assert torch.equal(logits(ours, inputs), base_logits)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    ours.enable_adapter_layers()
    assert torch.equal(logits(ours, inputs), adapted_logits)


def test_merge_adapter_and_unmerge_adapter_as_peft():
    theirs, ours = lora_twins("llama", ["q_proj", "v_proj"], r=4, alpha=8)
    inputs = hf_inputs("llama")
    weight = ours.base_model.model.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    ours.merge_adapter()
    theirs.merge_adapter()
    assert ours.merged_adapters == ["default"]
    torch.testing.assert_close(weight, theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    assert ours.merged_adapters == []
    torch.testing.assert_close(weight, original)


def test_safe_merge_refuses_non_finite_weights_and_writes_nothing():
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2))
    randomize(adapted)
    before = {name: value.clone() for name, value in adapted.base_model.state_dict().items()}
    site = next(site for site in adapted.site_modules() if "layers.1" in site.path)
    with torch.no_grad():
        next(site.parameters()).fill_(float("inf"))
    with pytest.raises(FxpeftError, match="NaN or inf"):
        adapted.merge_adapter(safe_merge=True)
    assert adapted.merged_adapters == []
    after = adapted.base_model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("merged", [False, True])
def test_unload_gives_the_base_model_back_unchanged(merged):
    base = hf_model("llama")
    before = {name: value.clone() for name, value in base.state_dict().items()}
    adapted = fxpeft.transform(base, peft.LoraConfig(**LORA))
    randomize(adapted)
    if merged:
        adapted.merge_adapter()
    model = adapted.unload()
    assert model is base
    for name, value in model.state_dict().items():
        if merged:  # LoRA unmerged within float rounding
            torch.testing.assert_close(value, before[name], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(value, before[name]), name
    if not merged:
        assert torch.equal(logits(model, hf_inputs("llama")), logits(hf_model("llama"), hf_inputs("llama")))


# -- input gradients and the vocabulary ---------------------------------------------------------------------------
def test_enable_input_require_grads_as_transformers():
    """The input embeddings' output requires grad after it, as the base model's own method makes it; not after
    ``disable_input_require_grads``."""
    ids = hf_inputs("llama")["input_ids"]
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj"], r=2))
    reference = hf_model("llama")
    assert not adapted.get_input_embeddings()(ids).requires_grad
    adapted.enable_input_require_grads()
    reference.enable_input_require_grads()
    assert adapted.get_input_embeddings()(ids).requires_grad
    assert reference.get_input_embeddings()(ids).requires_grad
    adapted.disable_input_require_grads()
    assert not adapted.get_input_embeddings()(ids).requires_grad


class _Tagger(nn.Module):
    """A plain module (not transformers') that says which module embeds its tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 3)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_enable_input_require_grads_on_a_plain_module():
    ids = torch.randint(0, 16, (2, 5))
    adapted = fxpeft.transform(_Tagger(), fxpeft.LoRA(targets=["head"], r=2), example_inputs=ids)
    adapted.enable_input_require_grads()
    assert adapted.get_input_embeddings()(ids).requires_grad
    adapted.disable_input_require_grads()
    assert not adapted.get_input_embeddings()(ids).requires_grad


def test_resize_token_embeddings_keeps_the_adapter_and_takes_new_tokens():
    """After resizing, a forward with new token ids works and equals PEFT on a copy of the resized base model with
    the same adapter tensors; with adapters disabled, the resized base model itself, bit for bit."""
    adapted = fxpeft.transform(build_without_dropout("llama"), peft.LoraConfig(**LORA))
    randomize(adapted)
    adapted(**hf_inputs("llama"))  # a signature captured before the resize
    embeddings = adapted.resize_token_embeddings(VOCAB + 8)
    assert embeddings is adapted.get_input_embeddings() and embeddings.weight.shape[0] == VOCAB + 8
    assert not any(parameter.requires_grad for parameter in adapted.base_model.parameters())
    ids = torch.tensor([[3, VOCAB, VOCAB + 7, 5, VOCAB + 2], [VOCAB + 1, 9, 4, VOCAB + 6, 2]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    theirs = peft.get_peft_model(copy.deepcopy(adapted.base_model), peft.LoraConfig(**LORA)).eval()
    peft.set_peft_model_state_dict(theirs, adapted.adapter_state_dict())
    ours = adapted.eval()(**inputs)
    reference = theirs(**inputs)
    assert ours.logits.shape[-1] == VOCAB + 8
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=1e-5)
    with adapted.disable_adapter():
        assert torch.equal(logits(adapted, inputs), logits(adapted.base_model, inputs))
    adapted.train()(**inputs).loss.backward()
    assert all(parameter.grad is not None for parameter in adapted.adapters.parameters())


def test_resize_token_embeddings_refuses_adapters_shaped_by_the_vocabulary():
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj"], r=2),
                                                   fxpeft.Trainable(["lm_head"])])
    with pytest.raises(UnsupportedError, match="lm_head.*Resize the base model first"):
        adapted.resize_token_embeddings(VOCAB + 8)
    assert adapted.get_input_embeddings().weight.shape[0] == VOCAB
