"""``adapted.generate``: transformers' own decoding loops over captured, rewritten graphs with a KV cache.

Every result is held against a real reference on identical weights: PEFT's ``generate`` for LoRA (unmerged,
merged, two adapters active, mixed batches with ``adapter_names``, on bitsandbytes int8 and nf4 bases), each row of a
mixed batch generated alone with its adapter, the base model's ``generate`` with adapters
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
from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.runtime.generation import Generation
from tests.passes.peft_reference import build_without_dropout, lora_twins, randomize_peft
from tests.streamers import CollectingStreamer

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
        # Weights large enough that the adapter changes the tokens of these tiny models.
        self.peft_model, self.adapted = lora_twins(family, FAMILIES[family], R, ALPHA)
        self.kwargs = {"max_new_tokens": NEW_TOKENS, "pad_token_id": 1}

    def merged_reference(self) -> torch.nn.Module:
        """A plain transformers model with the active LoRA update merged into its weights."""
        return copy.deepcopy(self.peft_model).merge_and_unload().eval()


@functools.lru_cache(maxsize=None)
def pair(family: str) -> Pair:
    return Pair(family)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


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


# -- mixed batches: one adapter per row (multi-LoRA serving) -----------------------------------------------------------
# Two LoRA adapters of different ranks and sites (the second on a subset of the first's), random non-zero A and B,
# loaded into one PeftModel and into fxpeft by PEFT's keys; "__base__" rows run the base model.
MIXED_TARGETS = {"llama": (FAMILIES["llama"], ["q_proj", "v_proj"]), "gpt2": (FAMILIES["gpt2"], ["c_attn", "c_fc"])}
NAMES = ["french", "german", "__base__", "french"]


class MixedPair:
    def __init__(self, family: str):
        wide, narrow = MIXED_TARGETS[family]
        configs = {"french": peft.LoraConfig(target_modules=wide, r=4, lora_alpha=8, lora_dropout=0.0),
                   "german": peft.LoraConfig(target_modules=narrow, r=2, lora_alpha=4, lora_dropout=0.0)}
        self.peft_model = peft.get_peft_model(build_without_dropout(family), configs["french"], adapter_name="french")
        self.peft_model.add_adapter("german", configs["german"])
        generator = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for name, parameter in sorted(self.peft_model.named_parameters()):
                if "lora_" in name:  # A and B of both adapters
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        self.peft_model.eval()
        self.adapted = fxpeft.transform(build_without_dropout(family), [fxpeft.LoRA(targets=wide, r=4, alpha=8)],
                                        adapter_name="french")
        self.adapted.add_adapter("german", fxpeft.LoRA(targets=narrow, r=2, alpha=4))
        for name in configs:
            state = peft.get_peft_model_state_dict(self.peft_model, adapter_name=name)
            self.adapted.adapters[name].load_peft_state_dict(state)
        self.adapted.eval()

    def alone(self, prompt: dict[str, torch.Tensor], row: int, name: str, **settings) -> torch.Tensor:
        """Row ``row`` of a left-padded prompt generated as a batch of its own, unpadded, with its adapter set (or
        the adapters disabled for "__base__"); only the new tokens."""
        keep = prompt["attention_mask"][row].bool()
        ids = prompt["input_ids"][row][keep][None]
        single = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if name == "__base__":
            with self.adapted.disable_adapters():
                out = self.adapted.generate(**single, **settings)
        else:
            self.adapted.set_adapter(name)
            try:
                out = self.adapted.generate(**single, **settings)
            finally:
                self.adapted.set_adapter("french")
        return out[:, ids.shape[1]:]


@functools.lru_cache(maxsize=None)
def mixed_pair(family: str) -> MixedPair:
    return MixedPair(family)


def _mixed_prompt(lengths: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Prompts of these lengths, left-padded with id 1 to the longest."""
    prompt = _prompt(len(lengths), max(lengths), seed)
    for row, length in enumerate(lengths):
        prompt["input_ids"][row, :max(lengths) - length] = 1
        prompt["attention_mask"][row, :max(lengths) - length] = 0
    return prompt


def _assert_rows_alone(m: MixedPair, prompt, names, ours, **settings) -> None:
    """Each prompt's ``k`` returned rows (beams, num_return_sequences) equal that prompt generated alone."""
    k = ours.shape[0] // len(names)
    width = prompt["input_ids"].shape[1]
    for row, name in enumerate(names):
        expected = m.alone(prompt, row, name, **settings)
        got = ours[row * k:(row + 1) * k, width:]
        # A row alone may stop earlier (eos): the batch pads it after that with pad_token_id.
        assert torch.equal(got[:, :expected.shape[1]], expected), f"row {row} ({name})"
        assert (got[:, expected.shape[1]:] == 1).all(), f"row {row} ({name}) goes on after its end"


@pytest.mark.parametrize("family", MIXED_TARGETS)
def test_mixed_batch_rows_equal_each_row_alone_and_peft(family):
    m = mixed_pair(family)
    prompt = _mixed_prompt((8, 5, 3, 7), seed=22)
    settings = {"max_new_tokens": NEW_TOKENS, "pad_token_id": 1}
    ours = m.adapted.generate(**prompt, **settings, adapter_names=NAMES)
    assert ours.shape == (4, 8 + NEW_TOKENS)
    _assert_rows_alone(m, prompt, NAMES, ours, **settings)
    assert torch.equal(ours, m.peft_model.generate(**prompt, **settings, adapter_names=NAMES))
    # Each row really ran its own adapter: the same prompts with one name for every row give other tokens there.
    every = {name: m.adapted.generate(**prompt, **settings, adapter_names=[name] * 4) for name in set(NAMES)}
    for row, name in enumerate(NAMES):
        assert torch.equal(ours[row], every[name][row])
        assert all(not torch.equal(ours[row], every[other][row]) for other in every if other != name), row


def test_mixed_batch_beams_and_return_sequences_follow_each_prompt():
    """transformers repeats each prompt for beams and num_return_sequences; each copy keeps its prompt's adapter."""
    m = mixed_pair("llama")
    prompt = _mixed_prompt((6, 4, 7, 3), seed=23)
    for extra in (dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)):
        settings = {"max_new_tokens": NEW_TOKENS, "pad_token_id": 1, **extra}
        ours = m.adapted.generate(**prompt, **settings, adapter_names=NAMES)
        assert ours.shape[0] == 4 * extra.get("num_return_sequences", 1)
        _assert_rows_alone(m, prompt, NAMES, ours, **settings)
        # PEFT repeats its adapter_names for num_beams, which covers num_return_sequences <= num_beams.
        assert torch.equal(ours, m.peft_model.generate(**prompt, **settings, adapter_names=NAMES))
    # Sampling with num_return_sequences (top_k=1: deterministic, so comparable with a row alone). PEFT's generate
    # refuses this case (it repeats adapter_names only for num_beams: "Length of `adapter_names` should be the same
    # as the number of inputs, but got 4 and 8").
    settings = {"max_new_tokens": NEW_TOKENS, "pad_token_id": 1, "do_sample": True, "top_k": 1,
                "num_return_sequences": 2}
    _assert_rows_alone(m, prompt, NAMES, m.adapted.generate(**prompt, **settings, adapter_names=NAMES), **settings)


def test_mixed_decode_graph_is_captured_once():
    """Mixed batches run the gathered per-row form of the same prefill and decode programs: another pattern of names
    (as strings or as adapter_indices' tensor), batch size and prompt lengths capture and derive nothing new."""
    m = mixed_pair("llama")
    settings = {"max_new_tokens": 6, "pad_token_id": 1}
    m.adapted.generate(**_mixed_prompt((5, 2), seed=24), **settings)  # a plain call with the same arguments
    programs = m.adapted.programs()
    # Prefill and decode with a mask (rows alone in other tests, unpadded, may have run without one).
    cached = [program for program in _cache_programs(m.adapted) if "attention_mask" in program.kwarg_names]
    assert len(cached) == 2

    def mixed_modules():
        return [program.module_for(False, torch.device("cpu"), mixed_batch=True) for program in cached]

    m.adapted.generate(**_mixed_prompt((6, 3, 9, 4), seed=25), **settings, adapter_names=NAMES)
    modules = mixed_modules()
    for module in modules:  # one gathered product per shared site (A then B), in prefill and decode alike
        assert any(node.target is torch.ops.aten.bmm.default for node in module.graph.nodes)
    pattern = ["german", "__base__", "german"]
    m.adapted.generate(**_mixed_prompt((2, 11, 7), seed=26), **settings, adapter_names=pattern)
    indices = m.adapted.adapter_indices(["__base__", "french"])
    m.adapted.generate(**_mixed_prompt((3, 1), seed=27), **settings, adapter_names=indices)
    assert m.adapted.programs() == programs
    assert all(now is before for now, before in zip(mixed_modules(), modules))


def test_mixed_batch_errors_come_before_any_token():
    m = mixed_pair("llama")
    adapted = m.adapted
    prompt = _mixed_prompt((4, 3, 4, 2), seed=28)
    programs = adapted.programs()
    streamer = CollectingStreamer()
    cases = [(["french", "nope", "__base__", "french"], "unknown adapters"),
             (["french", "german", "__base__"], "3 entries for a batch of 4"),
             (["french", "german"], "2 entries for a batch of 4"),  # a divisor of the batch, still wrong
             ("french", "one adapter name"),
             (adapted.adapter_indices(["french"] * 3), "3 entries for a batch of 4")]
    for names, message in cases:
        with pytest.raises(FxpeftError, match=message):
            adapted.generate(**prompt, max_new_tokens=2, pad_token_id=1, adapter_names=names, streamer=streamer)
    adapted.merge(["french"])
    try:
        with pytest.raises(FxpeftError, match="unmerge"):
            adapted.generate(**prompt, max_new_tokens=2, pad_token_id=1, adapter_names=NAMES, streamer=streamer)
    finally:
        adapted.unmerge()
    assert not streamer.chunks and adapted.programs() == programs
    # A model call whose batch is not a multiple of the names' (a batch grown other than by repeating each prompt).
    generation = Generation(adapted, adapted.base_model, adapter_indices=adapted.adapter_indices(["french", "german"]))
    with pytest.raises(FxpeftError, match="batch of 3 rows, which is not a multiple of the 2 adapter names"):
        generation(**_prompt(3, 4, seed=29))
    # Virtual tokens are part of the graph: no row can go without them.
    virtual = fxpeft.transform(build_without_dropout("llama"), fxpeft.PromptTuning(4)).eval()
    with pytest.raises(UnsupportedError, match="virtual-token adapters"):
        virtual.generate(**_prompt(2, 4, seed=30), max_new_tokens=2, adapter_names=["default", "__base__"])
