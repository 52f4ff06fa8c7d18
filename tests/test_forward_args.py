"""Every forward argument of the base model, including those that arrive through its ``**kwargs``
(``output_hidden_states``, ``output_attentions``, ``return_dict``, ``num_items_in_batch``), against the eager base
model itself: with adapters disabled the outputs (hidden states, attentions, tuples) equal the base model's bit for
bit; with a non-zero adapter every argument set runs the same adapter."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

import fxpeft
from fxpeft.errors import ArgumentError
from tests.models import hf_inputs, hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}
FLAGS = [
    {"output_hidden_states": True},
    {"return_dict": False},
    {"output_attentions": True, "output_hidden_states": True, "return_dict": False},
]


@functools.lru_cache(maxsize=None)
def _pair(family: str):
    """A tiny model with eager attention (so that attentions are returned) and its adapted model, whose LoRA ``B``
    is non-zero (so that the adapter shows in every output)."""
    base = hf_model(family)
    base.set_attn_implementation("eager")
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=TARGETS[family], r=4, alpha=8)])
    with torch.no_grad():
        for site in adapted.site_modules():
            site.lora_B.normal_(std=0.2)
    return base, adapted.eval()


def _inputs(family: str, seed: int = 1) -> dict:
    inputs = hf_inputs(family, batch=3, seq=9, seed=seed)
    if family == "bert":
        inputs["labels"] = torch.tensor([0, 1, 0])
    else:
        inputs["labels"] = inputs["decoder_input_ids" if family == "t5" else "input_ids"].clone()
    return inputs


def _reference(base, inputs: dict, **flags):
    """The eager base model's output (no KV cache: the adapted model's graphs return none unless asked)."""
    takes_cache = "use_cache" in inspect.signature(base.forward).parameters
    with torch.no_grad():
        return base(**inputs, **flags, **({"use_cache": False} if takes_cache else {}))


def _leaves(output) -> tuple[list, object]:
    return pytree.tree_flatten(output if isinstance(output, tuple) else output.to_tuple())


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("flags", FLAGS, ids=lambda flags: "+".join(sorted(flags)))
def test_kwargs_arguments_give_the_base_models_outputs(family, flags):
    base, adapted = _pair(family)
    inputs = _inputs(family)
    with adapted.disable_adapters():
        ours = adapted(**inputs, **flags)
    theirs = _reference(base, inputs, **flags)
    our_leaves, our_spec = _leaves(ours)
    their_leaves, their_spec = _leaves(theirs)
    assert type(ours) is type(theirs) and our_spec == their_spec
    assert all(torch.equal(a, b) for a, b in zip(our_leaves, their_leaves))
    if flags.get("output_hidden_states") and flags.get("return_dict", True):
        hidden = getattr(ours, "hidden_states", None) or ours.decoder_hidden_states
        assert len(hidden) == 3  # the embeddings and 2 layers
    if flags.get("output_attentions"):
        assert len(their_leaves) > len(_leaves(_reference(base, inputs, output_hidden_states=True,
                                                          return_dict=False))[0]), "attentions were returned"


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_every_argument_set_runs_the_adapter(family):
    base, adapted = _pair(family)
    inputs = _inputs(family, seed=2)
    plain = adapted(**inputs)
    flagged = adapted(**inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert torch.equal(plain.logits, flagged[1])
    assert torch.equal(plain.loss, flagged[0])
    assert not torch.equal(plain.logits, _reference(base, inputs).logits), "the adapter applies"


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_num_items_in_batch_reaches_the_loss_as_for_the_base_model(family):
    base, adapted = _pair(family)
    inputs = _inputs(family, seed=3)
    with adapted.disable_adapters():
        adapted(**inputs, num_items_in_batch=3)
        programs = len(adapted.programs())
        for count in (5, 17, 2.5, torch.tensor(11.0)):  # numbers, and the float32 tensor Trainer passes
            ours = adapted(**inputs, num_items_in_batch=count).loss
            theirs = _reference(base, inputs, num_items_in_batch=count).loss
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert len(adapted.programs()) == programs, "a count, a number or a tensor, is data of one graph"
        integer = torch.tensor(23)
        torch.testing.assert_close(adapted(**inputs, num_items_in_batch=integer).loss,
                                   _reference(base, inputs, num_items_in_batch=integer).loss, rtol=0, atol=0)
        mean = adapted(**inputs).loss
    # llama's loss (transformers' loss_function) divides by the count; t5's own cross-entropy ignores it, as eagerly.
    assert torch.equal(ours, mean) is (family == "t5")


def test_shift_labels_reach_the_loss_function():
    base, adapted = _pair("llama")
    inputs = _inputs("llama", seed=7)
    shift = inputs["labels"][:, 1:].clone()
    shift[:, :4] = -100  # a loss over the last tokens only: not the labels' own shift
    shift = torch.cat([shift, torch.full((3, 1), -100)], dim=1)
    with adapted.disable_adapters():
        ours = adapted(**inputs, shift_labels=shift).loss
    assert torch.equal(ours, _reference(base, inputs, shift_labels=shift).loss)
    assert not torch.equal(ours, _reference(base, inputs).loss)


def test_a_new_flag_value_is_captured_once_then_reused():
    _, adapted = _pair("llama")
    inputs = _inputs("llama", seed=4)
    adapted(**inputs, output_hidden_states=True)
    count = len(adapted.programs())
    adapted(**inputs, output_hidden_states=True)
    other = hf_inputs("llama", batch=2, seq=5, seed=5)
    adapted(**other, labels=other["input_ids"], output_hidden_states=True)  # another size: no capture
    assert len(adapted.programs()) == count
    off = adapted(**inputs, output_hidden_states=False)  # a new value of a constant: a new signature
    assert len(adapted.programs()) == count + 1 and off.hidden_states is None
    adapted(**inputs, output_hidden_states=False)
    assert len(adapted.programs()) == count + 1


def test_positional_and_kwargs_arguments_together():
    base, adapted = _pair("llama")
    inputs = _inputs("llama", seed=6)
    with adapted.disable_adapters():
        ours = adapted(inputs["input_ids"], inputs["attention_mask"], output_hidden_states=True)
    theirs = _reference(base, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                        output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))


def test_an_unknown_keyword_names_the_accepted_ones():
    _, adapted = _pair("llama")
    count = len(adapted.programs())
    with pytest.raises(ArgumentError, match="output_hiden_states") as caught:
        adapted(**_inputs("llama"), output_hiden_states=True)
    assert isinstance(caught.value, TypeError)
    for accepted in ("output_hidden_states", "num_items_in_batch", "return_dict", "labels", "attention_mask"):
        assert accepted in str(caught.value)
    assert len(adapted.programs()) == count, "nothing captured"
    with pytest.raises(ArgumentError, match="too many positional"):
        adapted(*[torch.zeros(2, 3, dtype=torch.long)] * 12)


class _ScaledMLP(nn.Module):
    """Not a transformers model: untyped ``**kwargs`` accept any keyword."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, **kwargs):
        return self.fc2(torch.relu(self.fc1(x))) * kwargs.get("scale", 1.0) + kwargs.get("shift", 0.0)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 4)

    def forward(self, x, bias=None):
        return self.fc1(x) if bias is None else self.fc1(x) + bias


def test_other_modules_take_their_own_keywords():
    torch.manual_seed(0)
    model = _ScaledMLP().eval()
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=(torch.randn(4, 8),)).eval()
    x = torch.randn(5, 8)
    shift = torch.randn(5, 4)
    assert torch.equal(adapted(x, scale=2.0, shift=shift), model(x, scale=2.0, shift=shift))
    plain = fxpeft.transform(_Plain().eval(), [fxpeft.LoRA(targets=["fc1"], r=2)],
                             example_inputs=(torch.randn(4, 8),))
    with pytest.raises(ArgumentError, match="'scale'.*accepts: bias, x"):
        plain(x, scale=2.0)


def test_given_dynamic_shapes_may_nest_kwargs_extras():
    base = hf_model("llama")
    inputs = hf_inputs("llama", batch=3, seq=9)
    auto = {0: Dim.AUTO, 1: Dim.AUTO}
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj"], r=2)],
                               example_kwargs={**inputs, "output_hidden_states": True},
                               dynamic_shapes={"input_ids": auto, "attention_mask": auto,
                                               "kwargs": {"output_hidden_states": None}}).eval()
    other = hf_inputs("llama", batch=2, seq=6)
    out = adapted(**other, output_hidden_states=True)
    assert len(adapted.programs()) == 1, "the example's signature serves other sizes"
    reference = _reference(base, other, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, reference.hidden_states))
