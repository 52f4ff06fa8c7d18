"""fxpeft's ``DynamicCache`` pytree (fxpeft/capture/caches.py): a cache is its tensors, rebuilt without a copy.

transformers' registration rebuilt each layer with ``update`` from an empty tensor, so every captured decode graph
began with ``cat(empty constant, past)`` per key and value tensor, and every output cache was copied once more.
These tests hold the copy-free form: the decode graph reads each past tensor only in the model's own
``cat([past, new])``, a rebuilt cache holds the very tensors it was given, layer types and states survive the round
trip, and what cannot be rebuilt is refused by name.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
import transformers as tf
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.executorch import register_dynamic_cache_export_support

import fxpeft
from fxpeft.capture.caches import register_cache_pytrees, register_dynamic_cache
from fxpeft.errors import UnsupportedError
from tests.models import hf_model

aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def registered():
    register_cache_pytrees()


def _kv(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, length, 4, generator=generator), torch.randn(2, 2, length, 4, generator=generator)


def _prompt(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _round_trip(cache: DynamicCache) -> DynamicCache:
    leaves, spec = pytree.tree_flatten(cache)
    return pytree.tree_unflatten(leaves, spec)


def test_the_decode_graph_reads_the_past_without_a_copy():
    adapted = fxpeft.transform(hf_model("llama"), fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4)).eval()
    adapted.generate(**_prompt(2, 5, seed=1), max_new_tokens=3, do_sample=False)
    decode = [program for program in adapted.programs()
              if any("key_cache" in node.name for node in program.placeholders())]
    assert len(decode) == 1
    module = decode[0].module_for(False, decode[0].device)
    past = [node for node in module.graph.nodes if node.op == "placeholder"
            and ("key_cache" in node.name or "value_cache" in node.name)]
    cats = [node for node in module.graph.nodes if node.target is aten.cat.default]
    assert len(past) == 2 * 2  # keys and values of two layers
    assert not any(node.target is aten.lift_fresh_copy.default for node in module.graph.nodes)
    for tensor in past:  # read by the model's own update, cat([past, new]), and no cat(empty, past) before it
        readers = [user for user in tensor.users if user.target is not aten.sym_size.int]
        assert [user.target for user in readers] == [aten.cat.default] and readers[0].args[0][0] is tensor
    assert sum(any(arg in past for arg in cat.args[0]) for cat in cats) == len(past)


def test_a_rebuilt_cache_holds_the_same_tensors_and_layers():
    cache = DynamicCache(config=tf.MistralConfig(num_hidden_layers=3, sliding_window=6))
    cache.layers.append(DummyLayer())
    cache.update(*_kv(4, seed=0), layer_idx=0)
    cache.update(*_kv(3, seed=1), layer_idx=2)
    rebuilt = _round_trip(cache)
    assert [type(layer) for layer in rebuilt.layers] == [DynamicSlidingWindowLayer] * 3 + [DummyLayer]
    assert [layer.is_initialized for layer in rebuilt.layers] == [True, False, True, True]
    for old, new in zip(cache.layers, rebuilt.layers):
        assert new.keys is old.keys and new.values is old.values  # not copies
    for index in (0, 2):
        assert rebuilt.layers[index].sliding_window == 6
        assert rebuilt.layers[index].cumulative_length == cache.layers[index].cumulative_length
    assert rebuilt.get_seq_length(0) == 4 and rebuilt.layer_class_to_replicate is None
    # A cache made without a config grows its layers lazily, and still does once rebuilt.
    lazy = DynamicCache()
    lazy.update(*_kv(2, seed=2), layer_idx=0)
    again = _round_trip(lazy)
    assert again.layer_class_to_replicate is DynamicLayer and type(again.layers[0]) is DynamicLayer
    again.update(*_kv(1, seed=3), layer_idx=1)
    assert again.get_seq_length(1) == 1
    assert _round_trip(DynamicCache()).layers == []


def test_a_layer_it_cannot_rebuild_is_refused_by_name():
    class Custom(DynamicLayer):
        pass

    cache = DynamicCache()
    cache.layers.append(Custom())
    with pytest.raises(UnsupportedError, match="layer 0 is a Custom"):
        pytree.tree_flatten(cache)


def test_the_spec_serializes_and_replaces_transformers_registration():
    cache = DynamicCache(config=tf.MistralConfig(num_hidden_layers=2, sliding_window=6))
    cache.update(*_kv(2, seed=4), layer_idx=0)
    spec = pytree.tree_structure(cache)
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec
    register_dynamic_cache_export_support()  # after fxpeft's: a no-op
    assert pytree.tree_structure(cache) == spec
    pytree._deregister_pytree_node(DynamicCache)
    try:
        register_dynamic_cache_export_support()  # before fxpeft's: replaced by it
        assert pytree.tree_structure(cache) != spec
    finally:
        register_dynamic_cache()
    assert pytree.tree_structure(cache) == spec


def test_generating_past_a_sliding_window_equals_transformers():
    """A sliding-window layer's written length is rebuilt as its keys' length (transformers' rule): past the window
    the decode steps still see the right keys, and the tokens are the base model's."""
    config = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, sliding_window=6)
    torch.manual_seed(0)
    base = tf.MistralForCausalLM(config).eval()
    adapted = fxpeft.transform(tf.MistralForCausalLM(config).eval(), fxpeft.LoRA(targets=["q_proj"], r=4)).eval()
    adapted.base_model.load_state_dict(base.state_dict())
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    prompt = _prompt(2, 5, seed=1)
    assert torch.equal(adapted.generate(**prompt, **settings), base.generate(**prompt, **settings))
