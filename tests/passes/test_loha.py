"""LoHa (passes/loha.py) against PEFT 0.21.2's LoHa on identical weights: llama and bart (plain linears; GPT-2's
Conv1D is refused by both). Logits, gradients, PEFT's parameter counts, the saved files both ways, merge/unmerge
against PEFT's merged weights, several adapters and mixed rows, a PEFT config object, ``fxpeft check`` and the rule's
errors; convolutions (flat and PEFT's effective CP form) and a bfloat16 base on a small conv net. The pass harness
(node counts, identity, gating, PEFT as the reference, compile without recompiles) runs on llama."""

from __future__ import annotations

import copy
import functools
import json

import peft
import pytest
import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING

import fxpeft
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft_configs import rules_from_config
from fxpeft.methods import method_for
from tests.models import hf_inputs
from tests.passes.harness import BASE, check_pass, hooked_call, per_site
from tests.passes.peft_reference import (
    assert_gradients_equal,
    assert_merge_is_peft_merge,
    build_without_dropout,
    fxpeft_grads,
    gradients_of_both,
    peft_grads,
    randomize_peft,
    saved_both_ways,
)

SETUPS = {  # family -> (targets, r, alpha, rank_pattern)
    "llama": (["down_proj", "q_proj", "v_proj"], 4, 6, {"down_proj": 2}),
    "bart": (["fc2", "q_proj"], 4, 8, {}),
}
PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def data(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    return hf_inputs(family, batch=batch, seq=seq, seed=seed)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def peft_config(family: str, **extra) -> peft.LoHaConfig:
    targets, r, alpha, ranks = SETUPS[family]
    return peft.LoHaConfig(target_modules=targets, r=r, alpha=alpha, rank_pattern=ranks, **extra)


def rule(family: str, **extra) -> fxpeft.Rule:
    targets, r, alpha, ranks = SETUPS[family]
    return fxpeft.LoHa(targets=targets, r=r, alpha=alpha, rank_pattern=ranks, **extra)


@functools.lru_cache(maxsize=None)
def twins(family: str):
    """PEFT's LoHa model and fxpeft's, from one seed, with PEFT's random factors loaded into both (eval mode)."""
    peft_model = peft.get_peft_model(build_without_dropout(family), peft_config(family)).eval()
    state = randomize_peft(peft_model, scale=0.3)
    adapted = fxpeft.transform(build_without_dropout(family), rule(family))
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval()


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_logits_gradients_and_counts_equal_peft(family):
    peft_model, adapted = twins(family)
    inputs = data(family)
    torch.testing.assert_close(logits(adapted, inputs), logits(peft_model, inputs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(adapted, inputs), logits(build_without_dropout(family), inputs), atol=1e-3)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert adapted.adapters["default"].peft_keys() == {
        key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(peft_model).items()}
    got, want = gradients_of_both(peft_model, adapted, inputs)
    assert_gradients_equal(got, want)
    assert len(got) == 4 * len(list(adapted.site_modules())) and all(grad.abs().max() > 0 for grad in want.values())
    # set_alpha: alpha / r at every site (its own r), PEFT's scaling
    layers = [module for module in peft_model.modules() if isinstance(module, peft.tuners.loha.LoHaLayer)]
    try:
        adapted.set_alpha(12)
        for layer in layers:
            layer.scaling["default"] = 12 / layer.r["default"]
        torch.testing.assert_close(logits(adapted, inputs), logits(peft_model, inputs), rtol=1e-6, atol=1e-6)
    finally:
        adapted.set_alpha(SETUPS[family][2])
        for layer in layers:
            layer.scaling["default"] = layer.alpha["default"] / layer.r["default"]


def test_saved_files_both_ways(tmp_path):
    peft_model, adapted = twins("llama")
    inputs = data("llama")
    want = logits(peft_model, inputs)
    theirs = saved_both_ways(peft_model, adapted, tmp_path, (
        "peft_type", "r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "init_weights", "rank_dropout",
        "module_dropout", "use_effective_conv2d", "modules_to_save", "layers_to_transform"))
    assert {key.rpartition(".")[2] for key in theirs} == set(PARTS)
    assert all(key.startswith("base_model.model.model.layers.") for key in theirs)
    peft_loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), tmp_path / "fxpeft").eval()
    torch.testing.assert_close(logits(peft_loaded, inputs), want, rtol=1e-6, atol=1e-6)
    loaded = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, inputs), want, rtol=1e-6, atol=1e-6)
    assert loaded.adapters["default"].rules == [rule("llama")]
    # fxpeft check: the folder on the base model holds, but for a declared rule of a smaller rank
    report = fxpeft.verify(build_without_dropout("llama"), tmp_path / "fxpeft",
                           rules=[{"method": "loha", "targets": SETUPS["llama"][0], "r": 2}])
    assert report.kinds() == {"rules-violation"}, report.summary()
    assert "rank 4 exceeds the rules' r=2" in report.summary()


def test_merge_is_peft_merge_and_unmerge_restores():
    peft_model, adapted = twins("llama")
    assert_merge_is_peft_merge(peft_model, adapted, data("llama"), changed=len(list(adapted.site_modules())))


def test_merge_and_unload_is_peft_merge_and_unload():
    family = "llama"
    peft_model = peft.get_peft_model(build_without_dropout(family), peft_config(family, init_weights=False)).eval()
    adapted = fxpeft.transform(build_without_dropout(family), rule(family, init=False))
    adapted.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model))
    inputs = data(family)
    want = logits(peft_model, inputs)
    ours = adapted.merge_and_unload()
    theirs = peft_model.merge_and_unload()
    assert type(ours) is type(theirs)
    for (name, tensor), (other, expected) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == other and torch.equal(tensor, expected), name
    torch.testing.assert_close(logits(ours, inputs), want, rtol=1e-5, atol=1e-5)


def test_harness_llama():
    """Node counts, identity, gating and mixed rows, PEFT as the reference, compiled over two sizes."""
    targets, r, alpha, ranks = SETUPS["llama"]
    reference = peft.get_peft_model(build_without_dropout("llama"), peft_config("llama"))

    def peft_reference(adapted):
        peft.set_peft_model_state_dict(reference, adapted.adapter_state_dict())
        return reference

    paths = [f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "self_attn.v_proj",
                                                                        "mlp.down_proj")]
    # the delta weight (two mm, the product, the scale), the input's gated rows (6), linear(x, dW), the gate's
    # coefficient (1 * gate) and the rest of the gating (8), the add
    roles = {"weight": 4, "rows": 6, "delta": 1, "row_scale": 1, "scale": 8, "join": 1}
    check_pass(lambda: build_without_dropout("llama"), rule("llama"),
               inputs=[data("llama", 2, 9, 1), data("llama", 3, 12, 2)],
               expected_nodes=per_site("loha", paths, roles), reference=peft_reference)


def test_several_adapters_mixed_rows_and_an_inf_in_an_inactive_one():
    """Two adapters: each alone is PEFT's; ``adapter_names`` rows are each adapter's rows and the base rows bit for
    bit (PEFT ignores adapter_names for LoHa: fxpeft honours it), also with an ``inf`` in the inactive adapter."""
    inputs = data("llama", batch=3)
    peft_model = peft.get_peft_model(build_without_dropout("llama"), peft_config("llama", init_weights=False))
    peft_model.add_adapter("other", peft.LoHaConfig(target_modules=["k_proj", "q_proj"], r=2, alpha=3,
                                                    init_weights=False))
    adapted = fxpeft.transform(build_without_dropout("llama"), rule("llama"), example_kwargs=inputs).eval()
    adapted.add_adapter("other", fxpeft.LoHa(targets=["k_proj", "q_proj"], r=2, alpha=3))
    wants = {}
    for name in ("default", "other"):
        adapted.adapters[name].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name=name))
        peft_model.set_adapter(name)
        adapted.set_adapter(name)
        wants[name] = logits(peft_model.eval(), inputs)
        torch.testing.assert_close(logits(adapted, inputs), wants[name], rtol=1e-6, atol=1e-6)
    base = logits(build_without_dropout("llama"), inputs)
    mixed = adapted(**inputs, adapter_names=["other", BASE, "default"]).logits.detach()
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], wants["other"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], wants["default"][2], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        adapted.adapters["other"].sites["loha:model/layers/0/self_attn/q_proj"].hada_w1_a.fill_(float("inf"))
    mixed = adapted(**inputs, adapter_names=["default", BASE, "default"]).logits.detach()
    assert torch.equal(mixed[1], base[1]) and torch.isfinite(mixed).all()
    adapted.set_adapter("default")  # and no NaN gradient from the inactive adapter's inf
    adapted.train()
    adapted(**inputs).logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapted.adapters["default"].parameters())
    assert len(adapted.programs()) == 1


def test_peft_config_object_and_init():
    """``transform(model, LoHaConfig(...))`` builds PEFT's tensors; a fresh adapter is the base model bit for bit,
    ``init_weights=False`` is not."""
    inputs = data("llama")
    base = logits(build_without_dropout("llama"), inputs)
    peft_model = peft.get_peft_model(build_without_dropout("llama"), peft_config("llama"))
    from_config = fxpeft.transform(build_without_dropout("llama"), peft_config("llama"), example_kwargs=inputs)
    assert from_config.adapters["default"].rules == [rule("llama")]
    assert from_config.adapters["default"].peft_keys() == {
        key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(peft_model).items()}
    assert torch.equal(logits(from_config.eval(), inputs), base)
    from_config.add_adapter("random", rule("llama", init=False))
    from_config.set_adapter("random")
    assert not torch.allclose(logits(from_config, inputs), base, atol=1e-4)
    assert fxpeft.Rule.from_peft_config(peft_config("llama", modules_to_save=["lm_head"])) == [
        rule("llama"), fxpeft.Trainable(targets=("lm_head",))]
    assert rule("llama").to_peft_config().to_dict() == peft_config("llama").to_dict()
    # no target_modules: PEFT's defaults for the model type, as get_peft_model fills them in
    assert rules_from_config(peft.LoHaConfig(), build_without_dropout("llama")) == [
        fxpeft.LoHa(targets=tuple(TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING["llama"]))]


def test_codec_reads_modules_to_save_where_the_file_holds_them():
    codec = method_for(fxpeft.LoHa).codec
    config = {**peft_config("llama", modules_to_save=["lm_head"]).to_dict(), "peft_type": "LOHA"}
    config["target_modules"] = sorted(config["target_modules"])
    with_head = {"base_model.model.lm_head.weight", "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a"}
    assert codec.to_rules(config, with_head) == [rule("llama"), fxpeft.Trainable(targets=("lm_head",))]
    assert codec.to_rules(config, with_head - {"base_model.model.lm_head.weight"}) == [rule("llama")]
    with pytest.raises(UnsupportedError, match="sets \\['use_dora'\\]"):
        codec.to_rules({**config, "use_dora": True}, None)


def test_rule_errors():
    with pytest.raises(UnsupportedError, match="rank_dropout=0.1.*torch.rand"):
        fxpeft.LoHa(targets=["q_proj"], rank_dropout=0.1)
    with pytest.raises(UnsupportedError, match="module_dropout"):
        fxpeft.Rule.from_peft_config(peft.LoHaConfig(target_modules=["q_proj"], module_dropout=0.2))
    with pytest.raises(RuleError, match="LoHa: `rank_dropout` must be"):
        fxpeft.LoHa(targets=["q_proj"], rank_dropout=1.5)
    with pytest.raises(RuleError, match="LoHa: `r` must be"):
        fxpeft.LoHa(targets=["q_proj"], r=0)
    with pytest.raises(RuleError, match="LoHa: `alpha` must be"):
        fxpeft.LoHa(targets=["q_proj"], alpha=float("nan"))
    with pytest.raises(RuleError, match="LoHa: `init`"):
        fxpeft.LoHa(targets=["q_proj"], init="lycoris")
    with pytest.raises(RuleError, match="LoHa: `targets` is required"):
        fxpeft.LoHa()
    with pytest.raises(RuleError, match="unknown field"):
        fxpeft.LoHa(targets=["q_proj"], decompose_both=True)
    assert fxpeft.LoHa(target_modules=["q_proj"], init_weights=False, layers_to_transform=[1]) == \
        fxpeft.LoHa(targets=["q_proj"], init=False, layers=(1,))
    loha = fxpeft.LoHa(targets=["q_proj"], r=4, alpha_pattern={"q_proj": 2.0}, layers=[0])
    assert fxpeft.Rule.from_dict(json.loads(json.dumps(loha.to_dict()))) == loha


def test_transformers_conv1d_is_refused_as_peft_refuses_it():
    with pytest.raises(TypeError, match="Conv1D"):  # PEFT's own refusal, which fxpeft's matches
        peft.get_peft_model(build_without_dropout("gpt2"), peft.LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(UnsupportedError, match="transformer.h.0.attn.c_attn is a transformers Conv1D"):
        fxpeft.transform(build_without_dropout("gpt2"), fxpeft.LoHa(targets=["c_attn"]))


class ConvNet(torch.nn.Module):
    """Every conv form PEFT's LoHa/LoKr take: a Conv1d, a grouped 3x3 Conv2d with padding "same", a 1x1 Conv2d (no
    effective form), a strided and dilated non-square one; then a linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 12, 3, padding="same", groups=2)
        self.c3 = torch.nn.Conv2d(12, 8, 1)
        self.c4 = torch.nn.Conv2d(8, 6, (3, 2), stride=2, dilation=(1, 2))
        self.lin = torch.nn.Linear(6, 5)

    def forward(self, x):
        h = self.c1(x).unsqueeze(-1).expand(-1, -1, -1, 6)
        h = self.c3(torch.relu(self.c2(h)))
        return self.lin(self.c4(h).mean((2, 3)))


def conv_twins(config_class, rule_class, **fields):
    """A ConvNet under PEFT's config and fxpeft's rule (one seed), PEFT's random factors in both; and an input."""
    torch.manual_seed(0)
    base, inputs = ConvNet().eval(), torch.randn(3, 4, 10)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config_class(**fields, init_weights=False)).eval()
    adapted = fxpeft.transform(base, rule_class(**fields), example_inputs=(inputs,)).eval()
    state = peft.get_peft_model_state_dict(peft_model)
    assert adapted.adapters["default"].peft_keys() == {key: tuple(value.shape) for key, value in state.items()}
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted, inputs


def eager_grads(adapted, inputs) -> dict[str, torch.Tensor]:
    """The adapter's gradients through an eager reference: the base model with a forward hook per site adding
    ``conv(x, delta_weight())`` (or ``linear``), ``delta_weight`` differentiated by autograd."""
    def hook(site):
        def add(module, args, output):
            if isinstance(module, torch.nn.Linear):
                return output + torch.nn.functional.linear(args[0], site.delta_weight())
            conv = torch.nn.functional.conv1d if isinstance(module, torch.nn.Conv1d) else torch.nn.functional.conv2d
            return output + conv(args[0], site.delta_weight(), None, module.stride, module.padding, module.dilation,
                                 module.groups)
        return add

    adapted.zero_grad(set_to_none=True)
    hooked_call(adapted.base_model, {site.path: hook(site) for site in adapted.site_modules()},
                x=inputs).square().mean().backward()
    grads = {key: value.grad.clone() for key, value in adapted.adapters["default"].peft_state_dict().items()}
    adapted.zero_grad(set_to_none=True)
    return grads


def check_conv_parity(peft_model, adapted, inputs) -> None:
    """Outputs (bit for bit), gradients, parameter counts and merged weights equal PEFT's. Where PEFT's gradient is
    wrong (``HadaWeightCP.backward`` of the effective form gives ``hada_w1_a`` a contraction with ``hada_t2`` and
    ``hada_w2_b``, and ``hada_w2_a`` one with ``hada_t1`` and ``hada_w1_b``), fxpeft's is autograd's, checked against
    an eager reference."""
    with torch.no_grad():
        assert torch.equal(adapted(inputs), peft_model(inputs))
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    reference = eager_grads(adapted, inputs)
    for model in (peft_model, adapted):
        model.train()
        model(inputs).square().mean().backward()
        model.eval()
    want = {key.removesuffix(".default"): grad for key, grad in peft_grads(peft_model).items()}
    got = fxpeft_grads(adapted)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
        if key.endswith(("hada_w1_a", "hada_w2_a")) and f"{key.rpartition('.')[0]}.hada_t1" in want:
            assert not torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-5), f"{key}: PEFT's CP gradient is right"
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    adapted.merge()
    peft_model.merge_adapter()
    theirs = dict(peft_model.named_parameters())
    for name, tensor in adapted.base_model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        key = f"base_model.model.{owner}.base_layer.{leaf}"
        assert torch.equal(tensor, theirs.get(key, theirs.get(f"base_model.model.{name}"))), name
    with torch.no_grad():
        torch.testing.assert_close(adapted(inputs), peft_model(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
def test_convolutions_equal_peft(effective):
    """Conv1d and Conv2d (grouped, 1x1, strided, dilated, padding "same"), flattened or in PEFT's effective (CP)
    form: PEFT's tensors, outputs bit for bit, gradients, counts and merged weights."""
    fields = dict(target_modules=["c1", "c2", "c3", "c4", "lin"], r=2, alpha=3, use_effective_conv2d=effective)
    peft_model, adapted, inputs = conv_twins(peft.LoHaConfig, fxpeft.LoHa, **fields)
    parts = {key.rpartition(".")[2] for key in adapted.adapters["default"].peft_keys()}
    assert ("hada_t1" in parts) == effective
    torch.manual_seed(0)  # conv_twins's base model again
    report = fxpeft.verify(ConvNet().eval(), adapted, (inputs,))
    assert report.ok, report.summary()
    check_conv_parity(peft_model, adapted, inputs)


def test_conv_refusals():
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2 * 2, 3))
    with pytest.raises(UnsupportedError, match=r"\['0'\] are Conv3d"):
        fxpeft.transform(model, fxpeft.LoHa(targets=["0", "2"]), example_inputs=(torch.randn(2, 2, 2, 2, 2),))
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedError, match="padding_mode"):
        fxpeft.transform(model, fxpeft.LoHa(targets=["0"]), example_inputs=(torch.randn(2, 2, 4, 4),))


def check_half_precision(config_class, rule_class) -> None:
    """Over a bfloat16 base the factors stay float32 (PEFT's autocast_adapter_dtype): the input is cast to them, the sum
    back to bfloat16, and the outputs and merged weights are PEFT's bit for bit."""
    torch.manual_seed(0)
    base, inputs = ConvNet().eval().to(torch.bfloat16), torch.randn(3, 4, 10).to(torch.bfloat16)
    fields = dict(target_modules=["c1", "c2", "c4", "lin"], r=2, alpha=3)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config_class(**fields, init_weights=False)).eval()
    adapted = fxpeft.transform(base, rule_class(**fields), example_inputs=(inputs,)).eval()
    adapted.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model))
    assert {parameter.dtype for parameter in adapted.adapters.parameters()} == {torch.float32}
    with torch.no_grad():
        got, want = adapted(inputs), peft_model(inputs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    adapted.merge()
    peft_model.merge_adapter()
    theirs = dict(peft_model.named_parameters())
    for name, tensor in adapted.base_model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        assert torch.equal(tensor, theirs.get(f"base_model.model.{owner}.base_layer.{leaf}",
                                              theirs.get(f"base_model.model.{name}"))), name


def test_half_precision_base_is_peft():
    check_half_precision(peft.LoHaConfig, fxpeft.LoHa)
