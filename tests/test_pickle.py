"""Pickling the adapted model (fxpeft/runtime/recapture.py): ``torch.save`` / ``torch.load(weights_only=False)`` and
``pickle`` round-trip every adapter and its state, with outputs bit for bit; the graphs are captured again on
loading. ``copy.deepcopy`` copies the graphs and captures nothing."""

from __future__ import annotations

import copy
import io
import pickle
import time

import pytest
import torch

import fxpeft
from fxpeft import model as model_module
from fxpeft.rules import LoRA, PrefixTuning, Trainable
from tests.models import hf_inputs, hf_model


def _torch_round_trip(adapted):
    buffer = io.BytesIO()
    torch.save(adapted, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _pickle_round_trip(adapted):
    return pickle.loads(pickle.dumps(adapted))


ROUND_TRIPS = {"torch.save": _torch_round_trip, "pickle": _pickle_round_trip}


@pytest.fixture
def captures(monkeypatch):
    """How many captures the adapted model makes (``capture`` as ``fxpeft.model`` calls it, counted)."""
    made = []
    original = model_module.capture

    def counted(*args, **kwargs):
        made.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "capture", counted)
    return made


def _randomized(adapted, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return adapted


def _several_adapters():
    """Three LoRA adapters: ``default`` and ``other`` active (``other`` with a new alpha), ``frozen`` inactive and
    loaded for inference only, and a second signature (a call with labels) captured."""
    adapted = fxpeft.transform(hf_model("llama"), [LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    adapted.add_adapter("other", [LoRA(targets=["v_proj", "o_proj"], r=2, alpha=4)])
    adapted.add_adapter("frozen", [LoRA(targets=["k_proj"], r=2)])
    _randomized(adapted, 1)
    adapted.adapters["frozen"].frozen = True
    adapted.set_adapter(["default", "other"])
    adapted.set_alpha(6.0, "other")
    adapted.train()
    inputs = hf_inputs("llama", seed=2)
    adapted(**inputs, labels=inputs["input_ids"])
    return adapted.eval()


def _outputs(adapted, inputs):
    with torch.no_grad():
        logits = adapted(**inputs).logits
        rows = adapted(**inputs, adapter_names=["frozen", "__base__"]).logits
        with adapted.disable_adapters():
            base = adapted(**inputs).logits
    return logits, rows, base


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_round_trip_keeps_every_adapter_and_the_outputs(how, captures):
    adapted = _several_adapters()
    inputs = hf_inputs("llama", batch=2, seq=7, seed=3)
    before = _outputs(adapted, inputs)
    signatures = sorted(map(repr, (p.key for p in adapted.programs())))
    captures.clear()
    loaded = ROUND_TRIPS[how](adapted)
    assert type(loaded).__name__ == type(adapted).__name__ == "AdaptedLlamaForCausalLM"
    assert len(captures) == 2 and sorted(map(repr, (p.key for p in loaded.programs()))) == signatures
    assert list(loaded.adapters) == ["default", "other", "frozen"]
    assert loaded.active_adapters == ["default", "other"]
    assert [loaded.adapters[name].frozen for name in loaded.adapters] == [False, False, True]
    assert {site.alpha for site in loaded.site_modules("other")} == {6.0}
    for name in adapted.adapters:
        ours, theirs = adapted.adapter_state_dict(name), loaded.adapter_state_dict(name)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    for got, expected in zip(_outputs(loaded, inputs), before):
        assert torch.equal(got, expected)
    with torch.no_grad():
        assert torch.equal(_outputs(loaded, inputs)[2], hf_model("llama")(**inputs).logits)
    assert len(captures) == 2  # the calls above ran the recaptured graphs
    loaded.train()
    trainable = sorted(name for name, p in loaded.named_parameters() if p.requires_grad)
    adapted.train()
    assert trainable == sorted(name for name, p in adapted.named_parameters() if p.requires_grad)
    assert trainable and all(".default." in name or ".other." in name for name in trainable)
    loaded(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert len(captures) == 2


def test_round_trip_keeps_the_merged_state():
    adapted = _several_adapters()
    adapted.merge()
    inputs = hf_inputs("llama", seed=4)
    with torch.no_grad():
        merged = adapted(**inputs).logits
    loaded = _torch_round_trip(adapted)
    assert loaded.merged_adapters == ["default", "other"]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, merged)
    adapted.unmerge()
    loaded.unmerge()
    for (name, ours), theirs in zip(adapted.base_model.named_parameters(), loaded.base_model.parameters()):
        assert torch.equal(ours, theirs), name
    assert torch.equal(_outputs(loaded, inputs)[0], _outputs(adapted, inputs)[0])


def test_round_trip_after_a_cast_with_trained_copies_and_prefix_tuning():
    """A bfloat16 model with LoRA, a trained copy and prefix tuning in one adapter (float32 LoRA and prefix, a
    bfloat16 copy) loads with its dtypes and gives its outputs bit for bit, losses included."""
    inputs = hf_inputs("llama", seed=5)
    inputs["labels"] = inputs["input_ids"]
    rules = [LoRA(targets=["q_proj"], r=2), Trainable(targets=["lm_head"]), PrefixTuning(3)]
    adapted = _randomized(fxpeft.transform(hf_model("llama"), rules, example_kwargs=inputs), 6).bfloat16().eval()
    with torch.no_grad():
        before = adapted(**inputs)
    loaded = _pickle_round_trip(adapted)
    assert [p.dtype for p in loaded.adapters.parameters()] == [p.dtype for p in adapted.adapters.parameters()]
    assert {p.dtype for p in loaded.adapters.parameters()} == {torch.float32, torch.bfloat16}
    with torch.no_grad():
        after = loaded(**inputs)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


def test_generate_after_a_round_trip_captures_nothing_new(captures):
    """The KV-cache signatures ``generate`` captured travel as example calls too (their cache rebuilt)."""
    adapted = _randomized(fxpeft.transform(hf_model("llama"), [LoRA(targets=["q_proj", "v_proj"], r=4)]), 7).eval()
    inputs = hf_inputs("llama", seed=8)
    tokens = adapted.generate(**inputs, max_new_tokens=4, do_sample=False)
    count = len(adapted.programs())
    assert count > 1
    loaded = _pickle_round_trip(adapted)
    captures.clear()
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    assert not captures and len(loaded.programs()) == count


def test_deepcopy_copies_the_graphs_and_captures_nothing(captures):
    adapted = _several_adapters()
    captures.clear()
    twin = copy.deepcopy(adapted)
    assert not captures
    assert len(twin.programs()) == len(adapted.programs())
    assert all(a.graph_module is not b.graph_module for a, b in zip(twin.programs(), adapted.programs()))
    inputs = hf_inputs("llama", seed=9)
    for got, expected in zip(_outputs(twin, inputs), _outputs(adapted, inputs)):
        assert torch.equal(got, expected)
    with torch.no_grad():  # nothing shared: the copy's tensors are its own
        next(twin.adapters.parameters()).add_(1.0)
    assert not torch.equal(_outputs(twin, inputs)[0], _outputs(adapted, inputs)[0])


def test_what_loading_costs(capsys):
    """Unpickling captures each signature again: print what that costs next to the tensors alone (the number in
    fxpeft/runtime/recapture.py's docstring)."""
    adapted = fxpeft.transform(hf_model("llama"), [LoRA(targets=["q_proj", "v_proj"], r=4)])
    blob, tensors_only = pickle.dumps(adapted), pickle.dumps(adapted.base_model)
    start = time.perf_counter()
    pickle.loads(tensors_only)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    loaded = pickle.loads(blob)
    with_capture = time.perf_counter() - start
    assert len(loaded.programs()) == 1
    with capsys.disabled():
        print(f"\npickle.loads: base model alone {plain:.3f} s; adapted model, one signature captured again "
              f"{with_capture:.2f} s ({len(blob) / 1024:.0f} KiB pickled)")
