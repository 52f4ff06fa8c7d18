"""The prefix-tuning pass (passes/prefix.py): parity with PEFT's ``PrefixTuningConfig``, files both ways,
projection, composition with LoRA, compile, padding and errors.

Parity: the same tiny model is built twice with one seed; one copy goes through ``peft.get_peft_model`` with a
``PrefixTuningConfig``, the other through ``fxpeft.transform``; PEFT's prefix is copied into fxpeft by PEFT's saved
key (``prompt_embeddings``), then logits, losses and the prefix's gradient are compared. PEFT refuses bert
("does not support past key values"); there the reference is transformers' own cache path, which PEFT's would be.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import DynamicCache

import fxpeft
from fxpeft.errors import FxpeftError, NoMatchError, RuleError, UnsupportedError
from fxpeft.rules import LoRA, PrefixTuning, Rule
from tests.models import hf_inputs, mlp
from tests.passes.peft_reference import build_without_dropout
from tests.passes.test_prompt import (
    assert_one_graph_over_sizes,
    assert_same_outputs,
    read_into_fxpeft,
    tagged,
    train_steps,
    write_peft_folder,
)

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bloom": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def prefix_inputs(family: str, batch: int = 2, seq: int = 9, seed: int = 1, left_pad: int = 0) -> dict:
    inputs = hf_inputs(family, batch, seq, seed)
    if left_pad:
        inputs["attention_mask"][0, :left_pad] = 0
    if TASKS.get(family) == "CAUSAL_LM":
        inputs["labels"] = inputs["input_ids"].clone()
    elif family == "t5":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    return inputs


def peft_pair(family: str, n: int, **config):
    base = build_without_dropout(family)
    reference = peft.get_peft_model(build_without_dropout(family), peft.PrefixTuningConfig(
        task_type=TASKS[family], num_virtual_tokens=n, **config))
    rule = PrefixTuning(n, projection=config.get("encoder_hidden_size") if config.get("prefix_projection") else None)
    adapted = fxpeft.transform(base, rule, example_kwargs=prefix_inputs(family))
    return adapted, reference


# -- parity with PEFT ------------------------------------------------------------------------------------------
# llama: SDPA with a boolean mask, grouped-query (4 query heads, 2 key/value heads), rotary positions; gpt2: learned
# positions; t5: the decoder's relative position bias as an additive mask, PEFT's seq2seq layout; bloom: the eager
# pattern (baddbmm with alibi, softmax, bmm).
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bloom"])
def test_prefix_tuning_matches_peft(family):
    n = 3
    adapted, reference = peft_pair(family, n)
    saved = peft.get_peft_model_state_dict(reference)
    assert set(adapted.adapter_state_dict()) == set(saved) == {"prompt_embeddings"}
    adapted.adapters["default"].load_peft_state_dict(saved)
    ops = tagged(adapted, "prefix_tuning")
    layers = 2  # every tiny model has two layers: one key cat and one value cat each
    assert ops[torch.ops.aten.cat.default] >= 2 * layers
    for inputs in (prefix_inputs(family), prefix_inputs(family, batch=3, seq=7, seed=4, left_pad=2)):
        assert_same_outputs(adapted, reference, inputs)
    assert len(adapted.programs()) == 1  # a new size, and padding, reuse the one capture
    inputs = prefix_inputs(family)
    adapted.train(), reference.train()
    adapted(**inputs).loss.backward()
    reference(**inputs).loss.backward()
    ours = next(adapted.site_modules()).embedding.grad
    theirs = reference.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert adapted.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


def test_projection_matches_peft_and_resumes_from_fxpeft_files(tmp_path):
    adapted, reference = peft_pair("llama", 4, prefix_projection=True, encoder_hidden_size=24)
    encoder = reference.prompt_encoder["default"]
    next(adapted.site_modules()).load_peft_state_dict(
        {f"fxpeft.prefix_encoder.{key}": value for key, value in encoder.state_dict().items()})
    inputs = prefix_inputs("llama")
    assert_same_outputs(adapted, reference, inputs)
    adapted(**inputs).loss.backward()
    reference(**inputs).loss.backward()
    site = next(adapted.site_modules())
    torch.testing.assert_close(site.transform_0_weight.grad, encoder.transform[0].weight.grad, atol=1e-5, rtol=1e-4)
    assert adapted.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    # fxpeft's folder keeps the projection (training resumes through it); PEFT reads the prefix it produces.
    adapted.eval(), reference.eval()
    adapted.save_adapter(tmp_path / "ours")
    resumed = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "ours", is_trainable=True)
    assert resumed.adapters["default"].rules[0].projection == 24
    assert_same_outputs(resumed.eval(), adapted, inputs)
    loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), str(tmp_path / "ours")).eval()
    assert_same_outputs(adapted, loaded, inputs)


def test_bert_matches_transformers_cache_path():
    """What PEFT would run if it let bert through: the model called with the prefix as its cache."""
    n, inputs = 3, hf_inputs("bert", batch=2, seq=7)
    inputs["attention_mask"][1, -2:] = 0
    base = build_without_dropout("bert")
    adapted = fxpeft.transform(build_without_dropout("bert"), PrefixTuning(n)).eval()
    site = next(adapted.site_modules())
    with torch.no_grad():
        site.embedding.normal_()
    per_layer = site.embedding.detach().view(n, 2 * 2, 4, 16).permute(1, 2, 0, 3)  # [2 * layers, heads, n, d]
    cache = DynamicCache(config=base.config)
    for layer in range(2):
        keys, values = (per_layer[2 * layer + i].unsqueeze(0).expand(2, -1, -1, -1) for i in (0, 1))
        cache.update(keys, values, layer)
    mask = torch.cat([torch.ones(2, n, dtype=torch.long), inputs["attention_mask"]], 1)
    with torch.no_grad():
        expected = base(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=cache).logits
        torch.testing.assert_close(adapted(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


# -- files ----------------------------------------------------------------------------------------------------------
def test_save_loads_in_peft_and_peft_save_loads_in_fxpeft(tmp_path):
    inputs = prefix_inputs("llama")
    adapted = fxpeft.transform(build_without_dropout("llama"), PrefixTuning(5)).eval()
    write_peft_folder(adapted, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 5
    # Grouped-query: PEFT's token_dim and head count are the key/value heads' (2 heads of 16).
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 2, 2)
    assert config["prefix_projection"] is False
    loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), str(tmp_path / "ours")).eval()
    assert_same_outputs(adapted, loaded, inputs)

    reference = peft.get_peft_model(build_without_dropout("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)).eval()
    reference.save_pretrained(str(tmp_path / "theirs"))
    ours = read_into_fxpeft(build_without_dropout("gpt2"), tmp_path / "theirs").eval()
    # PEFT saved the projection's output only: it loads as the fixed prefix it is, as PEFT reloads it.
    assert ours.adapters["default"].rules == [PrefixTuning(4)]
    assert_same_outputs(ours, reference, prefix_inputs("gpt2"))
    assert Rule.from_dict(PrefixTuning(4, projection=8).to_dict()) == PrefixTuning(4, projection=8)


# -- padding, composition, compile -------------------------------------------------------------------------------
def test_left_padded_rows_match_unpadded_rows_given_position_ids():
    """PEFT's convention numbers real tokens n, n+1, ... from the first column; a left-padded batch passes
    ``position_ids`` that start at n on each row's first real token (as ``generate`` does), and then every row
    gives what it gives alone."""
    n = 4
    adapted = fxpeft.transform(build_without_dropout("llama"), PrefixTuning(n)).eval()
    with torch.no_grad():
        next(adapted.site_modules()).embedding.normal_()
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(2, 128, (1, 5), generator=g), torch.randint(2, 128, (1, 8), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1),
                      torch.ones(1, 8, dtype=torch.long)])
    positions = (n + mask.cumsum(1) - 1).clamp(min=n)
    with torch.no_grad():
        batched = adapted(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone_short = adapted(input_ids=short, attention_mask=torch.ones_like(short),
                              position_ids=n + torch.arange(5)[None]).logits
        alone_long = adapted(input_ids=long, attention_mask=torch.ones_like(long),
                             position_ids=n + torch.arange(8)[None]).logits
        # Without position_ids the model numbers positions itself, from n (PEFT's convention).
        plain = adapted(input_ids=long, attention_mask=torch.ones_like(long)).logits
    torch.testing.assert_close(batched[1], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0, -5:], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, alone_long, atol=1e-5, rtol=1e-5)


def test_lora_and_prefix_train_together():
    inputs = prefix_inputs("llama", batch=4, seq=8)
    adapted = fxpeft.transform(build_without_dropout("llama"),
                               [LoRA(targets=["q_proj", "v_proj"], r=4), PrefixTuning(4, projection=16)]).train()
    assert tagged(adapted, "lora") and tagged(adapted, "prefix_tuning")
    losses = train_steps(adapted, inputs)
    assert losses[-1] < losses[0] - 0.3
    prefix = next(site for site in adapted.site_modules() if type(site).__name__ == "PrefixEncoder")
    lora = next(site for site in adapted.site_modules() if type(site).__name__ == "LoraWeights")
    assert prefix.transform_2_weight.grad.abs().sum() > 0 and lora.lora_B.grad.abs().sum() > 0


def test_compiles_whole_graph_without_recompiling_on_new_sizes():
    assert_one_graph_over_sizes(fxpeft.transform(build_without_dropout("gpt2"), PrefixTuning(3)).eval(), "gpt2")


# -- errors -------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(RuleError, match="num_virtual_tokens"):
        PrefixTuning(0)
    with pytest.raises(RuleError, match="projection"):
        PrefixTuning(4, projection=-2)
    with pytest.raises(NoMatchError, match="no attention op"):
        fxpeft.transform(mlp(), PrefixTuning(2), example_inputs=(torch.randn(3, 16),))
    with pytest.raises(RuleError, match="position table"):  # gpt2's table here has 64 rows
        fxpeft.transform(build_without_dropout("gpt2"), PrefixTuning(64))
    adapted = fxpeft.transform(build_without_dropout("gpt2"), PrefixTuning(60))
    adapted(**hf_inputs("gpt2", seq=4))
    with pytest.raises(RuleError, match="at most 4 tokens"):
        adapted(**hf_inputs("gpt2", seq=9))
    adapted = fxpeft.transform(build_without_dropout("llama"), PrefixTuning(2))
    # Virtual tokens are part of the graph: a second adapter could not switch them off, so it is refused.
    with pytest.raises(UnsupportedError, match="virtual-token adapters"):
        adapted.add_adapter("other", LoRA(targets=["q_proj"], r=2))
    inputs = hf_inputs("llama", seq=4)
    prefixed = adapted.eval()(**inputs).logits
    with adapted.disable_adapters():  # as PEFT's disable_adapter(): the base model itself, bit for bit
        assert torch.equal(adapted(**inputs).logits, adapted.base_model.eval()(**inputs).logits)
        with pytest.raises(FxpeftError, match="inside disable_adapters"):
            adapted(**inputs, adapter_names=["default"] * 2)
    assert torch.equal(adapted(**inputs).logits, prefixed)
    lora = fxpeft.transform(build_without_dropout("llama"), LoRA(targets=["q_proj"], r=2))
    with pytest.raises(UnsupportedError, match="virtual-token adapters"):
        lora.add_adapter("prefix", PrefixTuning(2))
    assert list(lora.adapters) == ["default"]
    with pytest.raises(NoMatchError, match="selected no self-attention op"):
        fxpeft.transform(build_without_dropout("llama"), PrefixTuning(2, targets=["cross_attn"]))


class _TinyCausal(torch.nn.Module):
    """A plain module (no transformers, no config): one causal SDPA with ``is_causal=True`` and no mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 32)

    def attend(self, ids, prefix_keys=None, prefix_values=None):
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.qkv(self.embed(ids)).chunk(3, -1))
        if prefix_keys is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        n, s = prefix_keys.shape[-2], ids.shape[1]
        keys, values = (torch.cat([p.expand(ids.shape[0], -1, -1, -1), t], 2)
                        for p, t in ((prefix_keys, k), (prefix_values, v)))
        mask = torch.arange(n + s)[None, :] <= torch.arange(s)[:, None] + n
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def forward(self, ids):
        return self.out(self.attend(ids).transpose(1, 2).flatten(2))


def test_plain_module_with_is_causal_attention():
    model = _TinyCausal()
    ids = torch.randint(0, 32, (2, 6))
    adapted = fxpeft.transform(model, PrefixTuning(3), example_inputs=(ids,)).eval()
    site = next(adapted.site_modules())
    assert site.embedding.shape == (3, 2 * 16)  # one layer: keys then values, 2 heads of 8
    with torch.no_grad():
        site.embedding.normal_()
        per = site.embedding.view(3, 2, 2, 8).permute(1, 2, 0, 3)  # [key|value, heads, n, d]
        for shape in ((2, 6), (3, 9)):
            ids = torch.randint(0, 32, shape)
            mixed = model.attend(ids, per[0][None], per[1][None])
            torch.testing.assert_close(adapted(ids), model.out(mixed.transpose(1, 2).flatten(2)), atol=1e-5, rtol=1e-5)
