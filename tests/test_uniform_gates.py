"""Eager calls in which every row uses the same adapters run a graph without per-row gating
(fxpeft/runtime/uniform_gates.py): no op reads a gate, inactive adapters' nodes are gone, and outputs and gradients
equal the gated graph's (``fold_gates=False``), for every gateable method, in eval and train mode, for every set
of active adapters and with adapters disabled."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import fxpeft
from fxpeft.passes.ia3 import IA3
from fxpeft.passes.loha import LoHa
from fxpeft.passes.vera import VeRA
from tests.models import hf_inputs, hf_model
from tests.passes.harness import add_noise

RULES = {
    "lora": fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8),
    "dora": fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, use_dora=True),
    "ia3": IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "loha": LoHa(targets=["q_proj", "v_proj"], r=4),
    "vera": VeRA(targets=["q_proj", "v_proj"], r=4),
    "lora with bias and a trained head": [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, bias="lora_only"),
                                          fxpeft.Trainable(targets=["lm_head"])],
}
OTHER = fxpeft.LoRA(targets=["q_proj", "o_proj", "up_proj"], r=2, alpha=4)  # shares q_proj with the first


def _gate_readers(module: torch.fx.GraphModule) -> int:
    return sum(len(node.users) for node in module.graph.nodes
               if node.op == "placeholder" and node.name.startswith("fxpeft_") and node.name.endswith("_gate"))


def _run(adapted: fxpeft.AdaptedModel, data: dict, training: bool, fold: bool,
         disabled: bool) -> tuple[torch.Tensor, dict]:
    """Logits (eval) or loss and every trainable parameter's gradient (train), with or without folded gates."""
    adapted.fold_gates = fold
    adapted.train(training)
    adapted.zero_grad(set_to_none=True)
    if not training:
        with torch.no_grad():
            return adapted(**data).logits, {}
    loss = adapted(**data, labels=data["input_ids"]).loss
    if disabled:  # as in PEFT, nothing trains (the folded loss has no autograd graph)
        return loss.detach(), {}
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in adapted.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(RULES))
def test_folded_graph_equals_the_gated_graph(method):
    torch.manual_seed(0)
    base = hf_model("llama")
    adapted = fxpeft.transform(hf_model("llama"), RULES[method])
    adapted.add_adapter("other", OTHER)
    add_noise(adapted)
    data = hf_inputs("llama", batch=3, seq=7)
    with torch.no_grad():
        base_logits = base(**data).logits
    cases = [["default"], ["other"], ["default", "other"], None]  # None: adapters disabled
    for training in (False, True):
        for active in cases:
            if active is not None:
                adapted.set_adapter(active)
            context = adapted.disable_adapters() if active is None else torch.enable_grad()
            with context:
                want, want_grads = _run(adapted, data, training, fold=False, disabled=active is None)
                got, got_grads = _run(adapted, data, training, fold=True, disabled=active is None)
            where = f"{method}, {'train' if training else 'eval'}, active {active}"
            assert torch.equal(got, want), f"{where}: the folded graph differs by {(got - want).abs().max():.3g}"
            assert got_grads.keys() == want_grads.keys(), f"{where}: other parameters got gradients"
            for name in want_grads:  # a broadcast factor's gradient may be summed in another order (IA3)
                torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-8,
                                           msg=lambda m: f"{where}: gradient of {name}: {m}")
            if active is None and not training:
                assert torch.equal(got, base_logits), f"{where}: not the base model bit for bit"
            program = adapted.programs()[0]
            active_set = frozenset(active or ())
            folded = program.module_for(training, torch.device("cpu"), active=active_set)
            gated = program.module_for(training, torch.device("cpu"))
            assert folded is not gated
            assert _gate_readers(gated) > 0 and _gate_readers(folded) == 0, f"{where}: an op still reads a gate"
    adapted.fold_gates = True


def test_a_folded_lora_branch_is_pefts_expression():
    """Per LoRA site, the folded eval graph adds PEFT's four ops (two linears, ``* scaling``, ``+``) to the base
    graph and nothing else: no select, no comparison, no per-row multiply."""
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4))
    adapted.eval()
    program = adapted.programs()[0]
    folded = program.module_for(False, torch.device("cpu"), active=frozenset({"default"}))
    adapted.merge()  # the merged model runs the graph as captured (in eval mode: its eval twin)
    plain = program.module_for(False, torch.device("cpu"), merged=True)
    adapted.unmerge()

    def ops(module):  # live ops only (the rewrite drops the captured graph's dead ones)
        graph = copy.deepcopy(module.graph)
        graph.eliminate_dead_code()
        return collections.Counter(str(node.target) for node in graph.nodes if node.op == "call_function")

    extra = ops(folded) - ops(plain)
    sites = 2 * 2  # q and v in two layers
    assert extra == collections.Counter({"aten.linear.default": 2 * sites, "aten.mul.Tensor": sites,
                                         "aten.add.Tensor": sites, "aten.reshape.default": sites}), extra
    assert not ops(plain) - ops(folded), "the folded graph lost base ops"


def test_switching_adapters_runs_the_right_twin():
    """Each set of active adapters has its twin; switching back and forth, deleting and adding adapters give the
    outputs of a model holding only the active adapter."""
    torch.manual_seed(0)
    rules = {"a": fxpeft.LoRA(targets=["q_proj"], r=4), "b": fxpeft.LoRA(targets=["v_proj"], r=2)}
    alone = {}
    for name, rule in rules.items():
        alone[name] = fxpeft.transform(hf_model("llama"), rule, adapter_name=name).eval()
        add_noise(alone[name], seed=len(alone))
    adapted = fxpeft.transform(hf_model("llama"), rules["a"], adapter_name="a").eval()
    adapted.add_adapter("b", rules["b"])
    for name in rules:
        adapted.adapters[name].load_peft_state_dict(alone[name].adapters[name].peft_state_dict())
    data = hf_inputs("llama", batch=2, seq=5)
    with torch.no_grad():
        want = {name: model(**data).logits for name, model in alone.items()}
        for name in ["a", "b", "a", "b"]:
            adapted.set_adapter(name)
            assert torch.equal(adapted(**data).logits, want[name]), f"active {name}"
        adapted.delete_adapter("a")
        assert torch.equal(adapted(**data).logits, want["b"]), "after delete_adapter"
