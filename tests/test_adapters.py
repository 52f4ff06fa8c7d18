"""Several adapters, switching without recompiles, mixed batches, merge and unmerge (vs the eager base)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch._dynamo.utils import counters

import fxpeft
from fxpeft.errors import FxpeftError, RuleError
from tests.models import hf_inputs, hf_model, mlp


def _randomize(adapted, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in adapted.site_modules(adapter_name):
            for parameter in site.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def two_adapters():
    base = hf_model("llama")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    adapted.add_adapter("other", [fxpeft.LoRA(targets=["k_proj", "o_proj", "down_proj"], r=2, alpha=4)])
    _randomize(adapted, "default", 1)
    _randomize(adapted, "other", 2)
    adapted.eval()
    return base, adapted


def _logits(model, inputs, **kwargs):
    return model(**inputs, **kwargs).logits


def _assert_rows_alone(base, adapted, inputs, names, atol):
    """A batch with ``adapter_names`` gives each row what the row gives alone with its adapter set (or the base)."""
    mixed = _logits(adapted, inputs, adapter_names=names)
    for row, name in enumerate(names):
        single = {k: v[row:row + 1] for k, v in inputs.items()}
        if name == "__base__":
            expected = base(**single).logits
        else:
            adapted.set_adapter(name)
            expected = _logits(adapted, single)
        torch.testing.assert_close(mixed[row:row + 1], expected, rtol=1e-5, atol=atol)
    adapted.set_adapter("default")


def test_add_adapter_is_inactive_until_set(two_adapters):
    base, adapted = two_adapters
    assert adapted.active_adapters == ["default"]
    inputs = hf_inputs("llama", batch=2, seq=7)
    only_default = _logits(adapted, inputs)
    adapted.set_adapter("other")
    only_other = _logits(adapted, inputs)
    adapted.set_adapter(["default", "other"])
    both = _logits(adapted, inputs)
    adapted.set_adapter("default")
    base_logits = base(**inputs).logits
    assert not torch.equal(only_default, base_logits) and not torch.equal(only_other, base_logits)
    assert not torch.equal(both, only_default) and not torch.equal(both, only_other)
    # Adapters on different sites of a residual network do not add up linearly, but disabling both does:
    adapted.set_adapter(["default", "other"])
    with adapted.disable_adapters():
        assert torch.equal(_logits(adapted, inputs), base_logits)
    adapted.set_adapter("default")
    assert torch.equal(_logits(adapted, inputs), only_default)


def test_disable_adapters_gives_base_outputs_bit_for_bit(two_adapters):
    base, adapted = two_adapters
    inputs = hf_inputs("llama", batch=3, seq=6)
    with adapted.disable_adapters():
        assert torch.equal(_logits(adapted, inputs), base(**inputs).logits)
    assert not torch.equal(_logits(adapted, inputs), base(**inputs).logits)


def test_mixed_batch_equals_each_row_alone(two_adapters):
    base, adapted = two_adapters
    inputs = hf_inputs("llama", batch=3, seq=6)
    names = ["other", "__base__", "default"]
    _assert_rows_alone(base, adapted, inputs, names, atol=1e-6)
    with pytest.raises(FxpeftError, match="unknown adapters"):
        adapted(**inputs, adapter_names=["default", "nope", "other"])
    with pytest.raises(FxpeftError, match="one adapter name"):
        adapted(**inputs, adapter_names=["default"])


def test_mixed_batch_gathers_shared_sites_in_one_product():
    """Adapters sharing sites (different ranks, one with an extra site): a call with adapter_names runs one gathered
    product per shared site (fxpeft/runtime/mixed_batch.py, passes/lora/mixed_batch.py), equal to each row alone,
    compiled once for any row pattern."""
    base = hf_model("llama")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4)])
    adapted.add_adapter("wide", [fxpeft.LoRA(targets=["q_proj", "v_proj", "o_proj"], r=6)])
    adapted.add_adapter("thin", [fxpeft.LoRA(targets=["q_proj"], r=2, alpha=8)])
    for seed, name in enumerate(adapted.adapters):
        _randomize(adapted, name, 10 + seed)
    adapted.eval()
    inputs = hf_inputs("llama", batch=4, seq=6)
    names = ["thin", "wide", "__base__", "default"]
    _assert_rows_alone(base, adapted, inputs, names, atol=1e-5)
    routed = adapted.programs()[0].module_for(False, torch.device("cpu"), mixed_batch=True)
    products = [node for node in routed.graph.nodes if node.target is torch.ops.aten.bmm.default]
    assert len(products) == 2 * 2 * 2  # q and v of two layers, A then B: the o_proj branches stay single
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(adapted, fullgraph=True, dynamic=True, backend="aot_eager")
    for pattern in (names, ["default", "default", "wide", "thin"]):
        indices = adapted.adapter_indices(pattern)
        with torch.no_grad():
            torch.testing.assert_close(fast(**inputs, adapter_names=indices).logits,
                                       _logits(adapted, inputs, adapter_names=pattern), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_mixed_batch_trains_each_adapter_on_its_rows(two_adapters):
    _, adapted = two_adapters
    adapted.train()
    inputs = hf_inputs("llama", batch=2, seq=5)
    adapted.zero_grad()
    adapted.set_adapter(["default", "other"])  # both trainable
    adapted(**inputs, labels=inputs["input_ids"], adapter_names=["default", "default"]).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in adapted.adapters["other"].parameters())
    assert any(p.grad is not None and p.grad.any() for p in adapted.adapters["default"].parameters())
    adapted.zero_grad()
    adapted(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name in ("default", "other"):  # several adapters active and trained in the same step
        assert any(p.grad is not None and p.grad.any() for p in adapted.adapters[name].parameters())
    adapted.zero_grad()
    adapted.set_adapter("default")
    adapted.eval()


def test_adapter_names_are_checked(two_adapters):
    _, adapted = two_adapters
    with pytest.raises(RuleError, match="exists already"):
        adapted.add_adapter("other", [fxpeft.LoRA(targets=["q_proj"])])
    with pytest.raises(RuleError, match="Invalid adapter name"):
        adapted.add_adapter("a.b", [fxpeft.LoRA(targets=["q_proj"])])
    def structure():
        return [[(n.op, str(n.target)) for n in p.graph.nodes] for p in adapted.programs()]

    inputs = hf_inputs("llama", batch=2, seq=5)
    before, logits = structure(), _logits(adapted, inputs)
    with pytest.raises(fxpeft.errors.NoMatchError):
        adapted.add_adapter("broken", [fxpeft.LoRA(targets=["no_such_module"])])
    assert "broken" not in adapted.adapters
    assert structure() == before
    assert torch.equal(_logits(adapted, inputs), logits)


def test_merge_unmerge_and_delete(two_adapters):
    """``merge()`` of the two active adapters adds ``alpha / r * B @ A`` (computed here: 8/4 and 4/2) to each adapted
    base weight and nothing to the others, and the merged graph, with no adapter node, gives the unmerged outputs;
    ``unmerge()`` restores every base weight. Then a third adapter, active beside ``default``, is deleted: its nodes
    go, ``default`` stays active, and the outputs are ``default``'s alone again."""
    base, adapted = two_adapters
    inputs = hf_inputs("llama", batch=2, seq=8)
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    expected = dict(weights)
    for name, scaling in (("default", 8 / 4), ("other", 4 / 2)):
        for site in adapted.site_modules(name):
            key = f"{site.path}.weight"
            expected[key] = expected[key] + scaling * (site.lora_B @ site.lora_A).detach()
    assert sum(not torch.equal(expected[key], weights[key]) for key in weights) == 2 * (2 + 3)  # 2 layers
    adapted.set_adapter(["default", "other"])
    unmerged = _logits(adapted, inputs)
    adapted.merge()
    for name, parameter in base.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    merged_graph = adapted.programs()[0].module_for(False, unmerged.device, merged=True).graph
    assert not [n for n in merged_graph.nodes if "fxpeft" in n.meta or n.name.startswith("fxpeft_")]
    torch.testing.assert_close(_logits(adapted, inputs), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(FxpeftError, match="unmerge"):
        adapted.set_adapter("default")
    adapted.unmerge()
    for name, parameter in base.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(adapted, inputs), unmerged, rtol=1e-5, atol=1e-6)

    adapted.set_adapter("default")
    only_default = _logits(adapted, inputs)
    adapted.add_adapter("doomed", [fxpeft.LoRA(targets=["q_proj", "up_proj"], r=2)])
    try:
        _randomize(adapted, "doomed", 4)
        adapted.set_adapter(["default", "doomed"])
        assert not torch.allclose(_logits(adapted, inputs), only_default, atol=1e-4)
    finally:
        adapted.delete_adapter("doomed")
    assert list(adapted.adapters) == ["default", "other"] and adapted.active_adapters == ["default"]
    assert not [n for p in adapted.programs() for n in p.graph.nodes
                if n.meta.get("fxpeft", {}).get("adapter") == "doomed" or "doomed" in n.name]
    assert torch.equal(_logits(adapted, inputs), only_default)


def test_delete_adapter_removes_its_nodes():
    base = hf_model("llama")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj"], r=2)])
    adapted.add_adapter("extra", [fxpeft.LoRA(targets=["v_proj"], r=2)])
    _randomize(adapted, "default", 3)
    inputs = hf_inputs("llama", batch=2, seq=6)
    adapted.eval()
    expected = _logits(adapted, inputs)
    adapted.delete_adapter("extra")
    assert list(adapted.adapters) == ["default"]
    tags = {n.meta["fxpeft"]["adapter"] for p in adapted.programs() for n in p.graph.nodes if "fxpeft" in n.meta}
    assert tags == {"default"}
    assert torch.equal(_logits(adapted, inputs), expected)  # "extra" was inactive: it never contributed
    with pytest.raises(FxpeftError, match="only adapter"):
        adapted.delete_adapter("default")


def test_deleting_the_only_active_adapter_activates_the_first_remaining_as_peft():
    """PEFT's ``delete_adapter`` of the only active adapter makes the first remaining adapter active (with a warning);
    fxpeft must not leave the model silently running as the base model. Both on the same small MLP."""
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    twin = peft.get_peft_model(mlp(), peft.LoraConfig(target_modules=["fc1"], r=2))
    twin.add_adapter("extra", peft.LoraConfig(target_modules=["fc2"], r=2))
    twin.set_adapter("extra")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Adapter extra was active which is now deleted. ..."
        twin.delete_adapter("extra")
    adapted = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=(x,))
    adapted.add_adapter("extra", [fxpeft.LoRA(targets=["fc2"], r=2)])
    adapted.set_adapter("extra")
    adapted.delete_adapter("extra")
    assert twin.active_adapters == ["default"]
    assert adapted.active_adapters == twin.active_adapters


def test_merge_and_unload_returns_the_transformers_model():
    base = hf_model("gpt2")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["c_attn"], r=2)])
    _randomize(adapted, "default", 5)
    adapted.eval()
    inputs = hf_inputs("gpt2", batch=2, seq=6)
    expected = _logits(adapted, inputs)
    merged = adapted.merge_and_unload()
    assert type(merged).__name__ == "GPT2LMHeadModel" and hasattr(merged, "generate")
    torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_compiled_switch_disable_reload_and_alpha_do_not_recompile(two_adapters):
    _, adapted = two_adapters
    inputs = hf_inputs("llama", batch=2, seq=9)
    torch._dynamo.reset()
    counters.clear()
    # Recompiles are dynamo's guards, whatever the backend; "eager" skips Inductor's code generation here
    # (tests/test_compile.py runs Inductor itself).
    fast = torch.compile(adapted, fullgraph=True, dynamic=True, backend="eager")
    adapted.set_adapter("default")
    first = fast(**inputs).logits
    torch.testing.assert_close(first, _logits(adapted, inputs), rtol=1e-5, atol=1e-5)
    adapted.set_adapter("other")
    torch.testing.assert_close(fast(**inputs).logits, _logits(adapted, inputs), rtol=1e-5, atol=1e-5)
    with adapted.disable_adapters():
        torch.testing.assert_close(fast(**inputs).logits, _logits(adapted, inputs), rtol=1e-5, atol=1e-5)
    adapted.set_adapter("default")
    _randomize(adapted, "default", 7)  # new weights of the same rank, loaded in place
    adapted.set_alpha(16.0, "default")
    assert {site.scaling.item() for site in adapted.site_modules("default")} == {16.0 / 4}  # alpha / r
    torch.testing.assert_close(fast(**inputs).logits, _logits(adapted, inputs), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    # Mixed batches take the per-row path: one more graph the first time, none for other assignments.
    for names in (["other", "default"], ["__base__", "other"], ["default", "default"]):
        torch.testing.assert_close(fast(**inputs, adapter_names=adapted.adapter_indices(names)).logits,
                                   _logits(adapted, inputs, adapter_names=names), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(counters["graph_break"].values()) == 0
