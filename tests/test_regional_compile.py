"""``adapted.compile()``: each repeated layer compiled once, training included (fxpeft/runtime/regional_compile.py).

The Inductor test compares the loss and every gradient of compiled training steps with eager ones (SDPA attention,
dynamic shapes: two sequence lengths); the compile-counter tests pin how many frames are compiled."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from transformers import CompileConfig

import fxpeft
from fxpeft.runtime.regional_compile import compiled_templates
from tests.models import hf_inputs, hf_model

LAYERS = 3


def _inputs(seq: int, batch: int = 2) -> dict:
    inputs = hf_inputs("llama", batch=batch, seq=seq, seed=seq)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _adapted(layers: int = LAYERS, trainable: bool = True) -> fxpeft.AdaptedModel:
    """A tiny llama (SDPA attention), LoRA on q/v (non-zero B) and trained copies inside and outside the layers."""
    torch.manual_seed(0)
    base = hf_model("llama", layers=layers)
    assert base.config._attn_implementation == "sdpa"
    rules = [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)]
    if trainable:
        rules.append(fxpeft.Trainable(targets=["post_attention_layernorm", "lm_head"]))
    adapted = fxpeft.transform(base, rules, example_kwargs=_inputs(8))
    with torch.no_grad():
        for site in adapted.site_modules():
            if hasattr(site, "lora_B"):
                site.lora_B.normal_(std=0.1)
    return adapted.train()


def _step(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def inductor_steps():
    """One regional Inductor compile (dynamic=True) shared by the module: the steps of the compiled model and of an
    eager copy at two sequence lengths, and the dynamo counters after them."""
    torch._dynamo.reset()
    counters.clear()
    eager = _adapted()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="inductor", dynamic=True, fullgraph=True)
    steps = [(_step(compiled, _inputs(seq)), _step(eager, _inputs(seq))) for seq in (8, 13)]
    return compiled, steps, dict(counters["stats"])


def test_inductor_training_step_equals_eager(inductor_steps):
    compiled, steps, _ = inductor_steps
    trained = {name for name, p in compiled.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trained) and any("lm_head" in name for name in trained)
    assert any("layers/1/post_attention_layernorm" in name for name in trained)
    for (loss, grads), (eager_loss, eager_grads) in steps:
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(eager_grads) == trained  # every trainable tensor got a gradient, no other did
        for name in trained:
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_inductor_compiles_one_layer_once(inductor_steps):
    compiled, _, stats = inductor_steps
    (program,) = compiled.programs()
    twin = program.module_for(True, torch.device("cpu"))  # the train graph's regional twin, made by the steps
    assert len(compiled_templates(twin)) == 1  # one template serves the three layers
    assert stats["unique_graphs"] == 1  # traced once for three layers and both sequence lengths


def test_switching_adapters_compiles_nothing():
    """Eval calls and adapter switching under a compile counter: one frame per graph (train, eval), for all layers;
    switching, disabling and alpha changes compile nothing; outputs equal the eager model's."""
    eager = _adapted(trainable=False)
    eager.add_adapter("other", [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "other" in name and "lora_B" in name:
                p.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile(backend=counter)
    inputs = _inputs(8)
    for model in (eager, compiled):
        model.train()
    torch.testing.assert_close(compiled(**inputs).loss, eager(**inputs).loss)
    assert counter.frame_count == 1
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        for switch in ("default", "other", "disable", ["default", "other"], "alpha"):
            outputs = []
            for model in (eager, compiled):
                if switch == "disable":
                    with model.disable_adapters():
                        outputs.append(model(**inputs).logits)
                    continue
                if switch == "alpha":
                    model.set_alpha(3.0)
                else:
                    model.set_adapter(switch)
                outputs.append(model(**inputs).logits)
            torch.testing.assert_close(outputs[1], outputs[0])
            assert counter.frame_count == 2, switch  # the eval graph's template, compiled once


def test_model_without_repeated_layers_compiles_whole_graph():
    eager = _adapted(layers=1, trainable=False)
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile(backend=counter)
    inputs = _inputs(8)
    loss, grads = _step(compiled, inputs)
    eager_loss, eager_grads = _step(eager, inputs)
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    assert counter.frame_count == 1
    program = compiled.programs()[0]
    assert compiled_templates(program.module_for(True, torch.device("cpu"))) == []


def test_layers_with_dropout_share_a_template():
    """Dropout nodes carry their own draw numbers; layers still match, and each call draws the eager masks."""
    torch.manual_seed(0)
    eager = fxpeft.transform(hf_model("llama", layers=LAYERS), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4,
                                                                            dropout=0.3)],
                             example_kwargs=_inputs(8)).train()
    with torch.no_grad():
        for site in eager.site_modules():
            site.lora_B.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile(backend=counter, dynamic=True)
    inputs = _inputs(8)
    torch.manual_seed(5)
    loss, grads = _step(compiled, inputs)
    torch.manual_seed(5)
    eager_loss, eager_grads = _step(eager, inputs)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    torch.manual_seed(6)
    assert _step(compiled, inputs)[0] != loss  # the masks are drawn at each call
    program = compiled.programs()[0]
    assert len(compiled_templates(program.module_for(True, torch.device("cpu")))) == 1
    assert counter.frame_count == 1


def test_generate_runs_the_compiled_layers():
    """``generate`` on a model compiled in place: the decode steps' graph (KV cache in and out) runs its layers through
    one compiled template, the tokens are the eager model's, and transformers does not compile the decode step again
    on top."""
    eager = _adapted(trainable=False).eval()
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile(backend=counter)
    prompt = hf_inputs("llama", batch=2, seq=6)
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    want = eager.generate(**prompt, **options)
    got = compiled.generate(**prompt, **options)
    assert torch.equal(got, want)
    assert compiled.compiled_in_place and not eager.compiled_in_place
    assert 2 <= counter.frame_count <= 4  # the prefill, the decode template (and a dynamic recompile), not per layer
    templates = [compiled_templates(program.module_for(False, torch.device("cpu"))) for program in compiled.programs()]
    # The example's graph and the decode step's run one template each; the prefill's layers hold an in-place op
    # (``detach_`` on the new cache's tensors), which a template may not (fxpeft/runtime/shared_layers.py): compiled
    # whole.
    assert [len(found) for found in templates] == [1, 0, 1]
    # A static cache with a compile config transformers would act on (on any device): the decode step is not
    # compiled again over the templates; every graph dynamo makes is one the model's own compile counted.
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True
    frames = counter.frame_count
    counters.clear()
    static = compiled.generate(**prompt, **options, cache_implementation="static", compile_config=config)
    assert torch.equal(static, want)
    assert counters["stats"]["unique_graphs"] == counter.frame_count - frames
