"""VeRA (passes/vera.py) against PEFT 0.21.2's VeRA on identical weights: llama (linears of three shapes, so the
projections are sliced), gpt2 (transformers' Conv1D, flattened rows) and t5 (encoder-decoder). The projections bit
for bit from the key, logits, gradients, PEFT's parameter counts, the saved files both ways (with and without the
projections), merge/unmerge against PEFT's merged weights, several adapters as PEFT shares their projections, dropout,
half precision, the mixed-batch refusal, ``fxpeft check`` and the rule's errors. The pass harness (node counts,
identity, gating, compile without recompiles) runs on gpt2."""

from __future__ import annotations

import functools
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft import cli
from fxpeft.errors import AdapterLoadError, RuleError, UnsupportedError
from fxpeft.passes.vera import VeraProjections, projections
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

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "t5": ["q", "v", "wo"]}
R = 8


def data(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    return hf_inputs(family, batch=batch, seq=seq, seed=seed)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def peft_vera(family: str, **fields) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out / save_projection notes
        return peft.get_peft_model(build_without_dropout(family), peft.VeraConfig(
            target_modules=TARGETS[family], r=R, **fields)).eval()


@functools.lru_cache(maxsize=None)
def twins(family: str):
    """PEFT's VeRA model and fxpeft's from one seed, with PEFT's random vectors loaded into both (eval mode)."""
    peft_model = peft_vera(family)
    state = randomize_peft(peft_model, scale=0.3)
    adapted = fxpeft.transform(build_without_dropout(family), fxpeft.VeRA(target_modules=TARGETS[family], r=R))
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval()


def shared(adapted, name: str = "default") -> VeraProjections:
    return next(site for site in adapted.adapters[name].site_modules() if isinstance(site, VeraProjections))


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_projections_logits_gradients_and_counts_equal_peft(family):
    peft_model, adapted = twins(family)
    assert torch.equal(shared(adapted).vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(shared(adapted).vera_B, peft_model.base_model.vera_B["default"])
    inputs = data(family)
    got = logits(adapted, inputs)
    assert torch.equal(got, logits(peft_model, inputs))  # PEFT's order of operations: bit for bit
    assert not torch.allclose(got, logits(build_without_dropout(family), inputs), atol=1e-3)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    got, want = gradients_of_both(peft_model, adapted, inputs)
    got = {key: grad for key, grad in got.items() if ".vera_lambda_" in key}
    assert_gradients_equal(got, want)
    assert len(want) == 2 * (len(list(adapted.site_modules())) - 1)
    assert shared(adapted).vera_A.grad is None and not shared(adapted).vera_A.requires_grad


def test_the_key_makes_the_projections_and_a_new_key_needs_no_capture(tmp_path):
    """``projections`` makes PEFT's for any key; another key is other tensors in the same graph: PEFT's key-7 file
    without projections, loaded in place into an adapter made with key 0, gives PEFT's key-7 logits, no new capture."""
    inputs = data("llama")
    other = peft_vera("llama", projection_prng_key=7, save_projection=False)
    randomize_peft(other, scale=0.3)
    other.save_pretrained(tmp_path / "key7")
    a, b = projections(7, R, 128, 64)
    assert torch.equal(a, other.base_model.vera_A["default"]) and torch.equal(b, other.base_model.vera_B["default"])
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.VeRA(
        target_modules=TARGETS["llama"], r=R, save_projection=False), example_kwargs=inputs).eval()
    constants = adapted.programs()[0].constants.values()
    assert not any(isinstance(t, torch.Tensor) and t.shape == a.shape for t in constants)
    adapted.load_adapter(tmp_path / "key7", "default")
    assert shared(adapted).key == 7 and torch.equal(shared(adapted).vera_A, a)
    assert torch.equal(logits(adapted, inputs), logits(other, inputs)) and len(adapted.programs()) == 1
    with torch.no_grad():
        want = other.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(adapted.merge_and_unload()(**inputs).logits.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_saved_files_both_ways(family, tmp_path):
    peft_model, adapted = twins(family)
    inputs = data(family)
    want = logits(peft_model, inputs)
    theirs = saved_both_ways(peft_model, adapted, tmp_path, (
        "peft_type", "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
        "fan_in_fan_out", "bias", "init_weights", "modules_to_save", "layers_to_transform"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(theirs)
    peft_loaded = peft.PeftModel.from_pretrained(build_without_dropout(family), tmp_path / "fxpeft").eval()
    assert torch.equal(logits(peft_loaded, inputs), want)
    loaded = fxpeft.load_adapter(build_without_dropout(family), tmp_path / "peft").eval()
    assert torch.equal(logits(loaded, inputs), want)
    assert [type(rule).__name__ for rule in loaded.adapters["default"].rules] == ["VeRA"]


def test_save_projection_false_files_and_their_checks(tmp_path):
    inputs = data("llama")
    peft_model = peft_vera("llama", save_projection=False, projection_prng_key=3)
    state = randomize_peft(peft_model, scale=0.3)
    assert not any("vera_A" in key for key in state)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "peft").eval()
    assert torch.equal(logits(loaded, inputs), logits(peft_model, inputs))
    loaded.save_adapter(tmp_path / "fxpeft")
    assert sorted(load_file(str(tmp_path / "fxpeft" / "adapter_model.safetensors"))) == sorted(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build_without_dropout("llama"), tmp_path / "fxpeft").eval()
    assert torch.equal(logits(back, inputs), logits(peft_model, inputs))
    # projections in a file whose config says it has none (PEFT ignores them), or none where it says it has them
    tensors = load_file(str(tmp_path / "fxpeft" / "adapter_model.safetensors"))
    a, b = projections(3, R, 128, 64)
    save_file({**tensors, "base_model.vera_A": a, "base_model.vera_B": b},
              str(tmp_path / "fxpeft" / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="save_projection is false but the file holds"):
        fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "fxpeft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "save_projection": True}))
    with pytest.raises(AdapterLoadError, match="does not hold base_model.vera_A"):
        fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "peft")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_is_peft_merge_and_unmerge_restores(family):
    peft_model, adapted = twins(family)
    assert_merge_is_peft_merge(peft_model, adapted, data(family), changed=2 * len(TARGETS[family]))


def test_several_adapters_share_the_first_projections_as_peft():
    """PEFT gives a later VeRA adapter the first adapter's projections: fxpeft's later adapter holds the same numbers
    (the first's shape from the same key), so a smaller adapter gives PEFT's logits; PEFT's conditions are errors;
    mixed batches give each row its adapter alone; an inactive adapter's inf reaches no row."""
    inputs = data("llama", batch=3)
    peft_model = peft_vera("llama")
    peft_model.add_adapter("other", peft.VeraConfig(target_modules=["q_proj"], r=R))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if "vera_lambda" in name:  # both adapters' (PEFT trains the active one only)
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.VeRA(target_modules=TARGETS["llama"], r=R),
                               example_kwargs=inputs).eval()
    adapted.add_adapter("other", fxpeft.VeRA(targets=["q_proj"], r=R))
    for name in ("default", "other"):
        adapted.adapters[name].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name=name))
    assert shared(adapted, "other").vera_A.shape == (R, 128)
    assert torch.equal(shared(adapted, "other").vera_B, peft_model.base_model.vera_B["other"])
    for name in ("other", ["default", "other"], "default"):
        peft_model.base_model.set_adapter(name)
        adapted.set_adapter(name)
        assert torch.equal(logits(adapted, inputs), logits(peft_model, inputs)), name
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    for rule, match in ((fxpeft.VeRA(targets=["q_proj"], r=R, projection_prng_key=1), "projection_prng_key"),
                        (fxpeft.VeRA(targets=["up_proj"], r=R), "up to 64 -> 128")):
        with pytest.raises(RuleError, match=match):
            adapted.add_adapter("bad", rule)
    # One adapter per row, which PEFT's VeRA cannot do: each row is its adapter alone, a base row the base model.
    mixed = logits(adapted, dict(inputs, adapter_names=["other", BASE, "default"]))
    adapted.set_adapter("other")
    assert torch.equal(mixed[0], logits(adapted, inputs)[0])
    with adapted.disable_adapters():
        assert torch.equal(mixed[1], logits(adapted, inputs)[1])
    adapted.set_adapter("default")
    assert torch.equal(mixed[2], logits(adapted, inputs)[2])
    base = logits(build_without_dropout("llama"), inputs)
    with torch.no_grad():
        adapted.adapters["other"].parameters().__next__().fill_(float("inf"))
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, inputs), base)
    assert torch.isfinite(logits(adapted, inputs)).all() and len(adapted.programs()) == 1


def test_harness_gpt2_conv1d():
    """Conv1D's flattened rows: node counts, identity, gating (mixed batches too), PEFT as the reference,
    compiled over two sizes and an adapter switch without a recompile."""
    reference = peft_vera("gpt2")

    def peft_reference(adapted):
        peft.set_peft_model_state_dict(reference, adapted.adapter_state_dict())
        return reference

    paths = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "mlp.c_proj")]
    # the input and the result kept to the gated rows (6 nodes each); a slice and a linear per projection; the two
    # vector products; the add
    roles = {"rows": 12, "vera_A": 2, "vera_B": 2, "lambda_d": 1, "lambda_b": 1, "join": 1}
    check_pass(lambda: build_without_dropout("gpt2"), fxpeft.VeRA(targets=TARGETS["gpt2"], r=R),
               inputs=[data("gpt2", 2, 9, 1), data("gpt2", 3, 12, 2)], expected_nodes=per_site("vera", paths, roles),
               weights=_noisy, reference=peft_reference, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def _noisy(adapted):
    generator = torch.Generator().manual_seed(7)
    for parameter in adapted.adapters.parameters():
        parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_dropout_bias_and_modules_to_save_train_as_peft():
    """vera_dropout draws PEFT's masks (same seed, train mode); bias="vera_only" and modules_to_save train copies
    that PEFT counts and saves the same way."""
    inputs = data("llama")
    peft_model = peft_vera("llama", vera_dropout=0.3, bias="all", modules_to_save=["lm_head"])
    state = randomize_peft(peft_model, scale=0.3)
    adapted = fxpeft.transform(build_without_dropout("llama"), peft.VeraConfig(
        target_modules=TARGETS["llama"], r=R, vera_dropout=0.3, bias="all", modules_to_save=["lm_head"]))
    assert sorted(adapted.adapter_state_dict()) == sorted(state)
    adapted.adapters["default"].load_peft_state_dict(state)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    outputs = []
    for model in (peft_model, adapted):
        model.train()
        torch.manual_seed(11)
        outputs.append(model(**inputs).logits.detach())
        model.eval()
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], logits(adapted, inputs))


def test_half_precision_base_rounds_as_peft():
    """Over a bfloat16 base PEFT rounds the projections and the first vectors to bfloat16 before keeping them in
    float32 (d_initial 0.1 is 0.10009765625): the same tensors, and the same logits."""
    inputs = data("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(build_without_dropout("llama").to(torch.bfloat16), peft.VeraConfig(
            target_modules=TARGETS["llama"], r=R)).eval()
    adapted = fxpeft.transform(build_without_dropout("llama").to(torch.bfloat16),
                               fxpeft.VeRA(targets=TARGETS["llama"], r=R)).eval()
    want = peft.get_peft_model_state_dict(peft_model)
    got = adapted.adapter_state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key
    state = randomize_peft(peft_model, scale=0.3)
    adapted.adapters["default"].load_peft_state_dict(state)
    assert torch.equal(logits(adapted, inputs), logits(peft_model, inputs))


def test_peft_config_defaults_and_layers():
    """``transform(model, VeraConfig(...))`` without target_modules: PEFT's default targets for the model type, and
    layers_to_transform / layers_pattern select PEFT's layers."""
    config = peft.VeraConfig(r=R, layers_to_transform=[1], layers_pattern="layers")
    adapted = fxpeft.transform(build_without_dropout("llama"), config)  # first: PEFT fills in the config's targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(build_without_dropout("llama"), config)
    want = {key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(peft_model).items()}
    assert adapted.adapters["default"].peft_keys() == want
    assert sorted(key for key in want if "lambda_b" in key) == [
        f"base_model.model.model.layers.1.self_attn.{name}.vera_lambda_b" for name in ("q_proj", "v_proj")]
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


def test_check_knows_vera_files(tmp_path, capsys):
    """``fxpeft check`` passes a VeRA folder; with ``--rules`` it reports vectors at a linear no rule allows and
    projections that are not what the key makes (PEFT would load them as they are)."""
    _, adapted = twins("llama")
    build_without_dropout("llama").save_pretrained(tmp_path / "base")
    adapted.save_adapter(tmp_path / "vera")
    assert cli.main(["check", str(tmp_path / "base"), str(tmp_path / "vera")]) == 0, capsys.readouterr().out
    capsys.readouterr()
    file = str(tmp_path / "vera" / "adapter_model.safetensors")
    tensors = load_file(file)
    save_file({**tensors, "base_model.vera_A": tensors["base_model.vera_A"] * 2}, file)  # not what key 0 makes
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"method": "vera", "targets": ["q_proj", "v_proj"], "r": R}]))
    with pytest.warns(UserWarning, match="differ from what projection_prng_key=0 makes"):
        code = cli.main(["check", str(tmp_path / "base"), str(tmp_path / "vera"), "--rules", str(rules)])
    out = capsys.readouterr().out
    assert code == 1 and "rules-violation" in out, out
    assert "projection_prng_key=0" in out and "no rule allows" in out and out.count("no rule allows") == 2, out


def test_rule_errors():
    assert fxpeft.VeRA(target_modules=["q_proj"], vera_dropout=0.1, init_weights=False, layers_to_transform=1) == \
        fxpeft.VeRA(targets=["q_proj"], dropout=0.1, init=False, layers=[1])
    for fields, match in (({"r": 0}, "`r` must be"), ({"r": 2.0}, "`r` must be"), ({"bias": "lora_only"}, "bias"),
                          ({"dropout": 1.0}, "`dropout` must be"),
                          ({"projection_prng_key": 1.5}, "projection_prng_key"),
                          ({"save_projection": "yes"}, "save_projection"), ({"init": 1}, "`init` must be"),
                          ({"d_initial": float("nan")}, "d_initial"), ({"layers_pattern": "layers"}, "give `layers`"),
                          ({"layers": [-1]}, "`layers` must be"), ({"targets": []}, "empty"),
                          ({"lora_alpha": 8}, "alpha")):
        with pytest.raises(RuleError, match=match):
            fxpeft.VeRA(**{"targets": ["q_proj"], **fields})
    with pytest.raises(RuleError, match="no default VeRA targets"):
        fxpeft.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), fxpeft.VeRA(),
                         example_inputs=(torch.randn(2, 4),))
    with pytest.raises(RuleError, match="one VeRA rule"):
        fxpeft.transform(build_without_dropout("llama"), [fxpeft.VeRA(targets=["q_proj"], r=R),
                                                           fxpeft.VeRA(targets=["v_proj"], r=R)])
    with pytest.raises(UnsupportedError, match="use_dora"):
        fxpeft.Rule.from_peft_config({"peft_type": "VERA", "target_modules": ["q_proj"], "use_dora": True})
    rule = fxpeft.VeRA(targets=["q_proj"], r=R, projection_prng_key=5, save_projection=False, layers=[0],
                       layers_pattern="layers", bias="vera_only")
    assert fxpeft.Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert fxpeft.Rule.from_peft_config(rule.to_peft_config()) == [rule]
