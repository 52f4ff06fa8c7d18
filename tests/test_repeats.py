"""Repeated layers as one shared region (fxpeft/repeats.py): found without tables, exact, compiled once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import fxpeft
from fxpeft.repeats import repeated_region_count
from tests.models import AUTO_CLASS, CONFIGS, hf_inputs


def _model(family: str, layers: int) -> nn.Module:
    config = CONFIGS[family]()
    for name in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                 "decoder_layers"):
        if hasattr(config, name):
            setattr(config, name, layers)
    torch.manual_seed(0)
    kwargs = {"attn_implementation": "eager"} if family == "bloom" else {}
    return AUTO_CLASS[family].from_config(config, **kwargs).eval()


def _adapted(model: nn.Module, **kwargs) -> fxpeft.AdaptedModel:
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets="all-linear", r=4, alpha=8)], **kwargs)
    with torch.no_grad():  # a non-zero B, so the LoRA branches show in the numbers
        for site in adapted.site_modules():
            site.lora_B.normal_(std=0.1)
    return adapted


def _run(adapted: fxpeft.AdaptedModel, inputs: dict, training: bool, shared: bool):
    """One forward (and backward when training) of the flat or the shared graph, called as forward does."""
    adapted.train(training)
    adapted.zero_grad()
    program = adapted.programs()[0]
    gates = adapted._gates(inputs, None)
    torch.manual_seed(0)  # dropout draws the same masks in the same order in both graphs
    out = program.run(training, inputs, lambda source: adapted._resolve(source, gates), shared=shared)
    logits = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    if training:
        logits.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in adapted.parameters() if p.requires_grad] if training else []
    return logits.detach(), grads


# Sharing needs two matching layers per stack: T5's first block computes the position bias (it differs from
# the rest), so it stays inline and three blocks per stack give two shared calls each.
@pytest.mark.parametrize("family, layers, calls", [("llama", 3, 3), ("gpt2", 2, 2), ("bert", 2, 2), ("t5", 3, 4),
                                                   ("whisper", 2, 4), ("vit", 2, 2)])
def test_shared_graph_calls_one_region_per_layer_and_gives_the_flat_graphs_numbers(family, layers, calls):
    adapted = _adapted(_model(family, layers))
    program = adapted.programs()[0]
    for training in (False, True):
        shared_module = program.module_for(training, torch.device("cpu"), shared=True)
        assert repeated_region_count(shared_module) == calls
        assert repeated_region_count(program.module_for(training, torch.device("cpu"))) == 0
    inputs = hf_inputs(family)
    for training in (False, True):
        flat_logits, flat_grads = _run(adapted, inputs, training, shared=False)
        shared_logits, shared_grads = _run(adapted, inputs, training, shared=True)
        assert torch.equal(shared_logits, flat_logits)
        assert all(torch.equal(a, b) for a, b in zip(shared_grads, flat_grads))


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
    shared_module = adapted.programs()[0].module_for(False, torch.device("cpu"), shared=True)
    assert repeated_region_count(shared_module) == 3
    x = torch.randn(5, 8)
    adapted.eval()
    torch.testing.assert_close(torch.compile(adapted, fullgraph=True, dynamic=True, backend="eager")(x), adapted(x),
                               rtol=0, atol=0)


class _GraphRecorder:
    """A torch.compile backend that keeps dynamo's graphs and runs them as ``aot_eager`` does."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)


def _subgraph_calls(graph_module: torch.fx.GraphModule) -> list[str]:
    """The subgraph each ``invoke_subgraph`` call of dynamo's graph runs."""
    return [node.args[0].target for node in graph_module.graph.nodes
            if node.op == "call_function" and "invoke_subgraph" in str(node.target)]


def test_under_torch_compile_every_layer_calls_one_traced_subgraph_and_the_flag_turns_it_off():
    adapted = _adapted(_model("llama", 3))
    inputs = hf_inputs("llama", batch=2, seq=8)
    inputs["labels"] = inputs["input_ids"]
    adapted.eval()
    with torch.no_grad():
        eager_eval = adapted(**inputs).logits
    adapted.train()
    eager = adapted(**inputs)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in adapted.parameters() if p.requires_grad]
    # With autograd on, layer 0's input needs no gradient (the base is frozen) while the others' inputs do, so
    # dynamo traces layer 0 apart and inlines it (a subgraph used once); layers 1 and 2 call one subgraph.
    # By default a graph this shallow compiles flat (fxpeft.repeats.AUTO_SHARE_MIN_CALLS).
    for share, eval_calls, train_calls in ((True, 3, 2), (False, 0, 0), (None, 0, 0)):
        torch._dynamo.reset()
        adapted.compile_layers_once = share
        recorder = _GraphRecorder()
        compiled = torch.compile(adapted, fullgraph=True, dynamic=True, backend=recorder)
        adapted.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, eager_eval, rtol=0, atol=0)
        adapted.train()
        adapted.zero_grad()
        out = compiled(**inputs)
        out.loss.backward()
        assert len(recorder.graphs) == 2
        called = [_subgraph_calls(graph) for graph in recorder.graphs]
        assert [len(c) for c in called] == [eval_calls, train_calls]
        assert all(len(set(c)) == (1 if share else 0) for c in called)
        assert adapted.programs()[0].shared_layer_calls == 3
        torch.testing.assert_close(out.logits, eager.logits, rtol=0, atol=0)
        for p, grad in zip((p for p in adapted.parameters() if p.requires_grad), eager_grads):
            torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)
