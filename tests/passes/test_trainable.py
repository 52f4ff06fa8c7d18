"""The Trainable pass (passes/trainable.py) against PEFT's ``modules_to_save`` on identical weights."""

from __future__ import annotations

import functools

import peft
import pytest
import torch

import fxpeft
from fxpeft.adapters import ParameterCopy
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout, call, fxpeft_grads, peft_grads, printed, randomize_peft

INPUTS = hf_inputs("bert")
LABELS = torch.tensor([0, 1])


@functools.lru_cache(maxsize=None)
def models():
    """bert sequence classification: LoRA on query/value, the classifier head trained whole."""
    peft_model = peft.get_peft_model(build_without_dropout("bert"), peft.LoraConfig(
        target_modules=["query", "value"], r=4, lora_alpha=8, modules_to_save=["classifier"]))
    adapted = fxpeft.transform(build_without_dropout("bert"),
                               [fxpeft.LoRA(targets=["query", "value"], r=4, alpha=8),
                                fxpeft.Trainable(targets=["classifier"])], example_kwargs=INPUTS)
    return peft_model, adapted


def test_fresh_copies_are_the_base_model():
    _, adapted = models()
    copies = [site for site in adapted.adapters["default"].site_modules() if isinstance(site, ParameterCopy)]
    assert sorted(site.path for site in copies) == ["classifier.bias", "classifier.weight"]
    for site in copies:
        site.reset_parameters()
    for site in adapted.adapters["default"].site_modules():
        site.reset_parameters()
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(call(adapted, INPUTS), call(build_without_dropout("bert"), INPUTS))


def test_keys_counts_and_printout_match_peft():
    peft_model, adapted = models()
    ours, theirs = adapted.adapter_state_dict(), peft.get_peft_model_state_dict(peft_model)
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.classifier.weight" in ours and "base_model.model.classifier.bias" in ours
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # PEFT counts the kept original head and its trainable copy.
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert printed(adapted.print_trainable_parameters) == printed(peft_model.print_trainable_parameters)


def test_logits_gradients_and_a_step_match_peft():
    peft_model, adapted = models()
    base_head = {name: t.clone() for name, t in adapted.base_model.classifier.named_parameters()}
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(peft_model, seed=7, scale=0.3))
    for model in (peft_model, adapted):
        model.zero_grad(set_to_none=True)
        model.train()
    ours, theirs = adapted(**INPUTS, labels=LABELS), peft_model(**INPUTS, labels=LABELS)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.logits, call(build_without_dropout("bert"), INPUTS), atol=1e-4)
    ours.loss.backward()
    theirs.loss.backward()
    grads_ours, grads_theirs = fxpeft_grads(adapted), peft_grads(peft_model)
    assert sorted(grads_ours) == sorted(grads_theirs)
    for key, grad in grads_theirs.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-5, atol=1e-7)
    for model in (peft_model, adapted):
        torch.optim.SGD([t for t in model.parameters() if t.requires_grad], lr=0.5).step()
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(call(adapted, INPUTS), call(peft_model, INPUTS), rtol=1e-5, atol=1e-6)
    for name, tensor in adapted.base_model.classifier.named_parameters():
        assert torch.equal(tensor, base_head[name]) and not tensor.requires_grad, name
    assert not torch.equal(adapted.adapter_state_dict()["base_model.model.classifier.weight"], base_head["weight"])
    for site in adapted.adapters["default"].site_modules():
        site.reset_parameters()


def test_no_match_names_close_modules():
    base = build_without_dropout("bert")
    with pytest.raises(fxpeft.errors.NoMatchError, match="classifier"):
        fxpeft.transform(base, [fxpeft.LoRA(targets=["query"]), fxpeft.Trainable(targets=["classifer"])],
                         example_kwargs=INPUTS)
    assert all(t.requires_grad for t in base.parameters())  # a failed transform freezes nothing
