"""Tied weights and base tensors shared by several adapted models (fxpeft/shared_tensors.py), against PEFT on identical
weights and the eager base model.

The tiny GPT-2 ties its head to its token embedding (``lm_head.weight`` *is* ``transformer.wte.weight``): PEFT's
``modules_to_save`` copy stands in for the module selected and nowhere else, and with ``ensure_weight_tying`` one copy
stands in for every tied module. A merge writes the shared tensor itself, so it must be refused where an adapter does
not apply at every use of it.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import AdapterLoadError, SharedTensorWarning, UnsupportedError
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout, call, fxpeft_grads, peft_grads, randomize_peft

INPUTS = hf_inputs("gpt2")
LORA = dict(target_modules=["c_attn"], r=2, lora_alpha=4)


def tied_gpt2() -> torch.nn.Module:
    model = build_without_dropout("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def untied_gpt2() -> torch.nn.Module:
    model = tied_gpt2()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def quietly(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(*args, **kwargs)


def base_logits(model=None) -> torch.Tensor:
    with torch.no_grad():
        return call(model or tied_gpt2(), INPUTS)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters(remove_duplicate=False)}


def assert_same_params(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters(remove_duplicate=False))
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("selected, tying", [(["lm_head"], False), (["wte"], False), (["wte", "lm_head"], True)],
                         ids=["head", "embedding", "both-one-copy"])
def test_trainable_on_a_tied_tensor_matches_peft(selected, tying):
    """The copy serves the module selected and nowhere else (PEFT's modules_to_save); both selected: one copy serves
    both (PEFT's ensure_weight_tying): same keys, counts, logits, gradients and logits after a step."""
    peft_model = quietly(peft.get_peft_model, tied_gpt2(), peft.LoraConfig(
        **LORA, modules_to_save=list(selected), ensure_weight_tying=tying))
    state = randomize_peft(peft_model, seed=3, scale=0.5)
    adapted = quietly(fxpeft.transform, tied_gpt2(), [fxpeft.LoRA(targets=["c_attn"], r=2, alpha=4),
                                                      fxpeft.Trainable(targets=selected)])
    assert sorted(adapted.adapter_state_dict()) == sorted(state)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    adapted.adapters["default"].load_peft_state_dict(state)
    for model in (peft_model, adapted):
        model.train()
        model.zero_grad(set_to_none=True)
    ours, theirs = adapted(**INPUTS, labels=INPUTS["input_ids"]), peft_model(**INPUTS, labels=INPUTS["input_ids"])
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert (ours.logits - base_logits()).abs().max() > 0.5
    ours.loss.backward()
    theirs.loss.backward()
    grads_ours, grads_theirs = fxpeft_grads(adapted), peft_grads(peft_model)
    for key, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-4, atol=1e-6)
    for model in (peft_model, adapted):
        torch.optim.SGD([t for t in model.parameters() if t.requires_grad], lr=0.5).step()
        model.eval()
    torch.testing.assert_close(base_logits(adapted), base_logits(peft_model), rtol=1e-5, atol=1e-5)
    saved = adapted.adapter_state_dict()
    if len(selected) == 2:  # never two copies drifting apart
        assert torch.equal(saved["base_model.model.lm_head.weight"], saved["base_model.model.transformer.wte.weight"])


def test_one_copy_round_trips_through_peft_files(tmp_path):
    """fxpeft's one copy of the tied pair saves as PEFT's ensure_weight_tying, and loads back in PEFT and fxpeft;
    PEFT's own ensure_weight_tying folder loads in fxpeft."""
    peft_model = quietly(peft.get_peft_model, tied_gpt2(), peft.LoraConfig(
        **LORA, modules_to_save=["lm_head"], ensure_weight_tying=True)).eval()
    state = randomize_peft(peft_model, seed=4, scale=0.5)
    adapted = fxpeft.transform(tied_gpt2(), [fxpeft.LoRA(targets=["c_attn"], r=2, alpha=4),
                                             fxpeft.Trainable(targets=["wte", "lm_head"])]).eval()
    adapted.adapters["default"].load_peft_state_dict(state)
    want = base_logits(peft_model)
    torch.testing.assert_close(base_logits(adapted), want, rtol=1e-5, atol=1e-5)

    adapted.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and config["modules_to_save"] == ["lm_head", "transformer.wte"]
    theirs = quietly(peft.PeftModel.from_pretrained, tied_gpt2(), tmp_path / "ours").eval()
    wrapper = theirs.base_model.model
    head, embedding = wrapper.lm_head.modules_to_save["default"], wrapper.transformer.wte.modules_to_save["default"]
    assert head.weight is embedding.weight
    torch.testing.assert_close(base_logits(theirs), want, rtol=1e-5, atol=1e-5)
    again = fxpeft.load_adapter(tied_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(base_logits(again), want, rtol=1e-5, atol=1e-5)

    peft_model.save_pretrained(tmp_path / "peft")  # modules_to_save ["transformer.wte"], lm_head's key beside it
    loaded = fxpeft.load_adapter(tied_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(base_logits(loaded), want, rtol=1e-5, atol=1e-5)
    assert len([t for t in loaded.adapters["default"].parameters() if t.shape == (128, 64)]) == 1  # one copy


def test_a_file_with_two_diverged_copies_of_one_tied_tensor(tmp_path):
    """PEFT without ensure_weight_tying trains two copies; fxpeft will not load them into one (a clear error), and
    loads them into an untied base model as PEFT runs them."""
    peft_model = quietly(peft.get_peft_model, tied_gpt2(), peft.LoraConfig(
        **LORA, modules_to_save=["wte", "lm_head"])).eval()
    randomize_peft(peft_model, seed=5, scale=0.5)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"(?s)lm_head\.weight.*transformer\.wte\.weight.*untie"):
        fxpeft.load_adapter(tied_gpt2(), tmp_path)
    loaded = fxpeft.load_adapter(untied_gpt2(), tmp_path).eval()
    torch.testing.assert_close(base_logits(loaded), base_logits(peft_model), rtol=1e-5, atol=1e-5)


def test_lora_on_a_tied_head_warns_and_merge_refuses_before_writing():
    """PEFT warns and then merges into the tied tensor (the embedding changes too); fxpeft warns at transform and
    refuses merge() before writing anything. Untied, the same adapter merges."""
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        peft_model = peft.get_peft_model(tied_gpt2(), peft.LoraConfig(target_modules=["lm_head"], r=2)).eval()
    state = {key: value for key, value in randomize_peft(peft_model, seed=6, scale=0.5).items() if ".lora_" in key}
    unmerged = base_logits(peft_model)
    with pytest.warns(SharedTensorWarning, match=r"lm_head\.weight.*transformer\.wte\.weight"):
        adapted = fxpeft.transform(tied_gpt2(), [fxpeft.LoRA(targets=["lm_head"], r=2)])
    adapted.adapters["default"].load_peft_state_dict(state)
    adapted.eval()
    torch.testing.assert_close(base_logits(adapted), unmerged, rtol=1e-5, atol=1e-5)
    before = params(adapted.base_model)
    for attempt in (adapted.merge, adapted.merge_and_unload):
        with pytest.raises(UnsupportedError, match=r"(?s)nothing was merged.*lm_head\.weight.*transformer\.wte\.weight"
                           r".*torch\.nn\.Parameter\(model\.lm_head\.weight\.detach\(\)\.clone\(\)\)"):
            attempt()
        assert_same_params(adapted.base_model, before)
        assert adapted.merged_adapters == []
        assert torch.equal(base_logits(adapted), unmerged)
    # What the refusal prevents: PEFT's merge writes the delta into the embedding as well.
    assert (base_logits(quietly(peft_model.merge_and_unload)) - unmerged).abs().max() > 1.0

    # Untied after transform is no fix (the graph reads one tensor for both): still refused.
    adapted.base_model.lm_head.weight = torch.nn.Parameter(adapted.base_model.lm_head.weight.detach().clone())
    with pytest.raises(UnsupportedError, match=r"op of transformer\.wte"):
        adapted.merge()

    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedTensorWarning)
        untied = fxpeft.transform(untied_gpt2(), [fxpeft.LoRA(targets=["lm_head"], r=2)])
    untied.adapters["default"].load_peft_state_dict(state)
    untied.eval()
    torch.testing.assert_close(base_logits(untied), unmerged, rtol=1e-5, atol=1e-5)
    merged_model = untied.merge_and_unload()
    torch.testing.assert_close(base_logits(merged_model), unmerged, rtol=1e-4, atol=1e-4)


def test_merging_trained_copies_of_a_tied_tensor():
    """A copy serving only the head would change the embedding when merged: refused. One copy serving both uses
    merges, and the merged base model (eager) gives the unmerged outputs."""
    for selected in (["lm_head"], ["wte"]):
        with pytest.warns(SharedTensorWarning, match=r"Trainable\(targets="):
            adapted = fxpeft.transform(tied_gpt2(), [fxpeft.Trainable(targets=selected)])
        before = params(adapted.base_model)
        with pytest.raises(UnsupportedError, match=r"Trainable\(targets=\['(lm_head', 'transformer\.wte|transformer"
                                                   r"\.wte', 'lm_head)'\]\)"):
            adapted.merge()
        assert_same_params(adapted.base_model, before)

    adapted = fxpeft.transform(tied_gpt2(), [fxpeft.Trainable(targets=["wte", "lm_head"])]).eval()
    (copy_site,) = adapted.site_modules()
    with torch.no_grad():
        copy_site.weight.add_(torch.randn(copy_site.weight.shape, generator=torch.Generator().manual_seed(7)))
    unmerged = base_logits(adapted)
    merged_model = adapted.merge_and_unload()
    assert merged_model.lm_head.weight is merged_model.transformer.wte.weight
    assert torch.equal(merged_model.transformer.wte.weight, copy_site.weight)
    torch.testing.assert_close(base_logits(merged_model), unmerged, rtol=1e-5, atol=1e-5)


def test_two_adapted_models_on_one_base_model():
    """Merging one would silently change the other's outputs: a warning at the second transform, merge() refused
    while both are alive; a deleted (or unloaded) adapted model blocks nothing."""
    base = tied_gpt2()
    first = fxpeft.transform(base, [fxpeft.LoRA(targets=["c_attn"], r=2)]).eval()
    with pytest.warns(SharedTensorWarning, match="copy.deepcopy"):
        second = fxpeft.transform(base, [fxpeft.LoRA(targets=["c_attn"], r=2)]).eval()
    with torch.no_grad():
        for site in first.site_modules():
            site.lora_B.normal_(generator=torch.Generator().manual_seed(8))
    unmerged, other = base_logits(first), base_logits(second)
    before = params(base)
    with pytest.raises(UnsupportedError, match=r"(?s)adapted model at 0x.*c_attn\.weight.*copy\.deepcopy"):
        first.merge()
    assert_same_params(base, before)
    assert torch.equal(base_logits(second), other)

    del second
    gc.collect()
    first.merge()
    torch.testing.assert_close(base_logits(first), unmerged, rtol=1e-4, atol=1e-4)
    merged_model = first.merge_and_unload()  # hands the base model back: ``first`` no longer counts
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedTensorWarning)
        again = fxpeft.transform(merged_model, [fxpeft.LoRA(targets=["c_attn"], r=2)])
        separate = fxpeft.transform(copy.deepcopy(merged_model), [fxpeft.LoRA(targets=["c_attn"], r=2)])
    again.merge()
    separate.merge()  # a deep copy shares nothing
