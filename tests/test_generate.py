"""``adapted.generate``: transformers' own decoding loops over captured, rewritten graphs with a KV cache.

Every result is held against a real reference on identical weights: PEFT's ``generate`` for LoRA (unmerged,
merged, two adapters active, on bitsandbytes int8 and nf4 bases), the base model's ``generate`` with adapters
disabled, and transformers' sampling
and beam search on the model with the LoRA update merged into its weights (PEFT's ``merge_and_unload`` of a
copy). Models are the tiny families of tests/models.py without dropout; weights are PEFT's seeded random LoRA
tensors copied into fxpeft by PEFT's own keys (tests/passes/peft_reference.py).
"""

from __future__ import annotations

import copy
import functools
import logging

import peft
import pytest
import torch
import transformers as tf
from transformers import BitsAndBytesConfig, DynamicCache
from transformers.generation.streamers import BaseStreamer

import fxpeft
from fxpeft.errors import UnsupportedError
from tests.passes.peft_reference import build_without_dropout, randomize_peft

NEW_TOKENS = 32
R, ALPHA = 4, 8
# One decoder per attention form: llama (RoPE, GQA), gpt2 (Conv1D, learned positions), opt (all-linear targets,
# learned positions with an offset, pad id 1).
FAMILIES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"], "opt": "all-linear"}


def _prompt(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _left_padded(seed: int) -> dict[str, torch.Tensor]:
    """Three prompts of lengths 8, 5 and 3, left-padded with id 1 (OPT's pad id; any id works with the mask)."""
    prompt = _prompt(3, 8, seed)
    for row, pad in enumerate((0, 3, 5)):
        prompt["input_ids"][row, :pad] = 1
        prompt["attention_mask"][row, :pad] = 0
    return prompt


class Pair:
    """One family twice from one seed: PEFT-wrapped and fxpeft-adapted, with PEFT's random LoRA weights in both."""

    def __init__(self, family: str):
        targets = FAMILIES[family]
        self.peft_model = peft.get_peft_model(
            build_without_dropout(family), peft.LoraConfig(target_modules=targets, r=R, lora_alpha=ALPHA,
                                                           lora_dropout=0.0)).eval()
        # Large enough that the adapter changes the tokens of these tiny models.
        state = randomize_peft(self.peft_model, seed=5, scale=0.3)
        self.adapted = fxpeft.transform(build_without_dropout(family), [fxpeft.LoRA(targets=targets, r=R, alpha=ALPHA)])
        self.adapted.adapters["default"].load_peft_state_dict(state)
        self.adapted.eval()
        self.kwargs = {"max_new_tokens": NEW_TOKENS, "pad_token_id": 1}

    def merged_reference(self) -> torch.nn.Module:
        """A plain transformers model with the active LoRA update merged into its weights."""
        return copy.deepcopy(self.peft_model).merge_and_unload().eval()


@functools.lru_cache(maxsize=None)
def pair(family: str) -> Pair:
    return Pair(family)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a machine whose cores are busy each decode step's
    thread hand-offs cost more than its work (this file ran 7x slower with 2 threads beside another job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_nodes(program, training: bool = False) -> int:
    module = program.module_for(training, program.device)
    return sum(1 for node in module.graph.nodes if (node.meta.get("fxpeft") or {}).get("method") == "lora")


def _cache_programs(adapted) -> list:
    return [program for program in adapted.programs() if "cache" in program.kwarg_names]


# -- LoRA parity with PEFT, per family ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_lora_equals_peft(family):
    p = pair(family)
    prompt = _prompt(2, 7, seed=1)
    ours = p.adapted.generate(**prompt, **p.kwargs)
    theirs = p.peft_model.generate(**prompt, **p.kwargs)
    assert ours.shape == (2, 7 + NEW_TOKENS)
    assert torch.equal(ours, theirs)
    with p.peft_model.disable_adapter():
        base_tokens = p.peft_model.generate(**prompt, **p.kwargs)
    assert not torch.equal(ours, base_tokens), "the adapter did not change the tokens: the test would prove nothing"
    # Prefill (empty cache) and decode (filled cache) are captured graphs, rewritten with the adapter in them.
    cached = _cache_programs(p.adapted)
    assert len(cached) == 2 and all(_lora_nodes(program) > 0 for program in cached)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_peft(family):
    p = pair(family)
    prompt = _left_padded(seed=2)
    assert torch.equal(p.adapted.generate(**prompt, **p.kwargs), p.peft_model.generate(**prompt, **p.kwargs))


def test_merged_equals_peft():
    p = pair("llama")
    prompt = _prompt(2, 6, seed=3)
    expected = p.peft_model.generate(**prompt, **p.kwargs)
    p.adapted.merge()
    try:
        assert torch.equal(p.adapted.generate(**prompt, **p.kwargs), expected)
    finally:
        p.adapted.unmerge()
    assert torch.equal(p.adapted.generate(**prompt, **p.kwargs), expected)


def test_disabled_equals_base_generate():
    p = pair("llama")
    prompt = _left_padded(seed=4)
    base = build_without_dropout("llama")
    with p.adapted.disable_adapters():
        ours = p.adapted.generate(**prompt, **p.kwargs)
    assert torch.equal(ours, base.generate(**prompt, **p.kwargs))


def test_two_active_adapters_equal_peft():
    p = pair("gpt2")
    config = peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=4, lora_dropout=0.0)
    theirs = copy.deepcopy(p.peft_model)
    theirs.add_adapter("other", config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in sorted(theirs.named_parameters()):
            if ".other." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    theirs.base_model.set_adapter(["default", "other"])
    adapted = p.adapted
    adapted.add_adapter("other", fxpeft.LoRA(targets=["c_attn", "c_fc"], r=2, alpha=4))
    try:
        adapted.adapters["other"].load_peft_state_dict(peft.get_peft_model_state_dict(theirs, adapter_name="other"))
        adapted.set_adapter(["default", "other"])
        prompt = _prompt(2, 5, seed=5)
        both = adapted.generate(**prompt, **p.kwargs)
        assert torch.equal(both, theirs.generate(**prompt, **p.kwargs))
        adapted.set_adapter("default")
        assert not torch.equal(both, adapted.generate(**prompt, **p.kwargs))
    finally:
        adapted.set_adapter("default")
        adapted.delete_adapter("other")


@pytest.fixture(scope="module")
def saved_opt(tmp_path_factory):
    """The tiny OPT without dropout, one layer, saved in full precision to be loaded quantized."""
    model = build_without_dropout("opt")
    model.model.decoder.layers = model.model.decoder.layers[:1]
    model.config.num_hidden_layers = 1
    directory = tmp_path_factory.mktemp("opt")
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("quantization", [dict(load_in_8bit=True),
                                          dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)], ids=["int8", "nf4"])
def test_quantized_base_with_lora_equals_peft(saved_opt, quantization):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every int8 call

    def load():
        return tf.AutoModelForCausalLM.from_pretrained(saved_opt, dtype=torch.float32,
                                                       quantization_config=BitsAndBytesConfig(**quantization)).eval()

    targets = ["q_proj", "v_proj", "fc1"]
    theirs = peft.get_peft_model(load(), peft.LoraConfig(target_modules=targets, r=R, lora_alpha=ALPHA,
                                                         lora_dropout=0.0)).eval()
    state = randomize_peft(theirs, seed=5, scale=0.3)
    adapted = fxpeft.transform(load(), [fxpeft.LoRA(targets=targets, r=R, alpha=ALPHA)])
    adapted.adapters["default"].load_peft_state_dict(state)
    adapted.eval()
    prompt = _left_padded(seed=19)
    ours = adapted.generate(**prompt, max_new_tokens=NEW_TOKENS, pad_token_id=1)
    assert torch.equal(ours, theirs.generate(**prompt, max_new_tokens=NEW_TOKENS, pad_token_id=1))
    with theirs.disable_adapter():
        assert not torch.equal(ours, theirs.generate(**prompt, max_new_tokens=NEW_TOKENS, pad_token_id=1))


# -- transformers' strategies, against transformers on the merged model -------------------------------------------
def test_sampling_with_a_seed_equals_transformers_on_the_merged_model():
    p = pair("llama")
    prompt = _prompt(2, 5, seed=6)
    sampling = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, **p.kwargs)
    torch.manual_seed(123)
    expected = p.merged_reference().generate(**prompt, **sampling)
    torch.manual_seed(123)
    ours = p.adapted.generate(**prompt, **sampling)
    assert torch.equal(ours, expected)
    torch.manual_seed(124)
    assert not torch.equal(p.adapted.generate(**prompt, **sampling), ours), "the seed did not matter"


def test_beam_search_equals_transformers_on_the_merged_model():
    p = pair("llama")
    prompt = _prompt(2, 5, seed=7)
    beams = dict(num_beams=4, num_return_sequences=2, return_dict_in_generate=True, output_scores=True,
                 max_new_tokens=16, pad_token_id=1)
    expected = p.merged_reference().generate(**prompt, **beams)
    ours = p.adapted.generate(**prompt, **beams)
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(ours.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-5)


def test_return_dict_scores_streamer_and_eos_are_transformers():
    p = pair("opt")
    prompt = _prompt(1, 6, seed=8)
    reference = p.peft_model.generate(**prompt, **p.kwargs)
    eos = int(reference[0, 6 + 5])  # a token generated at step 6: generation must stop there

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    settings = dict(return_dict_in_generate=True, output_scores=True, eos_token_id=eos, **p.kwargs)
    ours = p.adapted.generate(**prompt, streamer=streamer, **settings)
    theirs = p.peft_model.generate(**prompt, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    stop = ours.sequences[0].tolist().index(eos, 6)
    assert ours.sequences.shape[1] == stop + 1 <= 6 + 6
    assert len(ours.scores) == len(theirs.scores) == stop + 1 - 6
    for mine, peft_scores in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(mine, peft_scores, rtol=1e-4, atol=1e-5)
    assert streamer.ended and sum(streamer.chunks, []) == ours.sequences[0].tolist()
    assert isinstance(ours.cache, DynamicCache) and ours.cache.get_seq_length() == ours.sequences.shape[1] - 1


# -- graphs: captured once, shared with training ----------------------------------------------------------------------
def test_decode_graph_is_captured_once():
    p = pair("llama")
    p.adapted.generate(**_prompt(2, 7, seed=1), **p.kwargs)
    programs = p.adapted.programs()
    # Another prompt length and batch size, a batch of one, a prompt of one token: no new graph.
    p.adapted.generate(**_prompt(3, 4, seed=10), **p.kwargs)
    p.adapted.generate(**_prompt(1, 9, seed=11), max_new_tokens=5, pad_token_id=1)
    p.adapted.generate(**_prompt(2, 1, seed=12), max_new_tokens=5, pad_token_id=1)
    assert p.adapted.programs() == programs


def test_a_cache_call_updates_the_cache_passed_in():
    """Called directly with a cache, the adapted model leaves it as the eager model's forward would: filled."""
    p = pair("llama")
    ids = _prompt(2, 6, seed=13)["input_ids"]
    ours, theirs = DynamicCache(config=p.adapted.base_model.config), DynamicCache(config=p.peft_model.config)
    with torch.no_grad():
        for chunk in (ids[:, :4], ids[:, 4:5], ids[:, 5:]):  # a prefill, then two decode steps
            got = p.adapted(input_ids=chunk, cache=ours, use_cache=True)
            want = p.peft_model(input_ids=chunk, cache=theirs, use_cache=True)
            assert got.cache is ours and ours.get_seq_length() == theirs.get_seq_length()
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_continuing_from_a_returned_cache_equals_peft():
    """generate() again with the cache it returned: the new tokens (a query of 4 over a filled cache) and the
    decode steps after them run the decode graph, with no new capture."""
    p = pair("llama")
    prompt, extra = _prompt(2, 6, seed=17)["input_ids"], _prompt(2, 3, seed=18)["input_ids"]
    p.adapted.generate(input_ids=prompt, max_new_tokens=2, pad_token_id=1)
    programs = p.adapted.programs()
    results = []
    for model in (p.adapted, p.peft_model):
        first = model.generate(input_ids=prompt, max_new_tokens=5, pad_token_id=1, return_dict_in_generate=True)
        more = torch.cat([first.sequences, extra], dim=1)
        results.append(model.generate(input_ids=more, cache=first.cache, max_new_tokens=6, pad_token_id=1))
    assert torch.equal(*results)
    assert p.adapted.programs() == programs


def test_train_then_generate_then_train():
    family = "gpt2"
    adapted = fxpeft.transform(build_without_dropout(family), [fxpeft.LoRA(targets=FAMILIES[family], r=R, alpha=ALPHA)])
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    batch = _prompt(2, 9, seed=14)

    def step() -> float:
        adapted.train()
        loss = adapted(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    first = [step() for _ in range(3)]
    adapted.eval()
    prompt = _prompt(1, 4, seed=15)
    before = adapted.generate(**prompt, max_new_tokens=8, pad_token_id=1)
    programs = adapted.programs()
    later = [step() for _ in range(3)]
    assert later[-1] < first[0]
    adapted.eval()
    after = adapted.generate(**prompt, max_new_tokens=8, pad_token_id=1)
    assert adapted.programs() == programs, "training or generating again captured a graph again"
    # The graphs read the trained tensors: the same tokens as PEFT with fxpeft's weights.
    theirs = peft.get_peft_model(build_without_dropout(family),
                                 peft.LoraConfig(target_modules=FAMILIES[family], r=R, lora_alpha=ALPHA))
    peft.set_peft_model_state_dict(theirs, adapted.adapter_state_dict())
    assert torch.equal(after, theirs.eval().generate(**prompt, max_new_tokens=8, pad_token_id=1))
    assert before.shape == after.shape


# -- what is not supported yet says so ---------------------------------------------------------------------------------
def test_what_generate_does_not_support_yet_is_refused_clearly():
    p = pair("llama")
    programs = p.adapted.programs()
    with pytest.raises(UnsupportedError, match="adapter_names"):
        p.adapted.generate(**_prompt(2, 4, seed=16), max_new_tokens=2, adapter_names=["default", "__base__"])
    # A static cache does not flatten into its tensors: export would bake one call's cache into the graph.
    with pytest.raises(UnsupportedError, match="StaticCache"):
        p.adapted.generate(**_prompt(1, 4, seed=16), max_new_tokens=2, cache_implementation="static")
    assert p.adapted.programs() == programs
