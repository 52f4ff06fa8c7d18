"""DoRA (``fxpeft.LoRA(..., use_dora=True)``, passes/lora/dora.py) against PEFT 0.21.2's ``use_dora=True``.

The same tiny model is built twice from one seed, once through ``peft.get_peft_model`` and once through
``fxpeft.transform``; PEFT's random ``lora_A``, ``lora_B`` and ``lora_magnitude_vector`` are loaded into fxpeft by
PEFT's saved keys, then logits, gradients, parameter counts, files and merges are compared. On these models fxpeft
computes PEFT's numbers bit for bit (the comparisons below allow float rounding all the same).
"""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import RuleError, UnsupportedError
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout, call, fxpeft_grads, peft_grads, printed, randomize_peft

R, ALPHA = 4, 8
FAMILIES = {
    "llama": ["q_proj", "v_proj", "down_proj"],  # aten.linear, no bias
    "gpt2": ["c_attn", "c_proj", "c_fc"],        # Conv1D: addmm with W [in, out] (fan_in_fan_out) and a bias
    "bart": ["q_proj", "v_proj", "fc1"],         # encoder-decoder, linears with a bias
}
MAGNITUDE = "lora_magnitude_vector"


def peft_config(family: str, **extra) -> peft.LoraConfig:
    return peft.LoraConfig(**{"target_modules": FAMILIES[family], "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
                              "use_dora": True, **extra})


def peft_trainable_grads(model) -> dict[str, torch.Tensor]:
    """PEFT's gradients under its saved keys (the magnitude's module parameter ``...weight`` is saved without it)."""
    return {key.removesuffix(".weight") if MAGNITUDE in key else key: grad for key, grad in peft_grads(model).items()}


class Pair:
    """One family built three times from one seed: the eager base, PEFT with DoRA, fxpeft with DoRA."""

    def __init__(self, family: str):
        self.family = family
        self.inputs = hf_inputs(family)
        self.base = build_without_dropout(family)
        self.peft_model = peft.get_peft_model(build_without_dropout(family), peft_config(family))
        self.rule = fxpeft.LoRA(targets=FAMILIES[family], r=R, alpha=ALPHA, use_dora=True)
        self.adapted = fxpeft.transform(build_without_dropout(family), [self.rule], example_kwargs=self.inputs)
        self.fresh = {key: value.detach().clone() for key, value in self.adapted.adapter_state_dict().items()}

    def load_peft_weights(self, seed: int = 5) -> dict[str, torch.Tensor]:
        state = randomize_peft(self.peft_model, seed)
        self.adapted.adapters["default"].load_peft_state_dict(state)
        return state


@functools.lru_cache(maxsize=None)
def pair(family: str) -> Pair:
    return Pair(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_keys_magnitude_and_counts_match_peft(family):
    """Before any weight is changed: the same keys, shapes and dtypes; the magnitude PEFT initialises (the row norms
    of ``W``, a Conv1D's taken over its stored columns); PEFT's parameter counts and printout; and a fresh adapter
    gives PEFT's outputs, which here are the base model's bit for bit (``m / ||W|| = 1`` exactly, so the update is
    ``0 * (y - b) + 1 * 0``)."""
    p = pair(family)
    theirs = peft.get_peft_model_state_dict(p.peft_model)
    assert sorted(p.fresh) == sorted(theirs)
    magnitudes = [key for key in theirs if MAGNITUDE in key]
    assert magnitudes and all(key.endswith(f".{MAGNITUDE}") for key in magnitudes)
    for key, value in theirs.items():
        assert p.fresh[key].shape == value.shape and p.fresh[key].dtype == value.dtype, key
        if MAGNITUDE in key:
            assert torch.equal(p.fresh[key], value), key
    for key in magnitudes:  # a Conv1D stores W as [in, out]: its rows are the stored columns
        weight = p.base.get_parameter(key.removeprefix("base_model.model.").replace(MAGNITUDE, "weight"))
        torch.testing.assert_close(p.fresh[key], weight.norm(dim=0 if family == "gpt2" else 1), rtol=0, atol=1e-6)
    assert p.adapted.get_nb_trainable_parameters() == p.peft_model.get_nb_trainable_parameters()
    assert printed(p.adapted.print_trainable_parameters) == printed(p.peft_model.print_trainable_parameters)
    with torch.no_grad():
        p.adapted.eval()
        p.peft_model.eval()
        want = call(p.base, p.inputs)
        assert torch.equal(call(p.peft_model, p.inputs), want)
        assert torch.equal(call(p.adapted, p.inputs), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_peft(family):
    """Random A, B and magnitude from PEFT: eval and train logits, and the gradients of A, B and the magnitude (PEFT
    detaches the weight norm: a gradient through it would differ here)."""
    p = pair(family)
    p.load_peft_weights()
    for model in (p.peft_model, p.adapted):
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        p.peft_model.eval()
        p.adapted.eval()
        ours = call(p.adapted, p.inputs)
        torch.testing.assert_close(ours, call(p.peft_model, p.inputs), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, call(p.base, p.inputs), atol=1e-3)
    p.peft_model.train()
    p.adapted.train()
    theirs, ours = call(p.peft_model, p.inputs), call(p.adapted, p.inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    grads_ours, grads_theirs = fxpeft_grads(p.adapted), peft_trainable_grads(p.peft_model)
    assert sorted(grads_ours) == sorted(grads_theirs)
    assert any(MAGNITUDE in key for key in grads_theirs)
    for key, grad in grads_theirs.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
    for model in (p.peft_model, p.adapted):
        model.zero_grad(set_to_none=True)
        model.eval()


def test_the_weight_norm_is_a_constant_in_backward():
    """PEFT's detail (DoRA paper, section 4.3): no gradient flows through ``||W + s B A||``. With the norm's gradient
    the A and B gradients would differ from PEFT's; here they are checked against a hand-written PEFT formula."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["0"], r=2, alpha=4, use_dora=True)],
                               example_inputs=(torch.randn(3, 6),))
    site = next(iter(adapted.adapters["default"].site_modules()))
    with torch.no_grad():
        site.lora_B.normal_()
        site.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(3, 6)
    adapted.train()
    adapted(x).pow(2).sum().backward()
    a, b, m = (t.detach().clone().requires_grad_() for t in (site.lora_A, site.lora_B, site.lora_magnitude_vector))
    w, bias = base[0].weight, base[0].bias
    norm = (w + 2.0 * (b @ a).detach()).norm(dim=1).detach()
    y = x @ w.T + bias
    scale = m / norm
    ((y + (scale - 1) * (y - bias) + scale * (x @ a.T @ b.T) * 2.0).pow(2).sum()).backward()
    for ours, want in ((site.lora_A, a), (site.lora_B, b), (site.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_files_both_ways(family, tmp_path):
    """fxpeft's folder (``use_dora: true``, PEFT's keys) loads in PEFT with fxpeft's logits; PEFT's folder loads in
    fxpeft with PEFT's logits."""
    p = pair(family)
    p.load_peft_weights(seed=6)
    p.adapted.eval()
    p.peft_model.eval()
    ours_dir, theirs_dir = tmp_path / "fxpeft", tmp_path / "peft"
    p.adapted.save_adapter(ours_dir)
    p.peft_model.save_pretrained(theirs_dir)
    config = json.loads((ours_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(build_without_dropout(family), ours_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, p.inputs), call(p.adapted, p.inputs), rtol=1e-5, atol=1e-6)
    saved = peft.get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(p.adapted.adapter_state_dict())
    for key, value in p.adapted.adapter_state_dict().items():
        assert torch.equal(saved[key], value), key
    again = fxpeft.load_adapter(build_without_dropout(family), theirs_dir).eval()
    assert again.adapters["default"].rules[0].use_dora is True
    with torch.no_grad():
        torch.testing.assert_close(call(again, p.inputs), call(p.peft_model, p.inputs), rtol=1e-5, atol=1e-6)
    theirs = peft.get_peft_model_state_dict(p.peft_model)
    for key, value in again.adapter_state_dict().items():
        assert torch.equal(theirs[key], value), key


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unmerge_match_peft(family):
    """``merge()`` writes PEFT's ``m / ||W + dW|| * (W + dW)`` (the merged weights equal PEFT's merged weights) and
    gives the unmerged outputs; ``unmerge()`` gives the base weights and outputs back."""
    p = pair(family)
    p.load_peft_weights(seed=7)
    p.adapted.eval()
    p.peft_model.eval()
    before = {name: t.detach().clone() for name, t in p.adapted.base_model.named_parameters()}
    with torch.no_grad():
        unmerged = call(p.adapted, p.inputs)
        p.adapted.merge()
        p.peft_model.merge_adapter()
        theirs = dict(p.peft_model.named_parameters())
        moved = 0
        for name, tensor in p.adapted.base_model.named_parameters():
            peft_name = next(k for k in (f"base_model.model.{name}",
                                         f"base_model.model.{name.rpartition('.')[0]}.base_layer.{name.rpartition('.')[2]}")
                             if k in theirs)
            torch.testing.assert_close(tensor, theirs[peft_name], rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
            moved += not torch.equal(tensor, before[name])
        assert moved == sum(MAGNITUDE in key for key in p.fresh)  # every adapted linear's weight
        torch.testing.assert_close(call(p.adapted, p.inputs), unmerged, rtol=1e-5, atol=1e-5)
        p.adapted.unmerge()
        p.peft_model.unmerge_adapter()
        for name, tensor in p.adapted.base_model.named_parameters():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(call(p.adapted, p.inputs), unmerged, rtol=1e-5, atol=1e-6)
        for name, tensor in p.adapted.base_model.named_parameters():  # exactly, for the tests sharing the model
            tensor.copy_(before[name])


def test_disabled_and_inactive_adapters_give_the_base_bit_for_bit():
    """``disable_adapters()`` gives the base outputs bit for bit, and an inactive DoRA adapter whose magnitude holds
    an Inf changes nothing (its rows are selected away, not multiplied by 0)."""
    p = pair("llama")
    p.load_peft_weights(seed=8)
    p.adapted.eval()
    with torch.no_grad():
        want = call(p.base, p.inputs)
        with p.adapted.disable_adapters():
            assert torch.equal(call(p.adapted, p.inputs), want)
        p.adapted.add_adapter("broken", [fxpeft.LoRA(targets=["q_proj"], r=2, use_dora=True)])
        try:
            for site in p.adapted.adapters["broken"].site_modules():
                site.lora_magnitude_vector.fill_(float("inf"))
            active = call(p.adapted, p.inputs)
            assert torch.isfinite(active).all()
            p.adapted.set_adapter("broken")
            assert not torch.isfinite(call(p.adapted, p.inputs)).all()
            p.adapted.set_adapter("default")
            assert torch.equal(call(p.adapted, p.inputs), active)
        finally:
            p.adapted.set_adapter("default")
            p.adapted.delete_adapter("broken")


def test_dropout_matches_peft_in_train_and_eval():
    """PEFT's DoRA with dropout, in train mode, computes the LoRA part *and* the ``(m / norm - 1)`` base part on the
    dropped input; in eval mode the base part is ``y - b``. Same seed, same masks."""
    inputs = hf_inputs("llama")
    twin = peft.get_peft_model(build_without_dropout("llama"), peft_config("llama", lora_dropout=0.3))
    adapted = fxpeft.transform(build_without_dropout("llama"), [
        fxpeft.LoRA(targets=FAMILIES["llama"], r=R, alpha=ALPHA, dropout=0.3, use_dora=True)], example_kwargs=inputs)
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin, seed=9))
    twin.train()
    adapted.train()
    for seed in (1, 2):
        torch.manual_seed(seed)
        theirs = call(twin, inputs)
        torch.manual_seed(seed)
        ours = call(adapted, inputs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(call(adapted, inputs), ours)
    twin.eval()
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(call(adapted, inputs), call(twin, inputs), rtol=1e-5, atol=1e-6)


def test_refused_where_peft_refuses_or_drops_the_magnitude():
    """Mixed batches naming a DoRA adapter are refused (PEFT: "Cannot pass `adapter_names` when DoRA is enabled");
    ``add_weighted_adapter`` of DoRA adapters is refused (PEFT combines A and B only and silently leaves the new
    adapter's magnitude at the base norms). ``use_dora`` must be a bool."""
    p = pair("llama")
    batch = p.inputs["input_ids"].shape[0]
    with pytest.raises(ValueError, match="DoRA"):
        p.peft_model(**p.inputs, adapter_names=["default"] * batch)
    with pytest.raises(UnsupportedError, match="DoRA adapters"):
        p.adapted(**p.inputs, adapter_names=["default", "__base__"][:batch])
    with pytest.raises(UnsupportedError, match="DoRA adapters"):
        p.adapted.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    assert "combined" not in p.adapted.adapters
    with pytest.raises(RuleError, match="use_dora"):
        fxpeft.LoRA(targets=["q_proj"], use_dora="yes")


def test_compiles_whole_graph_and_trains_as_eager():
    """``torch.compile(fullgraph=True, dynamic=True)`` (aot_eager): one graph, no break, over two sizes; the compiled
    train step's outputs and gradients (A, B, magnitude) equal eager's."""
    from torch._dynamo.utils import counters

    p = pair("llama")
    p.load_peft_weights(seed=10)
    other = hf_inputs("llama", batch=3, seq=12, seed=2)
    p.adapted.train()
    call(p.adapted, other)  # captured eagerly first (the same signature: no new capture)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(p.adapted, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        for inputs in (p.inputs, other):
            results = []
            for model in (p.adapted, compiled):
                p.adapted.zero_grad(set_to_none=True)
                out = call(model, inputs)
                out.pow(2).mean().backward()
                results.append((out.detach(), {k: v.clone() for k, v in fxpeft_grads(p.adapted).items()
                                               if v is not None}))
            (eager, eager_grads), (got, got_grads) = results
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
            assert eager_grads.keys() == got_grads.keys() and any(MAGNITUDE in k for k in got_grads)
            for key, grad in eager_grads.items():
                torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-6)
    finally:
        p.adapted.zero_grad(set_to_none=True)
        p.adapted.eval()
    assert counters["stats"]["unique_graphs"] == 1 and not sum(counters["graph_break"].values())
    assert len(p.adapted.programs()) == 1


def test_bfloat16_base_matches_peft_fresh_and_trained():
    """Over a bfloat16 base PEFT computes the initial magnitude in bfloat16 (before casting the adapter to float32),
    so a fresh DoRA adapter moves the outputs by that rounding: fxpeft starts from the same magnitude and gives PEFT's
    outputs bit for bit, fresh and with random weights (float32 adapters, PEFT's autocast_adapter_dtype)."""
    inputs = hf_inputs("llama")
    targets = ["q_proj", "v_proj"]
    twin = peft.get_peft_model(build_without_dropout("llama").to(torch.bfloat16), peft.LoraConfig(
        target_modules=targets, r=R, lora_alpha=ALPHA, use_dora=True)).eval()
    adapted = fxpeft.transform(build_without_dropout("llama").to(torch.bfloat16), [
        fxpeft.LoRA(targets=targets, r=R, alpha=ALPHA, use_dora=True)], example_kwargs=inputs).eval()
    theirs, ours = peft.get_peft_model_state_dict(twin), adapted.adapter_state_dict()
    assert {v.dtype for v in ours.values()} == {v.dtype for v in theirs.values()} == {torch.float32}
    for key in (k for k in theirs if MAGNITUDE in k):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        assert torch.equal(call(adapted, inputs), call(twin, inputs))
        adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin, seed=11))
        got = call(adapted, inputs)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, call(twin, inputs), rtol=1e-2, atol=1e-2)


def test_two_active_adapters_compose_as_peft():
    """Several active adapters at one linear: each DoRA branch takes the running result (the adapters before it
    included) as its base part, as PEFT's ``result`` is; with a plain LoRA adapter too. fxpeft applies them in the
    order they were added (PEFT: the order given to ``set_adapter``, the same here)."""
    inputs = hf_inputs("llama")
    targets = ["q_proj", "v_proj"]

    def config(use_dora):
        return peft.LoraConfig(target_modules=targets, r=R, lora_alpha=ALPHA, use_dora=use_dora)

    twin = peft.get_peft_model(build_without_dropout("llama"), config(True))
    adapted = fxpeft.transform(build_without_dropout("llama"), [
        fxpeft.LoRA(targets=targets, r=R, alpha=ALPHA, use_dora=True)], example_kwargs=inputs)
    for name, use_dora in (("two", True), ("plain", False)):
        twin.add_adapter(name, config(use_dora))
        adapted.add_adapter(name, [fxpeft.LoRA(targets=targets, r=R, alpha=ALPHA, use_dora=use_dora)])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in sorted(twin.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for name in ("default", "two", "plain"):
            adapted.adapters[name].load_peft_state_dict(peft.get_peft_model_state_dict(twin, adapter_name=name))
        twin.eval()
        adapted.eval()
        for active in (["default", "two"], ["default", "plain"], ["two", "plain"]):
            twin.base_model.set_adapter(active)
            adapted.set_adapter(active)
            torch.testing.assert_close(call(adapted, inputs), call(twin, inputs), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, active=active: f"{active}: {m}")
