"""Casts and moves after ``transform``: ``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.float()``, ``.double()``,
``.to(device)`` (fxpeft/runtime/recapture.py), and training refused while adapters are merged.

The reference is PEFT with the base cast *before* ``get_peft_model`` (its default ``autocast_adapter_dtype=True``
keeps adapters in float32 over a half-precision base, which is fxpeft's policy after a cast too), on identical
weights; with adapters disabled, the base model cast the same way, bit for bit. Tolerances are torch's defaults for
the dtype compared (bfloat16: rtol 1.6e-2), though on this machine the logits come out equal.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import fxpeft
from fxpeft import model as model_module
from fxpeft.errors import FxpeftError
from fxpeft.passes.prompt import PromptTuningCodec
from fxpeft.rules import LoRA, PrefixTuning, PromptTuning, Trainable
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout, fxpeft_grads, peft_grads, randomize_peft

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _cast(model: nn.Module, dtype: torch.dtype, how: str) -> nn.Module:
    return model.to(dtype) if how == "to" else getattr(model, how)()


def _twins(family: str, dtype: torch.dtype, **extra) -> tuple[nn.Module, fxpeft.AdaptedModel]:
    """PEFT over the base cast to ``dtype`` first, and fxpeft transformed in float32 (not cast yet), with PEFT's
    random adapter weights in both."""
    config = peft.LoraConfig(target_modules=TARGETS[family], r=4, lora_alpha=8, **extra)
    reference = peft.get_peft_model(build_without_dropout(family).to(dtype), config).eval()
    state = randomize_peft(reference, scale=0.3)
    rules = [LoRA(targets=TARGETS[family], r=4, alpha=8)]
    if "modules_to_save" in extra:
        rules.append(Trainable(targets=extra["modules_to_save"]))
    adapted = fxpeft.transform(build_without_dropout(family), rules).eval()
    adapted.adapters["default"].load_peft_state_dict(state)
    return reference, adapted


def _peft_base_weights(reference: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's base model's own parameters, named as in the base model (``base_layer`` dropped)."""
    named = reference.get_base_model().named_parameters()
    return {name.replace(".base_layer", ""): parameter for name, parameter in named if "lora_" not in name}


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family, dtype, how", [
    ("llama", torch.bfloat16, "to"), ("llama", torch.float16, "half"), ("gpt2", torch.bfloat16, "bfloat16"),
    ("llama", torch.float64, "double")])
def test_a_cast_equals_peft_on_the_cast_base(family, dtype, how):
    reference, adapted = _twins(family, dtype)
    before = {key: value.clone() for key, value in adapted.adapter_state_dict().items()}
    assert _cast(adapted, dtype, how) is adapted
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for key, value in adapted.adapter_state_dict().items():  # the same values, nothing initialised again
        assert value.dtype == adapter_dtype, key
        assert torch.equal(value, before[key].to(adapter_dtype)), key
    assert {p.dtype for p in adapted.base_model.parameters()} == {dtype}
    inputs = hf_inputs(family, batch=2, seq=7, seed=3)
    ours = _logits(adapted, inputs)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, _logits(reference, inputs))
    base = build_without_dropout(family).to(dtype).eval()
    with adapted.disable_adapters():
        assert torch.equal(_logits(adapted, inputs), _logits(base, inputs))
    assert not torch.allclose(ours, _logits(base, inputs))  # the adapter shows in the numbers

    adapted.train(), reference.train()  # a training step: the loss and float32 gradients as PEFT's
    inputs["labels"] = inputs["input_ids"]
    loss, theirs = adapted(**inputs).loss, reference(**inputs).loss
    torch.testing.assert_close(loss, theirs)
    loss.backward(), theirs.backward()
    expected = peft_grads(reference)
    for key, grad in fxpeft_grads(adapted).items():
        assert grad.dtype == adapter_dtype, key
        torch.testing.assert_close(grad, expected[key], rtol=0.05, atol=0.02 * expected[key].abs().max().item())


def test_half_precision_and_back_keeps_the_adapters_exactly():
    """float32 adapters stay float32 through ``.bfloat16()``; ``.float()`` then equals PEFT over the base that went
    through the same two casts (its weights rounded to bfloat16)."""
    reference, adapted = _twins("llama", torch.float32)
    before = {key: value.clone() for key, value in adapted.adapter_state_dict().items()}
    adapted.bfloat16().float()
    after = adapted.adapter_state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    twice = peft.get_peft_model(build_without_dropout("llama").bfloat16().float(), peft.LoraConfig(
        target_modules=TARGETS["llama"], r=4, lora_alpha=8)).eval()
    peft.set_peft_model_state_dict(twice, before)
    inputs = hf_inputs("llama", seed=4)
    ours = _logits(adapted, inputs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _logits(twice, inputs))
    assert not torch.allclose(ours, _logits(reference, inputs))  # the base weights were rounded, as the base's are


def test_merge_unmerge_save_and_load_after_a_cast(tmp_path):
    """After ``.bfloat16()``: merge writes PEFT's merged weights bit for bit (the delta added in float32, rounded
    once) and unmerge PEFT's restored ones (within bfloat16 rounding of the originals, for both); the saved adapter
    is float32, as PEFT saves it, and loads into a fresh bfloat16 base in fxpeft and in PEFT to the outputs it gave
    before the merge."""
    reference, adapted = _twins("llama", torch.bfloat16)
    adapted.bfloat16()
    inputs = hf_inputs("llama", seed=5)
    unmerged = _logits(adapted, inputs)
    adapted.merge()
    reference.merge_adapter()
    theirs = _peft_base_weights(reference)
    for name, weight in adapted.base_model.named_parameters():
        assert torch.equal(weight, theirs[name]), name
    merged = _logits(adapted, inputs)
    assert torch.equal(merged, _logits(reference, inputs))
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # bfloat16 weights round the sum
    adapted.unmerge()
    reference.unmerge_adapter()
    for name, weight in adapted.base_model.named_parameters():
        assert torch.equal(weight, theirs[name]), name
    assert torch.equal(_logits(adapted, inputs), _logits(reference, inputs))

    adapted.save_adapter(tmp_path / "a")
    loaded = fxpeft.load_adapter(build_without_dropout("llama").bfloat16(), tmp_path / "a").eval()
    assert {value.dtype for value in loaded.adapter_state_dict().values()} == {torch.float32}
    assert torch.equal(_logits(loaded, inputs), unmerged)  # (after unmerge, adapted's base is rounded twice)
    again = peft.PeftModel.from_pretrained(build_without_dropout("llama").bfloat16(), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(again, inputs), unmerged)


def test_trained_copies_take_the_base_dtype():
    """A ``Trainable`` copy stands in for a base tensor, so it takes the base's dtype (PEFT's ``modules_to_save``
    copy does too); LoRA stays float32. Disabled, the output is the cast base's."""
    reference, adapted = _twins("llama", torch.bfloat16, modules_to_save=["lm_head"])
    adapted.to(torch.bfloat16)
    copy_dtypes = {site.weight.dtype for site in adapted.site_modules() if hasattr(site, "peft_names")}
    assert copy_dtypes == {torch.bfloat16}
    assert {site.lora_A.dtype for site in adapted.site_modules() if hasattr(site, "lora_A")} == {torch.float32}
    assert reference.base_model.model.lm_head.modules_to_save["default"].weight.dtype == torch.bfloat16
    inputs = hf_inputs("llama", seed=6)
    torch.testing.assert_close(_logits(adapted, inputs), _logits(reference, inputs))
    with adapted.disable_adapters():
        assert torch.equal(_logits(adapted, inputs), _logits(build_without_dropout("llama").bfloat16().eval(), inputs))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_after_a_cast_equal_peft(method):
    """Prompt and prefix tuning keep their tokens in float32 over a bfloat16 base, as PEFT does."""
    n = 3
    inputs = hf_inputs("llama", seed=7)
    inputs["labels"] = inputs["input_ids"].clone()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n) if method == "prefix" else \
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    reference = peft.get_peft_model(build_without_dropout("llama").bfloat16(), config).eval()
    state = randomize_peft(reference, scale=0.5)
    rule = PrefixTuning(n) if method == "prefix" else PromptTuning(n)
    adapted = fxpeft.transform(build_without_dropout("llama"), rule, example_kwargs=inputs).eval()
    adapted.adapters["default"].load_peft_state_dict(state if method == "prefix" else
                                                     PromptTuningCodec().state_from_file(state))
    adapted.bfloat16()
    assert {p.dtype for p in adapted.adapters.parameters()} == {torch.float32}
    with torch.no_grad():
        ours, theirs = adapted(**inputs), reference(**inputs)
    assert ours.logits.dtype == torch.bfloat16
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.loss, theirs.loss)


class _CastsItsInput(nn.Module):
    """Takes any floating input and casts it to its weights' dtype (as transformers' vision models do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.to(self.fc1.weight.dtype))))


def test_floating_inputs_of_either_dtype_after_a_cast():
    """A call with float32 inputs and one with float16 inputs are two signatures: the first graph casts its input,
    the second's cast was an identity that capture drops; each equals the base model cast the same way."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    adapted = fxpeft.transform(_CastsItsInput(), [LoRA(targets=["fc1"], r=2)], example_inputs=(x,)).eval()
    adapted.half()
    base = _CastsItsInput().half().eval()
    with torch.no_grad(), adapted.disable_adapters():
        assert torch.equal(adapted(x), base(x))
        assert torch.equal(adapted(x.half()), base(x.half()))
    assert len(adapted.programs()) == 2


def test_compiled_after_a_cast_never_recompiles():
    """Cast, then compile: new sizes reuse one graph and the numbers are the eager ones (``aot_eager`` shows
    dynamo's recompiles without Inductor's compile time)."""
    torch._dynamo.reset()
    counters.clear()
    _, adapted = _twins("llama", torch.bfloat16)
    adapted.bfloat16()
    fast = torch.compile(adapted, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, seq in [(2, 6), (3, 9), (4, 5)]:
        inputs = hf_inputs("llama", batch=batch, seq=seq, seed=batch)
        assert torch.equal(_logits(fast, inputs), _logits(adapted, inputs))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


def test_a_device_move_captures_nothing():
    reference, adapted = _twins("llama", torch.float32)
    programs = adapted.programs()
    adapted.to("cpu").cpu().float()
    assert adapted.programs() == programs
    if not torch.cuda.is_available():
        return
    inputs = {key: value.cuda() for key, value in hf_inputs("llama", seed=8).items()}
    state = {key: value.clone() for key, value in adapted.adapter_state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        adapted.to("cuda", dtype)
        assert {p.device.type for p in adapted.parameters()} == {"cuda"}
        assert {p.dtype for p in adapted.adapters.parameters()} == {torch.float32}
        reference = peft.get_peft_model(build_without_dropout("llama").to("cuda", dtype), peft.LoraConfig(
            target_modules=TARGETS["llama"], r=4, lora_alpha=8)).eval()
        peft.set_peft_model_state_dict(reference, state)
        ours = _logits(adapted, inputs)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, _logits(reference, inputs))
        with adapted.disable_adapters():
            base = build_without_dropout("llama").to("cuda", dtype).eval()
            assert torch.equal(_logits(adapted, inputs), _logits(base, inputs))


def test_generate_after_a_cast_equals_peft_and_recaptures_the_cache_signatures(monkeypatch):
    """The KV-cache signatures a ``generate`` captured are captured again with caches in the new dtype: the next
    ``generate`` captures nothing and its tokens are PEFT's over the cast base."""
    reference, adapted = _twins("llama", torch.bfloat16)
    inputs = hf_inputs("llama", seed=10)
    adapted.generate(**inputs, max_new_tokens=3, do_sample=False)
    signatures = len(adapted.programs())
    adapted.bfloat16()
    made = []
    original = model_module.capture
    monkeypatch.setattr(model_module, "capture", lambda *args, **kwargs: made.append(args) or original(*args, **kwargs))
    tokens = adapted.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not made and len(adapted.programs()) == signatures
    assert torch.equal(tokens, reference.generate(**inputs, max_new_tokens=6, do_sample=False))


# -- training while merged -------------------------------------------------------------------------------------
def test_training_while_merged_is_refused_with_the_fix():
    """PEFT's merged model runs the forward and fails in backward with torch's "does not require grad"; fxpeft says
    at the forward that adapters are merged and to unmerge() first. Inference while merged still runs."""
    reference, adapted = _twins("llama", torch.float32)
    inputs = hf_inputs("llama", seed=9)
    inputs["labels"] = inputs["input_ids"]
    reference.train()
    reference.merge_adapter()
    with pytest.raises(RuntimeError, match="does not require grad"):
        reference(**inputs).loss.backward()
    adapted.train()
    adapted.merge()
    with pytest.raises(FxpeftError, match=r"(?s)merged into the base weights.*unmerge\(\)"):
        adapted(**inputs)
    with torch.no_grad():
        merged = adapted(**inputs).logits  # no gradients: inference, allowed in train mode too
    adapted.eval()
    assert torch.equal(adapted(**inputs).logits, merged)
    adapted.train()
    adapted.unmerge()
    adapted(**inputs).loss.backward()
    assert all(p.grad is not None for p in adapted.adapters.parameters())
