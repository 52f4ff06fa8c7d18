"""Bottleneck adapters (passes/bottleneck.py): Houlsby and Pfeiffer placement found by data flow, held against a
hand-written reference of the papers' formula.

AdapterHub's ``adapters`` 1.3 (the method's usual home) requires transformers ~=4.57 and does not install beside
transformers 5.24, and PEFT has no bottleneck adapters, so the reference is the eager base model with forward hooks
that replace each adapted linear's output ``h`` by ``h + scaling * up(act(down(h)))``, on the adapter's own tensors.
Built models are shared within the module (one adapted model per family).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft.errors import AdapterLoadError, RuleError, UnsupportedError
from fxpeft.passes.bottleneck import PEFT_TYPE, Bottleneck, BottleneckSite
from tests.models import hf_inputs
from tests.passes.harness import BASE, add_noise, hooked_call
from tests.passes.peft_reference import build_without_dropout

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
# family -> the rule its shared adapted model is built with (gpt2: Conv1D linears, t5: encoder-decoder)
RULES = {"llama": Bottleneck(reduction_factor=8),
         "gpt2": Bottleneck(reduction_factor=4, placement="pfeiffer", non_linearity="gelu"),
         "t5": Bottleneck(reduction_factor=16, non_linearity="tanh", scaling=0.5)}


class BottleneckHooks:
    """The reference: the eager base model with each adapted linear's output ``h`` replaced by
    ``h + scaling * up(act(down(h)))`` (forward hooks), on the adapter's own tensors."""

    def __init__(self, adapted: fxpeft.AdaptedModel, adapter_name: str = "default"):
        self.model = adapted.base_model
        rule = next(rule for rule in adapted.adapters[adapter_name].rules if isinstance(rule, Bottleneck))
        self.act, self.scaling = _ACTIVATIONS[rule.non_linearity], rule.scaling
        self.sites = {site.path: site for site in adapted.site_modules(adapter_name)}

    def _hook(self, site: BottleneckSite):
        def hook(module, args, h):
            down = F.linear(h, site.down_weight, site.down_bias)
            return h + self.scaling * F.linear(self.act(down), site.up_weight, site.up_bias)

        return hook

    def __call__(self, **inputs):
        return hooked_call(self.model, {path: self._hook(site) for path, site in self.sites.items()}, **inputs)


@pytest.fixture(scope="module")
def models() -> dict:
    """family -> (adapted model, its base's logits on ``hf_inputs(family)``), built once for the module."""
    built = {}
    for family, rule in RULES.items():
        data = hf_inputs(family)
        with torch.no_grad():
            base_out = build_without_dropout(family)(**data).logits
        built[family] = (fxpeft.transform(build_without_dropout(family), rule, example_kwargs=data).eval(), base_out)
    return built


def fresh(adapted: fxpeft.AdaptedModel) -> fxpeft.AdaptedModel:
    """Every adapter back to its initial state, the default adapter alone active, eval mode."""
    for site in adapted.site_modules():
        site.reset_parameters()
    adapted.set_adapter("default")
    return adapted.eval()


def logits(model, data: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**data, **extra).logits


def adapter_parameters(adapted: fxpeft.AdaptedModel, name: str = "default") -> dict[str, torch.Tensor]:
    return dict(adapted.adapters[name].peft_state_dict())


# -- numerics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(RULES))
def test_reference_parity_logits_and_gradients(models, family):
    """Trained-looking weights: the logits and the gradients of every adapter tensor equal the hooked reference's."""
    adapted, base_out = models[family]
    fresh(adapted)
    add_noise(adapted, scale=0.2)
    data = hf_inputs(family, batch=3, seq=7, seed=4)
    reference = BottleneckHooks(adapted)
    params = adapter_parameters(adapted)
    outputs, grads = [], []
    adapted.train()
    reference.model.train()
    try:
        for model in (adapted, reference):
            out = model(**data).logits
            outputs.append(out.detach())
            grads.append(dict(zip(params, torch.autograd.grad(out.square().mean(), list(params.values())))))
    finally:
        adapted.eval()
        reference.model.eval()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(adapted, hf_inputs(family)), base_out, atol=1e-3), "the adapter changed nothing"
    for key in params:
        assert grads[0][key].abs().sum() > 0, f"no gradient reaches {key}"
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("family", list(RULES))
def test_fresh_adapter_and_disabled_are_the_base_bit_for_bit(models, family):
    adapted, base_out = models[family]
    data = hf_inputs(family)
    assert torch.equal(logits(fresh(adapted), data), base_out)
    site = next(adapted.site_modules())
    assert site.down_weight.std().item() == pytest.approx(1e-2, rel=0.3)  # Houlsby's near-identity init
    assert not site.down_bias.any() and not site.up_weight.any() and not site.up_bias.any()
    add_noise(adapted)
    assert not torch.equal(logits(adapted, data), base_out)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, data), base_out)


def _paths(family: str, rule: Bottleneck) -> list[str]:
    adapted = fxpeft.transform(build_without_dropout(family), rule, example_kwargs=hf_inputs(family))
    return sorted(site.path for site in adapted.site_modules())


def test_sites_by_placement_per_layer(models):
    """Houlsby: after every attention output projection and feed-forward output linear (cross-attention included);
    Pfeiffer: after the feed-forward output only. Widths: hidden // reduction_factor, at least 1."""
    llama = sorted(site.path for site in models["llama"][0].site_modules())
    assert llama == [f"model.layers.{i}.{name}" for i in range(2) for name in ("mlp.down_proj", "self_attn.o_proj")]
    assert {site.width for site in models["llama"][0].site_modules()} == {64 // 8}
    assert sorted(site.path for site in models["gpt2"][0].site_modules()) == [f"transformer.h.{i}.mlp.c_proj"
                                                                            for i in range(2)]
    t5 = sorted(site.path for site in models["t5"][0].site_modules())
    assert t5 == sorted([f"encoder.block.{i}.layer.{name}" for i in range(2)
                         for name in ("0.SelfAttention.o", "1.DenseReluDense.wo")] +
                        [f"decoder.block.{i}.layer.{name}" for i in range(2)
                         for name in ("0.SelfAttention.o", "1.EncDecAttention.o", "2.DenseReluDense.wo")])
    assert _paths("llama", Bottleneck(placement="pfeiffer")) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert _paths("gpt2", Bottleneck()) == [f"transformer.h.{i}.{name}" for i in range(2)
                                           for name in ("attn.c_proj", "mlp.c_proj")]
    # targets name the linears instead; a huge reduction factor still leaves one unit
    adapted = fxpeft.transform(build_without_dropout("llama"), Bottleneck(targets=["o_proj"], reduction_factor=1000),
                               example_kwargs=hf_inputs("llama"))
    assert [(site.path, site.width) for site in adapted.site_modules()] == \
        [(f"model.layers.{i}.self_attn.o_proj", 1) for i in range(2)]


@pytest.mark.parametrize("family, attention, feedforward", [
    ("bart", ["model.encoder.layers.{}.self_attn.out_proj", "model.decoder.layers.{}.self_attn.out_proj",
              "model.decoder.layers.{}.encoder_attn.out_proj"], ["model.encoder.layers.{}.fc2",
                                                                 "model.decoder.layers.{}.fc2"]),
    ("bert", ["bert.encoder.layer.{}.attention.output.dense"], ["bert.encoder.layer.{}.output.dense"]),
])
def test_sublayer_roles_by_data_flow(family, attention, feedforward):
    """The roles the placements use, read off the graph of post-norm models too (no module-name table):
    ``attention.output`` and ``feedforward.output`` (the last linear of every other residual sublayer)."""
    from fxpeft.adapters import Adapter
    from fxpeft.capture import capture
    from fxpeft.rewrite import RewriteContext

    model = build_without_dropout(family)
    ctx = RewriteContext(capture(model, hf_inputs(family)), model, "default", Adapter([]))
    assert ctx.roles["attention.output"] == {path.format(i) for path in attention for i in range(2)}
    assert ctx.roles["feedforward.output"] == {path.format(i) for path in feedforward for i in range(2)}


def test_mixed_batch_rows_equal_each_adapter_alone(models):
    adapted, base_out = models["llama"]
    fresh(adapted)
    if "other" not in adapted.adapters:
        adapted.add_adapter("other", Bottleneck(reduction_factor=8, non_linearity="relu"))
    add_noise(adapted, scale=0.2)
    data = hf_inputs("llama", batch=3)
    alone = {}
    for name in ("default", "other"):
        adapted.set_adapter(name)
        alone[name] = logits(adapted, data)
    with adapted.disable_adapters():
        alone[BASE] = logits(adapted, data)
    assert not torch.allclose(alone["default"], alone["other"], atol=1e-3)
    rows = ["other", BASE, "default"]
    mixed = logits(adapted, data, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == BASE:
            assert torch.equal(mixed[i], alone[BASE][i])
        else:
            torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6)
    reference = BottleneckHooks(adapted, "other")
    torch.testing.assert_close(alone["other"], logits(reference, data), rtol=1e-5, atol=1e-5)
    adapted.set_adapter("default")
    adapted.delete_adapter("other")
    fresh(adapted)


# -- files, merge, check -----------------------------------------------------------------------------------------
def test_save_load_round_trip_bit_for_bit(models, tmp_path):
    adapted, _ = models["gpt2"]
    fresh(adapted)
    add_noise(adapted, scale=0.2)
    data = hf_inputs("gpt2")
    trained = logits(adapted, data)
    adapted.save_adapter(tmp_path / "bn")
    config = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE == "FXPEFT_BOTTLENECK"
    assert {key: config[key] for key in ("reduction_factor", "placement", "non_linearity", "scaling")} == \
        {"reduction_factor": 4, "placement": "pfeiffer", "non_linearity": "gelu", "scaling": 1.0}
    paths = [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    assert config["target_modules"] == paths
    saved = load_file(str(tmp_path / "bn" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"base_model.model.{path}.bottleneck_{part}.{name}" for path in paths
                                   for part in ("down", "up") for name in ("weight", "bias"))
    assert saved[f"base_model.model.{paths[0]}.bottleneck_down.weight"].shape == (16, 64)

    loaded = fxpeft.load_adapter(build_without_dropout("gpt2"), tmp_path / "bn")
    assert [type(rule) for rule in loaded.adapters["default"].rules] == [Bottleneck]
    assert torch.equal(logits(loaded.eval(), data), trained)
    for key, value in adapter_parameters(adapted).items():
        assert torch.equal(adapter_parameters(loaded)[key], value), key

    import peft  # PEFT must refuse the folder, never read it as one of its own types
    with pytest.raises(Exception, match="FXPEFT_BOTTLENECK"):
        peft.PeftConfig.from_pretrained(str(tmp_path / "bn"))

    config["non_linearity"] = "sigmoid"
    (tmp_path / "bn" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="non_linearity"):
        fxpeft.load_adapter(build_without_dropout("gpt2"), tmp_path / "bn")
    fresh(adapted)


def test_merge_is_refused_and_changes_nothing(models):
    adapted, _ = models["llama"]
    fresh(adapted)
    add_noise(adapted)
    data = hf_inputs("llama")
    before = logits(adapted, data)
    weights = {name: p.detach().clone() for name, p in adapted.base_model.named_parameters()}
    for merge in (adapted.merge, adapted.merge_and_unload):
        with pytest.raises(UnsupportedError, match="not linear in h, so it cannot be folded"):
            merge()
        assert adapted.merged_adapters == []
        assert all(torch.equal(p, weights[name]) for name, p in adapted.base_model.named_parameters())
        assert torch.equal(logits(adapted, data), before)
    fresh(adapted)


def test_merge_of_an_adapter_with_a_bottleneck_beside_mergeable_sites_writes_nothing():
    """A trained copy merges by overwriting its tensor: with a bottleneck in the same adapter, ``merge`` refuses before
    the copy is written (``SiteModule.merge_refusal``), not after."""
    adapted = fxpeft.transform(build_without_dropout("llama"), [Bottleneck(reduction_factor=8),
                                                                 fxpeft.Trainable(["model.norm"])])
    add_noise(adapted)
    weights = {name: p.detach().clone() for name, p in adapted.base_model.named_parameters()}
    with pytest.raises(UnsupportedError, match="nothing was merged: a bottleneck adapter"):
        adapted.merge()
    assert adapted.merged_adapters == []
    assert all(torch.equal(p, weights[name]) for name, p in adapted.base_model.named_parameters())


def test_check_accepts_a_bottleneck_folder_and_flags_a_foreign_key(models, tmp_path):
    adapted, _ = models["llama"]
    fresh(adapted)
    add_noise(adapted)
    adapted.save_adapter(tmp_path / "bn")
    report = fxpeft.verify(build_without_dropout("llama"), tmp_path / "bn")
    assert report.ok, report.summary()
    policy = fxpeft.verify(build_without_dropout("llama"), tmp_path / "bn",
                           rules=[{"method": "bottleneck", "placement": "pfeiffer", "reduction_factor": 8}])
    errors = [f for f in policy.findings if f.severity == "error"]
    assert not policy.ok and {f.kind for f in errors} == {"rules-violation"}
    assert sorted(f.module for f in errors) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    state = load_file(str(tmp_path / "bn" / "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.self_attn.q_proj.bottleneck_up.bias"] = torch.zeros(32)
    save_file(state, str(tmp_path / "bn" / "adapter_model.safetensors"))
    report = fxpeft.verify(build_without_dropout("llama"), tmp_path / "bn")
    assert not report.ok and {f.kind for f in report.findings if f.severity == "error"} == {"undeclared-site"}
    fresh(adapted)


# -- the rule ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    ({"reduction_factor": 0}, "reduction_factor"), ({"reduction_factor": 2.5}, "reduction_factor"),
    ({"reduction_factor": "4"}, "reduction_factor"), ({"reduction_factor": True}, "reduction_factor"),
    ({"placement": "parallel"}, "placement"), ({"non_linearity": "sigmoid"}, "non_linearity"),
    ({"scaling": float("nan")}, "scaling"), ({"targets": []}, "targets"), ({"rank": 4}, "rank"),
])
def test_bad_rules_are_refused_at_construction(fields, match):
    with pytest.raises(RuleError, match=match):
        Bottleneck(**fields)


def test_rule_defaults_and_dict_round_trip():
    assert Bottleneck().non_linearity == "swish" and Bottleneck(placement="pfeiffer").non_linearity == "relu"
    assert fxpeft.Bottleneck is Bottleneck
    rule = Bottleneck(targets=["o_proj"], reduction_factor=4, non_linearity="gelu", scaling=2.0)
    assert fxpeft.Rule.from_dict(rule.to_dict()) == rule
