"""The p-tuning pass (passes/ptuning.py): parity with PEFT's ``PromptEncoderConfig`` (MLP and LSTM encoders),
and its files: PEFT's ``prompt_embeddings`` (the encoder's output) plus the encoder's weights for resuming.

The graph rewrite is prompt tuning's (tested in test_prompt.py: padding, compile, errors); these tests cover
what differs, the encoder. PEFT's encoder weights are copied into fxpeft under fxpeft's own keys.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

import fxpeft
from fxpeft.rules import PromptTuning, PTuning
from tests.passes.peft_reference import build_without_dropout
from tests.passes.test_prompt import (
    TASKS,
    assert_same_outputs,
    labelled_inputs,
    tagged,
    virtual_pair,
)


def copy_encoder(adapted: fxpeft.AdaptedModel, reference) -> None:
    encoder = reference.prompt_encoder["default"]
    next(adapted.site_modules()).load_peft_state_dict(
        {f"fxpeft.prompt_encoder.{key}": value for key, value in encoder.state_dict().items()})


@pytest.mark.parametrize("family,encoder", [("llama", "mlp"), ("gpt2", "lstm"), ("t5", "mlp")])
def test_ptuning_matches_peft(family, encoder):
    n = 4
    inputs = labelled_inputs(family)
    config = peft.PromptEncoderConfig(task_type=TASKS[family], num_virtual_tokens=n, encoder_hidden_size=32,
                                      encoder_reparameterization_type=encoder.upper())
    adapted, reference = virtual_pair(family, [PTuning(n, encoder=encoder, encoder_hidden_size=32)], config, inputs)
    copy_encoder(adapted, reference)
    assert tagged(adapted, "p_tuning")
    for training in (True, False):
        adapted.train(training), reference.train(training)
        assert_same_outputs(adapted, reference, inputs)
        assert_same_outputs(adapted, reference, labelled_inputs(family, batch=3, seq=12, seed=5))
    adapted.train(), reference.train()
    adapted(**inputs).loss.backward()
    reference(**inputs).loss.backward()
    site, theirs = next(adapted.site_modules()), reference.prompt_encoder["default"]
    torch.testing.assert_close(site.embedding.grad, theirs.embedding.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(site.mlp_head_0_weight.grad, theirs.mlp_head[0].weight.grad, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == \
        sum(p.numel() for p in reference.parameters() if p.requires_grad)
    # What PEFT saves is the encoder's output.
    torch.testing.assert_close(site.peft_state_dict()["prompt_embeddings"],
                               peft.get_peft_model_state_dict(reference)["prompt_embeddings"])


def test_files_resume_in_fxpeft_and_load_in_peft(tmp_path):
    """Through the public API only: ``save_adapter`` writes PEFT's p-tuning files (the encoder's output as PEFT's
    prompt, plus the encoder's weights); PEFT loads them with fxpeft's outputs, ``fxpeft.load_adapter`` gets the
    encoder back to resume training, and PEFT's own file (the output only) loads as the prompt it is."""
    inputs = labelled_inputs("llama")
    adapted = fxpeft.transform(build_without_dropout("llama"), PTuning(3, encoder_hidden_size=16)).eval()
    adapted.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["encoder_reparameterization_type"] == "MLP"
    assert config["encoder_hidden_size"] == 16 and config["token_dim"] == 64
    # PEFT reads the saved output as its prompt (as it does for its own files).
    loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), str(tmp_path / "ours")).eval()
    assert_same_outputs(adapted, loaded, inputs)
    # fxpeft reads the encoder back: training can resume.
    again = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "ours", is_trainable=True).eval()
    assert isinstance(again.adapters["default"].rules[0], PTuning)
    pairs = list(zip(next(adapted.site_modules()).named_parameters(), next(again.site_modules()).parameters()))
    assert len(pairs) == len(list(next(adapted.site_modules()).parameters())) > 1
    for (name, ours), theirs in pairs:
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, msg=name)
        assert theirs.requires_grad, name
    assert_same_outputs(again, loaded, inputs)
    # PEFT's own file has only the output: it loads as the prompt it is.
    loaded.save_pretrained(str(tmp_path / "theirs"))
    from_peft = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "theirs").eval()
    assert isinstance(from_peft.adapters["default"].rules[0], PromptTuning)
    assert_same_outputs(from_peft, loaded, inputs)
