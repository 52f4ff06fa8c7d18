"""(IA)³ (passes/ia3.py) against PEFT 0.21.2's IA3 on identical weights: llama (output and feed-forward input
vectors), gpt2 (transformers' Conv1D, flattened rows) and t5 (encoder-decoder). Logits, gradients of the vectors,
PEFT's parameter counts, the saved files both ways, merge/unmerge against PEFT's merged weights, the identity,
disabling, mixed batches, ``fxpeft check`` and the rule's errors. The pass harness (node counts, compile without
recompiles) runs on gpt2 here and on llama in tests/passes/test_harness.py."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
from fxpeft import cli
from fxpeft.errors import RuleError, UnsupportedError
from tests.models import hf_inputs
from tests.passes.harness import BASE, check_pass, per_site
from tests.passes.peft_reference import (
    assert_gradients_equal,
    assert_merge_is_peft_merge,
    build_without_dropout,
    gradients_of_both,
    randomize_peft,
)

SETUPS = {  # PEFT's own defaults for these model types
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


def data(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    return hf_inputs(family, batch=batch, seq=seq, seed=seed)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@functools.lru_cache(maxsize=None)
def twins(family: str):
    """PEFT's IA3 model and fxpeft's, from one seed, with PEFT's random vectors loaded into both (eval mode)."""
    targets, feedforward = SETUPS[family]
    peft_model = peft.get_peft_model(build_without_dropout(family), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward)).eval()
    randomize_peft(peft_model, scale=0.3)
    with torch.no_grad():  # around 1, as trained vectors are
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    state = peft.get_peft_model_state_dict(peft_model)
    adapted = fxpeft.transform(build_without_dropout(family), fxpeft.IA3(targets=targets, feedforward=feedforward))
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval()


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_logits_gradients_and_counts_equal_peft(family):
    peft_model, adapted = twins(family)
    inputs = data(family)
    torch.testing.assert_close(logits(adapted, inputs), logits(peft_model, inputs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(adapted, inputs), logits(build_without_dropout(family), inputs), atol=1e-3)
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    kinds = {site.path: site.feedforward for site in adapted.site_modules()}
    assert any(kinds.values()) and not all(kinds.values())
    assert_gradients_equal(*gradients_of_both(peft_model, adapted, inputs))


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_saved_files_both_ways(family, tmp_path):
    peft_model, adapted = twins(family)
    inputs = data(family)
    want = logits(peft_model, inputs)
    adapted.save_adapter(tmp_path / "fxpeft")
    peft_model.save_pretrained(tmp_path / "peft")
    keys = {folder: sorted(load_file(str(tmp_path / folder / "adapter_model.safetensors"))) for folder in
            ("fxpeft", "peft")}
    assert keys["fxpeft"] == keys["peft"] and all(key.endswith(".ia3_l") for key in keys["peft"])
    config = json.loads((tmp_path / "fxpeft" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("peft_type", "target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
                  "modules_to_save"):
        mine, other = config[field], theirs[field]
        assert (sorted(mine) if isinstance(mine, list) else mine) == \
            (sorted(other) if isinstance(other, list) else other), field
    # PEFT loads fxpeft's folder, fxpeft loads PEFT's: the same logits.
    peft_loaded = peft.PeftModel.from_pretrained(build_without_dropout(family), tmp_path / "fxpeft").eval()
    torch.testing.assert_close(logits(peft_loaded, inputs), want, rtol=1e-6, atol=1e-6)
    loaded = fxpeft.load_adapter(build_without_dropout(family), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, inputs), want, rtol=1e-6, atol=1e-6)
    assert [type(rule).__name__ for rule in loaded.adapters["default"].rules] == ["IA3"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_is_peft_merge_and_unmerge_restores(family):
    peft_model, adapted = twins(family)
    # one weight per vector (an output vector also scales the bias, but gpt2's start at zero: unchanged)
    assert_merge_is_peft_merge(peft_model, adapted, data(family), changed=len(list(adapted.site_modules())))


def test_identity_disabled_and_mixed_rows_are_the_base_bit_for_bit():
    """A fresh adapter (ones), disable_adapters, ``__base__`` rows: the base outputs bit for bit, also with an
    ``inf`` in an inactive adapter's vector; mixed rows of two adapters equal each row alone."""
    targets, feedforward = SETUPS["llama"]
    inputs = data("llama", batch=3)
    base = logits(build_without_dropout("llama"), inputs)
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.IA3(targets=targets, feedforward=feedforward),
                               example_kwargs=inputs).eval()
    assert torch.equal(logits(adapted, inputs), base)
    adapted.add_adapter("other", fxpeft.IA3(targets=["q_proj", "up_proj"], feedforward=["up_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    first = logits(adapted, inputs)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, inputs), base)
    adapted.set_adapter("other")
    second = logits(adapted, inputs)
    adapted.set_adapter("default")
    mixed = adapted(**inputs, adapter_names=["other", BASE, "default"]).logits.detach()
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], second[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], first[2], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        next(adapted.adapters["other"].parameters()).fill_(float("inf"))
    mixed = adapted(**inputs, adapter_names=["default", BASE, "default"]).logits.detach()
    assert torch.equal(mixed[1], base[1]) and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-6)
    adapted.train()  # and no NaN gradient from the inactive adapter's inf
    adapted(**inputs).logits.square().mean().backward()
    grads = [p.grad for p in adapted.adapters["default"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert len(adapted.programs()) == 1


def test_harness_gpt2_conv1d():
    """Conv1D's flattened rows: node counts, identity, gating, PEFT as the reference, compiled over two sizes."""
    targets, feedforward = SETUPS["gpt2"]
    reference = peft.get_peft_model(build_without_dropout("gpt2"), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward))

    def peft_reference(adapted):
        peft.set_peft_model_state_dict(reference, adapted.adapter_state_dict())
        return reference

    paths = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "mlp.c_proj")]
    # ne(gate), its column; the vector flat, where(on, l, 1), the batch, rows [batch, -1, f], positions, unsqueeze,
    # expand, reshape [-1, f]; the product
    roles = {"gate": 2, "scale": 8, "join": 1}
    check_pass(lambda: build_without_dropout("gpt2"), fxpeft.IA3(targets=targets, feedforward=feedforward),
               inputs=[data("gpt2", 2, 9, 1), data("gpt2", 3, 12, 2)], expected_nodes=per_site("ia3", paths, roles),
               weights=lambda adapted: _noisy(adapted), reference=peft_reference)


@torch.no_grad()
def _noisy(adapted):
    generator = torch.Generator().manual_seed(7)
    for parameter in adapted.adapters.parameters():
        parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_peft_config_and_defaults():
    """``transform(model, IA3Config())``: PEFT's default targets and feed-forward modules for the model type."""
    peft_model = peft.get_peft_model(build_without_dropout("llama"), peft.IA3Config())
    from_config = fxpeft.transform(build_without_dropout("llama"), peft.IA3Config())
    left_out = fxpeft.transform(build_without_dropout("llama"), fxpeft.IA3())
    want = {key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(peft_model).items()}
    for adapted in (from_config, left_out):
        assert adapted.adapters["default"].peft_keys() == want


def test_check_exits_0_on_an_ia3_folder(tmp_path, capsys):
    _, adapted = twins("llama")
    build_without_dropout("llama").save_pretrained(tmp_path / "base")
    adapted.save_adapter(tmp_path / "ia3")
    assert cli.main(["check", str(tmp_path / "base"), str(tmp_path / "ia3")]) == 0, capsys.readouterr().out
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"method": "ia3", "targets": ["k_proj", "v_proj"], "feedforward": []}]))
    assert cli.main(["check", str(tmp_path / "base"), str(tmp_path / "ia3"), "--rules", str(rules)]) == 1
    assert "rules-violation" in capsys.readouterr().out


def test_rule_errors():
    with pytest.raises(RuleError, match="subset of target_modules"):
        fxpeft.IA3(targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    with pytest.raises(RuleError, match="`init` must be"):
        fxpeft.IA3(targets=["k_proj"], init="ones")
    with pytest.raises(RuleError, match="empty"):
        fxpeft.IA3(targets=[])
    with pytest.raises(RuleError, match="unknown|fields"):
        fxpeft.IA3(targets=["k_proj"], r=4)
    assert fxpeft.IA3(target_modules=["k_proj"], feedforward_modules=[]) == fxpeft.IA3(targets=["k_proj"],
                                                                                       feedforward=())
    with pytest.raises(RuleError, match="no default"):
        fxpeft.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), fxpeft.IA3(targets=["0"]),
                         example_inputs=(torch.randn(2, 4),))
    with pytest.raises(UnsupportedError, match="use_dora"):
        fxpeft.Rule.from_peft_config({"peft_type": "IA3", "target_modules": ["k_proj"], "use_dora": True})
    rule = fxpeft.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"], init=False)
    assert fxpeft.Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_add_weighted_adapter_equals_peft():
    targets, feedforward = SETUPS["llama"]
    inputs = data("llama")
    peft_model = peft.get_peft_model(build_without_dropout("llama"), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward))
    peft_model.add_adapter("other", peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if "ia3_l" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.IA3(targets=targets, feedforward=feedforward))
    adapted.add_adapter("other", fxpeft.IA3(targets=["q_proj", "down_proj"], feedforward=["down_proj"]))
    for name in ("default", "other"):
        adapted.adapters[name].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name=name))
    peft_model.add_weighted_adapter(["default", "other"], [0.6, -0.7], "mix")
    adapted.add_weighted_adapter(["default", "other"], [0.6, -0.7], "mix")
    want = peft.get_peft_model_state_dict(peft_model, adapter_name="mix")
    got = adapted.adapters["mix"].peft_state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    peft_model.set_adapter("mix")
    adapted.set_adapter("mix")
    torch.testing.assert_close(logits(adapted.eval(), inputs), logits(peft_model.eval(), inputs), rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(UnsupportedError, match="combination"):
        adapted.add_weighted_adapter(["default", "other"], [1.0, 1.0], "cat", combination_type="cat")


def test_check_finds_an_input_join_at_another_site():
    """The structural check accepts a join read as its own linear's input, and still reports one tagged for
    another linear (here down_proj's input scaled but tagged as up_proj's)."""
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.IA3(targets=["down_proj"],
                                                                          feedforward=["down_proj"]))
    _noisy(adapted)
    assert fxpeft.verify(build_without_dropout("llama"), adapted).ok
    program = adapted.programs()[0]
    for node in program.graph.nodes:
        tag = node.meta.get("fxpeft")
        if tag and tag["site"] == "model.layers.0.mlp.down_proj":
            node.meta["fxpeft"] = {**tag, "site": "model.layers.0.mlp.up_proj"}
    program.finish_rewrite()
    report = fxpeft.verify(build_without_dropout("llama"), adapted)
    assert "adapter-misplaced" in {finding.kind for finding in report.failures}, report.summary()
