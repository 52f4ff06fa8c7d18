"""LoRA on raw parameters (``LoRA(target_parameters=...)``, PEFT's ``ParamWrapper``) held against PEFT on identical
weights: tiny Mixtral (grouped_mm experts) and Qwen3-MoE (batched_mm experts), their 3-D expert stacks adapted."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import CaptureError, RuleError, UnsupportedError
from tests.models import moe_model
from tests.passes.peft_reference import fxpeft_grads, peft_grads, randomize_peft

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
EXPERTS = "model.layers.0.mlp.experts"


def ids(batch: int, seq: int, seed: int = 1) -> dict:
    return {"input_ids": torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))}


def logits(model, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


def twins(family="mixtral", implementation=None, targets=("q_proj",), r=2, alpha=4, seed=5):
    """PEFT's model and fxpeft's on one seeded base, PEFT's random LoRA weights loaded into both."""
    config = peft.LoraConfig(target_modules=list(targets), target_parameters=PARAMS, r=r, lora_alpha=alpha)
    peft_model = peft.get_peft_model(moe_model(family, implementation), config).eval()
    state = randomize_peft(peft_model, seed=seed, scale=0.2)
    adapted = fxpeft.transform(moe_model(family, implementation), [fxpeft.LoRA(
        targets=list(targets) or None, target_parameters=PARAMS, r=r, alpha=alpha)])
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval(), state


@pytest.fixture(scope="module")
def mixtral():
    return twins()


def test_keys_shapes_and_counts_are_peft(mixtral):
    peft_model, adapted, state = mixtral
    keys = adapted.adapters["default"].peft_keys()
    assert keys == {key: tuple(value.shape) for key, value in state.items()}
    # PEFT nests a ParamWrapper per parameter, the first registered (gate_up_proj) innermost
    assert keys[f"base_model.model.{EXPERTS}.base_layer.lora_A.weight"] == (2 * 4, 32)   # [r * E, hidden]
    assert keys[f"base_model.model.{EXPERTS}.base_layer.lora_B.weight"] == (128, 2 * 4)  # [2 * inter, r * E]
    assert keys[f"base_model.model.{EXPERTS}.lora_A.weight"] == (2 * 4, 64)              # down_proj: in = inter
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


def test_logits_are_peft_bit_for_bit_at_two_sizes(mixtral):
    peft_model, adapted, _ = mixtral
    base = [logits(adapted.base_model, ids(2, 9)), logits(adapted.base_model, ids(3, 5))]
    for inputs, plain in zip((ids(2, 9), ids(3, 5)), base):
        got = logits(adapted, inputs)
        assert torch.equal(got, logits(peft_model, inputs))
        assert not torch.allclose(got, plain, atol=1e-4)  # the adapter does something


def test_gradients_equal_peft(mixtral):
    peft_model, adapted, _ = mixtral
    inputs = ids(2, 7, seed=3)
    for model in (peft_model, adapted):
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.square().mean().backward()
    want, got = peft_grads(peft_model), fxpeft_grads(adapted)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-8, msg=key)
    assert got[f"base_model.model.{EXPERTS}.lora_B.weight"].abs().sum() > 0
    for model in (peft_model, adapted):
        model.zero_grad(set_to_none=True)


def test_zero_adapter_disable_and_mixed_rows():
    adapted = fxpeft.transform(moe_model(), [fxpeft.LoRA(target_parameters=PARAMS, r=2)]).eval()
    base = adapted.base_model
    assert torch.equal(logits(adapted, ids(2, 9)), logits(base, ids(2, 9)))  # B = 0: the base bit for bit
    with torch.no_grad():
        for p in adapted.adapters["default"].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.equal(logits(adapted, ids(2, 9)), logits(base, ids(2, 9)))
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, ids(2, 9)), logits(base, ids(2, 9)))
    with pytest.raises(UnsupportedError, match="target_parameters"):
        logits(adapted, ids(2, 9), adapter_names=["default", "__base__"])


def test_merge_unmerge_and_unload_are_peft():
    peft_model, adapted, _ = twins(targets=())
    original = adapted.base_model.get_parameter(f"{EXPERTS}.down_proj").detach().clone()
    want = logits(adapted, ids(2, 9))
    adapted.merge()
    reference = copy.deepcopy(peft_model)
    reference.merge_adapter()
    for name in ("gate_up_proj", "down_proj"):
        merged = reference.base_model.model.get_submodule(EXPERTS).get_base_layer().get_parameter(name)
        assert torch.equal(adapted.base_model.get_parameter(f"{EXPERTS}.{name}"), merged)
    torch.testing.assert_close(logits(adapted, ids(2, 9)), want, rtol=1e-5, atol=1e-5)
    adapted.unmerge()
    torch.testing.assert_close(adapted.base_model.get_parameter(f"{EXPERTS}.down_proj"), original, rtol=0,
                               atol=1e-6)
    unloaded = adapted.merge_and_unload()
    want_unloaded = peft_model.merge_and_unload()
    assert torch.equal(unloaded.get_parameter(f"{EXPERTS}.gate_up_proj"),
                       want_unloaded.get_parameter(f"{EXPERTS}.gate_up_proj"))
    torch.testing.assert_close(logits(unloaded, ids(2, 9)), logits(want_unloaded, ids(2, 9)), rtol=0, atol=0)


def test_files_both_ways(mixtral, tmp_path):
    peft_model, adapted, _ = mixtral
    adapted.save_adapter(tmp_path / "fx")
    config = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(PARAMS) and config["target_modules"] == ["q_proj"]
    loaded = peft.PeftModel.from_pretrained(moe_model(), tmp_path / "fx").eval()
    assert torch.equal(logits(loaded, ids(2, 9)), logits(adapted, ids(2, 9)))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fxpeft.load_adapter(moe_model(), tmp_path / "peft").eval()
    assert ours.adapters["default"].rules[0].target_parameters == tuple(sorted(PARAMS))
    assert torch.equal(logits(ours, ids(3, 5)), logits(peft_model, ids(3, 5)))


def test_peft_config_object_and_transposed_batched_mm_experts():
    """``transform`` takes PEFT's config object. GPT-OSS with transformers' batched_mm experts, parameters only: its
    experts are stored [E, in, out] (``is_transposed``), so A and B fold the other way round; merged as PEFT's."""
    config = peft.LoraConfig(target_modules=[], target_parameters=PARAMS, r=4, lora_alpha=8, use_rslora=True)
    peft_model = peft.get_peft_model(moe_model("gpt_oss", "batched_mm"), copy.deepcopy(config)).eval()
    state = randomize_peft(peft_model, scale=0.2)
    adapted = fxpeft.transform(moe_model("gpt_oss", "batched_mm"), config).eval()
    rule = adapted.adapters["default"].rules[0]
    assert rule.targets is None and rule.target_parameters == tuple(sorted(PARAMS)) and rule.use_rslora
    adapted.adapters["default"].load_peft_state_dict(state)
    assert adapted.adapters["default"].peft_keys() == {key: tuple(value.shape) for key, value in state.items()}
    assert torch.equal(logits(adapted, ids(2, 9)), logits(peft_model, ids(2, 9)))
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    adapted.merge()
    peft_model.merge_adapter()
    merged = peft_model.base_model.model.get_submodule(EXPERTS).get_base_layer().down_proj
    assert torch.equal(adapted.base_model.get_parameter(f"{EXPERTS}.down_proj"), merged)


def test_two_adapters_compile_fullgraph_without_recompiles(mixtral):
    from torch._dynamo.utils import counters

    peft_model, adapted, state = mixtral
    adapted = copy.deepcopy(adapted)
    adapted.add_adapter("other", [fxpeft.LoRA(target_parameters=PARAMS, r=2, alpha=4, init="random")])
    peft_other = copy.deepcopy(peft_model)
    peft_other.add_adapter("other", peft.LoraConfig(target_modules=[], target_parameters=PARAMS, r=2, lora_alpha=4))
    peft.set_peft_model_state_dict(peft_other, adapted.adapters["other"].peft_state_dict(), adapter_name="other")
    peft_other.set_adapter("other")
    adapted.set_adapter("other")
    assert torch.equal(logits(adapted, ids(2, 9)), logits(peft_other, ids(2, 9)))
    # both at once: PEFT adds W + (d1 + d2), fxpeft (W + d1) + d2 (the module docstring): equal within rounding
    adapted.set_adapter(["default", "other"])
    peft_other.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(adapted, ids(2, 9)), logits(peft_other, ids(2, 9)), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(adapted, backend="aot_eager", fullgraph=True, dynamic=True)
    for name, inputs in (("other", ids(2, 9)), ("other", ids(3, 6)), ("default", ids(2, 7))):
        adapted.set_adapter(name)
        torch.testing.assert_close(logits(compiled, inputs), logits(adapted, inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(compiled, ids(2, 7)), logits(peft_model, ids(2, 7)), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not sum(counters["graph_break"].values())


def test_eager_experts_are_a_capture_error_and_leave_the_model_as_it_was():
    """The README's note: transformers' ``eager`` experts loop over the experts a batch hits (data-dependent), which
    torch.export cannot capture; fxpeft says so with a CaptureError, and the model keeps training as before."""
    model = moe_model("mixtral", "eager")
    with pytest.raises(CaptureError, match="data-dependent"):
        fxpeft.transform(model, [fxpeft.LoRA(target_parameters=["experts.gate_up_proj"], r=2)])
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_invalid_rules_fail_at_construction():
    with pytest.raises(RuleError, match="list of parameter names"):
        fxpeft.LoRA(target_parameters="experts.down_proj")
    with pytest.raises(RuleError, match="dropout"):
        fxpeft.LoRA(target_parameters=PARAMS, dropout=0.1)
    with pytest.raises(RuleError, match="use_dora"):
        fxpeft.LoRA(target_parameters=PARAMS, use_dora=True)
    with pytest.raises(RuleError, match="targets"):
        fxpeft.LoRA()
    assert fxpeft.LoRA.from_dict(fxpeft.LoRA(target_parameters=PARAMS).to_dict()).target_parameters == \
        tuple(sorted(PARAMS))
    with pytest.raises(RuleError, match="orthogonal"):
        fxpeft.LoRA(target_parameters=PARAMS, init="orthogonal", r=2)


def test_check_knows_the_keys(mixtral, tmp_path):
    """``fxpeft.verify`` (``fxpeft check``) on a saved folder, with a declared rule whose r is too small for the
    parameters only: every key is known (no key or shape finding), the one finding per parameter is that rank;
    add_weighted_adapter refuses raw-parameter sites rather than combining them wrongly."""
    _, adapted, _ = mixtral
    adapted.save_adapter(tmp_path)
    rules = [{"method": "lora", "targets": ["q_proj"], "r": 2}, {"method": "lora", "r": 1, "target_parameters": PARAMS}]
    report = fxpeft.verify(moe_model(), tmp_path, rules=rules)
    flagged = sorted(f.subject for f in report.findings if f.severity == "error")
    assert {f.kind for f in report.findings if f.severity == "error"} == {"rules-violation"}
    assert flagged == sorted(f"model.layers.{i}.mlp.experts.{name}" for i in (0, 1)
                             for name in ("down_proj", "gate_up_proj")), flagged
    with pytest.raises(UnsupportedError, match="target_parameters"):
        adapted.add_weighted_adapter(["default"], [1.0], "combined")


def test_bfloat16_base_is_peft():
    """Over a bfloat16 base PEFT keeps A and B in float32 and folds them in bfloat16 (lhs/rhs cast to W's dtype)."""
    config = peft.LoraConfig(target_modules=[], target_parameters=PARAMS, r=2, lora_alpha=4)
    peft_model = peft.get_peft_model(moe_model().to(torch.bfloat16), config).eval()
    state = randomize_peft(peft_model, scale=0.2)
    adapted = fxpeft.transform(moe_model().to(torch.bfloat16), [fxpeft.LoRA(target_parameters=PARAMS, r=2,
                                                                            alpha=4)]).eval()
    site = next(adapted.adapters["default"].site_modules())
    assert site.lora_A.dtype == torch.float32
    adapted.adapters["default"].load_peft_state_dict(state)
    assert torch.equal(logits(adapted, ids(2, 9)), logits(peft_model, ids(2, 9)))


def test_peft_config_fields_both_ways():
    """A parameters-only rule is PEFT's config with ``target_modules=[]`` (PEFT writes that; None would make PEFT
    fill in its default targets for the model type), and reads back from PEFT's dict."""
    config = fxpeft.LoRA(target_parameters=PARAMS, r=2, alpha=4).to_peft_config()
    assert isinstance(config, peft.LoraConfig) and not config.target_modules
    assert sorted(config.target_parameters) == sorted(PARAMS)
    (rule,) = fxpeft.LoRA.from_peft_config(config)
    assert rule == fxpeft.LoRA(target_parameters=PARAMS, r=2, alpha=4)
    with pytest.raises(UnsupportedError, match="neither target_modules nor target_parameters"):
        fxpeft.LoRA.from_peft_config({"peft_type": "LORA", "target_modules": [], "target_parameters": []})
