"""LoKr (passes/lokr.py) against PEFT 0.21.2's LoKr on identical weights: llama (full and low-rank Kronecker factors
mixed by ``decompose_both`` and ``rank_pattern``) and bart (``decompose_factor``, ``layers_to_transform``); GPT-2's
Conv1D is refused by both; convolutions (flat and effective) and a bfloat16 base on a small conv net. Logits,
gradients, PEFT's parameter counts, the saved files both ways, merge/unmerge against PEFT's merged weights, the three
initialisations, several adapters and mixed rows, a PEFT config object, verify and the rule's errors. The pass harness
(node counts, identity, gating, PEFT as the reference, compile without recompiles, a compiled training step) runs on
llama."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization

import fxpeft
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.methods import method_for
from fxpeft.passes.lokr import factorization
from tests.models import hf_inputs
from tests.passes.harness import BASE, check_pass, per_site
from tests.passes.peft_reference import (
    assert_gradients_equal,
    assert_merge_is_peft_merge,
    build_without_dropout,
    gradients_of_both,
    randomize_peft,
    saved_both_ways,
)
from tests.passes.test_loha import ConvNet, check_conv_parity, check_half_precision, conv_twins

SETUPS = {  # family -> the fields of both configs
    "llama": dict(target_modules=["down_proj", "q_proj", "v_proj"], r=2, alpha=6, decompose_both=True,
                  rank_pattern={"down_proj": 8}),
    "bart": dict(target_modules=["fc2", "q_proj"], r=4, alpha=8, decompose_factor=4, layers_to_transform=[1]),
}
PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def data(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    return hf_inputs(family, batch=batch, seq=seq, seed=seed)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def shapes(state: dict) -> dict:
    return {key: tuple(value.shape) for key, value in state.items()}


@functools.lru_cache(maxsize=None)
def twins(family: str):
    """PEFT's LoKr model and fxpeft's, from one seed, with PEFT's random factors loaded into both (eval mode)."""
    peft_model = peft.get_peft_model(build_without_dropout(family), peft.LoKrConfig(**SETUPS[family])).eval()
    state = randomize_peft(peft_model, scale=0.3)
    adapted = fxpeft.transform(build_without_dropout(family), fxpeft.LoKr(**SETUPS[family]))
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval()


@pytest.mark.parametrize("dimension, factor", [(64, -1), (128, -1), (127, -1), (96, 4), (96, 5), (32, 64), (1, -1)])
def test_factorization_is_peft_factorization(dimension, factor):
    assert factorization(dimension, factor) == peft_factorization(dimension, factor)


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_logits_gradients_and_counts_equal_peft(family):
    peft_model, adapted = twins(family)
    inputs = data(family)
    torch.testing.assert_close(logits(adapted, inputs), logits(peft_model, inputs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(adapted, inputs), logits(build_without_dropout(family), inputs), atol=1e-3)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert adapted.adapters["default"].peft_keys() == shapes(peft.get_peft_model_state_dict(peft_model))
    if family == "llama":  # both forms of both factors
        assert {key.rpartition(".")[2] for key in adapted.adapters["default"].peft_keys()} == PARTS
    got, want = gradients_of_both(peft_model, adapted, inputs)
    assert_gradients_equal(got, want)
    assert all(grad.abs().max() > 0 for grad in want.values())


def test_saved_files_both_ways(tmp_path):
    peft_model, adapted = twins("llama")
    inputs = data("llama")
    want = logits(peft_model, inputs)
    saved_both_ways(peft_model, adapted, tmp_path, (
        "peft_type", "r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "init_weights", "decompose_both",
        "decompose_factor", "rank_dropout_scale", "use_effective_conv2d"))
    peft_loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), tmp_path / "fxpeft").eval()
    torch.testing.assert_close(logits(peft_loaded, inputs), want, rtol=1e-6, atol=1e-6)
    loaded = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, inputs), want, rtol=1e-6, atol=1e-6)
    assert loaded.adapters["default"].rules == [fxpeft.LoKr(**SETUPS["llama"])]
    # fxpeft check: the adapter holds, but for a declared rule of a smaller rank (down_proj has rank_pattern's 8)
    report = fxpeft.verify(build_without_dropout("llama"), loaded, rules=[fxpeft.LoKr(
        targets=["q_proj", "v_proj", "down_proj"], r=2)])
    assert report.kinds() == {"rules-violation"}, report.summary()
    assert "rank 8 exceeds" in report.summary()


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_merge_is_peft_merge_and_unmerge_restores(family):
    peft_model, adapted = twins(family)
    assert_merge_is_peft_merge(peft_model, adapted, data(family), changed=len(list(adapted.site_modules())))


def test_harness_llama():
    """Node counts, identity, gating and mixed rows, PEFT as the reference, compiled over two sizes (and a compiled
    training step against the eager one)."""
    reference = peft.get_peft_model(build_without_dropout("llama"), peft.LoKrConfig(**SETUPS["llama"]))

    def peft_reference(adapted):
        peft.set_peft_model_state_dict(reference, adapted.adapter_state_dict())
        return reference

    # the delta weight: one mm per low-rank factor, the Kronecker product, the scale; the input's gated rows (6),
    # linear(x, dW), the gate's coefficient (1 * gate) and the rest of the gating (8), the add
    common = {"rows": 6, "delta": 1, "row_scale": 1, "scale": 8, "join": 1}
    expected = {}
    for i in range(2):
        layer = f"model.layers.{i}"
        expected.update(per_site("lokr", [f"{layer}.mlp.down_proj"], {**common, "weight": 2}))
        expected.update(per_site("lokr", [f"{layer}.self_attn.q_proj", f"{layer}.self_attn.v_proj"],
                                 {**common, "weight": 4}))
    check_pass(lambda: build_without_dropout("llama"), fxpeft.LoKr(**SETUPS["llama"]),
               inputs=[data("llama", 2, 9, 1), data("llama", 3, 12, 2)], expected_nodes=expected,
               reference=peft_reference, compile_train=True)


def test_initialisations_several_adapters_and_mixed_rows():
    """``init_weights`` True / "lycoris" / False: the tensors PEFT zeroes are the ones fxpeft zeroes; the first two
    are the base model bit for bit, False is not. A PEFT config object goes through the codec. Rows of a mixed batch
    (``adapter_names``: PEFT ignores it for LoKr, fxpeft honours it) are each adapter's rows, and the base rows bit
    for bit."""
    inputs = data("llama", batch=3)
    base = logits(build_without_dropout("llama"), inputs)
    fields = SETUPS["llama"]
    adapted = fxpeft.transform(build_without_dropout("llama"), peft.LoKrConfig(**fields), example_kwargs=inputs)
    adapted.eval()
    for init in (True, "lycoris", False):
        name = f"init-{init}"
        adapted.add_adapter(name, fxpeft.LoKr(**fields, init_weights=init))
        adapted.set_adapter(name)
        theirs = peft.get_peft_model(build_without_dropout("llama"), peft.LoKrConfig(**fields, init_weights=init))
        want = {key: bool((value == 0).all()) for key, value in peft.get_peft_model_state_dict(theirs).items()}
        got = {key: bool((value == 0).all()) for key, value in adapted.adapters[name].peft_state_dict().items()}
        assert got == want and any(want.values()) == (init is not False), init
        assert torch.equal(logits(adapted, inputs), base) == (init is not False), init
    assert adapted.adapters["default"].rules == [fxpeft.LoKr(**fields)]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in adapted.adapters["default"].parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    alone = {}
    for name in ("default", "init-False"):
        adapted.set_adapter(name)
        alone[name] = logits(adapted, inputs)
    mixed = adapted(**inputs, adapter_names=["init-False", BASE, "default"]).logits.detach()
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], alone["init-False"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], alone["default"][2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[2], base[2], atol=1e-4)
    assert len(adapted.programs()) == 1


def test_verify_knows_lokr_keys():
    method = method_for(fxpeft.LoKr)
    part = method.key_part("base_model.model.model.layers.0.self_attn.q_proj.lokr_w1_a")
    assert (part.path, part.part, part.rank_axis) == ("model.layers.0.self_attn.q_proj", "lokr_w1_a", 1)
    assert method.key_part("base_model.model.model.layers.0.self_attn.q_proj.lokr_w2").rank_axis is None
    assert method.key_part("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") is None
    assert method.key_part("base_model.model.c2.lokr_t2").rank_axis == 0


def test_rule_errors():
    with pytest.raises(UnsupportedError, match="rank_dropout=0.1.*torch.rand"):
        fxpeft.LoKr(targets=["q_proj"], rank_dropout=0.1)
    with pytest.raises(UnsupportedError, match="module_dropout"):
        fxpeft.transform(build_without_dropout("llama"), peft.LoKrConfig(target_modules=["q_proj"],
                                                                         module_dropout=0.2))
    with pytest.raises(RuleError, match="LoKr: `decompose_factor` must be -1"):
        fxpeft.LoKr(targets=["q_proj"], decompose_factor=0)
    with pytest.raises(RuleError, match="LoKr: `decompose_both` must be True or False"):
        fxpeft.LoKr(targets=["q_proj"], decompose_both="yes")
    with pytest.raises(RuleError, match="LoKr: `init`"):
        fxpeft.LoKr(targets=["q_proj"], init="gaussian")
    with pytest.raises(RuleError, match=r"LoKr: `rank_pattern\[.q_proj.\]` must be an integer >= 1"):
        fxpeft.LoKr(targets=["q_proj"], rank_pattern={"q_proj": 0})
    assert fxpeft.LoKr(target_modules=["q_proj"], init_weights="lycoris", exclude_modules=["x"]) == \
        fxpeft.LoKr(targets=["q_proj"], init="lycoris", exclude=["x"])
    lokr = fxpeft.LoKr(targets=["q_proj"], decompose_both=True, decompose_factor=4, init="lycoris")
    assert fxpeft.Rule.from_dict(json.loads(json.dumps(lokr.to_dict()))) == lokr
    assert lokr.to_peft_config().to_dict() == peft.LoKrConfig(
        target_modules=["q_proj"], decompose_both=True, decompose_factor=4, init_weights="lycoris").to_dict()
    with pytest.raises(UnsupportedError, match="Conv1D"):
        fxpeft.transform(build_without_dropout("gpt2"), fxpeft.LoKr(targets="all-linear"))


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
def test_convolutions_equal_peft(effective):
    """Conv1d and Conv2d (grouped, 1x1, strided, dilated, padding "same"), the second factor low-rank (flattened,
    or PEFT's CP core ``lokr_t2``) or full: PEFT's tensors, outputs bit for bit, gradients, counts, merged weights."""
    targets = ["c2", "c3", "c4", "lin"] if effective else ["c1", "c2", "c3", "c4", "lin"]
    fields = dict(target_modules=targets, r=1, alpha=3, use_effective_conv2d=effective, decompose_both=True,
                  rank_pattern={} if effective else {"c1": 2})  # c1: a full [b, d, k] lokr_w2 (a 2-D x 3-D kron)
    peft_model, adapted, inputs = conv_twins(peft.LoKrConfig, fxpeft.LoKr, **fields)
    parts = {key.rpartition(".")[2] for key in adapted.adapters["default"].peft_keys()}
    assert ("lokr_t2" in parts) == effective and {"lokr_w1_a", "lokr_w2_b"} <= parts
    assert ("lokr_w2" in parts) != effective
    check_conv_parity(peft_model, adapted, inputs)
    with pytest.raises(UnsupportedError, match="c1 is a Conv1d with use_effective_conv2d=True and r=1"):
        fxpeft.transform(ConvNet(), fxpeft.LoKr(**{**fields, "target_modules": ["c1"], "use_effective_conv2d": True,
                                                      "rank_pattern": {}}),
                         example_inputs=(inputs,))


def test_half_precision_base_is_peft():
    check_half_precision(peft.LoKrConfig, fxpeft.LoKr)
