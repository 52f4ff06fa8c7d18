"""``adapted.generate`` on encoder-decoder models (t5, bart): the encoder once per call, the decoder steps with the
``EncoderDecoderCache`` and ``encoder_outputs=`` as graph inputs.

References on identical weights: PEFT's ``generate`` with LoRA on encoder and decoder attention (PEFT's seeded random
LoRA tensors, copied into fxpeft by PEFT's own keys), and the base model's ``generate`` with adapters disabled.
``min_new_tokens`` keeps the tiny random models from stopping at their first token (eos), so every comparison
covers all the new tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

import fxpeft
from fxpeft.graph.program import Program
from tests.passes.peft_reference import lora_twins

NEW_TOKENS = 24
R, ALPHA = 4, 8
FAMILIES = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}


class Pair:
    """One family twice from one seed: PEFT-wrapped and fxpeft-adapted, with PEFT's random LoRA weights in both."""

    def __init__(self, family: str):
        self.peft_model, self.adapted = lora_twins(family, FAMILIES[family], R, ALPHA)
        self.kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}


@functools.lru_cache(maxsize=None)
def pair(family: str) -> Pair:
    return Pair(family)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def _prompt(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class RunCounter:
    """Counts the runs of captured programs: the encoder pass is the one without a KV cache argument."""

    def __init__(self, monkeypatch):
        self.runs: list[tuple[str, ...]] = []
        original = Program.run

        def run(program, *args, **kwargs):
            self.runs.append(program.kwarg_names)
            return original(program, *args, **kwargs)

        monkeypatch.setattr(Program, "run", run)

    def encoder_runs(self) -> int:
        return sum(1 for names in self.runs if "cache" not in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_lora_equals_peft_encoder_once(family, monkeypatch):
    p = pair(family)
    prompt = _prompt(2, 7, seed=1)
    counter = RunCounter(monkeypatch)
    ours = p.adapted.generate(**prompt, **p.kwargs)
    assert counter.encoder_runs() == 1, "the encoder ran more (or less) than once in one generate call"
    assert len(counter.runs) == 1 + NEW_TOKENS  # the encoder pass, then one graph per decoder step
    theirs = p.peft_model.generate(**prompt, **p.kwargs)
    assert ours.shape == theirs.shape and ours.shape[1] >= NEW_TOKENS
    assert torch.equal(ours, theirs)
    with p.peft_model.disable_adapter():
        base_tokens = p.peft_model.generate(**prompt, **p.kwargs)
    assert not torch.equal(ours, base_tokens), "the adapter did not change the tokens: the test would prove nothing"
    # The decoder's steps are captured graphs with the adapters in them (first step and later steps).
    cached = [program for program in p.adapted.programs() if "cache" in program.kwarg_names]
    assert len(cached) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_equals_base(family):
    p = pair(family)
    prompt = _prompt(2, 6, seed=3)
    with p.adapted.disable_adapters():
        ours = p.adapted.generate(**prompt, **p.kwargs)
    base = p.peft_model.get_base_model()
    with p.peft_model.disable_adapter():
        theirs = base.generate(**prompt, **p.kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_new_lengths_and_batch_capture_nothing(family, monkeypatch):
    p = pair(family)
    p.adapted.generate(**_prompt(2, 7, seed=4), **p.kwargs)
    before = len(p.adapted.programs())
    counter = RunCounter(monkeypatch)
    prompt = _prompt(3, 11, seed=5)
    ours = p.adapted.generate(**prompt, **p.kwargs)
    assert len(p.adapted.programs()) == before
    assert counter.encoder_runs() == 1
    assert torch.equal(ours, p.peft_model.generate(**prompt, **p.kwargs))
    single = _prompt(1, 3, seed=6)
    assert torch.equal(p.adapted.generate(**single, **p.kwargs), p.peft_model.generate(**single, **p.kwargs))
    assert len(p.adapted.programs()) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_peft(family):
    p = pair(family)
    prompt = _prompt(3, 8, seed=7)
    pad = p.adapted.base_model.config.pad_token_id
    for row, width in enumerate((0, 3, 5)):
        prompt["input_ids"][row, :width] = pad
        prompt["attention_mask"][row, :width] = 0
    ours = p.adapted.generate(**prompt, **p.kwargs)
    assert torch.equal(ours, p.peft_model.generate(**prompt, **p.kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_encoder_outputs(family):
    """The model's call with ``encoder_outputs=`` (what a user's own decoding loop passes) is a signature like any
    other: captured once, with the adapters of the decoder; the encoder's output comes from the adapted encoder."""
    p = pair(family)
    prompt = _prompt(2, 9, seed=8)
    decoder_ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        encoder_outputs = p.peft_model.get_encoder()(**prompt)
        theirs = p.peft_model(**prompt, decoder_input_ids=decoder_ids).logits
        ours = p.adapted(attention_mask=prompt["attention_mask"], decoder_input_ids=decoder_ids,
                         encoder_outputs=encoder_outputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_composite_encoder_decoder_transforms_without_example_inputs():
    """``EncoderDecoderModel`` keeps its vocabulary sizes in its encoder and decoder configs: fxpeft builds its
    example inputs from them, and the adapted model with a fresh adapter is the base model."""
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = tf.EncoderDecoderConfig.from_encoder_decoder_configs(
        tf.BertConfig(**small), tf.BertConfig(**small, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = tf.EncoderDecoderModel(config=config).eval()
    ids = torch.randint(2, 64, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["query", "value"], r=2)).eval()
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids, decoder_input_ids=ids[:, :3]).logits, want)
