"""PEFT's config objects given to ``fxpeft.transform`` (fxpeft/formats/peft_configs.py), and PEFT's field names in
fxpeft's rules (fxpeft/peft_names.py), held against the ``peft`` package itself.

A config given to ``transform`` must build what ``peft.get_peft_model`` builds from it: the same trainable parameter
count and, once PEFT's (random) adapter weights are loaded, the same logits. A config fxpeft cannot honour fully is
an error naming the field, never a silently different adapter.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft_configs import rules_from_config
from tests.models import hf_inputs, hf_model
from tests.passes.peft_reference import build_without_dropout, randomize_peft


def twins(family: str, config):
    """(fxpeft model from ``transform(model, config)``, PEFT model from ``get_peft_model(model, config)``) over two
    identical dropout-free copies of a tiny model; PEFT's adapter gets random weights, which fxpeft's loads (through
    PEFT's saved state dict)."""
    ours = fxpeft.transform(build_without_dropout(family), copy.deepcopy(config))
    theirs = peft.get_peft_model(build_without_dropout(family), copy.deepcopy(config))
    return ours, theirs


LORA_CASES = {
    "llama": peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, task_type="CAUSAL_LM"),
    "gpt2": peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8, use_rslora=True),  # Conv1D: fan_in_fan_out
    "bert": peft.LoraConfig(target_modules=["query", "value"], r=2, task_type="SEQ_CLS",    # the head trains too
                            rank_pattern={"value": 4}, layers_to_transform=[1]),
}


@pytest.mark.parametrize("family", sorted(LORA_CASES))
def test_lora_config_builds_what_get_peft_model_builds(family):
    """Same trainable count as PEFT; PEFT's random weights loaded into fxpeft's adapter give PEFT's logits."""
    ours, theirs = twins(family, LORA_CASES[family])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.adapters["default"].load_peft_state_dict(randomize_peft(theirs))
    inputs = hf_inputs(family)
    with torch.no_grad():
        expected = theirs.eval()(**inputs).logits
        got = ours.eval()(**inputs).logits
        base = ours.base_model(**inputs).logits
    assert not torch.allclose(expected, base, atol=1e-4), "the adapter changes nothing: the test cannot fail"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_config_without_target_modules_takes_peft_defaults():
    """``LoraConfig(task_type=...)`` with no targets: PEFT's default targets for the model type, as get_peft_model."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4)
    ours, theirs = twins("llama", config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.adapters["default"].rules[0].targets) == set(theirs.peft_config["default"].target_modules)


VIRTUAL_CASES = {
    "prompt": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prompt-vocab": peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                            prompt_tuning_init="SAMPLE_VOCAB"),
    "prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix-projection": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prefix_projection=True,
                                                 encoder_hidden_size=16),
    "p-tuning-mlp": peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "p-tuning-lstm": peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM",
                                              encoder_reparameterization_type="LSTM"),
}
EXPECTED_RULES = {
    "prompt": fxpeft.PromptTuning(3), "prompt-vocab": fxpeft.PromptTuning(3, init="vocab"),
    "prefix": fxpeft.PrefixTuning(3), "prefix-projection": fxpeft.PrefixTuning(3, projection=16),
    "p-tuning-mlp": fxpeft.PTuning(3, encoder_hidden_size=16),
    "p-tuning-lstm": fxpeft.PTuning(3, encoder="lstm", encoder_hidden_size=16),
}


@pytest.mark.parametrize("case", sorted(VIRTUAL_CASES))
def test_virtual_token_configs_build_what_get_peft_model_builds(case):
    """Prompt tuning, prefix tuning (with and without PEFT's projection) and P-tuning configs: the rule fxpeft's own
    API writes for it, the same trainable count as PEFT; for the methods whose saved tensors are the whole adapter
    (a prompt, a plain prefix), PEFT's random weights give PEFT's logits."""
    ours, theirs = twins("llama", VIRTUAL_CASES[case])
    assert ours.adapters["default"].rules == [EXPECTED_RULES[case]]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    if case not in ("prompt", "prefix"):
        return
    ours.adapters["default"].load_peft_state_dict(randomize_peft(theirs))
    inputs = hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits, atol=1e-5,
                                   rtol=1e-5)


def test_config_among_rules_and_modules_to_save():
    """A config in a list beside fxpeft rules stands for its rules; ``modules_to_save`` trains those modules whole."""
    config = peft.LoraConfig(target_modules=["q_proj"], r=2, modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(build_without_dropout("llama"), copy.deepcopy(config))
    ours = fxpeft.transform(build_without_dropout("llama"), [copy.deepcopy(config)])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mixed = fxpeft.transform(build_without_dropout("llama"), [peft.LoraConfig(target_modules=["q_proj"], r=2),
                                                             fxpeft.Trainable(["lm_head"])])
    assert mixed.adapters["default"].rules == ours.adapters["default"].rules


def test_inference_mode_freezes_the_adapter_as_peft_does():
    config = peft.LoraConfig(target_modules=["q_proj"], r=2, inference_mode=True)
    ours, theirs = twins("llama", config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0
    assert ours.peft_config["default"].inference_mode is True


@pytest.mark.parametrize("config, error, named", [
    (peft.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=4), UnsupportedError, "OFT"),
    (peft.LoraConfig(target_modules=["q_proj"], lora_bias=True), UnsupportedError, "lora_bias"),
    (peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"), UnsupportedError, "pissa"),
    (peft.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:",
                             tokenizer_name_or_path="some/tokenizer"), UnsupportedError, "prompt_tuning_init_text"),
    (peft.LoraConfig(target_modules=["q_proj"], lora_alpha=float("nan")), RuleError, "lora_alpha"),
    (peft.LoraConfig(target_modules=["q_proj"], lora_dropout=1.5), RuleError, "lora_dropout"),
    (peft.PromptTuningConfig(), RuleError, "num_virtual_tokens"),
], ids=["oft", "lora-bias", "pissa", "text-init", "nan-alpha", "dropout", "no-tokens"])
def test_what_fxpeft_cannot_honour_is_an_error_naming_the_field(config, error, named):
    """Unsupported types and fields, and bad values: an fxpeft error naming the config class and the field, before
    the model is touched (its parameters keep requires_grad)."""
    model = hf_model("llama")
    with pytest.raises(error, match=named) as raised:
        fxpeft.transform(model, config)
    assert type(config).__name__ in str(raised.value)
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("config, nearest", [
    (peft.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=4), "DoRA"),
    (peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10), "LoRA"),
    (peft.LNTuningConfig(target_modules=["input_layernorm"]), "Trainable"),
], ids=["oft", "adalora", "ln-tuning"])
def test_a_peft_folder_of_a_method_fxpeft_lacks_names_the_nearest_one(tmp_path, config, nearest):
    """PEFT saves the folder; loading it is an UnsupportedError that names its type and the nearest fxpeft method,
    and leaves the model as it was."""
    theirs = peft.get_peft_model(hf_model("llama"), config)
    theirs.save_pretrained(tmp_path)
    model = hf_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=f"peft_type '{config.peft_type.value}'.*nearest method fxpeft has is "
                                               f".*{nearest}"):
        fxpeft.load_adapter(model, tmp_path)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_where_only_rules_are_taken_a_config_says_how_to_convert_it():
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj"], r=2)])
    with pytest.raises(RuleError, match=r"PEFT LoraConfig.*Rule\.from_peft_config"):
        adapted.add_adapter("other", peft.LoraConfig(target_modules=["v_proj"]))


def test_fxpeft_does_not_import_peft():
    """peft is optional: importing fxpeft (and transforming with rules) never imports it."""
    code = ("import sys, fxpeft; from tests.models import mlp; fxpeft.transform(mlp(), fxpeft.LoRA(targets=['fc1']), "
            "example_inputs=__import__('torch').randn(2, 16)); assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


# -- PEFT's field names in fxpeft's rules ---------------------------------------------------------------------------
def test_lora_takes_peft_field_names_and_builds_what_peft_builds():
    """``LoRA(**kwargs)`` with PEFT's names is ``LoraConfig(**kwargs)``: the same rule as fxpeft's names, the same
    trainable count and logits as PEFT."""
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, lora_dropout=0.1, layers_to_transform=[0])
    rule = fxpeft.LoRA(**kwargs)
    assert rule == fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=16, dropout=0.1, layers=[0])
    theirs = peft.get_peft_model(build_without_dropout("llama"), peft.LoraConfig(**kwargs))
    ours = fxpeft.transform(build_without_dropout("llama"), rule)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.adapters["default"].load_peft_state_dict(randomize_peft(theirs))
    inputs = hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits, atol=1e-5,
                                   rtol=1e-5)


def test_other_rules_take_peft_field_names():
    assert fxpeft.Trainable(modules_to_save=["classifier"]) == fxpeft.Trainable(targets=["classifier"])
    assert fxpeft.PromptTuning(4, init="text", prompt_tuning_init_text="Hi", tokenizer_name_or_path="tok") == \
        fxpeft.PromptTuning(4, init="text", init_text="Hi", tokenizer="tok")
    assert fxpeft.LoRA(targets=["q"], exclude_modules=["k"]) == fxpeft.LoRA(targets=["q"], exclude=["k"])


@pytest.mark.parametrize("kwargs, named", [
    (dict(target_modules=["q_proj"], targets=["v_proj"]), r"`target_modules` \(PEFT's name for `targets`\)"),
    (dict(targets=["q_proj"], lora_alpha=8, alpha=16), r"`lora_alpha` \(PEFT's name for `alpha`\)"),
    (dict(targets=["q_proj"], rnak=4), r"unknown field\(s\) \['rnak'\].*'targets', 'r', 'alpha'"),
    (dict(targets=["q_proj"], init_lora_weights="gaussian"), r"init_lora_weights.*fxpeft's `init`"),
    (dict(targets=["q_proj"], task_type="CAUSAL_LM"), r"task_type.*drop it"),
    (dict(targets=["q_proj"], modules_to_save=["lm_head"]), r"fxpeft\.Trainable"),
])
def test_a_keyword_lora_does_not_take_is_a_rule_error_naming_its_fields(kwargs, named):
    with pytest.raises(RuleError, match=named):
        fxpeft.LoRA(**kwargs)


def test_a_field_given_by_position_and_by_name_is_a_rule_error():
    with pytest.raises(RuleError, match="given twice"):
        fxpeft.LoRA(["q_proj"], target_modules=["v_proj"])
    with pytest.raises(RuleError, match="encoder_reparameterization_type.*fxpeft's `encoder`"):
        fxpeft.PTuning(4, encoder_reparameterization_type="LSTM")


def test_rules_keep_their_signature_and_round_trips():
    """The alias machinery leaves ``inspect.signature``, ``to_dict``/``from_dict`` and ``dataclasses.replace`` alone."""
    assert list(inspect.signature(fxpeft.LoRA).parameters)[:4] == ["targets", "r", "alpha", "dropout"]
    rule = fxpeft.LoRA(target_modules=["q_proj"], lora_alpha=4)
    assert fxpeft.Rule.from_dict(rule.to_dict()) == rule
    with pytest.raises(RuleError, match="unknown field"):
        fxpeft.Rule.from_dict({**rule.to_dict(), "lora_alpha": 2})


def test_rules_from_config_is_the_codec_path():
    """The conversion is the adapter-file codec's (no second copy): a config's rules equal what that config, saved by
    PEFT as adapter_config.json fields, reads back as (without a file's tensors)."""
    config = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=2, modules_to_save=["lm_head"],
                             alpha_pattern={"q_proj": 3})
    assert rules_from_config(config) == fxpeft.Rule.from_peft_config(config.to_dict())
