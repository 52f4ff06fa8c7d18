"""Every built-in pass through the one harness (tests/passes/harness.py): node counts, the zero adapter, gating,
parity with a reference on identical weights, and compile without recompiles.

References: PEFT's model on fxpeft's weights for LoRA, Trainable (``modules_to_save``), prompt tuning, p-tuning
and prefix tuning; for Quantize, bitsandbytes' own eager layers with LoRA's term added by forward hooks; for
Bottleneck (which PEFT does not have), the eager base with the papers' formula added by forward hooks. The
virtual-token methods have no identity state (their tokens lengthen the sequence), so for them the reference is
what holds instead. Tiny models (tests/models.py), two input sizes each, the ``eager`` compile backend.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fxpeft
from fxpeft.methods import method_for
from fxpeft.rules import LoRA, PrefixTuning, PromptTuning, PTuning, Quantize, Trainable
from tests.models import hf_inputs, hf_model, mlp
from tests.passes.harness import COPY_ROLES, LORA_ROLES, check_pass, hooked_call, per_site
from tests.passes.peft_reference import build_without_dropout

aten = torch.ops.aten
R, ALPHA = 4, 8


def sizes(family: str) -> list[dict]:
    """Two inputs of different batch and sequence sizes (none of size 1: dynamo specializes it)."""
    return [hf_inputs(family, batch=2, seq=9, seed=1), hf_inputs(family, batch=3, seq=12, seed=2)]


def peft_on_fxpeft_weights(peft_model):
    """A reference: ``peft_model`` given the adapted model's adapter, through the adapter's own file codec (the
    keys PEFT saves), so both hold identical weights."""
    def reference(adapted: fxpeft.AdaptedModel):
        rules = adapted.adapters[adapted.active_adapter].rules
        codec = next(method_for(rule).codec for rule in rules if method_for(rule).codec is not None)
        result = peft.set_peft_model_state_dict(peft_model, codec.state_to_file(adapted.adapter_state_dict()))
        # PEFT loads a prompt-learning model's ``prompt_embeddings`` into its encoder after the module state, and
        # still lists the key as unexpected.
        assert set(result.unexpected_keys) <= {"prompt_embeddings"}, result.unexpected_keys
        return peft_model

    return reference


def layers(template: str, count: int = 2) -> list[str]:
    return [template.format(i) for i in range(count)]


# -- additive methods: an identity state, gated per row ----------------------------------------------------------
def test_lora():
    targets = ["q_proj", "v_proj", "down_proj"]
    reference = peft.get_peft_model(build_without_dropout("llama"),
                                    peft.LoraConfig(target_modules=targets, r=R, lora_alpha=ALPHA))
    paths = [p for i in range(2) for p in (f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj",
                                           f"model.layers.{i}.mlp.down_proj")]
    check_pass(lambda: build_without_dropout("llama"), [LoRA(targets=targets, r=R, alpha=ALPHA)],
               inputs=sizes("llama"), expected_nodes=per_site("lora", paths, LORA_ROLES),
               reference=peft_on_fxpeft_weights(reference), compile_train=True)


def test_ia3():
    """(IA)³: k and v scaled at their output, down_proj at its input (PEFT's feed-forward side); per site the gate's
    ``!= 0`` and its column, the vector flattened, ``where(on, l, 1)``, the batch size, the factor reshaped to
    broadcast, and the product (the join)."""
    targets, feedforward = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    reference = peft.get_peft_model(build_without_dropout("llama"), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward))
    paths = [p for i in range(2) for p in (f"model.layers.{i}.self_attn.k_proj", f"model.layers.{i}.self_attn.v_proj",
                                           f"model.layers.{i}.mlp.down_proj")]
    check_pass(lambda: build_without_dropout("llama"), fxpeft.IA3(targets=targets, feedforward=feedforward),
               inputs=sizes("llama"), expected_nodes=per_site("ia3", paths, {"gate": 2, "scale": 4, "join": 1}),
               reference=peft_on_fxpeft_weights(reference), compile_train=True)


def test_bottleneck():
    """Bottleneck adapters (Houlsby placement, found by data flow: o_proj and down_proj), against the eager base with
    ``h + up(act(down(h)))`` hooked on each adapted linear's output (PEFT has no such method); per site the rows the
    gate keeps (as LoRA's), down, the activation, up, LoRA's gated scaling and the add."""
    from tests.passes.test_bottleneck import BottleneckHooks

    paths = [f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.o_proj", "mlp.down_proj")]
    roles = {"rows": 6, "bottleneck_down": 1, "act": 1, "bottleneck_up": 1, "row_scale": 1, "scale": 8, "join": 1}
    check_pass(lambda: build_without_dropout("llama"), fxpeft.Bottleneck(reduction_factor=8), inputs=sizes("llama"),
               expected_nodes=per_site("bottleneck", paths, roles), reference=BottleneckHooks, compile_train=True)


def test_trainable_with_lora():
    """PEFT's ``modules_to_save``: the classifier's tensors are read through trained copies (``where(on, copy,
    base)``), counted per tensor under the copy's tag; the LoRA rule beside it keeps its own counts. A copy serves
    a whole call, so an ``adapter_names`` batch mixing it with base rows is refused."""
    reference = peft.get_peft_model(build_without_dropout("bert"), peft.LoraConfig(
        target_modules=["query", "value"], r=R, lora_alpha=ALPHA, modules_to_save=["classifier"]))
    lora_paths = [f"bert.encoder.layer.{i}.attention.self.{name}" for i in range(2) for name in ("query", "value")]
    expected = {**per_site("lora", lora_paths, LORA_ROLES),
                **per_site("copy", ["classifier.weight", "classifier.bias"], COPY_ROLES)}
    check_pass(lambda: build_without_dropout("bert"),
               [LoRA(targets=["query", "value"], r=R, alpha=ALPHA), Trainable(targets=["classifier"])],
               inputs=sizes("bert"), expected_nodes=expected, reference=peft_on_fxpeft_weights(reference),
               per_row=False)


def test_trainable_alone():
    """A Trainable rule alone (no method with a file format): the reference is the eager base model with the
    trained copies' values written into a twin of it."""
    def reference(adapted: fxpeft.AdaptedModel):
        twin = build_without_dropout("bert")
        with torch.no_grad():
            for site in adapted.site_modules():
                twin.get_parameter(site.path).copy_(site.weight)
        return twin

    check_pass(lambda: build_without_dropout("bert"), Trainable(targets=["classifier"]), inputs=sizes("bert"),
               expected_nodes=per_site("copy", ["classifier.weight", "classifier.bias"], COPY_ROLES),
               reference=reference, per_row=False)


class _LoraHooks:
    """The eager base with LoRA's ``B(A(x)) * scaling`` added to each adapted layer's output by forward hooks."""

    def __init__(self, adapted: fxpeft.AdaptedModel):
        self.model = adapted.base_model
        self.sites = {site.path: site for site in adapted.site_modules()}

    def __call__(self, **inputs):
        def hook(site):
            return lambda module, args, output: output + (
                args[0].to(site.lora_A.dtype) @ site.lora_A.T @ site.lora_B.T * site.scaling).to(output.dtype)

        return hooked_call(self.model, {path: hook(site) for path, site in self.sites.items()}, **inputs)


def test_quantize_with_lora():
    """``[Quantize, LoRA]`` (QLoRA in one transform): Quantize replaces base nodes by the quantized op instead of
    inserting tagged ones, so its count is of ops over the whole graph; the zero adapter is the eager quantized
    model (the base as the rules left it) bit for bit."""
    paths = [f"model.decoder.layers.0.{name}" for name in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")]
    check_pass(lambda: hf_model("opt", layers=1), [Quantize(bits=4), LoRA(targets="all-linear", r=R, alpha=ALPHA)],
               inputs=sizes("opt"), expected_nodes=per_site("lora", paths, LORA_ROLES),
               expected_ops={torch.ops.fxpeft.quantized_linear.default: len(paths)}, reference=_LoraHooks)


# -- virtual-token methods: no identity state, not gateable ------------------------------------------------------
# Prompt tuning and p-tuning: one cat per extended input (ids and mask; no labels here), each placed by a gather,
# one more gather and three wheres to splice the prompt rows into the embeddings.
PROMPT_OPS = {aten.cat.default: 2, aten.gather.default: 3, aten.where.self: 3}


def test_prompt_tuning():
    reference = peft.get_peft_model(build_without_dropout("llama"),
                                    peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    adapted = check_pass(lambda: build_without_dropout("llama"), PromptTuning(3), inputs=sizes("llama"),
                         expected_nodes={("prompt_tuning", "model.embed_tokens"): PROMPT_OPS}, identity=False,
                         reference=peft_on_fxpeft_weights(reference))
    assert not method_for(adapted.adapters["default"].rules[0]).gateable


def test_ptuning():
    """PEFT saves the encoder's output only; the reference gets the encoder's own weights (fxpeft's ``fxpeft.``
    keys), so the two compute the prompt the same way."""
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    reference = peft.get_peft_model(build_without_dropout("llama"), config)

    def with_encoder(adapted: fxpeft.AdaptedModel):
        prefix = "fxpeft.prompt_encoder."
        state = next(adapted.site_modules()).peft_state_dict()
        reference.prompt_encoder["default"].load_state_dict(
            {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        return reference

    check_pass(lambda: build_without_dropout("llama"), PTuning(3, encoder_hidden_size=16), inputs=sizes("llama"),
               expected_nodes={("p_tuning", "model.embed_tokens"): PROMPT_OPS}, identity=False,
               reference=with_encoder)


def test_prefix_tuning():
    """Per layer, a key cat and a value cat (llama's two key/value heads are repeated for its four query heads:
    one repeat_interleave each), plus the mask's and the positions' extension."""
    reference = peft.get_peft_model(build_without_dropout("llama"),
                                    peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    check_pass(lambda: build_without_dropout("llama"), PrefixTuning(3), inputs=sizes("llama"),
               expected_nodes={("prefix_tuning", "prefix_encoder"): {aten.cat.default: 6,
                                                                     aten.repeat_interleave.self_int: 4}},
               identity=False, reference=peft_on_fxpeft_weights(reference))


# -- the harness itself catches what it is for -----------------------------------------------------------------
def test_harness_catches_wrong_counts_and_a_non_identity_start():
    inputs = [(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)),),
              (torch.randn(3, 16, generator=torch.Generator().manual_seed(2)),)]
    rule = LoRA(targets=["fc1"], r=2)
    with pytest.raises(AssertionError, match="roles"):
        check_pass(mlp, rule, inputs=inputs, expected_nodes=per_site("lora", ["fc1"], {**LORA_ROLES, "join": 2}),
                   compile=False)
    with pytest.raises(AssertionError, match="not expected"):
        check_pass(mlp, rule, inputs=inputs, expected_nodes={}, compile=False)
    with pytest.raises(AssertionError, match="bit for bit"):  # B random: not an identity state
        check_pass(mlp, LoRA(targets=["fc1"], r=2, init="random"), inputs=inputs,
                   expected_nodes=per_site("lora", ["fc1"], LORA_ROLES), compile=False)
    check_pass(mlp, rule, inputs=inputs, expected_nodes=per_site("lora", ["fc1"], LORA_ROLES), backend="aot_eager",
               compile_train=True)
