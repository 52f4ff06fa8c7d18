"""Repeated layers as one shared region (fxpeft/runtime/shared_layers.py): no tables, exact, compiled once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import fxpeft
from fxpeft.runtime.shared_layers import repeated_region_count
from tests.models import hf_inputs, hf_model


def _adapted(model: nn.Module, **kwargs) -> fxpeft.AdaptedModel:
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets="all-linear", r=4, alpha=8)], **kwargs)
    with torch.no_grad():  # a non-zero B, so the LoRA branches show in the numbers
        for site in adapted.site_modules():
            site.lora_B.normal_(std=0.1)
    return adapted


def _eval_logits(adapted: fxpeft.AdaptedModel, inputs: dict, shared: bool) -> torch.Tensor:
    """One eval forward of the flat or the shared graph, called as forward calls it."""
    adapted.eval()
    program = adapted.programs()[0]
    gates = adapted._gates(inputs, None)
    out = program.run(False, inputs, lambda plan: adapted._resolve_plan(plan, gates), shared=shared)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


# Sharing needs two matching layers per stack: T5's first block computes the position bias (it differs from
# the rest), so it stays inline and three blocks per stack give two shared calls each.
@pytest.mark.parametrize("family, layers, calls", [("llama", 3, 3), ("gpt2", 2, 2), ("bert", 2, 2), ("t5", 3, 4),
                                                   ("whisper", 2, 4), ("vit", 2, 2)])
def test_shared_eval_graph_calls_one_region_per_layer_and_gives_the_flat_graphs_numbers(family, layers, calls):
    adapted = _adapted(hf_model(family, layers))
    program = adapted.programs()[0]
    cpu = torch.device("cpu")
    assert repeated_region_count(program.module_for(False, cpu, shared=True)) == 0  # opt-in
    adapted.compile_layers_once = True
    assert repeated_region_count(program.module_for(False, cpu, shared=True)) == calls
    assert repeated_region_count(program.module_for(False, cpu)) == 0
    assert program.module_for(True, cpu, shared=True) is program.module_for(True, cpu)  # training: flat
    inputs = hf_inputs(family)
    assert torch.equal(_eval_logits(adapted, inputs, shared=True), _eval_logits(adapted, inputs, shared=False))


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_plain_sequential_shares_its_matching_children_and_keeps_the_odd_one_inline():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(8), _Block(8), _Block(8), nn.Linear(8, 3))  # children "0".."3"
    adapted = _adapted(model, example_inputs=(torch.randn(4, 8),))
    adapted.compile_layers_once = True
    program = adapted.programs()[0]
    assert repeated_region_count(program.module_for(False, torch.device("cpu"), shared=True)) == 3
    adapted.eval()
    x = torch.randn(5, 8)
    gates = adapted._gates({"x": x}, None)
    outputs = [program.run(False, {program.kwarg_names[0]: x}, lambda plan: adapted._resolve_plan(plan, gates),
                           shared=shared) for shared in (False, True)]
    assert torch.equal(outputs[0], outputs[1])


class _GraphRecorder:
    """A torch.compile backend that keeps dynamo's graphs and hands them on to ``backend``."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return lookup_backend(self.backend)(graph_module, example_inputs)


def _subgraph_calls(graph_module: torch.fx.GraphModule) -> list[str]:
    """The subgraph each ``invoke_subgraph`` call of dynamo's graph runs."""
    return [node.args[0].target for node in graph_module.graph.nodes
            if node.op == "call_function" and "invoke_subgraph" in str(node.target)]


def test_compiled_inference_calls_one_subgraph_per_layer_and_training_compiles_the_flat_graph():
    adapted = _adapted(hf_model("llama", 3))
    inputs = hf_inputs("llama", batch=2, seq=8)
    inputs["labels"] = inputs["input_ids"]
    adapted.eval()
    with torch.no_grad():
        eager_eval = adapted(**inputs).logits
    # Inductor compiles the shared region once; the flat graph (the default) is checked on dynamo's graph alone.
    assert adapted.compile_layers_once is False
    for share, calls, backend in ((True, 3, "inductor"), (False, 0, "aot_eager")):
        torch._dynamo.reset()
        adapted.compile_layers_once = share
        recorder = _GraphRecorder(backend)
        with torch.no_grad():
            logits = torch.compile(adapted, fullgraph=True, dynamic=True, backend=recorder)(**inputs).logits
        torch.testing.assert_close(logits, eager_eval, rtol=1e-5, atol=1e-5)
        called = _subgraph_calls(recorder.graphs[0])
        assert (len(called), len(set(called))) == (calls, min(calls, 1))

    # A call that records gradients compiles the flat graph even when sharing is asked for (torch 2.13's
    # Inductor computes wrong gradients through a shared region that holds attention, with dynamic shapes).
    adapted.train()
    eager = adapted(**inputs)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in adapted.parameters() if p.requires_grad]
    torch._dynamo.reset()
    adapted.compile_layers_once = True
    adapted.zero_grad()
    recorder = _GraphRecorder("aot_eager")
    out = torch.compile(adapted, fullgraph=True, dynamic=True, backend=recorder)(**inputs)
    out.loss.backward()
    assert _subgraph_calls(recorder.graphs[0]) == []
    torch.testing.assert_close(out.logits, eager.logits, rtol=0, atol=0)
    for p, grad in zip((p for p in adapted.parameters() if p.requires_grad), eager_grads):
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)
