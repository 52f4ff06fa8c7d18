"""Training a mixed-adapter batch (``adapter_names``) at the cost of one adapter.

A training call that gives each row one adapter runs the train graph's mixed-batch form
(fxpeft/runtime/mixed_batch.py, passes/lora/mixed_batch.py): at each site shared by several adapters, each row's
``A`` and ``B`` are gathered and applied in one batched product, and autograd differentiates the gather. The
reference for every adapter is the same adapter trained alone (``set_adapter``) on its own rows: the loss is a sum
over rows, so the mixed batch's gradient for an adapter is its rows' gradient, and its loss the rows' losses
summed. No mocks: tiny llama and GPT-2 models (GPT-2's Conv1D flattens rows to ``[batch * seq, in]``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import fxpeft
from fxpeft.ops.dropout import dropout
from tests.models import hf_inputs
from tests.passes.peft_reference import build_without_dropout

TARGETS = {"llama": (["q_proj", "v_proj"], ["q_proj", "v_proj", "o_proj"]),
           "gpt2": (["c_attn"], ["c_attn", "c_fc"])}
NAMES = ["c", "default", "__base__", "b", "c", "wide"]


def _adapted(family: str, dropout: float = 0.0, dropouts: tuple[float, ...] | None = None) -> fxpeft.AdaptedModel:
    """Four LoRA adapters of different ranks and alphas (``wide`` on one more module), random non-zero ``A`` and
    ``B``, all trainable, in train mode; ``dropouts``: each adapter's dropout (else ``dropout`` for all)."""
    shared, wider = TARGETS[family]
    rates = dropouts or (dropout,) * 4
    adapted = fxpeft.transform(build_without_dropout(family),
                               fxpeft.LoRA(targets=shared, r=4, alpha=8, dropout=rates[0]))
    adapted.add_adapter("b", fxpeft.LoRA(targets=shared, r=2, alpha=3, dropout=rates[1]))
    adapted.add_adapter("c", fxpeft.LoRA(targets=shared, r=6, alpha=4, dropout=rates[2]))
    adapted.add_adapter("wide", fxpeft.LoRA(targets=wider, r=3, alpha=12, dropout=rates[3]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in adapted.adapters.values():
            for parameter in adapter.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    adapted.set_adapter(list(adapted.adapters))
    return adapted.train()


def _loss(model, inputs: dict, **kwargs) -> torch.Tensor:
    """The summed (not averaged) token cross-entropy of the logits against the input ids: a sum over rows."""
    logits = model(**inputs, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), inputs["input_ids"].flatten(),
                                             reduction="sum")


def _grads(adapted: fxpeft.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """An adapter's gradients (zeros where a parameter got none)."""
    return {key: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for key, p in adapted.adapters[name].named_parameters()}


def _backward_ops(loss: torch.Tensor) -> dict[str, int]:
    """How many nodes of each kind the autograd graph behind ``loss`` has: what the call actually ran."""
    seen, found, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found[type(node).__name__] = found.get(type(node).__name__, 0) + 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _gathered_sites(adapted: fxpeft.AdaptedModel) -> int:
    """The sites whose branches the train graph for ``adapter_names`` calls gathers (two batched products each)."""
    module = adapted.programs()[0].module_for(True, torch.device("cpu"), mixed_batch=True)
    return sum(node.target is torch.ops.aten.bmm.default for node in module.graph.nodes) // 2


def _alone(adapted: fxpeft.AdaptedModel, inputs: dict, names: list[str]) -> tuple[float, dict]:
    """Each adapter trained alone on its rows (and the base rows with adapters disabled): the summed loss and, per
    adapter, its gradients."""
    total, grads = 0.0, {}
    for name in dict.fromkeys(names):
        rows = [row for row, row_name in enumerate(names) if row_name == name]
        sub = {key: value[rows] for key, value in inputs.items()}
        adapted.zero_grad()
        if name == "__base__":
            with adapted.disable_adapters():
                total += _loss(adapted, sub).item()
            continue
        adapted.set_adapter(name)
        loss = _loss(adapted, sub)
        loss.backward()
        total += loss.item()
        grads[name] = _grads(adapted, name)
    adapted.set_adapter(list(adapted.adapters))
    adapted.zero_grad()
    return total, grads


def _assert_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda text: f"{key}: {text}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_mixed_training_step_gives_each_adapter_its_rows_gradients(family):
    adapted = _adapted(family)
    inputs = hf_inputs(family, batch=len(NAMES), seq=7)
    total, alone = _alone(adapted, inputs, NAMES)
    sites = _gathered_sites(adapted)
    assert sites == 4 if family == "llama" else sites == 2  # the shared modules of two layers; wide's extra stays
    adapted.zero_grad()
    loss = _loss(adapted, inputs, adapter_names=NAMES)
    loss.backward()
    # The step ran the gathered graph: per gathered site, the rows' A and B were index-selected with autograd.
    assert _backward_ops(loss).get("IndexSelectBackward0", 0) == 2 * sites
    torch.testing.assert_close(loss.item(), total, rtol=1e-6, atol=1e-4)
    for name in alone:
        _assert_grads(_grads(adapted, name), alone[name])
        assert any(grad.abs().sum() > 0 for grad in alone[name].values())
    torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1).step()  # the whole step runs


def test_base_rows_give_no_gradient_to_any_adapter():
    adapted = _adapted("llama")
    inputs = hf_inputs("llama", batch=3, seq=6)
    loss = _loss(adapted, inputs, adapter_names=["__base__"] * 3)
    loss.backward()
    with adapted.disable_adapters():
        torch.testing.assert_close(loss, _loss(adapted, inputs), rtol=1e-6, atol=1e-5)
    for name in adapted.adapters:
        assert all(not grad.any() for grad in _grads(adapted, name).values()), name


@pytest.mark.parametrize("broken", ["default", "b"])  # default: the adapter a row with none would gather first
def test_an_unused_adapter_with_an_inf_leaves_the_others_gradients_alone(broken):
    adapted = _adapted("llama")
    inputs = hf_inputs("llama", batch=4, seq=6)
    names = ["c", "__base__", "wide", "__base__"]
    loss = _loss(adapted, inputs, adapter_names=names)
    loss.backward()
    want = {name: _grads(adapted, name) for name in ("c", "wide")}
    adapted.zero_grad()
    with torch.no_grad():
        for site in adapted.site_modules(broken):
            site.lora_A[0, 0] = float("inf")
            site.lora_B[0, 0] = float("inf")
    poisoned = _loss(adapted, inputs, adapter_names=names)
    poisoned.backward()
    assert torch.equal(poisoned, loss)
    for name in ("c", "wide"):
        _assert_grads(_grads(adapted, name), want[name])
        assert all(torch.isfinite(grad).all() for grad in want[name].values())
    assert all(not grad.any() for grad in _grads(adapted, broken).values())  # exact zeros, not NaN


def test_equal_dropout_is_gathered_and_different_dropout_stays_gated(caplog):
    adapted = _adapted("llama", dropout=0.1)
    program = adapted.programs()[0]
    assert _gathered_sites(adapted) == 4
    train = program.module_for(True, torch.device("cpu"), mixed_batch=True)
    drops = [node for node in train.graph.nodes if node.target is dropout]
    assert len(drops) == 4 + 2  # one shared mask per gathered site, wide's own two o_proj branches
    inputs = hf_inputs("llama", batch=len(NAMES), seq=7)
    loss = _loss(adapted, inputs, adapter_names=NAMES)
    loss.backward()
    assert torch.isfinite(loss) and _backward_ops(loss).get("IndexSelectBackward0", 0) == 8
    with caplog.at_level(logging.INFO, logger="fxpeft"):
        differing = _adapted("llama", dropouts=(0.1, 0.0, 0.1, 0.1))
    assert "dropout differs" in caplog.text
    program = differing.programs()[0]
    assert program.module_for(True, torch.device("cpu"), mixed_batch=True) is program.graph_module
    assert _gathered_sites(differing) == 0
    eval_mixed = program.module_for(False, torch.device("cpu"), mixed_batch=True)  # eval mode drops no input
    assert sum(node.target is torch.ops.aten.bmm.default for node in eval_mixed.graph.nodes) == 8


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_mixed_training_recompiles_nothing_for_new_rows(backend):
    adapted = _adapted("llama")
    inputs = hf_inputs("llama", batch=4, seq=6)
    patterns = (["c", "default", "__base__", "b"], ["wide", "wide", "b", "default"], ["__base__", "c", "c", "b"])
    wanted = []
    for pattern in patterns:
        adapted.zero_grad()
        _loss(adapted, inputs, adapter_names=pattern).backward()
        wanted.append({name: _grads(adapted, name) for name in adapted.adapters})
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(adapted, fullgraph=True, backend=backend)
    for index, (pattern, want) in enumerate(zip(patterns, wanted)):
        adapted.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            _loss(fast, inputs, adapter_names=adapted.adapter_indices(pattern)).backward()
        for name in adapted.adapters:
            _assert_grads(_grads(adapted, name), want[name])
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
