"""``adapted.generate`` with virtual-token adapters: prompt tuning, P-tuning and prefix tuning, alone and with LoRA.

Under generate the virtual tokens live in the KV cache (fxpeft/runtime/virtual_tokens.py): the prefill puts them in
front, each decode step reads them from the cache, and real tokens take positions after them.

**The reference is a greedy loop through PEFT's ``forward`` without a cache, not PEFT's ``generate``.** Measured with
PEFT 0.21.2 on transformers 5.24 (../shared/FACTS-WAVE2.md): PEFT's ``generate`` disagrees with its own forward
loop for all three methods, and for prefix tuning it returns exactly the base model's tokens (it passes the prefix
as ``past_key_values`` next to the ``cache`` that generate makes, and the model keeps the empty cache: the prefix
is silently dropped). PEFT's ``forward`` applies the virtual tokens as the papers define them, and that is what
fxpeft's uncached graphs are held to in tests/passes/. So each step here compares fxpeft's generated token and its
raw logits (``output_logits``) with the token and the last position's logits of PEFT's forward on the whole
sequence so far, on identical weights (PEFT's seeded random adapter, saved by PEFT and loaded by
``fxpeft.load_adapter``).
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import GenerationError, UnsupportedError
from tests.passes.peft_reference import build_without_dropout, randomize_peft
from tests.streamers import CollectingStreamer

NEW_TOKENS = 32
N_VIRTUAL = 4
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM",
         "bart": "SEQ_2_SEQ_LM"}
CONFIGS = {
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL),
    "ptuning": lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N_VIRTUAL,
                                                     encoder_hidden_size=16),
    "prefix": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def _prompt(batch: int = 2, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _peft_model(family: str, method: str, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """PEFT's model for ``method`` with seeded random virtual tokens, large enough to change these tiny models."""
    model = peft.get_peft_model(base or build_without_dropout(family), CONFIGS[method](TASKS[family])).eval()
    randomize_peft(model, scale=1.0)
    return model


def _suppressed(logits: torch.Tensor, config, step: int) -> torch.Tensor:
    """What ``min_new_tokens=NEW_TOKENS`` and bart's ``forced_eos_token_id`` do to a step's logits in generate."""
    logits = logits.clone()
    if config.eos_token_id is not None:
        logits[:, config.eos_token_id] = -float("inf")
    if getattr(config, "forced_eos_token_id", None) is not None and step == NEW_TOKENS - 1:
        forced = torch.full_like(logits, -float("inf"))
        forced[:, config.forced_eos_token_id] = 0
        logits = forced
    return logits


@torch.no_grad()
def reference_loop(model: torch.nn.Module, prompt: dict[str, torch.Tensor], config) -> tuple[torch.Tensor, list]:
    """Greedy decoding by calling ``model`` (PEFT's forward, or a base model) on the whole sequence at every step:
    the new tokens and each step's raw last-position logits."""
    encoder_decoder = TASKS.get(config.model_type) == "SEQ_2_SEQ_LM"
    sequence = torch.full((prompt["input_ids"].shape[0], 1), config.decoder_start_token_id) if encoder_decoder \
        else prompt["input_ids"]
    raw = []
    for step in range(NEW_TOKENS):
        if encoder_decoder:
            logits = model(**prompt, decoder_input_ids=sequence).logits[:, -1]
        else:
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
        raw.append(logits)
        sequence = torch.cat([sequence, _suppressed(logits, config, step).argmax(-1, keepdim=True)], 1)
    return sequence[:, -NEW_TOKENS:], raw


def fxpeft_generate(adapted: fxpeft.AdaptedModel, prompt: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    out = adapted.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=1, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -NEW_TOKENS:], list(out.logits)


def assert_same_generation(ours: tuple[torch.Tensor, list], theirs: tuple[torch.Tensor, list]) -> None:
    tokens, logits = ours
    want_tokens, want_logits = theirs
    assert torch.equal(tokens, want_tokens), f"tokens differ:\n{tokens}\n{want_tokens}"
    torch.testing.assert_close(torch.stack(logits), torch.stack(want_logits), atol=1e-4, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def twins(family: str, method: str, folder) -> tuple[torch.nn.Module, fxpeft.AdaptedModel]:
    """PEFT's model and fxpeft's, loaded from the folder PEFT saved."""
    reference = _peft_model(family, method)
    reference.save_pretrained(folder)
    adapted = fxpeft.load_adapter(build_without_dropout(family), folder).eval()
    return reference, adapted


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return lambda family, method: tmp_path_factory.getbasetemp() / f"{family}-{method}"


# llama: RoPE positions and grouped-query attention (the RoPE shift prefix tuning needs); gpt2: learned positions
# from position ids; opt: learned positions derived from the attention mask; t5: relative positions, prompt tokens
# in the encoder and the prefix in the decoder's self-attention; bart: learned positions with an offset.
# P-tuning differs from prompt tuning only in where the rows come from (its encoder), so it runs on one decoder and
# one encoder-decoder.
CASES = [(family, method) for family in ("llama", "gpt2", "opt", "t5", "bart") for method in ("prompt", "prefix")]
CASES += [("llama", "ptuning"), ("t5", "ptuning")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_greedy_tokens_and_logits_equal_a_loop_through_peft_forward(family, method, folders):
    reference, adapted = twins(family, method, folders(family, method))
    prompt = _prompt()
    theirs = reference_loop(reference, prompt, reference.base_model.config)
    assert_same_generation(fxpeft_generate(adapted, prompt), theirs)
    # the adapter matters: the base model's own loop gives other logits
    _, base_logits = reference_loop(build_without_dropout(family), prompt, reference.base_model.config)
    assert not torch.allclose(torch.stack(theirs[1]), torch.stack(base_logits), atol=1e-3)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prefix_with_lora_equals_peft_forward_over_the_lora_merged_base(method):
    """One adapter with a virtual-token rule and LoRA: LoRA applies to the virtual tokens' keys and values and to
    every step. PEFT cannot hold both in one model, so the reference is PEFT's virtual-token model over a base with
    PEFT's LoRA merged into its weights."""
    family = "llama"
    lora = peft.get_peft_model(build_without_dropout(family), peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.0)).eval()
    lora_state = randomize_peft(lora, seed=7, scale=0.3)
    reference = _peft_model(family, method, base=copy.deepcopy(lora).merge_and_unload())
    virtual_rule = fxpeft.PrefixTuning(N_VIRTUAL) if method == "prefix" else fxpeft.PromptTuning(N_VIRTUAL)
    adapted = fxpeft.transform(build_without_dropout(family),
                               [virtual_rule, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)]).eval()
    adapted.adapters["default"].load_peft_state_dict({**lora_state, **peft.get_peft_model_state_dict(reference)})
    prompt = _prompt(seed=3)
    assert_same_generation(fxpeft_generate(adapted, prompt), reference_loop(reference, prompt,
                                                                            reference.base_model.config))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_rows_equal_each_row_alone(method, folders):
    """Left padding: the virtual tokens come before the padding in the cache, hidden by nothing but the mask; each
    row generates what it generates alone without padding."""
    _, adapted = twins("llama", method, folders("llama", method))
    prompt = _prompt(batch=3, length=8, seed=4)
    for row, pad in enumerate((0, 3, 5)):
        prompt["input_ids"][row, :pad] = 1
        prompt["attention_mask"][row, :pad] = 0
    batch_tokens, _ = fxpeft_generate(adapted, prompt)
    for row, pad in enumerate((0, 3, 5)):
        alone = {name: value[row:row + 1, pad:] for name, value in prompt.items()}
        tokens, _ = fxpeft_generate(adapted, alone)
        assert torch.equal(tokens[0], batch_tokens[row]), f"row {row}"


def test_a_prefix_that_overruns_the_position_table_fails_before_any_token(folders):
    """gpt2 has a learned position table: virtual tokens + prompt + new tokens beyond it is a GenerationError
    before any token is produced (a streamer sees nothing)."""
    _, adapted = twins("gpt2", "prefix", folders("gpt2", "prefix"))
    limit = adapted.base_model.config.n_positions
    prompt = _prompt(batch=1, length=6)
    streamer = CollectingStreamer()
    with pytest.raises(GenerationError, match="position table"):
        adapted.generate(**prompt, max_new_tokens=limit - 6 - N_VIRTUAL + 1, streamer=streamer, pad_token_id=1)
    assert not streamer.chunks
    out = adapted.generate(**prompt, max_new_tokens=limit - 6 - N_VIRTUAL, pad_token_id=1)  # exactly fits
    assert out.shape[1] == limit - N_VIRTUAL


def test_a_cached_call_of_an_encoder_decoder_prompt_needs_the_encoder_output(folders):
    """T5 with prompt tuning keeps its virtual tokens in the encoder's input: a cached call that would run the encoder
    itself (no encoder_outputs) cannot add them, and says so."""
    from transformers import DynamicCache, EncoderDecoderCache

    _, adapted = twins("t5", "prompt", folders("t5", "prompt"))
    prompt = _prompt()
    with pytest.raises(UnsupportedError, match="encoder_outputs"):
        adapted(**prompt, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long),
                cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)


def test_train_generate_train_without_transforming_again():
    """The cached graphs read the same virtual-token parameters as the training graph: after training steps,
    generate equals a greedy loop through fxpeft's own uncached forward, and training goes on afterwards."""
    family = "gpt2"
    base = build_without_dropout(family)
    adapted = fxpeft.transform(base, [fxpeft.PrefixTuning(N_VIRTUAL)])
    batch = _prompt(batch=4, length=10, seed=8)
    batch["labels"] = batch["input_ids"]
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=0.05)

    def train(steps: int) -> list[float]:
        adapted.train()
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = adapted(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    first = train(5)
    assert first[-1] < first[0]
    adapted.eval()
    prompt = _prompt(seed=9)
    assert_same_generation(fxpeft_generate(adapted, prompt), reference_loop(adapted, prompt, base.config))
    second = train(5)
    assert second[-1] < first[-1]
    adapted.eval()
    assert_same_generation(fxpeft_generate(adapted, prompt), reference_loop(adapted, prompt, base.config))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_static_cache_holds_the_virtual_tokens_too(method, folders):
    """With ``cache_implementation="static"`` the cache is sized for the virtual tokens as well: the same tokens and
    logits as the dynamic cache."""
    _, adapted = twins("llama", method, folders("llama", method))
    prompt = _prompt(seed=10)
    dynamic = fxpeft_generate(adapted, prompt)
    out = adapted.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=1, output_logits=True, return_dict_in_generate=True,
                           cache_implementation="static")
    assert_same_generation((out.sequences[:, -NEW_TOKENS:], list(out.logits)), dynamic)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_disabled_virtual_tokens_generate_as_peft_disable_adapter(method, folders):
    """Inside ``disable_adapters()`` (PEFT's ``disable_adapter()``) a virtual-token adapter is out of every call and of
    ``generate``: the tokens and logits equal PEFT's inside its ``disable_adapter()`` and the base model's own; after
    the block the virtual tokens are back."""
    reference, adapted = twins("llama", method, folders("llama", method))
    prompt = _prompt(seed=11)
    with_tokens = fxpeft_generate(adapted, prompt)
    with adapted.disable_adapters(), reference.disable_adapter():
        ours = fxpeft_generate(adapted, prompt)
        assert_same_generation(ours, fxpeft_generate(reference, prompt))
        assert_same_generation(ours, fxpeft_generate(adapted.base_model, prompt))
        assert not torch.equal(ours[0], with_tokens[0]) or not torch.equal(torch.stack(ours[1]),
                                                                           torch.stack(with_tokens[1]))
    assert_same_generation(fxpeft_generate(adapted, prompt), with_tokens)
