"""Adapters are isolated from each other: an inactive adapter's values never reach another adapter's rows.

Inactive adapters are still in the graph (switching is a tensor, so nothing recompiles), gated per row. A gate
of 0 *selects* the branch away instead of multiplying it by 0, because ``0 * inf`` is NaN: one Inf in an
inactive adapter would otherwise turn every output NaN, the active adapter's, ``disable_adapters()``'s and the
``"__base__"`` rows of a mixed batch alike. The references are the eager base model and the same adapter loaded
alone.
"""

from __future__ import annotations

import pytest
import torch

import fxpeft
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout

TARGETS = ["q_proj", "v_proj"]


def _randomize(adapted: fxpeft.AdaptedModel, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in adapted.site_modules(name):
            site.lora_B.copy_(0.1 * torch.randn(site.lora_B.shape, generator=generator))


def _poison(adapted: fxpeft.AdaptedModel, name: str, value: float) -> None:
    with torch.no_grad():
        for site in adapted.site_modules(name):
            site.lora_B[0, 0] = value


@pytest.fixture(scope="module", params=[True, False], ids=["folded gates", "gated graph"])
def models(request):
    """``default`` (random B) beside ``broken`` (an Inf or a NaN in B), and ``default`` alone on the same weights;
    eager calls run the graph specialised to the active adapters (fxpeft/runtime/uniform_gates.py) or, with
    ``fold_gates=False``, the gated graph a compiled model runs."""
    base = build_without_dropout("llama")
    adapted = fxpeft.transform(build_without_dropout("llama"), fxpeft.LoRA(targets=TARGETS, r=4, alpha=8))
    _randomize(adapted, "default", seed=3)
    alone = fxpeft.transform(build_without_dropout("llama"), fxpeft.LoRA(targets=TARGETS, r=4, alpha=8))
    alone.adapters["default"].load_peft_state_dict(adapted.adapters["default"].peft_state_dict())
    adapted.add_adapter("broken", fxpeft.LoRA(targets=TARGETS, r=2, alpha=4))
    adapted.fold_gates = request.param
    return base.eval(), adapted.eval(), alone.eval()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_an_inactive_adapter_with_a_non_finite_value_changes_nothing(models, value):
    base, adapted, alone = models
    _poison(adapted, "broken", value)
    data = hf_inputs("llama", batch=3, seq=7)
    with torch.no_grad():
        want = alone(**data).logits
        assert torch.isfinite(want).all()
        assert torch.equal(adapted(**data).logits, want)  # "broken" is loaded, not active
        with adapted.disable_adapters():
            assert torch.equal(adapted(**data).logits, base(**data).logits)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_mixed_batch_keeps_a_broken_tenant_to_its_own_rows(models, value):
    """The eval-mode mixed batch runs one gathered product per shared site; rows of other adapters and base rows
    equal those rows run alone, whatever the broken adapter holds."""
    base, adapted, alone = models
    _poison(adapted, "broken", value)
    data = hf_inputs("llama", batch=4, seq=7)
    with torch.no_grad():
        mixed = adapted(**data, adapter_names=["default", "__base__", "broken", "default"]).logits
        assert torch.isfinite(mixed[[0, 1, 3]]).all()
        assert not torch.isfinite(mixed[2]).all()  # the broken tenant's own row shows its values
        reference_default = alone(**data).logits
        reference_base = base(**data).logits
    torch.testing.assert_close(mixed[[0, 3]], reference_default[[0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], reference_base[1], rtol=1e-5, atol=1e-5)


def test_a_broken_adapter_beside_active_ones_in_training(models):
    """In train mode too (the gated graph, with gradients): the active adapter's loss and gradients are finite
    and equal those of the adapter alone."""
    _, adapted, alone = models
    _poison(adapted, "broken", float("inf"))
    data = hf_inputs("llama", batch=2, seq=7)
    labels = data["input_ids"]
    adapted.train()
    alone.train()
    try:
        for model in (adapted, alone):
            model.zero_grad()
            model(**data, labels=labels).loss.backward()
        grads = {key: site.lora_B.grad for key, site in adapted.adapters["default"].sites.items()}
        reference = {key: site.lora_B.grad for key, site in alone.adapters["default"].sites.items()}
        assert grads.keys() == reference.keys()
        for key, grad in grads.items():
            assert torch.isfinite(grad).all(), key
            torch.testing.assert_close(grad, reference[key], rtol=1e-5, atol=1e-6)
    finally:
        adapted.eval()
        alone.eval()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -1.0, True])
def test_set_alpha_refuses_what_would_poison_every_output(models, alpha):
    _, adapted, _ = models
    before = [site.scaling.clone() for site in adapted.site_modules()]
    with pytest.raises(fxpeft.errors.RuleError, match="set_alpha: `alpha` must be a finite number > 0"):
        adapted.set_alpha(alpha)
    assert all(torch.equal(site.scaling, old) for site, old in zip(adapted.site_modules(), before))
