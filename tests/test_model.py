"""The adapted model as an nn.Module: modes, argument sets, parameters, counts (against the eager base)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import transformers as tf

import fxpeft
from fxpeft.errors import RuleError
from tests.models import hf_inputs, hf_model


def _llama_with_dropout():
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, attention_dropout=0.3)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama_pair():
    base = _llama_with_dropout()
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.2)])
    return base, adapted


@pytest.fixture(scope="module")
def bert_pair():
    base = hf_model("bert")  # hidden_dropout 0.1, attention dropout 0.1
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["query", "value"], r=4), fxpeft.Trainable(["classifier"])])
    return base, adapted


def test_eval_mode_turns_off_every_dropout(llama_pair):
    base, adapted = llama_pair
    inputs = hf_inputs("llama", batch=3, seq=10)
    adapted.eval()
    first, second = adapted(**inputs).logits, adapted(**inputs).logits
    assert torch.equal(first, second)
    assert torch.equal(first, base.eval()(**inputs).logits)
    sdpa = [n for n in adapted.programs()[0].module_for(False, first.device).graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa and all(n.args[4] == 0.0 for n in sdpa)


def test_train_mode_applies_dropout_like_the_eager_model(llama_pair):
    base, adapted = llama_pair
    inputs = hf_inputs("llama", batch=2, seq=8)
    adapted.train()
    torch.manual_seed(3)
    first = adapted(**inputs).logits
    torch.manual_seed(4)
    second = adapted(**inputs).logits
    assert not torch.equal(first, second), "dropout is baked off in the train graph"
    assert not torch.equal(first, adapted.eval()(**inputs).logits)
    adapted.train()


def test_bert_train_and_eval_match_eager_base(bert_pair):
    base, adapted = bert_pair
    inputs = hf_inputs("bert", batch=2, seq=12)
    adapted.eval()
    assert torch.equal(adapted(**inputs).logits, base.eval()(**inputs).logits)
    adapted.train()
    base.train()
    torch.manual_seed(11)
    ours = adapted(**inputs).logits
    torch.manual_seed(11)
    theirs = base(**inputs).logits
    base.eval()
    assert torch.equal(ours, theirs), "same seed, same dropout masks, zero adapter: same outputs"


def test_new_argument_sets_are_captured_once_and_share_adapter_tensors(bert_pair):
    base, adapted = bert_pair
    adapted.eval()
    inputs = hf_inputs("bert", batch=2, seq=7)
    labels = torch.tensor([0, 1])
    with_labels = adapted(**inputs, labels=labels)
    no_mask = adapted(input_ids=inputs["input_ids"])
    count = len(adapted.programs())
    adapted(**inputs, labels=labels)
    adapted(input_ids=hf_inputs("bert", batch=4, seq=5)["input_ids"])
    assert len(adapted.programs()) == count, "a new size must not capture again"
    reference = base(**inputs, labels=labels)
    assert torch.equal(with_labels.logits, reference.logits)
    assert torch.equal(with_labels.loss, reference.loss)
    assert torch.equal(no_mask.logits, base(input_ids=inputs["input_ids"]).logits)
    placeholders = [{n.name for n in p.graph.nodes if n.op == "placeholder" and n.name.startswith("fxpeft_")}
                    for p in adapted.programs()]
    assert all(names == placeholders[0] for names in placeholders)


def test_positional_call_binds_to_forward_names(bert_pair):
    base, adapted = bert_pair
    adapted.eval()
    ids = hf_inputs("bert", batch=2, seq=6)["input_ids"]
    assert torch.equal(adapted(ids).logits, base(ids).logits)


def test_base_frozen_adapter_trainable_and_optimizer_only_moves_adapter(bert_pair):
    base, adapted = bert_pair
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    assert not any(p.requires_grad for p in base.parameters())
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable
    optimizer = torch.optim.AdamW(adapted.parameters(), lr=1e-2)
    adapted.train()
    inputs = hf_inputs("bert", batch=2, seq=6)
    for _ in range(2):
        adapted(**inputs, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    assert all(torch.equal(before[name], p) for name, p in base.named_parameters())
    assert not torch.equal(adapted(**inputs).logits, base(**inputs).logits)


def test_counts_match_peft_format(bert_pair):
    from peft import LoraConfig, get_peft_model

    _, adapted = bert_pair
    reference = get_peft_model(hf_model("bert"), LoraConfig(target_modules=["query", "value"], r=4,
                                                            modules_to_save=["classifier"]))
    assert adapted.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    ours, theirs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(ours):
        adapted.print_trainable_parameters()
    with contextlib.redirect_stdout(theirs):
        reference.print_trainable_parameters()
    assert ours.getvalue() == theirs.getvalue()


def _mt0_large_on_meta(tied: bool):
    config = tf.MT5Config(d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64,
                          vocab_size=250112, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = tf.AutoModelForSeq2SeqLM.from_config(config)
        if not tied:  # transformers 5 ties MT5's head by force; mt0-large was published untied
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    return model


@pytest.mark.parametrize("tied, expected", [
    (False, "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"),
    (True, "trainable params: 2,359,296 || all params: 975,825,920 || trainable%: 0.2418"),
])
def test_mt0_large_headline_counts_on_meta_device(tied, expected):
    """The seed's headline: mt0-large dimensions, LoRA r=8 on q and v, planned without memory.
    Untied as mt0-large was published; tied as transformers 5 builds it (PEFT prints 975,825,920)."""
    adapted = fxpeft.transform(_mt0_large_on_meta(tied=tied),
                               [fxpeft.LoRA(targets=["q", "v"], r=8, alpha=32, dropout=0.1)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        adapted.print_trainable_parameters()
    assert out.getvalue().strip() == expected


def test_rules_validate_and_round_trip():
    with pytest.raises(RuleError, match="r"):
        fxpeft.LoRA(targets=["q"], r=0)
    with pytest.raises(RuleError, match="dropout"):
        fxpeft.LoRA(targets=["q"], dropout=1.0)
    with pytest.raises(RuleError, match="init"):
        fxpeft.LoRA(targets=["q"], init="xavier")
    with pytest.raises(RuleError, match="targets"):
        fxpeft.LoRA()
    import json

    rule = fxpeft.LoRA(targets=["q_proj", torch.nn.Linear], r=4, alpha=16, use_rslora=True, exclude="lm_head")
    again = fxpeft.Rule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert again == rule
    with pytest.raises(RuleError, match="unknown field"):
        fxpeft.Rule.from_dict({"method": "lora", "targets": ["q"], "rank": 4})
