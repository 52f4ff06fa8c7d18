"""The LoRA pass (passes/lora/): its graph, its numbers, and parity with the ``peft`` package.

``check_lora_pass`` is this pass's helper (DESIGN.md): inserted node counts per site against the calls the
eager model makes, a fresh adapter giving the eager base model's outputs bit for bit (eval and train), and
a random adapter matching the eager base model with the LoRA update merged into its weights.

Parity: the same tiny model is built twice with one seed, one copy goes through
``peft.get_peft_model`` and the other through ``fxpeft.transform``; PEFT's random LoRA weights are loaded
into fxpeft by PEFT's own state-dict keys, then logits, gradients and parameter counts are compared.
"""

from __future__ import annotations

import collections
import copy
import functools
import math

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
from fxpeft.errors import RuleError
from fxpeft.ops.dropout import dropout as lora_dropout
from fxpeft.passes.lora import LoraWeights
from tests.models import hf_inputs, mlp
from tests.passes.peft_reference import build_without_dropout, call, fxpeft_grads, peft_grads, printed, randomize_peft

aten = torch.ops.aten
BASE_ROW = "__base__"  # an adapter_names entry: the row runs the base model


# -- the helper ---------------------------------------------------------------------------------------------
# The ops one LoRA branch adds per eager call of its linear (float32 base, no dropout); see check_lora_pass.
LORA_OPS_PER_CALL = {aten.linear.default: 2, aten.mul.Tensor: 2, aten.add.Tensor: 1, aten.sym_size.int: 2,
                     aten.reshape.default: 2, aten.unsqueeze.default: 3, aten.ne.Scalar: 2,
                     aten.where.ScalarOther: 2, aten.view_as.default: 2}


def lora_sites(adapted: fxpeft.AdaptedModel, adapter_name: str = "default") -> dict[str, LoraWeights]:
    return {site.path: site for site in adapted.adapters[adapter_name].site_modules() if isinstance(site, LoraWeights)}


def tagged_ops(adapted: fxpeft.AdaptedModel, training: bool = True) -> dict[str, collections.Counter]:
    """Per site, the ops of the nodes the pass inserted (``node.meta["fxpeft"]``)."""
    program = adapted.programs()[0]
    module = program.module_for(training, program.device)
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in module.graph.nodes:
        tag = node.meta.get("fxpeft")
        if tag and tag["method"] == "lora":
            ops[tag["site"]][node.target] += 1
    return ops


def eager_calls(model: nn.Module, inputs, paths) -> dict[str, int]:
    """How many times the eager model calls each module in ``paths`` in one forward."""
    calls = collections.Counter()
    handles = [model.get_submodule(path).register_forward_hook(lambda m, a, o, path=path: calls.update([path]))
               for path in paths]
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return dict(calls)


def expected_scaling(rule: fxpeft.LoRA) -> float:
    """LoRA's scaling as the paper and PEFT define it, computed here from the rule's numbers (never read from
    fxpeft): ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. Rules with per-site patterns are not covered."""
    assert not rule.rank_pattern and not rule.alpha_pattern, "per-site r/alpha: compute each site's scaling"
    return rule.alpha / (math.sqrt(rule.r) if rule.use_rslora else rule.r)


def merged_copy(base: nn.Module, sites: dict[str, LoraWeights], scaling: float) -> nn.Module:
    """The eager base model with ``scaling * B @ A`` added to each adapted weight (PEFT's merge); ``scaling``
    comes from the caller (:func:`expected_scaling`), so a wrong scaling in fxpeft shows as a difference."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for path, site in sites.items():
            module = merged.get_submodule(path)
            delta = (site.lora_B @ site.lora_A) * scaling
            module.weight += (delta.T if isinstance(module, Conv1D) else delta).to(module.weight.dtype)
    return merged


def randomize(adapted: fxpeft.AdaptedModel, seed: int = 3, scale: float = 0.1, adapter_name: str = "default") -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in lora_sites(adapted, adapter_name).values():
            for parameter in (site.lora_A, site.lora_B):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def check_lora_pass(base: nn.Module, adapted: fxpeft.AdaptedModel, rule: fxpeft.LoRA, inputs, *,
                    expected_paths: set[str] | None = None, train_exact: bool = True) -> None:
    """The LoRA pass's checks on ``adapted`` (built from a twin of ``base``, the untouched eager model).

    Leaves ``adapted`` with a fresh (zero-B) adapter and in eval mode.
    """
    sites = lora_sites(adapted)
    if expected_paths is not None:
        assert set(sites) == expected_paths
    for site in sites.values():
        site.reset_parameters()  # what a fresh adapter holds: A random, B zero
        assert torch.count_nonzero(site.lora_B) == 0 and torch.count_nonzero(site.lora_A) > 0

    # Node counts: per eager call of the linear, the input in the gated rows only (gate != 0, a reshape to
    # [batch, -1], a per-row mask, a select, a view back), two linears, the per-row gated scaling (scaling * gate,
    # then rows * that, between a reshape to [batch, -1] and back; rows whose gate is 0 selected away) and an add
    # (plus dropout if asked).
    calls = eager_calls(base, inputs, sites)
    per_call = collections.Counter(LORA_OPS_PER_CALL)
    if rule.dropout > 0:
        per_call[lora_dropout] = 1
    ops = tagged_ops(adapted)
    for path in sites:
        assert calls.get(path, 0) >= 1, f"{path} is not called by the eager model"
        assert ops[path] == collections.Counter({op: n * calls[path] for op, n in per_call.items()}), path
    assert set(ops) == set(sites)

    # A fresh adapter is the base model, bit for bit, in eval and in train mode.
    base.eval()
    adapted.eval()
    with torch.no_grad():
        expected = call(base, inputs)
        assert torch.equal(call(adapted, inputs), expected)
        if train_exact:
            base.train()
            adapted.train()
            torch.manual_seed(11)
            expected_train = call(base, inputs)
            torch.manual_seed(11)
            assert torch.equal(call(adapted, inputs), expected_train)
    base.eval()
    adapted.eval()

    # A random adapter: the eager base with ``alpha / r * B @ A`` (the scaling computed here) merged into its
    # weights (eval mode: no dropout). The update must move the outputs far more than the tolerance, so that a
    # scaling off by any factor cannot pass.
    randomize(adapted)
    with torch.no_grad():
        reference = call(merged_copy(base, sites, expected_scaling(rule)), inputs)
        got = call(adapted, inputs)
    moved = (reference - expected).abs().max().item()
    assert moved > 1e-3 + 1e-3 * expected.abs().max().item(), f"the random adapter moves the outputs by {moved:.2g}"
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    for site in sites.values():
        site.reset_parameters()


# -- parity with peft, per family ------------------------------------------------------------------------
# (targets, the linear form being exercised)
FAMILIES = {
    "llama": ["q_proj", "v_proj", "down_proj"],    # aten.linear, GQA
    "gpt2": ["c_attn", "c_proj", "c_fc"],          # Conv1D: addmm with W [in, out], fan_in_fan_out
    "opt": "all-linear",                           # PEFT's all-linear: every linear but lm_head
    "bart": ["q_proj", "v_proj", "fc1"],           # encoder-decoder, cross-attention
    "bert": ["query", "value", "dense"],           # encoder, sequence classification (pooler.dense too)
    "falcon": ["query_key_value", "dense"],        # FalconLinear: matmul(x, W.T)
}
R, ALPHA = 4, 8


class Pair:
    """One family built three times from one seed: eager base, PEFT-wrapped, fxpeft-adapted."""

    def __init__(self, family: str):
        self.family = family
        self.targets = FAMILIES[family]
        self.inputs = hf_inputs(family)
        self.base = build_without_dropout(family)
        self.peft_model = peft.get_peft_model(
            build_without_dropout(family),
            peft.LoraConfig(target_modules=self.targets, r=R, lora_alpha=ALPHA, lora_dropout=0.0))
        self.rule = fxpeft.LoRA(targets=self.targets, r=R, alpha=ALPHA)
        # example_kwargs: the signature of the calls below, so they reuse the first capture.
        self.adapted = fxpeft.transform(build_without_dropout(family), [self.rule], example_kwargs=self.inputs)

    def load_peft_weights(self, seed: int = 5) -> None:
        """Random LoRA weights in PEFT, copied into fxpeft by PEFT's saved keys."""
        self.adapted.adapters["default"].load_peft_state_dict(randomize_peft(self.peft_model, seed))


@functools.lru_cache(maxsize=None)
def pair(family: str) -> Pair:
    return Pair(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_pass(family):
    p = pair(family)
    peft_paths = {name.removeprefix("base_model.model.") for name, module in p.peft_model.named_modules()
                  if isinstance(module, peft.tuners.lora.LoraLayer)}
    check_lora_pass(p.base, p.adapted, p.rule, p.inputs, expected_paths=peft_paths)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_and_shapes_match_peft(family):
    p = pair(family)
    ours = p.adapted.adapter_state_dict()
    theirs = peft.get_peft_model_state_dict(p.peft_model)
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_peft(family):
    p = pair(family)
    p.load_peft_weights()
    for model in (p.peft_model, p.adapted):
        model.zero_grad(set_to_none=True)
    p.peft_model.eval()
    p.adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(call(p.adapted, p.inputs), call(p.peft_model, p.inputs), rtol=1e-5, atol=1e-6)

    p.peft_model.train()
    p.adapted.train()
    theirs = call(p.peft_model, p.inputs)
    ours = call(p.adapted, p.inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    grads_ours, grads_theirs = fxpeft_grads(p.adapted), peft_grads(p.peft_model)
    assert sorted(grads_ours) == sorted(grads_theirs)
    for key, grad in grads_theirs.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grads_ours[key], grad, rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
    p.peft_model.eval()
    p.adapted.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_in_peft(family, tmp_path):
    """fxpeft's folder, read by ``peft.PeftModel.from_pretrained``, gives fxpeft's logits."""
    p = pair(family)
    p.load_peft_weights(seed=6)
    p.adapted.eval()
    p.adapted.save_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(build_without_dropout(family), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, p.inputs), call(p.adapted, p.inputs), rtol=1e-5, atol=1e-6)
    theirs = peft.get_peft_model_state_dict(loaded)
    for key, value in p.adapted.adapter_state_dict().items():
        assert torch.equal(theirs[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_and_printout_match_peft(family):
    p = pair(family)
    assert p.adapted.get_nb_trainable_parameters() == p.peft_model.get_nb_trainable_parameters()
    ours = printed(p.adapted.print_trainable_parameters)
    assert ours == printed(p.peft_model.print_trainable_parameters)
    assert ours.startswith("trainable params: ")


def test_base_parameters_stay_frozen_and_unwritten():
    p = pair("llama")
    before = {name: t.clone() for name, t in p.adapted.base_model.named_parameters()}
    assert not any(t.requires_grad for t in p.adapted.base_model.parameters())
    p.load_peft_weights(seed=9)
    p.adapted.train()
    optimizer = torch.optim.SGD([t for t in p.adapted.parameters() if t.requires_grad], lr=0.5)
    call(p.adapted, p.inputs).pow(2).mean().backward()
    optimizer.step()
    p.adapted.eval()
    for name, tensor in p.adapted.base_model.named_parameters():
        assert torch.equal(tensor, before[name]), name
        assert tensor.grad is None, name


# -- hyper-parameters, against PEFT on small modules -------------------------------------------------------
def two_layer(dtype=torch.float32) -> nn.Module:
    """No dropout of its own, so train-mode outputs are deterministic unless LoRA adds dropout."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(dtype).eval()


X = (torch.randn(5, 16, generator=torch.Generator().manual_seed(2)),)


def transformed(model: nn.Module, example=X, **lora) -> fxpeft.AdaptedModel:
    return fxpeft.transform(model, [fxpeft.LoRA(**lora)], example_inputs=example)


def peft_twin(model: nn.Module, **lora) -> nn.Module:
    config = dict(lora)
    config["target_modules"] = list(config.pop("targets"))
    for ours, theirs in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if ours in config:
            config[theirs] = config.pop(ours)
    if config.pop("init", "default") == "gaussian":
        config["init_lora_weights"] = "gaussian"
    return peft.get_peft_model(model, peft.LoraConfig(**config))


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_scaling_is_alpha_over_r_or_sqrt_r(use_rslora, expected):
    lora = dict(targets=["0", "2"], r=4, alpha=8, use_rslora=use_rslora)
    adapted = transformed(two_layer(), **lora)
    check_lora_pass(two_layer(), adapted, fxpeft.LoRA(**lora), X)
    twin = peft_twin(two_layer(), **lora)
    for path, site in lora_sites(adapted).items():
        assert site.scaling.item() == pytest.approx(expected, rel=1e-7)
        assert site.scaling.item() == pytest.approx(twin.base_model.model.get_submodule(path).scaling["default"],
                                                    rel=1e-7)
    # The scaling reaches the output: each layer is base(x) + scaling * x A^T B^T.
    randomize(adapted)
    first, second = lora_sites(adapted)["0"], lora_sites(adapted)["2"]
    base = two_layer()
    with torch.no_grad():
        hidden = base[1](base[0](X[0]) + expected * (X[0] @ first.lora_A.T @ first.lora_B.T))
        reference = base[2](hidden) + expected * (hidden @ second.lora_A.T @ second.lora_B.T)
        torch.testing.assert_close(adapted(*X), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_alpha_scales_by_alpha_over_r_as_peft(use_rslora):
    """``set_alpha(20)`` makes the scaling ``20 / r`` (``20 / sqrt(r)`` with rsLoRA), computed here, and the outputs
    PEFT's after ``set_scale`` to the same alpha on identical weights; ``alpha * r`` or a stale scaling fails."""
    lora = dict(targets=["0", "2"], r=4, alpha=8, use_rslora=use_rslora)
    adapted = transformed(two_layer(), **lora).eval()
    twin = peft_twin(two_layer(), **lora).eval()
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin, scale=0.3))
    adapted.set_alpha(20.0)
    expected = 20 / (math.sqrt(4) if use_rslora else 4)
    for path in ("0", "2"):
        twin.base_model.model.get_submodule(path).set_scale("default", 20 / 8)  # PEFT: a factor on alpha / r
        assert twin.base_model.model.get_submodule(path).scaling["default"] == pytest.approx(expected, rel=1e-12)
    assert [site.scaling.item() for site in lora_sites(adapted).values()] == [pytest.approx(expected, rel=1e-7)] * 2
    first, second = lora_sites(adapted)["0"], lora_sites(adapted)["2"]
    base = two_layer()
    with torch.no_grad():
        hidden = base[1](base[0](X[0]) + expected * (X[0] @ first.lora_A.T @ first.lora_B.T))
        reference = base[2](hidden) + expected * (hidden @ second.lora_A.T @ second.lora_B.T)
        ours = adapted(*X)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, twin(*X), rtol=1e-5, atol=1e-6)
        adapted.set_alpha(8.0)  # back: the outputs of the rule's own alpha, PEFT's with scale 1
        for path in ("0", "2"):
            twin.base_model.model.get_submodule(path).set_scale("default", 1.0)
        torch.testing.assert_close(adapted(*X), twin(*X), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(adapted(*X), ours, rtol=1e-3, atol=1e-4)


class _LinearThenConv1D(nn.Module):
    """An ``nn.Linear`` (weight ``[out, in]``) and a transformers ``Conv1D`` (weight ``[in, out]``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 32)
        self.proj = Conv1D(8, 32)
        nn.init.normal_(self.proj.weight, std=0.2)

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(x)))


def test_merge_adds_alpha_over_r_times_b_a_and_unmerge_restores():
    """``merge()`` adds ``alpha / r * B @ A`` (computed here; transposed for a Conv1D's ``[in, out]`` weight) to
    each base weight, and the merged model gives the unmerged outputs; ``unmerge()`` gives every base weight back
    (within float rounding) and the unmerged outputs again."""
    rule = fxpeft.LoRA(targets=["fc", "proj"], r=4, alpha=12)
    adapted = fxpeft.transform(_LinearThenConv1D().eval(), [rule], example_inputs=X).eval()
    randomize(adapted, scale=0.3)
    sites = lora_sites(adapted)
    before = {name: t.detach().clone() for name, t in adapted.base_model.named_parameters()}
    with torch.no_grad():
        unmerged = adapted(*X)
        reference = merged_copy(_LinearThenConv1D().eval(), sites, 12 / 4)(*X)
        torch.testing.assert_close(unmerged, reference, rtol=1e-5, atol=1e-6)
        adapted.merge()
        fc, proj = adapted.base_model.fc.weight, adapted.base_model.proj.weight
        torch.testing.assert_close(fc, before["fc.weight"] + 3.0 * sites["fc"].lora_B @ sites["fc"].lora_A,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(proj, before["proj.weight"] + 3.0 * (sites["proj"].lora_B @ sites["proj"].lora_A).T,
                                   rtol=0, atol=1e-6)
        assert (fc - before["fc.weight"]).abs().max() > 0.1 and (proj - before["proj.weight"]).abs().max() > 0.1
        torch.testing.assert_close(adapted(*X), unmerged, rtol=1e-5, atol=1e-6)
        adapted.unmerge()
        for name, tensor in adapted.base_model.named_parameters():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(adapted(*X), unmerged, rtol=1e-5, atol=1e-6)


def test_mixed_batch_rows_against_the_formula():
    """``adapter_names`` gives each row its own adapter's update and ``"__base__"`` rows none: every row equals
    ``base + alpha / r * x A^T B^T`` at its adapter's sites, computed here, in eval mode (the gathered form: both
    adapters share a site) and in train mode (the gated form)."""
    adapted = transformed(two_layer(), targets=["0", "2"], r=4, alpha=8)
    adapted.add_adapter("other", [fxpeft.LoRA(targets=["0"], r=2, alpha=6)])
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for site in adapted.site_modules():
            for parameter in (site.lora_A, site.lora_B):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    updates = {"default": {"0": 8 / 4, "2": 8 / 4}, "other": {"0": 6 / 2}, BASE_ROW: {}}
    names = ["default", BASE_ROW, "other", "default", "other"]
    base = two_layer()

    def branch(name: str, path: str, x: torch.Tensor) -> torch.Tensor:
        if path not in updates[name]:
            return torch.zeros(())
        site = lora_sites(adapted, name)[path]
        return updates[name][path] * (x @ site.lora_A.T @ site.lora_B.T)

    with torch.no_grad():
        rows = []
        for i, name in enumerate(names):
            x = X[0][i:i + 1]
            hidden = base[1](base[0](x) + branch(name, "0", x))
            rows.append(base[2](hidden) + branch(name, "2", hidden))
        expected = torch.cat(rows)
        assert not torch.allclose(expected[2], base(X[0])[2], atol=1e-3)
        for training in (False, True):
            adapted.train(training)
            got = adapted(*X, adapter_names=names)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"train={training}: {m}")
            assert torch.equal(got[1], base(X[0])[1]), "the __base__ row is not the base model's bit for bit"
    adapted.eval()


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(512, 512)).eval()
    adapted = fxpeft.transform(wide, [fxpeft.LoRA(targets=["0"], r=16, init="gaussian")],
                               example_inputs=(torch.randn(3, 512),))
    site = lora_sites(adapted)["0"]
    assert site.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert site.lora_A.mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.count_nonzero(site.lora_B) == 0
    torch.manual_seed(0)
    default = fxpeft.transform(nn.Sequential(nn.Linear(512, 512)).eval(), [fxpeft.LoRA(targets=["0"], r=16)],
                               example_inputs=(torch.randn(3, 512),))
    a = lora_sites(default)["0"].lora_A
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert a.abs().max().item() <= bound and a.abs().max().item() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(lora_sites(default)["0"].lora_B) == 0


def test_dropout_acts_in_train_mode_only_and_matches_peft():
    lora = dict(targets=["0", "2"], r=4, alpha=8, dropout=0.3)
    adapted = transformed(two_layer(), **lora)
    check_lora_pass(two_layer(), adapted, fxpeft.LoRA(**lora), X)
    twin = peft_twin(two_layer(), **lora)
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin))
    without_dropout = transformed(two_layer(), **{**lora, "dropout": 0.0})
    without_dropout.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(twin))
    with torch.no_grad():
        reference = without_dropout(*X)
        adapted.eval()
        assert torch.equal(adapted(*X), reference)
        assert torch.equal(adapted(*X), reference)
        adapted.train()
        twin.train()
        first, second = adapted(*X), adapted(*X)
        assert not torch.allclose(first, reference) and not torch.allclose(first, second)
        for seed in (1, 2):  # same seed, same masks as PEFT's nn.Dropout on the LoRA input
            torch.manual_seed(seed)
            theirs = twin(*X)
            torch.manual_seed(seed)
            torch.testing.assert_close(adapted(*X), theirs, rtol=1e-6, atol=1e-7)
        twin.eval()
        adapted.eval()
        torch.testing.assert_close(adapted(*X), twin(*X), rtol=1e-6, atol=1e-7)
    eval_graph = adapted.programs()[0].module_for(False, torch.device("cpu")).graph
    assert not [n for n in eval_graph.nodes if n.target is lora_dropout]  # the eval twin drops them
    train_graph = adapted.programs()[0].module_for(True, torch.device("cpu")).graph
    draws = [n.args[3] for n in train_graph.nodes if n.target is lora_dropout and "fxpeft" in n.meta]
    assert len(draws) == len(set(draws)) == 2  # each its own draw (see fxpeft.ops.dropout)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_copies_with_peft_keys(bias):
    lora = dict(targets=["fc1"], r=4, alpha=8, bias=bias)
    base = mlp()
    adapted = transformed(base, **lora)
    twin = peft_twin(mlp(), **lora)
    ours, theirs = adapted.adapter_state_dict(), peft.get_peft_model_state_dict(twin)
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.fc1.base_layer.bias" in ours
    assert ("base_model.model.fc2.bias" in ours) == (bias == "all")
    assert adapted.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()
    check_lora_pass(mlp(), adapted, fxpeft.LoRA(**lora), X, train_exact=False)

    # One optimizer step on identical weights: the copies move like PEFT's biases, the base's do not.
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin))
    saved = {name: t.detach().clone() for name, t in base.named_parameters()}
    for model in (adapted, twin):
        model.eval()  # mlp() has its own dropout; eval keeps both sides deterministic
        optimizer = torch.optim.SGD([t for t in model.parameters() if t.requires_grad], lr=0.5)
        model(*X).pow(2).mean().backward()
        optimizer.step()
    for name, tensor in base.named_parameters():
        assert torch.equal(tensor, saved[name]) and not tensor.requires_grad, name
    moved = adapted.adapter_state_dict()["base_model.model.fc1.base_layer.bias"]
    assert not torch.equal(moved, saved["fc1.bias"])
    for key, value in peft.get_peft_model_state_dict(twin).items():
        torch.testing.assert_close(adapted.adapter_state_dict()[key], value, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(adapted(*X), twin(*X), rtol=1e-6, atol=1e-7)


class _WithLogitBias(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8)
        self.logit_bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.fc(x) + self.logit_bias


def test_bias_all_means_parameters_named_bias():
    """PEFT's ``bias="all"`` trains parameters *named* ``bias``; ``logit_bias`` is not one of them."""
    adapted = transformed(_WithLogitBias(), targets=["fc"], r=2, bias="all")
    twin = peft_twin(_WithLogitBias(), targets=["fc"], r=2, bias="all")
    assert sorted(adapted.adapter_state_dict()) == sorted(peft.get_peft_model_state_dict(twin))
    assert adapted.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()


def test_half_precision_base_matches_peft():
    """PEFT keeps the adapter in float32, casts x before dropout and adds before casting back."""
    lora = dict(targets=["0", "2"], r=4, alpha=8)
    x = (X[0].to(torch.bfloat16),)
    adapted = transformed(two_layer(torch.bfloat16), x, **lora)
    twin = peft_twin(two_layer(torch.bfloat16), **lora)
    assert {site.lora_A.dtype for site in lora_sites(adapted).values()} == {torch.float32}
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin, scale=0.5))
    with torch.no_grad():
        fresh_base = two_layer(torch.bfloat16)
        ours, theirs = adapted(*x), twin(*x)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, fresh_base(*x))


def test_double_precision_base_matches_peft():
    """``alpha / r = 16 / 3`` is not a float32 number: the scaling must keep the adapter's precision."""
    lora = dict(targets=["0", "2"], r=3, alpha=16)
    x = (X[0].double(),)
    adapted = transformed(two_layer(torch.float64), x, **lora)
    twin = peft_twin(two_layer(torch.float64), **lora)
    adapted.adapters["default"].load_peft_state_dict(randomize_peft(twin, scale=0.5))
    with torch.no_grad():
        assert torch.equal(adapted(*x), twin(*x))


def test_linear_feeding_linear():
    """A LoRA site whose input is another LoRA site's output (the pass must describe what it inserts)."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval()
    lora = dict(targets=["0", "1"], r=2, alpha=4)
    adapted = fxpeft.transform(chain, [fxpeft.LoRA(**lora)], example_inputs=X)
    torch.manual_seed(0)
    check_lora_pass(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval(), adapted, fxpeft.LoRA(**lora), X)


def test_two_lora_rules_on_one_linear_is_an_error():
    with pytest.raises(RuleError, match="0 is selected by more than one LoRA rule"):
        fxpeft.transform(two_layer(), [fxpeft.LoRA(targets=["0"], r=2), fxpeft.LoRA(targets=["0", "2"], r=4)],
                         example_inputs=X)


def test_no_match_lists_candidates():
    with pytest.raises(fxpeft.errors.NoMatchError) as info:
        transformed(mlp(), targets=["fc3"])
    assert "fc1" in str(info.value) or "fc2" in str(info.value)
