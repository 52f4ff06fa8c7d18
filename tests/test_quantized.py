"""Quantized bases (bitsandbytes int8, nf4, fp4) and the Quantize rule: fxpeft/ops/quantized.py,
fxpeft/capture/quantized_calls.py, passes/quantize.py.

References are the eager quantized model itself (bitsandbytes' own layers, called directly) and the ``peft``
package on an identically loaded copy (``prepare_model_for_kbit_training`` + ``get_peft_model``). The model is
the tiny OPT of tests/models.py without dropout and with one layer (captures and compiles take half the
time), saved once and loaded with ``BitsAndBytesConfig``; ``compute_dtype`` is float32 except in one bf16
parity case (bf16 is slow on this CPU, but this model is tiny).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import re
import runpy
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb  # the `quantization` extra: a missing one fails, never skips
import peft
import pytest
import torch
import tqdm  # noqa: F401  (the example's progress bar)
import transformers as tf
from torch import nn
from transformers import BitsAndBytesConfig

import fxpeft
from fxpeft.errors import FxpeftError, RuleError, UnsupportedError
from fxpeft.graph.sites import find_linear_sites
from fxpeft.ops import quantized
from fxpeft.rules import Quantize
from tests.models import AUTO_CLASS, hf_inputs, mlp
from tests.models import CONFIGS as MODEL_CONFIGS
from tests.passes.peft_reference import fxpeft_grads, peft_grads, randomize_peft
from tests.passes.test_lora import LORA_OPS_PER_CALL, lora_sites, tagged_ops

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every int8 call
ROOT = Path(__file__).resolve().parent.parent
QUANTIZED_LINEAR = torch.ops.fxpeft.quantized_linear.default
R, ALPHA = 4, 8

CONFIGS = {
    "int8": dict(load_in_8bit=True),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
}
# The same settings as a Quantize rule.
RULES = {"int8": Quantize(bits=8), "nf4-double": Quantize(bits=4, double_quant=True),
         "fp4": Quantize(bits=4, quant_type="fp4"), "nf4-bf16": Quantize(bits=4, compute_dtype=torch.bfloat16)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The tiny OPT (one layer, no dropout) saved in full precision, to load quantized."""
    config = MODEL_CONFIGS["opt"]()
    config.num_hidden_layers = 1
    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("opt")
    AUTO_CLASS["opt"].from_config(config).save_pretrained(directory)
    return directory


def load(directory: Path, kind: str) -> nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(**CONFIGS[kind]),
                                                   dtype=torch.float32).eval()


def inputs(batch: int = 2, seq: int = 9, seed: int = 1) -> dict:
    data = hf_inputs("opt", batch=batch, seq=seq, seed=seed)
    return {**data, "labels": data["input_ids"]}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules() if quantized.quantized_kind(module)}


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every quantized tensor of the model (packed weights and quantization statistics)."""
    return {f"{path}#{i}": tensor.clone() for path, layer in quantized_layers(model).items()
            for i, tensor in enumerate(quantized._quantized_tensors(layer))}


def with_lora_hooks(model: nn.Module, sites) -> list:
    """Eager reference: forward hooks adding ``B(A(x)) * alpha / r`` (the scaling computed here) to each adapted
    layer's output."""
    def hook(module, args, output, site):
        return output + (args[0].to(site.lora_A.dtype) @ site.lora_A.T @ site.lora_B.T * (ALPHA / R)).to(output.dtype)

    return [model.get_submodule(path).register_forward_hook(lambda m, a, o, s=site: hook(m, a, o, s))
            for path, site in sites.items()]


# -- capture: one op per quantized layer, recognised as a linear site ------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_capture_makes_one_quantized_op_per_layer_and_lora_adapts_it(saved, kind):
    model = load(saved, kind)
    layers = quantized_layers(model)
    before = dict(model.named_modules())
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["attention.query", "attention.value", "fc2"], r=R,
                                                   alpha=ALPHA)])
    assert dict(model.named_modules()) == before  # every layer back in its slot, the same objects

    program = adapted.programs()[0]
    ops = [node for node in program.pristine.graph.nodes if node.target is QUANTIZED_LINEAR]
    assert sorted(node.args[4] for node in ops) == sorted(layers)
    assert not any("bitsandbytes" in str(node.target) for node in program.pristine.graph.nodes)
    sites = find_linear_sites(program)
    for path, layer in layers.items():
        assert (sites[path].form, sites[path].in_features, sites[path].out_features) == \
            ("quantized", layer.in_features, layer.out_features)
    assert sites["lm_head"].form == "linear"  # transformers leaves the head in full precision

    # Roles come from data flow through the quantized nodes; LoRA's branch is the usual one.
    expected = {f"model.decoder.layers.0.{name}" for name in ("self_attn.q_proj", "self_attn.v_proj", "fc2")}
    assert set(lora_sites(adapted)) == expected
    per_call = collections.Counter(LORA_OPS_PER_CALL)
    assert dict(tagged_ops(adapted)) == {path: per_call for path in expected}

    # A fresh adapter is the eager quantized model bit for bit; a random one is it plus LoRA's term.
    data = inputs()
    with torch.no_grad():
        for mode in (False, True):
            model.train(mode)
            adapted.train(mode)
            assert torch.equal(adapted(**data).logits, model(**data).logits)
        generator = torch.Generator().manual_seed(3)
        for site in lora_sites(adapted).values():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.1)
        handles = with_lora_hooks(model, lora_sites(adapted))
        try:
            reference = model(**data).logits
        finally:
            for handle in handles:
                handle.remove()
        got = adapted(**data).logits
    assert not torch.allclose(got, model(**data).logits, atol=1e-3)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


# -- parity with peft ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "nf4-double", "fp4", "nf4-bf16"])
def test_parity_with_peft_on_the_same_quantized_base(saved, kind):
    """Same quantized base, same LoRA weights: same logits (train and eval), same gradients, same counts.
    With 32-bit compute the adapted layers' biases train too (``bias="lora_only"``: a trained copy of the
    layer's bias is fed to the quantized op, which PEFT does by training the bitsandbytes layer's own; with
    bf16 compute bitsandbytes casts its layer's bias to bf16 in place, which a copy cannot follow)."""
    bias = "none" if kind == "nf4-bf16" else "lora_only"
    theirs = peft.prepare_model_for_kbit_training(load(saved, kind), use_gradient_checkpointing=False)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                         bias=bias))
    state = randomize_peft(theirs)
    ours = fxpeft.transform(load(saved, kind), [fxpeft.LoRA(targets="all-linear", r=R, alpha=ALPHA, bias=bias)])
    ours.adapters["default"].load_peft_state_dict(state)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    data = inputs()
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        with torch.set_grad_enabled(mode):
            expected, got = theirs(**data), ours(**data)
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-6)
            if torch.is_grad_enabled():
                expected.loss.backward()
                got.loss.backward()
                want = peft_grads(theirs)
                for key, grad in fxpeft_grads(ours).items():
                    torch.testing.assert_close(grad, want[key], rtol=1e-4, atol=1e-7)


# -- training: adapters move, the quantized base does not -------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_quantize_rule_is_bitsandbytes_loading_and_qlora_trains(saved, kind):
    """``[Quantize, LoRA]`` on the full-precision model gives the same layers and numbers as loading it with
    BitsAndBytesConfig; the full-precision weights are freed; training moves only the adapter."""
    reference = load(saved, kind)
    model = tf.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    originals = {path: weakref.ref(module.weight) for path, module in model.named_modules()
                 if path in quantized_layers(reference)}
    adapted = fxpeft.transform(model, [RULES[kind], fxpeft.LoRA(targets="all-linear", r=R, alpha=ALPHA)])

    assert {p: type(m) for p, m in quantized_layers(model).items()} == \
        {p: type(m) for p, m in quantized_layers(reference).items()}
    assert isinstance(model.lm_head, nn.Linear) and not quantized.quantized_kind(model.lm_head)
    assert all(ref() is None for ref in originals.values()), "a full-precision weight is still alive"
    packed = packed_state(model)
    assert packed.keys() == packed_state(reference).keys()
    for key, tensor in packed_state(reference).items():
        assert torch.equal(packed[key], tensor), key
    data = inputs()
    for mode in (True, False):
        reference.train(mode)
        adapted.train(mode)
        with torch.no_grad():
            assert torch.equal(adapted(**data).logits, reference(**data).logits)

    adapted.train()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for s in lora_sites(adapted).values() for p in (s.lora_A, s.lora_B)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = adapted(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # Against the reference, which ran the same eval-mode calls: on a CPU with AVX512-BF16 such a call repacks a
    # 4-bit layer for bitsandbytes' CPU kernel, so the tensors before and after are in different layouts.
    trained, untouched = packed_state(model), packed_state(reference)
    assert trained.keys() == untouched.keys()
    for key, tensor in trained.items():
        assert torch.equal(tensor, untouched[key]), f"{key} changed in training"
    for layer in quantized_layers(model).values():
        assert type(layer.weight).__name__ in ("Int8Params", "Params4bit") and not layer.weight.requires_grad
        assert layer.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)


# -- merging ---------------------------------------------------------------------------------------------------
def requantized(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized the way ``layer`` is, by bitsandbytes' own parameter classes (as loading a model with
    ``BitsAndBytesConfig`` quantizes it), then dequantized: what a layer holding ``weight`` holds."""
    import bitsandbytes.functional as F

    if quantized.quantized_kind(layer) == "int8":
        param = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return param.data.float() * param.SCB.float().unsqueeze(1) / 127
    state = layer.weight.quant_state
    param = bnb.nn.Params4bit(weight.to(state.dtype).clone(), requires_grad=False, blocksize=state.blocksize,
                              compress_statistics=bool(state.nested), quant_type=state.quant_type).to("cpu")
    return F.dequantize_4bit(param.data, param.quant_state)


def check_requantized_merge(model: nn.Module, adapted: fxpeft.AdaptedModel, run: Callable[[nn.Module], torch.Tensor],
                            scaling: float) -> None:
    """``merge()`` puts into each quantized layer bitsandbytes' quantization of ``W + scaling * B @ A`` (``W`` the
    layer's dequantized weight; ``scaling`` the caller's ``alpha / r``), warns with the rounding error, and
    ``unmerge()`` restores the packed tensors exactly; ``merge_and_dequantize`` holds that sum in full precision,
    with the unmerged outputs. ``run(m)`` is the compared output of ``m`` (in train mode: int8 then runs the
    dequantized weight, so the graph and the eager layers agree to rounding)."""
    sites = lora_sites(adapted)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for site in sites.values():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.1)
    adapted.train()
    with torch.no_grad():
        unmerged = run(adapted)
        original = packed_state(model)
        weights = {path: quantized.dequantized_weight(model.get_submodule(path)).float() for path in sites}
        exact = {path: weights[path] + scaling * (site.lora_B @ site.lora_A) for path, site in sites.items()}
        assert all(quantized.quantized_kind(model.get_submodule(path)) for path in sites)
        expected = {path: requantized(model.get_submodule(path), exact[path]) for path in sites}
        # The update is many quantization steps wide somewhere in each layer: a merge of any other size shows.
        for path in sites:
            assert not torch.equal(expected[path], requantized(model.get_submodule(path), weights[path])), path
        with pytest.warns(quantized.QuantizedMergeWarning, match=r"off the exact sum by up to [0-9.e-]+ \(relative "
                                                                 r"error [0-9.]+% of the weight"):
            adapted.merge()
        for path in sites:
            merged_weight = quantized.dequantized_weight(model.get_submodule(path)).float()
            torch.testing.assert_close(merged_weight, expected[path].float(), rtol=0, atol=1e-6,
                                       msg=lambda m, path=path: f"{path}: {m}")
        # Merged, the graph runs without adapter nodes: the eager bitsandbytes model holding the merged weights.
        torch.testing.assert_close(run(adapted), run(model), rtol=1e-5, atol=1e-5)
        adapted.unmerge()
        for key, tensor in packed_state(model).items():
            assert torch.equal(tensor, original[key]), f"unmerge did not restore {key}"
        assert torch.equal(run(adapted), unmerged)

        full = quantized.merge_and_dequantize(adapted)
        assert full is model and not quantized_layers(model)
        for path in sites:
            assert type(model.get_submodule(path)) is nn.Linear
            torch.testing.assert_close(model.get_submodule(path).weight.float(), exact[path], rtol=0, atol=1e-6)
        torch.testing.assert_close(run(full.train()), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_merge_is_the_requantized_exact_sum(saved, kind):
    """:func:`check_requantized_merge` on the OPT loaded quantized with ``BitsAndBytesConfig``, LoRA on every
    linear."""
    model = load(saved, kind)
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets="all-linear", r=R, alpha=ALPHA)])
    data = inputs()
    check_requantized_merge(model, adapted, lambda m: m(**data).logits, ALPHA / R)


@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_merge_into_quantize_rule_layers_is_the_requantized_exact_sum(kind):
    """:func:`check_requantized_merge` on a small MLP quantized by the Quantize rule (a second of work: the mutation
    check of tests/test_mutants.py runs this one). The rule leaves the output layer fc2 in full precision, so LoRA
    goes on fc1 only."""
    model = mlp()
    model.drop.p = 0.0  # the MLP's own dropout: train mode must be deterministic here
    adapted = fxpeft.transform(model, [RULES[kind], fxpeft.LoRA(targets=["fc1"], r=2, alpha=6)],
                               example_inputs=(torch.randn(4, 16),))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    check_requantized_merge(model, adapted, lambda m: m(x), 6 / 2)


# -- torch.compile ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_compiles_whole_graph_and_trains_compiled(saved, kind):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    adapted = fxpeft.transform(load(saved, kind), [fxpeft.LoRA(targets="all-linear", r=R, alpha=ALPHA)])
    with torch.no_grad():
        for site in lora_sites(adapted).values():
            site.lora_B.normal_(std=0.1)
    adapted.train()
    adapted(**inputs(2, 8))  # captures the argument set with labels, eagerly
    fast = torch.compile(adapted, fullgraph=True, dynamic=True)
    trainable = {name: p for name, p in adapted.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    for batch, seq in [(2, 9), (3, 12)]:
        data = inputs(batch, seq, seed=batch + seq)
        eager = adapted(**data)
        eager.loss.backward()
        expected = {name: p.grad.clone() for name, p in trainable.items()}
        optimizer.zero_grad()
        got = fast(**data)
        got.loss.backward()
        torch.testing.assert_close(got.logits, eager.logits, rtol=1e-5, atol=1e-5)
        for name, p in trainable.items():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
        before = {name: p.detach().clone() for name, p in trainable.items()}
        optimizer.step()
        optimizer.zero_grad()
        assert any(not torch.equal(p, before[name]) for name, p in trainable.items())
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


# -- errors ----------------------------------------------------------------------------------------------------
def test_quantize_without_bitsandbytes_says_how_to_install():
    """bitsandbytes made unimportable in a fresh interpreter (``sys.modules`` entry None)."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, fxpeft\n"
            "from fxpeft.errors import UnsupportedError\n"
            "from tests.models import mlp\n"
            "try:\n"
            "    fxpeft.transform(mlp(), [fxpeft.rules.Quantize(bits=4), fxpeft.LoRA(targets=['fc1'])],\n"
            "                     example_inputs=(torch.randn(4, 16),))\n"
            "except UnsupportedError as error:\n"
            "    print('UnsupportedError:', error)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "UnsupportedError: Quantization needs the bitsandbytes package" in result.stdout, result.stderr
    assert "pip install bitsandbytes" in result.stdout


def test_quantize_on_the_meta_device_is_unsupported():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(UnsupportedError, match="meta device"):
        fxpeft.transform(model, [Quantize(bits=4), fxpeft.LoRA(targets=["fc1"])],
                         example_inputs=(torch.randn(4, 16, device="meta"),))


class _HomemadeInt8Linear(nn.Module):
    """A quantized linear fxpeft does not know: it holds an Int8Params but is no Linear8bitLt."""

    def __init__(self):
        super().__init__()
        weight = torch.randn(32, 16)
        self.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")

    def forward(self, x):
        return x @ (self.weight.float() * self.weight.SCB.unsqueeze(1) / 127).T


def test_lora_on_an_unknown_quantized_layer_type_names_it():
    model = mlp()
    model.fc1 = _HomemadeInt8Linear()
    with pytest.raises(UnsupportedError, match=r"fc1 is a tests\.test_quantized\._HomemadeInt8Linear, a quantized "
                                               r"layer type fxpeft does not know"):
        fxpeft.transform(model, [fxpeft.LoRA(targets=["fc1"])], example_inputs=(torch.randn(4, 16),))
    assert isinstance(model.fc1, _HomemadeInt8Linear)


def test_quantize_rule_validates_and_round_trips():
    rule = Quantize(bits=4, quant_type="fp4", double_quant=True, compute_dtype=torch.bfloat16, targets=["fc1"])
    assert rule.compute_dtype == "bfloat16" and rule.dtype is torch.bfloat16
    assert fxpeft.Rule.from_dict(rule.to_dict()) == rule
    for bad, field in [(dict(bits=3), "bits"), (dict(quant_type="int4"), "quant_type"),
                       (dict(compute_dtype=torch.int8), "compute_dtype"), (dict(double_quant="yes"), "double_quant"),
                       (dict(int8_threshold=-1), "int8_threshold")]:
        with pytest.raises(RuleError, match=field):
            Quantize(**bad)


def test_quantize_on_a_layer_quantized_otherwise_is_an_error_and_same_settings_are_kept():
    model = mlp()
    example = (torch.randn(4, 16),)
    first = fxpeft.transform(model, [Quantize(bits=4), fxpeft.LoRA(targets=["fc1"])], example_inputs=example)
    layer = model.fc1
    assert quantized.quantized_kind(layer) == "4bit"
    with pytest.raises(RuleError, match=r"fc1 is quantized already \(Linear4bit, bits=4\) but the rule asks for "
                                        r"bits=8"):
        fxpeft.transform(model, [Quantize(bits=8), fxpeft.LoRA(targets=["fc1"])], example_inputs=example)
    again = fxpeft.transform(model, [Quantize(bits=4), fxpeft.LoRA(targets=["fc1"])], example_inputs=example)
    assert model.fc1 is layer
    x = torch.randn(3, 16)
    torch.testing.assert_close(again(x), first(x))


def test_a_deep_copy_of_an_adapted_quantized_model_fails_loudly():
    """The graph finds its layers in the model it was captured from; a copy's tensors are not those."""
    adapted = fxpeft.transform(mlp(), [Quantize(bits=8), fxpeft.LoRA(targets=["fc1"])],
                               example_inputs=(torch.randn(4, 16),))
    twin = copy.deepcopy(adapted)
    with pytest.raises(FxpeftError, match="deep-copied"):
        twin(torch.randn(3, 16))
    adapted(torch.randn(3, 16))  # the original still runs


# -- the example -----------------------------------------------------------------------------------------------
def test_int8_example_quick_run(tmp_path, capsys, monkeypatch):
    """``examples/int8_causal_lm.py --quick``, run in this process (its imports are shared with the suite), on
    one intra-op thread: on a shared two-core machine two spinning threads are several times slower."""
    monkeypatch.setattr(sys, "argv", ["int8_causal_lm.py", "--quick", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(ROOT / "examples" / "int8_causal_lm.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    output = capsys.readouterr().out
    losses = re.search(r"task loss before LoRA training: ([0-9.]+), after: ([0-9.]+)", output)
    before, after = map(float, losses.groups())
    assert after < 0.5 * before, output
    assert "reloaded in int8: bitsandbytes.nn.modules.Linear8bitLt, weight torch.int8" in output
    assert "int8 base weights unchanged: yes" in output
    assert "reloaded adapter on a fresh int8 base: identical logits" in output
    assert len(re.findall(r"generated: 'the \w+ says' -> '.*'", output)) == 3
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
