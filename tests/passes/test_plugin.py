"""A method is a plugin (issue 13, item 1): a method defined entirely in this file, with no edit to ``fxpeft/``.

The method: a learned per-output-channel scale on selected linears, ``y = linear(x) * s`` (``s`` starts at ones).
This file defines its rule (:class:`Scale`), its per-site module (:class:`ScaleSite`: the parameter, merge and
unmerge), its rewrite and its PEFT file codec (:class:`ScaleMethod`, :class:`ScaleCodec`), registers it for the
tests of this module only (the ``scale_method`` fixture), and then uses nothing but the public API: transform,
train, save, load, merge, unmerge, several adapters, ``adapter_names``, verify; and the pass harness.

The rewrite is gated per row like every additive method, so that switching and disabling adapters change
tensors, never the graph::

    factor = 1 + (s - 1) * gate[row]        [batch, out], reshaped to broadcast over y's middle dims
    y'     = y * factor                     the join: with the gate at 0 it is y * 1, the base value bit for bit
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft.adapters import SiteModule, adapter_dtype
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.methods import KeyPart, Method, PeftCodec, method_for, register_method, unregister_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule
from tests.models import hf_inputs
from tests.passes.harness import BASE, check_pass, per_site
from tests.passes.peft_reference import build_without_dropout
from tests.passes.test_prompt import train_steps

aten = torch.ops.aten

PEFT_TYPE = "FXPEFT_TEST_SCALE"
KIND = "scale"  # the site kind: adapter keys ``scale:<path>``
KEY = "fxpeft_scale"  # the file key's part: ``base_model.model.<path>.fxpeft_scale``
TARGETS = ["q_proj", "v_proj", "down_proj"]
PATHS = [p for i in range(2) for p in (f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj",
                                        f"model.layers.{i}.mlp.down_proj")]


# -- the method, in full -----------------------------------------------------------------------------------------
def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Scale(Rule):
    """A learned per-output-channel scale on the selected linears (``targets`` as for LoRA)."""

    method: ClassVar[str] = "fxpeft_test_scale"

    targets: Any = None
    exclude: Any = None

    def __post_init__(self):
        if self.targets is None:
            raise RuleError("Scale: `targets` is required.")
        object.__setattr__(self, "targets", _as_tuple(self.targets))  # hashable: rules key dicts
        object.__setattr__(self, "exclude", _as_tuple(self.exclude))


class ScaleSite(SiteModule):
    """``s`` [out] for one linear; merging multiplies the base weight's rows (and the bias) by it."""

    def __init__(self, path: str, weight_fqn: str, bias_fqn: str | None, out_features: int, device, dtype):
        super().__init__()
        self.path = path
        self.weight_fqn = weight_fqn
        self.bias_fqn = bias_fqn
        self.s = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.s.device.type != "meta":
            self.s.fill_(1.0)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{self.path}.{KEY}": self.s}

    def _base_tensors(self, base_model: nn.Module):
        weight = base_model.get_parameter(self.weight_fqn)
        bias = base_model.get_parameter(self.bias_fqn) if self.bias_fqn else None
        return weight, bias

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        weight, bias = self._base_tensors(base_model)
        weight.mul_(self.s.to(weight.dtype)[:, None])
        if bias is not None:
            bias.mul_(self.s.to(bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        weight, bias = self._base_tensors(base_model)
        weight.div_(self.s.to(weight.dtype)[:, None])
        if bias is not None:
            bias.div_(self.s.to(bias.dtype))


class ScaleCodec(PeftCodec):
    """Its own ``peft_type``: the selected module paths as ``target_modules``, the scales under ``KEY``."""

    peft_types = (PEFT_TYPE,)

    def to_config(self, model, rules, selected, adapter) -> dict[str, Any]:
        paths = sorted({path for rule in rules if isinstance(rule, Scale) for path in selected.get(rule, [])})
        return {"peft_type": PEFT_TYPE, "target_modules": paths, "inference_mode": True,
                "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None}

    def to_rules(self, config: dict[str, Any], saved_keys) -> list:
        return [Scale(targets=tuple(config["target_modules"]))]


def _scale_output(ctx: RewriteContext, site, node, s: torch.fx.Node, s_dtype: torch.dtype,
                  gate: torch.fx.Node) -> None:
    """``y`` (one call of the linear) becomes ``y * (1 + (s - 1) * gate[row])``."""
    graph = ctx.program.graph
    node = ctx.site_output(node)  # after the adapters already at this site, as merge() folds them
    y_val = node.meta["val"]
    if y_val.dim() < 2:
        raise UnsupportedError(f"Scale: {site.path} gives a {y_val.dim()}-D output; rows need a batch dimension.")
    call = graph.call_function
    with graph.inserting_before(node.next):
        g = gate if s_dtype == torch.float32 else ctx.tag(call(aten.to.dtype, (gate, s_dtype)), site.path, "gate")
        column = ctx.tag(call(aten.unsqueeze.default, (g, 1)), site.path, "gate")                 # [batch, 1]
        minus_one = ctx.tag(call(aten.sub.Tensor, (s, 1)), site.path, "scale")                    # [out]
        rows = ctx.tag(call(aten.mul.Tensor, (column, minus_one)), site.path, "scale")           # [batch, out]
        factor = ctx.tag(call(aten.add.Tensor, (rows, 1)), site.path, "scale")
        batch = ctx.tag(call(aten.sym_size.int, (gate, 0)), site.path, "scale")
        shape = [batch] + [1] * (y_val.dim() - 2) + [site.out_features]
        factor = ctx.tag(call(aten.reshape.default, (factor, shape)), site.path, "scale")
        join = ctx.tag(call(aten.mul.Tensor, (node, factor)), site.path, tags.JOIN)
        out = join
        if torch.promote_types(y_val.dtype, s_dtype) != y_val.dtype:
            out = ctx.tag(call(aten.to.dtype, (join, y_val.dtype)), site.path, tags.OUTPUT)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not join)
    out.meta["val"] = y_val
    stack = node.meta.get("nn_module_stack")
    cursor = out
    while cursor is not node and stack is not None:
        cursor.meta["nn_module_stack"] = stack
        cursor = cursor.prev


class ScaleMethod(Method):
    rule_type = Scale
    tag = "fxpeft_test_scale"
    codec = ScaleCodec()
    key_form = f"<module>.{KEY}"
    site_kind = "a linear module"

    def rewrite(self, rule: Scale, ctx: RewriteContext) -> None:
        for site in ctx.select_linear(rule):
            if site.form not in ("linear", "matmul"):  # W [out, in]; addmm (Conv1D) is [in, out] and 2-D out
                raise UnsupportedError(f"Scale: {site.path} is computed as {site.form!r}; this test method scales "
                                       "nn.Linear-like layers only.")
            weight = ctx.base_model.get_parameter(site.weight_fqn)
            module = ctx.site(site.path, KIND, lambda: ScaleSite(site.path, site.weight_fqn, site.bias_fqn,
                                                                 site.out_features, weight.device,
                                                                 adapter_dtype(weight.dtype)))
            s = ctx.adapter_input(site.path, KIND, "s")
            gate = ctx.gate_input()
            for node in site.nodes:
                _scale_output(ctx, site, node, s, module.s.dtype, gate)

    def key_part(self, key: str) -> KeyPart | None:
        prefix, suffix = "base_model.model.", f".{KEY}"
        if key.startswith(prefix) and key.endswith(suffix):
            return KeyPart(key[len(prefix):-len(suffix)], KEY)
        return None

    def describe_site(self, path: str, ctx: RewriteContext) -> str | None:
        site = ctx.linear_sites.get(path)
        return f"a linear {site.in_features} -> {site.out_features}" if site is not None else None

    def allowed_sites(self, rule: Scale, ctx: RewriteContext) -> dict[str, Scale]:
        return {site.path: rule for site in ctx.select_linear(rule)}

    def policy_findings(self, site, allowed, given, declared, state) -> list:
        return [] if allowed is not None else ["the adapter scales this module, which no rule allows."]


@pytest.fixture
def scale_method():
    method = register_method(ScaleMethod())
    try:
        yield method
    finally:
        unregister_method(Scale)


# -- helpers --------------------------------------------------------------------------------------------------
def inputs(batch: int = 2, seq: int = 9, seed: int = 1, labels: bool = False) -> dict:
    data = hf_inputs("llama", batch=batch, seq=seq, seed=seed)
    return {**data, "labels": data["input_ids"]} if labels else data


def logits(model, data: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**data).logits


def scales(adapted: fxpeft.AdaptedModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {site.path: site.s for site in adapted.site_modules(adapter_name)}


def train(adapted: fxpeft.AdaptedModel, data: dict, steps: int = 5, lr: float = 0.05) -> list[float]:
    adapted.train()
    losses = train_steps(adapted, data, steps=steps, lr=lr)
    adapted.eval()
    return losses


class _ScaledByHooks:
    """The reference, by hand: the eager base model with each selected linear's output times ``s``."""

    def __init__(self, adapted: fxpeft.AdaptedModel):
        self.model = adapted.base_model
        self.scales = scales(adapted)

    def __call__(self, **data):
        handles = [self.model.get_submodule(path).register_forward_hook(lambda m, a, out, s=s: out * s)
                   for path, s in self.scales.items()]
        try:
            return self.model(**data)
        finally:
            for handle in handles:
                handle.remove()


# -- the proof -------------------------------------------------------------------------------------------------
def test_harness(scale_method):
    """Node counts per site, the zero adapter (s = 1) bit for bit, disable_adapters and adapter_names, the hooked
    eager reference, compiled once over two sizes, and a compiled training step."""
    roles = {"gate": 1, "scale": 5, tags.JOIN: 1}  # unsqueeze(gate); s - 1, times it, + 1, batch, reshape; y * factor
    check_pass(lambda: build_without_dropout("llama"), Scale(targets=TARGETS), inputs=[inputs(), inputs(3, 12, 2)],
               expected_nodes=per_site("fxpeft_test_scale", PATHS, roles), reference=_ScaledByHooks,
               compile_train=True)


def test_transform_train_save_load_merge(scale_method, tmp_path):
    data, labelled = inputs(), inputs(labels=True)
    base_out = logits(build_without_dropout("llama"), data)
    adapted = fxpeft.transform(build_without_dropout("llama"), [Scale(targets=TARGETS)], example_kwargs=labelled)
    base_weights = {name: p.detach().clone() for name, p in adapted.base_model.named_parameters()}
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"adapters.default.sites.{KIND}:{path.replace('.', '/')}.s" for path in PATHS}
    assert sorted(scales(adapted)) == sorted(PATHS)
    assert torch.equal(logits(adapted.eval(), data), base_out)

    # Training moves the scales and nothing else.
    losses = train(adapted, labelled)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(s, torch.ones_like(s)) for s in scales(adapted).values())
    for name, tensor in adapted.base_model.named_parameters():
        assert torch.equal(tensor, base_weights[name]), f"training wrote the base tensor {name}"
    trained = logits(adapted, data)
    assert not torch.allclose(trained, base_out, atol=1e-4)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, data), base_out)

    # Saved in its own format, through its codec; loaded into a fresh base through the same registry.
    adapted.save_adapter(tmp_path / "scale")
    config = json.loads((tmp_path / "scale" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE and config["target_modules"] == sorted(PATHS)
    assert sorted(load_file(str(tmp_path / "scale" / "adapter_model.safetensors"))) == \
        sorted(f"base_model.model.{path}.{KEY}" for path in PATHS)
    loaded = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "scale")
    assert [type(rule) for rule in loaded.adapters["default"].rules] == [Scale]
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False, PEFT's default
    assert torch.equal(logits(loaded.eval(), data), trained)
    resumed = fxpeft.load_adapter(build_without_dropout("llama"), tmp_path / "scale", is_trainable=True)
    assert {name for name, p in resumed.named_parameters() if p.requires_grad} == trainable
    for site in resumed.site_modules():  # in place, into an adapter of that name: no new graph
        site.reset_parameters()
    graph = resumed.programs()[0].graph_module
    resumed.load_adapter(tmp_path / "scale", "default", is_trainable=True)
    assert resumed.programs()[0].graph_module is graph
    assert torch.equal(logits(resumed.eval(), data), trained)

    # Merged: the base weights' rows times s, the graph as captured; unmerged: the base weights back.
    adapted.merge()
    merged = logits(adapted, data)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    changed = [name for name, tensor in adapted.base_model.named_parameters()
               if not torch.equal(tensor, base_weights[name])]
    assert sorted(changed) == sorted(f"{path}.weight" for path in PATHS)
    adapted.unmerge()
    for name, tensor in adapted.base_model.named_parameters():
        torch.testing.assert_close(tensor, base_weights[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits(adapted, data), trained, rtol=1e-5, atol=1e-5)
    unloaded = loaded.merge_and_unload()
    torch.testing.assert_close(logits(unloaded, data), trained, rtol=1e-5, atol=1e-5)


def test_several_adapters_and_rows(scale_method):
    """A second adapter of the method, switched and mixed per row without a new graph."""
    data = inputs(batch=3)
    adapted = fxpeft.transform(build_without_dropout("llama"), Scale(targets=TARGETS), example_kwargs=data).eval()
    adapted.add_adapter("other", Scale(targets=["o_proj"]))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for site in adapted.site_modules():
            site.s.copy_(1 + 0.2 * torch.randn(site.s.shape, generator=generator))
    base = logits(build_without_dropout("llama"), data)
    first = logits(adapted, data)
    adapted.set_adapter("other")
    second = logits(adapted, data)
    assert not torch.allclose(first, second, atol=1e-4)
    mixed = adapted(**data, adapter_names=["default", BASE, "other"]).logits.detach()
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], second[2], rtol=1e-5, atol=1e-6)
    assert len(adapted.programs()) == 1
    adapted.set_alpha(2.0)  # a method without alpha: a no-op, not an error
    assert torch.equal(logits(adapted, data), second)


@pytest.mark.parametrize("target", ["model", "folder"])
def test_verify(scale_method, tmp_path, target):
    """``fxpeft.verify`` on the plugin's adapter, in memory and as a folder: the graph minus the plugin's tagged
    nodes is the base graph, the base weights are untouched, disabling gives the base outputs, merging is close."""
    adapted = fxpeft.transform(build_without_dropout("llama"), Scale(targets=TARGETS))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for site in adapted.site_modules():
            site.s.copy_(1 + 0.1 * torch.randn(site.s.shape, generator=generator))
    if target == "folder":
        adapted.save_adapter(tmp_path / "scale")
    checked = adapted if target == "model" else tmp_path / "scale"
    report = fxpeft.verify(build_without_dropout("llama"), checked)
    assert report.ok, report.summary()
    if target == "folder":
        return
    # Against declared rules: the method says which sites a rule allows, and what a site holds beyond that.
    assert fxpeft.verify(build_without_dropout("llama"), checked, rules=[Scale(targets=TARGETS)]).ok
    narrow = fxpeft.verify(build_without_dropout("llama"), checked, rules=[Scale(targets=["q_proj"])])
    assert {finding.kind for finding in narrow.failures} == {"rules-violation"}, narrow.summary()
    assert sorted(finding.subject for finding in narrow.failures) == sorted(p for p in PATHS if "q_proj" not in p)


def test_merge_folds_adapters_at_one_site_in_the_order_the_graph_applies_them(scale_method):
    data = inputs()
    adapted = fxpeft.transform(build_without_dropout("llama"), Scale(targets=["q_proj"]), example_kwargs=data)
    adapted.add_adapter("lora", fxpeft.LoRA(targets=["q_proj"], r=2))
    adapted.set_adapter(["default", "lora"])
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    unmerged = logits(adapted.eval(), data)
    adapted.merge()
    merged = logits(adapted, data)
    adapted.unmerge()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_unregistered_method_is_unknown_again(scale_method):
    unregister_method(Scale)
    with pytest.raises(UnsupportedError, match="No method is registered for Scale"):
        fxpeft.transform(build_without_dropout("llama"), Scale(targets=TARGETS))
    register_method(scale_method)
    assert method_for(Scale) is scale_method
