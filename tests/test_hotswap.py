"""Hot swap on a compiled model (fxpeft/runtime/hotswap.py): after ``prepare_hotswap(max_rank, slots)``, adding,
loading (other rank, other alpha), replacing, deleting and switching LoRA adapters compile nothing, in eval and in
train mode, and every result equals a fresh transform holding that adapter alone (the reference)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import fxpeft
from fxpeft.errors import AdapterLoadError, FxpeftError, RuleError, UnsupportedError
from tests.models import hf_inputs, hf_model

LAYERS = 2


def _inputs(seq: int = 8, batch: int = 2) -> dict:
    inputs = hf_inputs("llama", batch=batch, seq=seq, seed=seq)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return hf_model("llama", layers=LAYERS)


def _adapted(rule: fxpeft.LoRA, seed: int) -> fxpeft.AdaptedModel:
    """A fresh transform of the base model with ``rule``, its B factors non-zero (seeded)."""
    adapted = fxpeft.transform(_base(), rule, example_kwargs=_inputs())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in adapted.site_modules():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.1)
    return adapted


RULES = {  # name -> (rule, seed): other ranks, alphas, sites and dropout within the hot-swap sites
    "default": (fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8), 1),
    "small": (fxpeft.LoRA(targets=["q_proj"], r=2, alpha=5), 2),
    "wide": (fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=3, rank_pattern={"v_proj": 6}), 3),
    "rslora": (fxpeft.LoRA(targets=["v_proj"], r=3, alpha=7, use_rslora=True), 4),
    "dropped": (fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1), 5),  # eval: no dropout
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter of RULES saved by a fresh transform, and that transform (the reference)."""
    folders, references = {}, {}
    for name, (rule, seed) in RULES.items():
        references[name] = _adapted(rule, seed)
        folders[name] = tmp_path_factory.mktemp(name)
        references[name].save_adapter(folders[name])
    return folders, references


def _prepared(saved, slots: int = 2) -> fxpeft.AdaptedModel:
    folders, _ = saved
    adapted = fxpeft.load_adapter(_base(), folders["default"], is_trainable=True, example_kwargs=_inputs())
    adapted.prepare_hotswap(max_rank=8, slots=slots)
    return adapted


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_prepare_changes_no_output_count_or_file(saved, tmp_path):
    """Padded to max_rank, the adapter gives the same outputs (bit for bit), counts and saved file."""
    folders, references = saved
    reference = references["default"]
    adapted = fxpeft.load_adapter(_base(), folders["default"], is_trainable=True, example_kwargs=_inputs())
    before = adapted.get_nb_trainable_parameters()
    adapted.prepare_hotswap(max_rank=8, slots=1)
    assert adapted.hotswap_max_rank == 8 and adapted.hotswap_free_slots == 1
    site = next(adapted.site_modules())
    assert tuple(site.lora_A.shape)[0] == 8 and site.r == 4
    inputs = _inputs()
    for mode in ("eval", "train"):
        getattr(adapted, mode)()
        getattr(reference, mode)()
        assert torch.equal(_logits(adapted, inputs), _logits(reference, inputs)), mode
    assert adapted.get_nb_trainable_parameters() == before == reference.get_nb_trainable_parameters()
    adapted.save_adapter(tmp_path)
    ours = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(folders["default"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4


def test_compiled_eval_swaps_compile_nothing(saved):
    """Under torch.compile (eval, no_grad): load new names of other ranks and alphas, replace in place, add, delete,
    switch, set alpha, disable: one frame compiled, no recompile, every output the reference's."""
    folders, references = saved
    adapted = _prepared(saved).eval()
    counter = CompileCounter()
    compiled = torch.compile(adapted, backend=counter, fullgraph=True)
    inputs = _inputs()
    base_logits = _logits(references["default"].base_model, inputs)

    def check(expected: torch.Tensor, step: str) -> None:
        torch.testing.assert_close(_logits(compiled, inputs), expected, rtol=1e-5, atol=1e-5, msg=step)
        assert counter.frame_count == 1, step

    check(_logits(references["default"].eval(), inputs), "warm-up")
    with torch._dynamo.config.patch(error_on_recompile=True):
        adapted.load_adapter(folders["small"], adapter_name="small")
        check(_logits(references["default"], inputs), "loaded, inactive")
        adapted.set_adapter("small")
        check(_logits(references["small"].eval(), inputs), "small")
        adapted.hotswap_adapter(folders["wide"], "small")  # PEFT's name: rank 8 / 6 into the rank-2 adapter
        check(_logits(references["wide"].eval(), inputs), "wide into small")
        adapted.load_adapter(folders["rslora"], adapter_name="rslora")
        adapted.set_adapter("rslora")
        check(_logits(references["rslora"].eval(), inputs), "rslora")
        with pytest.raises(FxpeftError, match="hot-swap slots"):
            adapted.add_adapter("fourth", fxpeft.LoRA(targets=["q_proj"], r=8))
        adapted.delete_adapter("small")
        adapted.add_adapter("fresh", fxpeft.LoRA(targets=["q_proj"], r=8, alpha=16))
        adapted.set_adapter("fresh")
        check(base_logits, "fresh adapter (B = 0)")
        adapted.set_adapter("rslora")
        adapted.set_alpha(14.0, "rslora")
        references["rslora"].set_alpha(14.0)
        check(_logits(references["rslora"], inputs), "alpha")
        references["rslora"].set_alpha(7.0)
        with adapted.disable_adapters():
            check(base_logits, "disabled")
        with pytest.warns(UserWarning, match="'default' is active now"):  # the first remaining, as in PEFT
            adapted.delete_adapter("rslora")
        check(_logits(references["default"], inputs), "deleted the active adapter")
        adapted.hotswap_adapter(folders["dropped"], "default")  # another dropout: the eval graph has none
        check(_logits(references["dropped"].eval(), inputs), "other dropout, eval")
    assert list(adapted.adapters) == ["default", "fresh"] and adapted.hotswap_free_slots == 1


def test_compiled_training_swaps_compile_nothing(saved):
    """Train mode under torch.compile (aot_eager: forward and backward): training one adapter, then loading and
    training another of another rank compiles nothing; the gradients are the reference's, inactive and frozen
    adapters get none, and the padding's gradient is exactly zero."""
    folders, references = saved
    adapted = _prepared(saved).train()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(adapted, backend=backend)
    inputs = _inputs()

    def step(model) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach()

    reference = copy.deepcopy(references["default"]).train()
    loss = step(compiled)
    want_loss = step(reference)
    torch.testing.assert_close(loss, want_loss)
    assert backend.frame_count == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        adapted.load_adapter(folders["wide"], adapter_name="wide", is_trainable=True)
        adapted.set_adapter("wide")
        loss = step(compiled)
    assert backend.frame_count == 1
    reference = copy.deepcopy(references["wide"]).train()
    want_loss = step(reference)
    torch.testing.assert_close(loss, want_loss)
    slot = adapted.adapters["wide"]
    trained = {name for name, p in adapted.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith("_hotswap_slots.hotswap_slot_1.") for name in trained), trained
    for key, site in slot.sites.items():
        path = site.path
        ref_site = reference.adapters["default"].sites[key]
        torch.testing.assert_close(site.lora_A.grad[: site.r], ref_site.lora_A.grad, rtol=1e-4, atol=1e-6,
                                   msg=path)
        torch.testing.assert_close(site.lora_B.grad[:, : site.r], ref_site.lora_B.grad, rtol=1e-4, atol=1e-6,
                                   msg=path)
        assert not site.lora_A.grad[site.r:].any() and not site.lora_B.grad[:, site.r:].any(), path
    with torch._dynamo.config.patch(error_on_recompile=True):  # a frozen adapter gets no gradient either
        adapted.hotswap_adapter(folders["small"], "wide")
        adapted.load_adapter(folders["rslora"], adapter_name="wide")  # is_trainable=False: frozen
        step(compiled)
        assert not [name for name, p in adapted.named_parameters() if p.grad is not None]
        adapted.set_adapter("default")
        adapted.delete_adapter("wide")
        adapted.add_adapter("again", fxpeft.LoRA(targets=["q_proj"], r=8, alpha=16))  # wide's freed slot
        adapted.set_adapter("again")
        loss = step(compiled)
    assert backend.frame_count == 1
    with torch.no_grad():  # a fresh adapter (B = 0) gives the base model's loss
        torch.testing.assert_close(loss, references["default"].base_model(**inputs).loss)
    trained = {name.split(".")[1] for name, p in adapted.named_parameters() if p.grad is not None}
    assert trained == {"hotswap_slot_1"}, trained


def test_optimizer_moves_only_the_active_adapter(saved):
    """AdamW with weight decay over every parameter: the inactive adapter and the free slot stay as they were."""
    adapted = _prepared(saved).train()
    adapted.fold_gates = False  # the gated graph, as compiled: every slot gets a gradient, zeros where inactive
    folders, _ = saved
    adapted.load_adapter(folders["small"], adapter_name="small", is_trainable=True)
    adapted.set_adapter("small")
    before = {name: p.detach().clone() for name, p in adapted.named_parameters() if "_hotswap_slots" in name}
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        adapted(**_inputs()).loss.backward()
        optimizer.step()
    moved = {name.split(".")[1] for name, p in adapted.named_parameters() if name in before
             and not torch.equal(p, before[name])}
    assert moved == {"hotswap_slot_1"}, moved
    site = adapted.adapters["small"].sites["lora:model/layers/0/self_attn/q_proj"]
    assert not site.lora_A[site.r:].any() and not site.lora_B[:, site.r:].any()  # the padding stays zero


def test_mixed_batch_of_other_ranks(saved):
    """adapter_names mixes adapters of other ranks per row: each row is its adapter's reference row."""
    folders, references = saved
    adapted = _prepared(saved).eval()
    adapted.load_adapter(folders["wide"], adapter_name="wide")
    inputs = _inputs(batch=3)
    got = adapted(**inputs, adapter_names=["wide", "__base__", "default"]).logits.detach()
    torch.testing.assert_close(got[0], _logits(references["wide"].eval(), inputs)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], _logits(references["default"].base_model, inputs)[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], _logits(references["default"].eval(), inputs)[2], rtol=1e-5, atol=1e-5)


def test_hotswapped_adapter_saves_as_peft_loads_it(saved, tmp_path):
    """An adapter swapped in at rank 2 saves at rank 2, and PEFT's from_pretrained gives the same outputs."""
    import peft
    folders, references = saved
    adapted = _prepared(saved).eval()
    adapted.hotswap_adapter(folders["small"], "default")
    adapted.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    assert adapted.peft_config["default"].r == 2 and adapted.peft_config["default"].lora_alpha == 5
    report = fxpeft.verify(_base(), tmp_path, _inputs())  # the folder is the base model plus this adapter
    assert report.ok, report.summary()
    theirs = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    inputs = _inputs()
    torch.testing.assert_close(_logits(adapted, inputs), _logits(theirs, inputs), rtol=1e-5, atol=1e-5)
    assert adapted.get_nb_trainable_parameters()[1] == references["small"].get_nb_trainable_parameters()[1]


def test_refusals_change_nothing(saved, tmp_path):
    """Each hot-swap refusal is a clear error from fxpeft.errors, and the model is as it was."""
    folders, references = saved
    adapted = _prepared(saved, slots=1).eval()
    inputs = _inputs()
    expected = _logits(adapted, inputs)
    with pytest.raises(UnsupportedError, match="not hot-swap sites"):
        adapted.add_adapter("mlp", fxpeft.LoRA(targets=["down_proj"], r=4))
    with pytest.raises(RuleError, match="max_rank=8"):
        adapted.add_adapter("big", fxpeft.LoRA(targets=["q_proj"], r=16))
    with pytest.raises(UnsupportedError, match="cannot be hot-swapped"):
        adapted.add_adapter("ia3", fxpeft.IA3(targets=["q_proj"], feedforward=[]))
    with pytest.raises(UnsupportedError, match="use_dora"):
        adapted.add_adapter("dora", fxpeft.LoRA(targets=["q_proj"], r=4, use_dora=True))
    broken = tmp_path / "broken"
    references["small"].save_adapter(broken)
    state = safetensors.torch.load_file(broken / "adapter_model.safetensors")
    key = next(iter(state))
    state[key] = state[key][:1]
    safetensors.torch.save_file(state, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError):
        adapted.load_adapter(broken, adapter_name="broken")
    with pytest.raises(FxpeftError, match="prepare_hotswap\\(\\) was called already"):
        adapted.prepare_hotswap(max_rank=8)
    with pytest.raises(UnsupportedError, match="add_weighted_adapter"):
        adapted.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(UnsupportedError, match="from its saved folder"):
        fxpeft.verify(_base(), adapted, inputs)  # a slot's branches are declared by no config: check the files
    assert list(adapted.adapters) == ["default"] and adapted.hotswap_free_slots == 1
    assert torch.equal(_logits(adapted, inputs), expected)
    adapted.add_adapter("dropped", fxpeft.LoRA(targets=["q_proj"], r=4, dropout=0.1))
    adapted.set_adapter("dropped")
    adapted.train()
    with pytest.raises(UnsupportedError, match="dropout"):
        adapted(**inputs)
    adapted.eval()
    assert torch.equal(_logits(adapted, inputs), _logits(references["default"].base_model, inputs))


def test_prepare_refuses_other_methods_and_ranks():
    """prepare_hotswap refuses adapters it cannot pad (nothing changes) and ranks over max_rank."""
    adapted = fxpeft.transform(_base(), fxpeft.IA3(targets=["q_proj", "down_proj"], feedforward=["down_proj"]),
                               example_kwargs=_inputs())
    with pytest.raises(UnsupportedError, match="cannot be hot-swapped"):
        adapted.prepare_hotswap(max_rank=8)
    assert adapted.hotswap_max_rank is None
    adapted = fxpeft.transform(_base(), fxpeft.LoRA(targets=["q_proj"], r=16), example_kwargs=_inputs())
    with pytest.raises(FxpeftError, match="rank 16, over max_rank=8"):
        adapted.prepare_hotswap(max_rank=8)
    assert tuple(next(adapted.site_modules()).lora_A.shape)[0] == 16 and adapted.hotswap_max_rank is None


def test_copies_keep_dropping_untrained_gradients(saved):
    """A deep copy and an unpickled copy of a prepared model drop the inactive slots' gradients too (torch copies
    no tensor hooks; the model puts them back)."""
    import pickle

    adapted = _prepared(saved).train()
    adapted.add_adapter("other", fxpeft.LoRA(targets=["q_proj"], r=2))
    for copied in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
        copied.fold_gates = False  # the gated graph (as compiled): every slot gets a gradient, zeros where inactive
        copied(**_inputs()).loss.backward()
        trained = {name.split(".")[1] for name, p in copied.named_parameters() if p.grad is not None}
        assert trained == {"hotswap_slot_0"}, trained


def test_regional_compile_swaps_compile_nothing(saved):
    """adapted.compile() (each layer compiled once) after prepare_hotswap: loading and switching compile nothing, in
    eval and in train mode, and the loaded adapter gives its reference's outputs."""
    folders, references = saved
    adapted = _prepared(saved, slots=1).eval()
    counter = CompileCounter()
    adapted.compile(backend=counter)
    inputs = _inputs()
    _logits(adapted, inputs)
    adapted.train()
    adapted(**inputs).loss.backward()
    frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        adapted.load_adapter(folders["wide"], adapter_name="wide", is_trainable=True)
        adapted.set_adapter("wide")
        adapted.zero_grad(set_to_none=True)
        loss = adapted(**inputs).loss
        loss.backward()
        adapted.eval()
        torch.testing.assert_close(_logits(adapted, inputs), _logits(references["wide"].eval(), inputs),
                                   rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames
    torch.testing.assert_close(loss, references["wide"].train()(**inputs).loss, rtol=1e-5, atol=1e-5)
    assert {name.split(".")[1] for name, p in adapted.named_parameters() if p.grad is not None} == {"hotswap_slot_1"}


def test_slots_share_the_train_graphs_dropout(saved):
    """The train graph drops every slot's input at the slots' dropout (the first adapter's, or prepare_hotswap's
    ``dropout=``): an adapter of that dropout trains (its losses vary with the seed), one of another is refused."""
    from fxpeft.ops.dropout import dropout

    folders, references = saved
    adapted = fxpeft.load_adapter(_base(), folders["dropped"], is_trainable=True, example_kwargs=_inputs())
    adapted.prepare_hotswap(max_rank=8, slots=1)
    graph = adapted.programs()[0].graph_module.graph
    drops = [node.args[1] for node in graph.nodes if node.target is dropout]
    assert drops == [0.1] * (2 * 2 * LAYERS), drops  # 2 slots x (q, v) x layers
    adapted.train()
    losses = set()
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.add(adapted(**_inputs()).loss.item())
    assert len(losses) == 2
    adapted.load_adapter(folders["small"], adapter_name="small", is_trainable=True)
    adapted.set_adapter("small")
    with pytest.raises(UnsupportedError, match="'small': \\{'dropout': 0.0\\}"):
        adapted(**_inputs())
    adapted.eval()
    torch.testing.assert_close(_logits(adapted, _inputs()), _logits(references["small"].eval(), _inputs()),
                               rtol=1e-5, atol=1e-5)


_ADD = st.tuples(st.just("add"), st.integers(0, 3), st.sampled_from([("q_proj",), ("v_proj",), ("q_proj", "v_proj")]),
                 st.integers(1, 8), st.sampled_from([1.0, 4.0, 16.0]), st.booleans())
_OPERATIONS = st.lists(st.one_of(_ADD, _ADD, st.tuples(st.just("delete"), st.integers(0, 3)),
                                 st.tuples(st.just("set"), st.integers(0, 3)),
                                 st.tuples(st.just("alpha"), st.sampled_from([2.0, 5.0]))), min_size=3, max_size=8)


@settings(max_examples=8)
@given(operations=_OPERATIONS, seed=st.integers(0, 2 ** 16))
def test_any_sequence_of_swaps_is_the_rewriting_path(operations, seed):
    """Property: for any sequence of adds (any targets within the hot-swap sites, rank up to max_rank, alpha,
    rsLoRA), deletes, switches and alpha changes, a prepared model never changes a graph and gives, after every step,
    the outputs of a model without hot swap on which the same steps rewrite the graph (the reference path)."""
    inputs = _inputs()
    generator = torch.Generator().manual_seed(seed)
    rule = fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)
    prepared = fxpeft.transform(_base(), rule, example_kwargs=inputs).eval()
    reference = fxpeft.transform(_base(), rule, example_kwargs=inputs).eval()
    prepared.prepare_hotswap(max_rank=8, slots=1)  # one free slot: sequences run out of slots too
    graphs = [program.graph_module for program in prepared.programs()]
    names = [f"adapter{index}" for index in range(4)]
    for operation in operations:
        note(f"{operation}")
        kind, *rest = operation
        if kind == "add":
            index, targets, r, alpha, rslora = rest
            if names[index] in prepared.adapters:
                continue
            rule = fxpeft.LoRA(targets=list(targets), r=r, alpha=alpha, use_rslora=rslora)
            if prepared.hotswap_free_slots == 0:
                with pytest.raises(FxpeftError, match="hot-swap slots"):
                    prepared.add_adapter(names[index], rule)
                continue
            prepared.add_adapter(names[index], rule)
            reference.add_adapter(names[index], rule)
            state = {key: torch.randn(value.shape, generator=generator) * 0.1
                     for key, value in prepared.adapter_state_dict(names[index]).items()}
            for model in (prepared, reference):
                model.adapters[names[index]].load_peft_state_dict(state)
        elif kind == "delete":
            if names[rest[0]] not in prepared.adapters or len(prepared.adapters) == 1:
                continue
            for model in (prepared, reference):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # deleting the active adapter: the first remaining one is
                    model.delete_adapter(names[rest[0]])
        elif kind == "set":
            if names[rest[0]] not in prepared.adapters:
                continue
            for model in (prepared, reference):
                model.set_adapter(names[rest[0]])
        else:
            for model in (prepared, reference):
                model.set_alpha(rest[0], model.active_adapter)
        assert list(prepared.adapters) == list(reference.adapters)
        assert prepared.active_adapters == reference.active_adapters
        assert prepared.get_nb_trainable_parameters()[1] == reference.get_nb_trainable_parameters()[1]
        torch.testing.assert_close(_logits(prepared, inputs), _logits(reference, inputs), rtol=1e-5, atol=1e-5)
    assert [program.graph_module for program in prepared.programs()] == graphs  # no graph was rewritten
