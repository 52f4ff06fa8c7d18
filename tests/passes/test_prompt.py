"""The prompt-tuning pass (passes/prompt.py): its graph, and parity with the ``peft`` package.

Parity: the same tiny model is built twice with one seed; one copy goes through ``peft.get_peft_model`` with a
``PromptTuningConfig``, the other through ``fxpeft.transform``; PEFT's prompt is copied into fxpeft by PEFT's saved
key (``prompt_embeddings``), then logits, losses and the prompt's gradient are compared at two sizes (the second
one reuses the first capture: a new size is never a new graph).
"""

from __future__ import annotations

import collections
import copy
import json

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import NoMatchError, RuleError
from fxpeft.methods import method_for
from fxpeft.passes.prompt import PromptEmbedding, PromptTuningCodec
from fxpeft.rules import LoRA, PromptTuning, Rule, Trainable
from tests.models import hf_inputs, mlp
from tests.passes.peft_reference import build_without_dropout

TASKS = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


# -- helpers shared by the virtual-token test files ------------------------------------------------------------
def labelled_inputs(family: str, batch: int = 2, seq: int = 9, seed: int = 1) -> dict:
    """``hf_inputs`` with labels: next-token labels for causal LMs, targets for t5, classes for bert."""
    inputs = hf_inputs(family, batch, seq, seed)
    if TASKS[family] == "CAUSAL_LM":
        inputs["labels"] = inputs["input_ids"].clone()
    elif family == "t5":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        inputs["labels"] = torch.arange(batch) % 2
    return inputs


def virtual_pair(family: str, rules: list, peft_config, inputs: dict):
    """(fxpeft adapted model, PEFT model) over two identical dropout-free copies of a tiny model."""
    base = build_without_dropout(family)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config)
    adapted = fxpeft.transform(base, rules, example_kwargs=inputs)
    return adapted, reference


def tagged(adapted: fxpeft.AdaptedModel, method: str) -> collections.Counter:
    """The ops of the nodes a pass inserted (``node.meta["fxpeft"]``) in the first program's train graph."""
    return collections.Counter(node.target for node in adapted.programs()[0].graph.nodes
                               if (node.meta.get("fxpeft") or {}).get("method") == method)


def assert_same_outputs(adapted, reference, inputs: dict, atol: float = 1e-5) -> None:
    ours, theirs = adapted(**inputs), reference(**inputs)
    assert ours.logits.shape == theirs.logits.shape
    torch.testing.assert_close(ours.logits, theirs.logits, atol=atol, rtol=1e-5)
    if theirs.loss is not None:
        torch.testing.assert_close(ours.loss, theirs.loss, atol=atol, rtol=1e-5)


def write_peft_folder(adapted: fxpeft.AdaptedModel, folder, adapter_name: str = "default") -> None:
    """The public ``save_adapter`` (kept as a name for the virtual-token test files)."""
    adapted.save_adapter(folder, adapter_name)


def read_into_fxpeft(model, folder) -> fxpeft.AdaptedModel:
    """The public ``fxpeft.load_adapter`` of a virtual-token folder, trainable (as resuming training needs)."""
    adapted = fxpeft.load_adapter(model, folder, is_trainable=True)
    assert all(method_for(rule).gateable is False or isinstance(rule, Trainable)
               for rule in adapted.adapters["default"].rules), "not a virtual-token adapter"
    return adapted


def train_steps(adapted: fxpeft.AdaptedModel, inputs: dict, steps: int = 8, lr: float = 3e-2) -> list[float]:
    """A few Adam steps on every trainable parameter; the losses, in order."""
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = adapted(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    return losses


def assert_one_graph_over_sizes(adapted: fxpeft.AdaptedModel, family: str) -> None:
    """Compiled whole-graph with dynamic shapes, equal to eager and compiled once over three batch/sequence sizes.

    aot_eager: dynamo's whole-graph capture and AOT autograd, without Inductor's codegen (minutes on this CPU);
    recompiles are decided by dynamo's guards, which are the same for every backend (Inductor: test_compile.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(adapted, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, seq in ((2, 9), (3, 13), (4, 6)):
        inputs = hf_inputs(family, batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, adapted(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


# -- parity with PEFT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])  # the tiny llama is grouped-query (4 q, 2 kv)
def test_prompt_tuning_matches_peft(family):
    n = 5
    inputs = labelled_inputs(family)
    rules = [PromptTuning(n)] + ([Trainable(targets=["classifier"])] if family == "bert" else [])
    adapted, reference = virtual_pair(family, rules, peft.PromptTuningConfig(task_type=TASKS[family],
                                                                             num_virtual_tokens=n), inputs)
    saved = peft.get_peft_model_state_dict(reference)
    # PEFT keeps n * num_transformer_submodules rows (2n for t5); the file keys match after the prefix mapping.
    assert set(PromptTuningCodec().state_to_file(adapted.adapter_state_dict())) == set(saved)
    adapted.adapters["default"].load_peft_state_dict(PromptTuningCodec().state_from_file(saved))
    ops = tagged(adapted, "prompt_tuning")
    # One cat per extended input (ids, mask, and labels of a causal LM), each placed by one gather; one where
    # picks the prompt rows into the embeddings.
    extended = 3 if TASKS[family] == "CAUSAL_LM" else 2
    assert ops[torch.ops.aten.cat.default] == extended and ops[torch.ops.aten.gather.default] == extended + 1
    assert ops[torch.ops.aten.where.self] == 3
    for training in (True, False):
        adapted.train(training), reference.train(training)
        assert_same_outputs(adapted, reference, inputs)
        assert_same_outputs(adapted, reference, labelled_inputs(family, batch=3, seq=13, seed=4))
    assert len(adapted.programs()) == 1
    adapted.train(), reference.train()
    adapted(**inputs).loss.backward()
    reference(**inputs).loss.backward()
    ours = next(adapted.site_modules()).weight.grad
    theirs = reference.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    counted = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert counted == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_left_padded_rows_match_unpadded_rows():
    adapted = fxpeft.transform(build_without_dropout("llama"), PromptTuning(4)).eval()
    with torch.no_grad():
        next(adapted.site_modules()).weight.normal_()
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(2, 128, (1, 5), generator=g), torch.randint(2, 128, (1, 8), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1),
                      torch.ones(1, 8, dtype=torch.long)])
    with torch.no_grad():
        batched = adapted(input_ids=ids, attention_mask=mask).logits
        alone_short = adapted(input_ids=short, attention_mask=torch.ones_like(short)).logits
        alone_long = adapted(input_ids=long, attention_mask=torch.ones_like(long)).logits
    torch.testing.assert_close(batched[1], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0, -5:], alone_short[0, -5:], atol=1e-5, rtol=1e-5)


# -- files ----------------------------------------------------------------------------------------------------------
def test_save_loads_in_peft_and_peft_save_loads_in_fxpeft(tmp_path):
    """Through the public API only: ``save_adapter`` writes PEFT's prompt-tuning files, which PEFT loads with
    fxpeft's outputs and ``fxpeft.load_adapter`` loads back to the same prompt; PEFT's own folder (prompt and
    trained classifier) loads with ``fxpeft.load_adapter`` to PEFT's outputs."""
    inputs = labelled_inputs("llama")
    adapted = fxpeft.transform(build_without_dropout("llama"), PromptTuning(6, init="vocab")).eval()
    adapted.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 6
    assert config["token_dim"] == 64 and config["num_layers"] == 2 and config["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(build_without_dropout("llama"), str(tmp_path / "ours")).eval()
    assert_same_outputs(adapted, loaded, inputs)
    again = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "ours").eval()
    assert again.adapters["default"].rules == adapted.adapters["default"].rules
    torch.testing.assert_close(next(again.site_modules()).weight, next(adapted.site_modules()).weight, rtol=0, atol=0)
    assert_same_outputs(again, loaded, inputs)

    reference = peft.get_peft_model(build_without_dropout("bert"), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.normal_()
        reference.base_model.classifier.modules_to_save["default"].weight.normal_()
    reference.save_pretrained(str(tmp_path / "theirs"))
    ours = fxpeft.load_adapter(build_without_dropout("bert"), tmp_path / "theirs").eval()
    assert [type(rule) for rule in ours.adapters["default"].rules] == [PromptTuning, Trainable]
    assert_same_outputs(ours, reference, labelled_inputs("bert"))


def test_init_from_vocab_and_text():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"[UNK]": 0, "classify": 7, "this": 9, "text": 11}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    table = build_without_dropout("gpt2").get_input_embeddings().weight
    rule = PromptTuning(5, init="text", init_text="classify this text", tokenizer=tokenizer)
    text = PromptEmbedding("transformer.wte", rule, 5, table, torch.float32)
    torch.testing.assert_close(text.weight, table[[7, 9, 11, 7, 9]], atol=0, rtol=0)
    vocab = PromptEmbedding("transformer.wte", PromptTuning(4, init="vocab"), 4, table, torch.float32)
    assert all(any(torch.equal(row, other) for other in table) for row in vocab.weight)
    assert Rule.from_dict(PromptTuning(5, init="vocab").to_dict()) == PromptTuning(5, init="vocab")


# -- composition and compile ------------------------------------------------------------------------------------
def test_lora_and_prompt_train_together():
    inputs = labelled_inputs("llama", batch=4, seq=8)
    adapted = fxpeft.transform(build_without_dropout("llama"),
                               [LoRA(targets=["q_proj", "v_proj"], r=4), PromptTuning(4)]).train()
    assert tagged(adapted, "lora") and tagged(adapted, "prompt_tuning")
    losses = train_steps(adapted, inputs)
    assert losses[-1] < losses[0] - 0.3
    trained = {type(site).__name__ for site in adapted.site_modules()}
    assert trained == {"LoraWeights", "PromptEmbedding"}
    prompt = next(site for site in adapted.site_modules() if type(site).__name__ == "PromptEmbedding")
    lora = next(site for site in adapted.site_modules() if type(site).__name__ == "LoraWeights")
    assert prompt.weight.grad.abs().sum() > 0 and lora.lora_B.grad.abs().sum() > 0


def test_compiles_whole_graph_without_recompiling_on_new_sizes():
    assert_one_graph_over_sizes(fxpeft.transform(build_without_dropout("llama"), PromptTuning(3)).eval(), "llama")


# -- errors -------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(RuleError, match="tokenizer"):
        PromptTuning(4, init="text", init_text="hello")
    with pytest.raises(RuleError, match="num_virtual_tokens"):
        PromptTuning(0)
    with pytest.raises(RuleError, match="position table"):  # gpt2's table here has 64 rows
        fxpeft.transform(build_without_dropout("gpt2"), PromptTuning(64))
    adapted = fxpeft.transform(build_without_dropout("gpt2"), PromptTuning(60))
    adapted(**hf_inputs("gpt2", seq=4))
    with pytest.raises(RuleError, match="at most 4 tokens"):
        adapted(**hf_inputs("gpt2", seq=9))
    with pytest.raises(NoMatchError, match="input_ids"):
        fxpeft.transform(mlp(), PromptTuning(2), example_inputs=(torch.randn(3, 16),))
