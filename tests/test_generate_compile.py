"""``generate`` with a static cache, eager and with the decode step compiled as transformers compiles it.

Tokens are held against the eager ``DynamicCache`` path (itself held against PEFT in tests/test_generate.py) and,
with adapters disabled, against transformers' own static-cache ``generate`` of the base model. Recompiles are
counted with dynamo's ``unique_graphs`` on the ``aot_eager`` backend (dynamo's guards decide recompiles, whatever
the backend; AOTAutograd also functionalizes the in-place write-back into the cache); one test compiles with
Inductor, the backend a user gets by default.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

import fxpeft
from fxpeft.errors import GenerationError, UnsupportedError
from tests.models import hf_model
from tests.streamers import CollectingStreamer

NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@functools.lru_cache(maxsize=None)
def adapted_llama() -> fxpeft.AdaptedModel:
    """A tiny llama with two LoRA adapters ("default" active, "other"), weights large enough to change tokens."""
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    adapted.add_adapter("other", [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site in adapted.site_modules():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.3)
    return adapted.eval()


def _prompt(batch: int, length: int, seed: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` prompts of ``length`` ids; the last one left-padded with ``pad`` pad ids (1)."""
    ids = torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[-1, :pad], mask[-1, :pad] = 1, 0
    return {"input_ids": ids, "attention_mask": mask}


def _generate(adapted, prompt: dict, new: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    return adapted.generate(**prompt, max_new_tokens=new, pad_token_id=1, **kwargs)


def _static_programs(adapted) -> list:
    return [program for program in adapted.programs() if "StaticCache" in repr(program.key)]


def _compile_config(backend: str) -> CompileConfig:
    """transformers' compile configuration, allowed on the CPU (transformers compiles only on accelerators unless
    ``_compile_all_devices`` is set)."""
    config = CompileConfig(backend=backend, mode="default" if backend == "inductor" else None, fullgraph=True)
    config._compile_all_devices = True
    return config


def test_static_cache_generates_the_dynamic_cache_tokens_with_one_graph():
    adapted = adapted_llama()
    padded = _prompt(3, 6, seed=1, pad=3)
    assert torch.equal(_generate(adapted, padded, cache_implementation="static"), _generate(adapted, padded))
    # The prefill and every decode step are one signature: one graph, whatever the prompt's length or the cache's size.
    assert len(_static_programs(adapted)) == 1
    longer = _prompt(2, 11, seed=2)
    assert torch.equal(_generate(adapted, longer, new=12, cache_implementation="static"),
                       _generate(adapted, longer, new=12))
    beams = {"num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(_generate(adapted, padded, cache_implementation="static", **beams),
                       _generate(adapted, padded, **beams))
    assert len(_static_programs(adapted)) == 1
    # Adapters disabled: transformers' own static-cache generate of the base model, token for token.
    with adapted.disable_adapters():
        ours = _generate(adapted, padded, cache_implementation="static")
    assert torch.equal(ours, _generate(adapted.base_model, padded, cache_implementation="static"))
    # A cache of the user's: written in place (its tensors keep their storage), as transformers' update writes it.
    cache = StaticCache(config=adapted.base_model.config, max_cache_len=6 + NEW_TOKENS)
    cache.early_initialization(batch_size=3, num_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    keys = cache.layers[0].keys
    pointer = keys.data_ptr()
    assert torch.equal(_generate(adapted, padded, cache=cache), _generate(adapted, padded))
    assert cache.layers[0].keys is keys and keys.data_ptr() == pointer and keys.abs().sum() > 0
    assert int(cache.layers[0].cumulative_length) == 6 + NEW_TOKENS - 1


def test_what_a_static_cache_cannot_do_is_refused_before_any_token():
    adapted = adapted_llama()
    prompt = _prompt(2, 6, seed=4)
    programs = adapted.programs()
    streamer = CollectingStreamer()
    short = StaticCache(config=adapted.base_model.config, max_cache_len=6 + NEW_TOKENS - 2)
    with pytest.raises(GenerationError, match="holds 12 positions, but the prompt and the new tokens .* need 13"):
        _generate(adapted, prompt, cache=short, streamer=streamer)
    assert len(streamer.chunks) <= 1 and adapted.programs() == programs  # at most the prompt, no new token
    # Sliding-window layers (mistral's) write a rolling window: not captured yet.
    mistral = fxpeft.transform(hf_model("mistral"), fxpeft.LoRA(targets=["q_proj"], r=4)).eval()
    with pytest.raises(UnsupportedError, match="StaticSlidingWindowLayer"):
        _generate(mistral, prompt, cache_implementation="static")


def _vary(adapted, **kwargs) -> tuple[list[torch.Tensor], list[int]]:
    """Every change that must not recompile a compiled decode step, after a warm-up of a plain and a mixed batch."""
    names = adapted.adapter_indices
    out = [_generate(adapted, _prompt(2, 5, seed=10, pad=2), **kwargs),
           _generate(adapted, _prompt(2, 5, seed=10, pad=2), adapter_names=names(["default", "other"]), **kwargs)]
    counts = [counters["stats"]["unique_graphs"]]
    out.append(_generate(adapted, _prompt(2, 3, seed=11), **kwargs))                    # a shorter prompt
    out.append(_generate(adapted, _prompt(2, 11, seed=12, pad=4), new=12, **kwargs))    # a larger cache
    out.append(_generate(adapted, _prompt(2, 5, seed=13, pad=1), **kwargs))             # other ids and padding
    adapted.set_adapter("other")
    out.append(_generate(adapted, _prompt(2, 5, seed=13, pad=1), **kwargs))
    adapted.set_alpha(2.0, "other")
    out.append(_generate(adapted, _prompt(2, 5, seed=13, pad=1), **kwargs))
    with adapted.disable_adapters():
        out.append(_generate(adapted, _prompt(2, 5, seed=13, pad=1), **kwargs))
    adapted.set_adapter("default")
    adapted.set_alpha(8.0, "other")
    out.append(_generate(adapted, _prompt(2, 5, seed=14), adapter_names=names(["other", "__base__"]), **kwargs))
    out.append(_generate(adapted, _prompt(2, 6, seed=15), adapter_names=names(["__base__", "default"]), **kwargs))
    counts.append(counters["stats"]["unique_graphs"])
    return out, counts


def test_compiled_decode_equals_eager_and_never_recompiles_after_warm_up():
    adapted = adapted_llama()
    dynamic, _ = _vary(adapted)
    static, _ = _vary(adapted, cache_implementation="static")  # eager: captures every signature outside compile
    assert all(torch.equal(a, b) for a, b in zip(static, dynamic))
    torch._dynamo.reset()
    counters.clear()
    compiled, (warm, after) = _vary(adapted, cache_implementation="static", compile_config=_compile_config("aot_eager"))
    assert all(torch.equal(a, b) for a, b in zip(compiled, dynamic))
    assert warm == 2 and after == warm  # one graph per kind of call (plain, mixed batch), then none
    assert sum(counters["graph_break"].values()) == 0


def test_inductor_compiled_decode_equals_eager():
    """One real Inductor compile (about 30 s here): the decode step's functional cache update, written back into
    the cache's tensors, runs as compiled code."""
    adapted = adapted_llama()
    prompts = [_prompt(2, 5, seed=20, pad=2), _prompt(2, 9, seed=21)]
    expected = [_generate(adapted, prompt, cache_implementation="static") for prompt in prompts]
    torch._dynamo.reset()
    counters.clear()
    config = _compile_config("inductor")
    assert torch.equal(_generate(adapted, prompts[0], cache_implementation="static", compile_config=config),
                       expected[0])
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(_generate(adapted, prompts[1], cache_implementation="static", compile_config=config),
                       expected[1])
    assert graphs == 1 and counters["stats"]["unique_graphs"] == graphs
