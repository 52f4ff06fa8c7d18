"""Capture: every model family becomes a graph that reproduces the eager base model bit for bit.

One capture per family (capturing is the slow part): each family's test checks, on that one adapted model,
outputs against the eager model at sizes other than the capture example, the LoRA sites against the model's
linear modules, the form of each linear in the graph, where gradients go in train mode, and, with B != 0, the
outputs against the eager model with LoRA's update (``alpha / r * x A^T B^T``) written out in forward hooks:
a numeric LoRA check for every family of the test zoo (the families of tests/passes/test_lora.py are also held
against PEFT there).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.pytorch_utils import Conv1D

import fxpeft
from fxpeft.errors import CaptureError
from fxpeft.graph.sites import find_linear_sites
from tests.models import CONFIGS, hf_inputs, hf_model, mlp, small_cnn

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "falcon", "bloom", "t5", "mt5", "bart", "bert",
            "roberta", "vit", "whisper"]

# How each kind of linear module appears in a captured graph (see CAPTURE-FACTS.md).
_FORM_OF = ((Conv1D, "addmm"), (FalconLinear, "matmul"), (nn.Linear, "linear"))

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _form_of(module: nn.Module) -> str | None:
    return next((form for cls, form in _FORM_OF if isinstance(module, cls)), None)


def _linear_modules(model: nn.Module) -> dict[str, str]:
    """Module path -> expected graph form, for every nn.Linear / Conv1D / FalconLinear in ``model``."""
    forms = {name: _form_of(module) for name, module in model.named_modules()}
    return {name: form for name, form in forms.items() if form is not None}


def _output_embedding(model: nn.Module) -> set[str]:
    """What "all-linear" leaves out of a transformers model, as PEFT does: the output embedding, if any
    (a classification head stays in, as in PEFT without a task type)."""
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head} if head is not None else set()


def _inputs(family: str, batch: int, seq: int) -> dict:
    """``hf_inputs`` at another size than the capture example (3 x 11), with padding where there is a mask."""
    inputs = hf_inputs(family, batch=batch, seq=seq)
    if "attention_mask" in inputs and batch > 1:
        inputs["attention_mask"][-1, -2:] = 0  # right padding: no query row is fully masked
    return inputs


def _tensors(result) -> dict[str, torch.Tensor]:
    """The tensors of a model's output, by name (the cache is left out: the capture runs without one)."""
    if isinstance(result, torch.Tensor):
        return {"output": result}
    return {key: value for key, value in result.items() if not isinstance(value, tf.Cache)}


def _assert_bitwise_equal(expected, actual, where: str) -> None:
    expected, actual = _tensors(expected), _tensors(actual)
    assert expected.keys() == actual.keys(), where
    for key in expected:
        assert isinstance(actual[key], torch.Tensor), f"{where}: {key} is {type(actual[key]).__name__}"
        assert actual[key].shape == expected[key].shape, f"{where}: {key}"
        assert torch.equal(actual[key], expected[key]), \
            f"{where}: {key} differs by {(actual[key] - expected[key]).abs().max().item()}"


def _main_output(result) -> torch.Tensor:
    tensors = _tensors(result)
    return tensors.get("logits", tensors.get("output"))


def _lora_sites(adapted: fxpeft.AdaptedModel) -> dict[str, nn.Module]:
    return {site.path: site for site in adapted.site_modules() if hasattr(site, "lora_A")}


@contextlib.contextmanager
def _lora_hooks(model: nn.Module, sites: dict[str, nn.Module], scaling: float):
    """The eager ``model`` with PEFT's LoRA update written out: a forward hook adds ``scaling * x A^T B^T`` to the
    output of each adapted module (``x`` its input; ``scaling`` the caller's ``alpha / r``)."""
    def hook(module, args, output, site):
        return output + scaling * (args[0] @ site.lora_A.T @ site.lora_B.T)

    handles = [model.get_submodule(path).register_forward_hook(functools.partial(hook, site=site))
               for path, site in sites.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _check_adapted(model: nn.Module, adapted: fxpeft.AdaptedModel, inputs: list[dict], expected_sites: set[str],
                   scaling: float):
    """The checks every captured model passes; ``inputs`` are keyword inputs at sizes other than the example;
    ``scaling`` is the rule's ``alpha / r``, computed by the caller."""
    base_parameters = {name: p.detach().clone() for name, p in model.named_parameters()}

    # 1. LoRA on exactly the selected linear modules, all found in the graph in their expected form.
    lora = _lora_sites(adapted)
    assert set(lora) == expected_sites
    assert set(adapted.adapter_state_dict()) == {
        f"base_model.model.{path}.lora_{ab}.weight" for path in expected_sites for ab in "AB"}
    found = find_linear_sites(adapted.programs()[0])
    assert {path: site.form for path, site in found.items()} == _linear_modules(model)

    # 2. Eval mode, fresh adapter (B = 0): the base model's outputs exactly.
    adapted.eval()
    with torch.no_grad():
        for kwargs in inputs:
            _assert_bitwise_equal(model(**kwargs), adapted(**kwargs), f"eval, B=0, {_shapes(kwargs)}")

    # 3. Train mode, B != 0: gradients reach every lora_A and lora_B and no base parameter.
    torch.manual_seed(0)
    with torch.no_grad():
        for site in lora.values():
            site.lora_B.normal_(std=0.1)
    adapted.train()
    _main_output(adapted(**inputs[0])).float().pow(2).mean().backward()
    for path, site in lora.items():
        for name in ("lora_A", "lora_B"):
            grad = getattr(site, name).grad
            assert grad is not None and torch.count_nonzero(grad) > 0, f"no gradient reached {path}.{name}"
    for name, parameter in model.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, f"base parameter {name} got a gradient"
        assert torch.equal(parameter, base_parameters[name]), f"base parameter {name} changed"

    # 4. The eval graph carries the adapter with LoRA's numbers: with B != 0 every output is the eager model's with
    # ``scaling * x A^T B^T`` added at each adapted module, and the update moves the outputs a hundred times more
    # than the tolerance (so a scaling off by any factor, or an update at the wrong place, fails).
    adapted.eval()
    with torch.no_grad():
        for kwargs in inputs:
            base = _main_output(model(**kwargs))
            with _lora_hooks(model, lora, scaling):
                reference = _tensors(model(**kwargs))
            got = _tensors(adapted(**kwargs))
            assert got.keys() == reference.keys()
            for key, want in reference.items():
                torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, key=key: f"{key} against the eager LoRA formula: {m}")
            moved = (_main_output(reference) - base).abs().max().item()
            assert moved > 1e-3 * (1 + base.abs().max().item()), f"the adapter moves the outputs by only {moved:.2g}"


def _shapes(kwargs: dict) -> dict:
    return {key: tuple(value.shape) for key, value in kwargs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_family(family):
    """Captured from example inputs built from the config (batch 3, sequence 11); called at (2, 9) and (1, 5)."""
    model = hf_model(family)
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets="all-linear", r=4, alpha=8))
    assert not model.training
    expected = set(_linear_modules(model)) - _output_embedding(model)
    _check_adapted(model, adapted, [_inputs(family, batch=2, seq=9), _inputs(family, batch=1, seq=5)], expected,
                   scaling=8 / 4)
    assert len(adapted.programs()) == 1, "a new size must not cost a new capture"


def test_capture_mlp():
    model = mlp()
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["fc1", "fc2"], r=4),
                               example_inputs=(torch.randn(4, 16),))
    inputs = [{"x": torch.randn(3, 16)}, {"x": torch.randn(1, 16)}]
    _check_adapted(model, adapted, inputs, {"fc1", "fc2"}, scaling=8 / 4)  # alpha defaults to 8


def test_capture_cnn():
    model = small_cnn()
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["head"], r=4), example_inputs=(torch.randn(4, 3, 8, 8),))
    inputs = [{"x": torch.randn(3, 3, 8, 8)}, {"x": torch.randn(1, 3, 8, 8)}]
    _check_adapted(model, adapted, inputs, {"head"}, scaling=8 / 4)


@pytest.mark.parametrize("family, form", [("gpt2", "addmm"), ("falcon", "matmul")])
def test_linear_forms_on_fresh_capture(fresh_capture, family, form):
    """gpt2's Conv1D is ``addmm(b, x, W[in, out])``; falcon's FalconLinear is ``matmul(x, W.T)``."""
    model, program = fresh_capture(family)
    sites = find_linear_sites(program)
    special = {name for name, module in model.named_modules() if isinstance(module, (Conv1D, FalconLinear))}
    assert special and {path for path, site in sites.items() if site.form == form} == special
    assert {path for path, site in sites.items() if site.form == "linear"} == {"lm_head"}
    for path in special:  # shapes read from the graph are nn.Linear's (out, in), whatever the storage layout
        weight = model.get_submodule(path).weight
        in_features, out_features = (weight.shape if form == "addmm" else weight.shape[::-1])
        assert (sites[path].in_features, sites[path].out_features) == (in_features, out_features)


# -- models that cannot be captured ----------------------------------------------------------------------------

class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y if y.sum() > 0 else -y  # Python control flow on a tensor's value


def test_capture_error_without_example_inputs():
    model = mlp()
    assert model(torch.randn(2, 16)).shape == (2, 8)  # the model itself is fine
    with pytest.raises(CaptureError, match=r"example_inputs=\("):
        fxpeft.transform(model, fxpeft.LoRA(targets=["fc1"]))
    assert all(p.requires_grad for p in model.parameters()), "a failed transform must leave the model as it was"


def test_capture_error_when_forward_fails_on_the_example():
    model = mlp()
    bad = torch.randn(4, 7)  # fc1 takes 16 features
    with pytest.raises(RuntimeError):
        model(bad)
    with pytest.raises(CaptureError) as error:
        fxpeft.transform(model, fxpeft.LoRA(targets=["fc1"]), example_inputs=(bad,))
    message = str(error.value)
    assert "MLP" in message and "(4, 7)" in message  # what was called, with what
    assert "example_inputs=" in message and "example_kwargs=" in message  # how to pass other inputs


def test_capture_error_on_data_dependent_control_flow():
    model = _DataDependent()
    model(torch.randn(3, 4))  # runs eagerly
    with pytest.raises(CaptureError) as error:
        fxpeft.transform(model, fxpeft.LoRA(targets=["fc"]), example_inputs=(torch.randn(3, 4),))
    message = str(error.value)
    assert "_DataDependent" in message and "example_inputs=" in message
    assert "value" in message  # says the forward branches on a tensor's value


# -- the meta device ---------------------------------------------------------------------------------------------

class _PeakRSS:
    """Samples this process's resident memory in a thread; ``growth`` is peak minus the starting value."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_meta_7b_llama_plans_without_memory():
    config = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            vocab_size=32000)
    with _PeakRSS() as rss:
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(config)
        adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 25 * 2**30  # ~27 GB in float32, so anything materialised would show
    assert rss.growth < 1 * 2**30, f"planning a 7B model on meta grew RSS by {rss.growth / 2**20:.0f} MiB"

    program = adapted.programs()[0]
    assert len(find_linear_sites(program)) == 225 == len(_linear_modules(model))
    assert sum(node.target is _SDPA for node in program.graph.nodes) == 32
    expected = {f"model.layers.{i}.self_attn.{name}" for i in range(32) for name in ("q_proj", "v_proj")}
    assert set(_lora_sites(adapted)) == expected
    state = adapted.adapter_state_dict()
    assert len(state) == 128 and all(t.device.type == "meta" for t in state.values())
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 4096)
    assert state["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (4096, 8)


def test_meta_model_then_load_base_model():
    """Plan on meta, load real weights: the base model's outputs with B = 0, the real adapted model's with B != 0."""
    rule = fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)
    with torch.device("meta"):
        planned = tf.LlamaForCausalLM(CONFIGS["llama"]())
    adapted = fxpeft.transform(planned.eval(), rule)  # example inputs built on meta too
    real = hf_model("llama")
    adapted.load_base_model(real)
    assert all(p.device.type == "cpu" for p in adapted.parameters())

    adapted.eval()
    with torch.no_grad():
        for kwargs in (_inputs("llama", batch=2, seq=9), _inputs("llama", batch=1, seq=5)):
            _assert_bitwise_equal(real(**kwargs), adapted(**kwargs), f"meta-planned, B=0, {_shapes(kwargs)}")

    reference = fxpeft.transform(hf_model("llama"), rule).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for site in _lora_sites(reference).values():
            site.lora_B.normal_(std=0.1)
    state = reference.adapter_state_dict()
    for site in adapted.site_modules():
        site.load_peft_state_dict(state)
    assert all(torch.equal(adapted.adapter_state_dict()[key], value) for key, value in state.items())
    kwargs = _inputs("llama", batch=2, seq=9)
    with torch.no_grad():
        expected = reference(**kwargs)
        assert not torch.equal(expected.logits, real(**kwargs).logits)
        _assert_bitwise_equal(expected, adapted(**kwargs), "meta-planned vs real, B != 0")
    assert len(adapted.programs()) == 1, "the graph captured on meta must serve the real weights, not a re-capture"


class _NoGradRegion(nn.Module):
    """A forward with a ``torch.no_grad()`` block over a dynamic size, as transformers' rotary embeddings had up
    to 5.17: export wraps it in ``wrap_with_set_grad_enabled``, which torch 2.11's dynamo refuses to compile."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        with torch.no_grad():
            angles = torch.arange(x.shape[0], dtype=x.dtype)[:, None] * self.scale
        return self.proj(x) + angles.cos()


def test_no_grad_regions_are_inlined_with_grad_mode_kept():
    model = _NoGradRegion()
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["proj"], r=2), example_inputs=(torch.randn(2, 4),))
    region = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph = adapted.programs()[0].graph
    assert not any(node.target is region for node in graph.nodes)
    assert any(node.target is torch.ops.aten.detach.default for node in graph.nodes)  # what no_grad meant
    x = torch.randn(5, 4)
    torch.testing.assert_close(adapted(x), model(x), atol=0, rtol=0)
