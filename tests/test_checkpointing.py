"""Activation checkpointing as a graph rewrite (fxpeft/runtime/checkpointing.py): each layer is recomputed in
backward, with the numbers of the run without it (dropout masks included), less memory, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpeft
from fxpeft.errors import UnsupportedError
from fxpeft.runtime.checkpointing import checkpointed_layer_count
from tests.models import AUTO_CLASS, CONFIGS, VOCAB, hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
_LAYERS = {"llama": 2, "gpt2": 2, "t5": 4}  # t5: 2 encoder and 2 decoder blocks


def _with_dropout(family: str, layers: int | None = None) -> nn.Module:
    """A tiny model whose attention drops out in train mode (gpt2 and t5 do by default; llama's config is 0.0)."""
    config = CONFIGS[family]()
    if family == "llama":
        config.attention_dropout = 0.1
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AUTO_CLASS[family].from_config(config)


def _batch(family: str, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if family == "t5":
        inputs["labels"] = torch.randint(1, VOCAB, (batch, seq // 2), generator=generator)
    return inputs


def _step(model: nn.Module, adapted: fxpeft.AdaptedModel, batch: dict, seed: int = 7):
    """Loss and every trainable parameter's gradient of one seeded forward and backward."""
    adapted.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in adapted.named_parameters() if p.requires_grad}
    assert grads and all(grad is not None for grad in grads.values())
    return loss.detach(), grads


def _assert_same(first, second) -> None:
    (loss, grads), (loss_again, grads_again) = first, second
    torch.testing.assert_close(loss_again, loss, rtol=0, atol=0)
    assert grads_again.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_again[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def _activation_bytes(adapted: fxpeft.AdaptedModel, batch: dict) -> int:
    """Bytes of the tensors autograd saves for backward during one forward, each storage once, leaving out the
    model's parameters and buffers (fxpeft's layers take weights as inputs; they are in memory anyway)."""
    weights = {t.untyped_storage().data_ptr() for t in (*adapted.parameters(), *adapted.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = adapted(**batch).loss
    loss.backward()
    return sum(saved.values())


def _checkpointed_layers(adapted: fxpeft.AdaptedModel) -> list[int]:
    cpu = torch.device("cpu")
    return [checkpointed_layer_count(program.module_for(True, cpu)) for program in adapted.programs()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_gradients_and_losses_equal_the_run_without_checkpointing(family):
    """LoRA dropout and attention dropout in train mode: the recomputed layer draws the masks of its first run."""
    adapted = fxpeft.transform(_with_dropout(family), [fxpeft.LoRA(targets=_LORA_TARGETS[family], r=4, dropout=0.2,
                                                                   init="gaussian")])
    adapted.train()
    batch = _batch(family)
    plain = _step(adapted, adapted, batch)
    assert not adapted.is_gradient_checkpointing and _checkpointed_layers(adapted) == [0, 0]

    adapted.gradient_checkpointing_enable()
    assert adapted.is_gradient_checkpointing
    assert _checkpointed_layers(adapted) == [_LAYERS[family]] * 2  # the example's graph and the call with labels
    _assert_same(plain, _step(adapted, adapted, batch))
    # Dropout is live: another seed gives other numbers, and so does a recomputation that does not restore the
    # random state (so the equality above is the masks being replayed, not dropout being off).
    other_loss, _ = _step(adapted, adapted, batch, seed=8)
    assert not torch.equal(other_loss, plain[0])
    adapted.gradient_checkpointing_enable({"preserve_rng_state": False})
    loss, grads = _step(adapted, adapted, batch)
    torch.testing.assert_close(loss, plain[0], rtol=0, atol=0)  # the forward is the same run
    assert any(not torch.allclose(grads[name], grad) for name, grad in plain[1].items())

    adapted.gradient_checkpointing_disable()
    assert not adapted.is_gradient_checkpointing and _checkpointed_layers(adapted) == [0, 0]
    _assert_same(plain, _step(adapted, adapted, batch))


def test_activations_saved_for_backward_fall_well_below_the_run_without():
    adapted = fxpeft.transform(hf_model("llama", layers=4), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8)])
    adapted.train()
    batch = _batch("llama", batch=4, seq=32)
    adapted(**batch)  # captures the call with labels
    without = _activation_bytes(adapted, batch)
    adapted.gradient_checkpointing_enable()
    with_checkpointing = _activation_bytes(adapted, batch)
    assert with_checkpointing < 0.25 * without, (with_checkpointing, without)
    adapted.gradient_checkpointing_disable()
    assert _activation_bytes(adapted, batch) == without


def test_the_base_models_flag_carries_over_every_n_layers_included():
    base = hf_model("llama", layers=4)
    with pytest.warns(FutureWarning):  # transformers 5.24 calls it a deprecated alias; PEFT users still call it
        base.gradient_checkpointing_enable(every_n_layers=2)
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4)])
    assert adapted.is_gradient_checkpointing and adapted.is_activation_checkpointing
    assert _checkpointed_layers(adapted) == [2]  # layers 0 and 2 of 4
    adapted.train()
    batch = _batch("llama")
    flagged = _step(adapted, adapted, batch)
    assert _checkpointed_layers(adapted) == [2, 2]  # the call with labels got its own graph, checkpointed too
    adapted.gradient_checkpointing_disable()
    _assert_same(flagged, _step(adapted, adapted, batch))

    plain = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj"], r=4)])
    assert not plain.is_gradient_checkpointing


def test_prefix_tuning_with_lora():
    """PEFT refuses prefix tuning with gradient checkpointing; fxpeft recomputes the layers that read the prefix."""
    adapted = fxpeft.transform(_with_dropout("llama"), [fxpeft.PrefixTuning(num_virtual_tokens=4),
                                                        fxpeft.LoRA(targets=["q_proj"], r=4, dropout=0.1)])
    adapted.train()
    batch = _batch("llama")
    plain = _step(adapted, adapted, batch)
    assert any("prefix" in name or "prompt" in name for name in plain[1]), sorted(plain[1])
    adapted.gradient_checkpointing_enable()
    assert _checkpointed_layers(adapted) == [2, 2]
    _assert_same(plain, _step(adapted, adapted, batch))


def test_several_active_adapters():
    adapted = fxpeft.transform(_with_dropout("llama"), [fxpeft.LoRA(targets=["q_proj"], r=4, dropout=0.1,
                                                                    init="gaussian")])
    adapted.add_adapter("second", [fxpeft.LoRA(targets=["v_proj", "o_proj"], r=2, dropout=0.1, init="gaussian")])
    adapted.set_adapter(["default", "second"])
    adapted.train()
    batch = _batch("llama")
    plain = _step(adapted, adapted, batch)
    assert {name.split(".")[1] for name in plain[1]} == {"default", "second"}
    adapted.gradient_checkpointing_enable()
    _assert_same(plain, _step(adapted, adapted, batch))
    adapted.delete_adapter("second")  # the graphs are rewritten again: they stay checkpointed
    assert _checkpointed_layers(adapted) == [2, 2]


def test_eval_and_no_grad_calls_run_the_graphs_they_ran_before():
    adapted = fxpeft.transform(_with_dropout("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4,
                                                                    init="gaussian")])
    batch = _batch("llama")
    adapted.eval()
    with torch.no_grad():
        before = adapted(**batch).logits
    adapted.gradient_checkpointing_enable()
    program = adapted.programs()[-1]  # the call with labels
    cpu = torch.device("cpu")
    assert checkpointed_layer_count(program.module_for(True, cpu)) == 2
    assert program.module_for(False, cpu) is not program.module_for(True, cpu)
    assert checkpointed_layer_count(program.module_for(False, cpu)) == 0
    with torch.no_grad():
        assert program.module_for(True, cpu) is program.graph_module  # nothing to recompute without autograd
        torch.testing.assert_close(adapted(**batch).logits, before, rtol=0, atol=0)


def test_mistakes_raise_fxpeft_errors_that_say_what_to_pass():
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj"], r=4)])
    with pytest.raises(UnsupportedError, match="use_reentrant=True is not supported.*use_reentrant': False"):
        adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(UnsupportedError, match=r"\['reentrant'\].*accepted"):
        adapted.gradient_checkpointing_enable({"reentrant": False})
    with pytest.raises(UnsupportedError, match="every_n_layers"):
        adapted.gradient_checkpointing_enable(every_n_layers=0)
    assert not adapted.is_gradient_checkpointing
    # What transformers' Trainer calls (gradient_checkpointing=True, default kwargs), and the explicit False.
    adapted.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert adapted.is_gradient_checkpointing and adapted.supports_gradient_checkpointing

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    flat = fxpeft.transform(NoLayers(), [fxpeft.LoRA(targets=["up"], r=2)], example_inputs=(torch.randn(2, 8),))
    with pytest.raises(UnsupportedError, match="no layers to recompute"):
        flat.gradient_checkpointing_enable()
    assert not flat.is_gradient_checkpointing


def test_compiled_with_aot_eager_recomputes_each_layer_with_the_eager_gradients():
    """One compile (aot_eager: AOT autograd's partitioner, no Inductor): whole graph, one checkpoint region per layer,
    the eager run's loss and gradients with LoRA dropout, and far fewer bytes saved than the flat graph's."""
    from torch._dynamo.backends.debugging import aot_eager

    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, dropout=0.2,
                                                               init="gaussian")])
    adapted.train()
    batch = _batch("llama", batch=4, seq=32)
    plain = _step(adapted, adapted, batch)
    flat_bytes = _activation_bytes(adapted, batch)
    adapted.gradient_checkpointing_enable()
    regions: list[int] = []

    def counting(graph_module, example_inputs):
        regions.append(sum(1 for node in graph_module.graph.nodes
                           if node.target is torch.ops.higher_order.tag_activation_checkpoint))
        return aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(adapted, backend=counting, fullgraph=True, dynamic=True)  # fullgraph: no graph break
    _assert_same(plain, _step(compiled, adapted, batch))
    assert regions == [2]
    assert _activation_bytes(compiled, batch) < 0.5 * flat_bytes
    torch._dynamo.reset()
