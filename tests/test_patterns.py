"""Graph patterns (fxpeft/graph/patterns.py): each linear and attention form on small captured graphs.

Tests come in pairs, ``test_match_X`` / ``test_no_match_X`` (TVM's dataflow-pattern tests): a match says what
it found, a no-match says why, and the reason is asserted. Then the counters and the DEBUG log
(fxpeft/debug.py) that report matches and selections, and a property: every linear layer of a random small
model is found as exactly one site, in its form, with its sizes.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
import fxpeft.debug
from fxpeft.adapters import Adapter
from fxpeft.capture.export import capture
from fxpeft.errors import NoMatchError
from fxpeft.graph import patterns
from fxpeft.graph.patterns import LinearMatch, NoMatch, input_sources, match_attention, match_linear
from fxpeft.graph.sites import find_attention_ops, find_linear_sites
from fxpeft.ops.quantized import QUANTIZED_LINEAR
from fxpeft.rewrite import RewriteContext
from tests.models import AUTO_CLASS, CONFIGS, mlp

aten = torch.ops.aten


# -- helpers ---------------------------------------------------------------------------------------------------

def _capture(module: nn.Module, *shape: int):
    torch.manual_seed(0)
    return capture(module.eval(), {"x": torch.randn(*shape)})


def _nodes(program, *targets) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes if node.op == "call_function" and node.target in targets]


def _only(program, *targets) -> torch.fx.Node:
    found = _nodes(program, *targets)
    assert len(found) == 1, found
    return found[0]


def _linear(program, *targets):
    """The match (or no-match) of the one node calling one of ``targets``."""
    return match_linear(_only(program, *targets), input_sources(program))


class _Module(nn.Module):
    """A module whose forward is ``fn(self, x)``, with a [8, 16] weight ``w``, a [16, 8] ``w_in_out`` and a
    bias ``b`` of 8, as parameters."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(8, 16))
        self.w_in_out = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.register_buffer("frozen", torch.randn(8, 16))

    def forward(self, x):
        return self.fn(self, x)


def _hand(fn, *shape: int):
    return _capture(_Module(fn), *(shape or (2, 16)))


# -- linear: aten.linear ---------------------------------------------------------------------------------------

def test_match_linear():
    program = _capture(mlp(), 4, 16)
    match = match_linear(_nodes(program, aten.linear.default)[0], input_sources(program))
    assert isinstance(match, LinearMatch) and match.form.name == "linear"
    assert (match.path, match.weight_fqn, match.bias_fqn) == ("fc1", "fc1.weight", "fc1.bias")
    assert (match.in_features, match.out_features) == (16, 32)
    assert match.input.op == "placeholder"


def test_no_match_linear_computed_weight():
    program = _hand(lambda m, x: F.linear(x, m.w * 2.0))
    result = _linear(program, aten.linear.default)
    assert isinstance(result, NoMatch) and not result
    assert result.reason.startswith("second operand is not a 2-D parameter (it is mul, computed by aten.mul")


def test_no_match_linear_buffer_weight():
    result = _linear(_hand(lambda m, x: F.linear(x, m.frozen)), aten.linear.default)
    assert str(result) == "second operand is not a 2-D parameter (it is 2-D buffer frozen)"


# -- linear: addmm (transformers' Conv1D) -----------------------------------------------------------------------

def test_match_addmm(fresh_capture):
    model, program = fresh_capture("gpt2")
    sources = input_sources(program)
    matches = [match_linear(node, sources) for node in _nodes(program, aten.addmm.default)]
    assert all(matches) and {m.form.name for m in matches} == {"addmm"}
    first = matches[0]
    assert (first.path, first.in_features, first.out_features) == ("transformer.h.0.attn.c_attn", 64, 192)
    assert first.bias_fqn == "transformer.h.0.attn.c_attn.bias"
    assert first.input is first.node.args[1]  # addmm(b, x, W): x is the second argument
    assert find_linear_sites(program)["transformer.h.0.attn.c_attn"].input_of(first.node) is first.node.args[1]


def test_no_match_addmm_scaled():
    """``beta``/``alpha`` other than 1 make addmm something else than a linear."""
    result = _linear(_hand(lambda m, x: torch.addmm(m.b, x, m.w_in_out, beta=0.5)), aten.addmm.default)
    assert str(result) == "beta=0.5, not 1: not a plain linear"


def test_no_match_addmm_computed_weight():
    result = _linear(_hand(lambda m, x: torch.addmm(m.b, x, m.w.t())), aten.addmm.default)
    assert not result and str(result).startswith("third operand is not a 2-D parameter (it is t, computed by aten.t")


# -- linear: matmul / mm with a transposed weight (falcon, x @ W.T) --------------------------------------------

def test_match_matmul_falcon(fresh_capture):
    model, program = fresh_capture("falcon")
    sites = find_linear_sites(program)
    path = "transformer.h.0.self_attention.query_key_value"
    assert sites[path].form == "matmul"
    weight = model.get_submodule(path).weight
    assert (sites[path].in_features, sites[path].out_features) == (weight.shape[1], weight.shape[0])


@pytest.mark.parametrize("fn, op", [
    (lambda m, x: x @ m.w.T, aten.matmul.default),
    (lambda m, x: torch.matmul(x, m.w.transpose(0, 1)), aten.matmul.default),
    (lambda m, x: torch.mm(x, m.w.t()), aten.mm.default),
], ids=["numpy_T", "transpose", "mm"])
def test_match_matmul_transposed_parameter(fn, op):
    match = _linear(_hand(fn), op)
    assert match.form.name == "matmul" and (match.weight_fqn, match.in_features, match.out_features) == ("w", 16, 8)


def test_no_match_matmul_weight_not_transposed():
    result = _linear(_hand(lambda m, x: x @ m.w_in_out), aten.matmul.default)
    assert str(result) == "second operand is not a transposed 2-D parameter (it is 2-D parameter w_in_out)"


def test_no_match_matmul_of_activations():
    """Attention's ``q @ k^T`` is a matmul with a transposed operand, but not of a parameter."""
    result = _linear(_hand(lambda m, x: x @ (x * 2.0).transpose(-1, -2), 2, 4, 16), aten.matmul.default)
    assert str(result).startswith("second operand is not a transposed 2-D parameter (it is the transpose of mul")


# -- linear: fxpeft's quantized_linear op ------------------------------------------------------------------------

def test_match_quantized():
    """The op names its layer: path and sizes are arguments (bitsandbytes is not needed to capture the op)."""
    program = _hand(lambda m, x: torch.ops.fxpeft.quantized_linear(x, m.w, m.b, "model", "layers.3.fc", 16, 8))
    match = _linear(program, QUANTIZED_LINEAR)
    assert (match.form.name, match.path, match.in_features, match.out_features) == ("quantized", "layers.3.fc", 16, 8)
    assert (match.weight_fqn, match.bias_fqn) == ("w", "b")


def test_no_match_not_a_linear_op():
    program = _hand(lambda m, x: torch.relu(x))
    node = _only(program, aten.relu.default)
    assert patterns.linear_form_for(node) is None
    assert str(match_linear(node, input_sources(program))) == "aten.relu is not the op of a linear form"


# -- attention: scaled_dot_product_attention ------------------------------------------------------------------

def test_match_sdpa(fresh_capture):
    _, program = fresh_capture("llama")
    ops = find_attention_ops(program)
    assert [op.form for op in ops] == ["sdpa", "sdpa"]
    assert ops[0].path == "model.layers.0.self_attn"
    assert (ops[0].query, ops[0].key, ops[0].value) == tuple(ops[0].output.args[:3])


def test_no_match_sdpa_without_attention():
    program = _capture(mlp(), 4, 16)
    assert find_attention_ops(program) == []


# -- attention: the eager chain -----------------------------------------------------------------------------------

def _heads(x):
    return x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)


class _Eager(nn.Module):
    """Eager attention as transformers writes it, with the part between scores and mix given by ``fn``."""

    def __init__(self, fn=None):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
        self.fn = fn or (lambda scores, v: torch.softmax(scores / 4.0, dim=-1, dtype=torch.float32).to(v.dtype) @ v)

    def forward(self, x):
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        return self.fn(q @ k.transpose(-1, -2), v)


def _eager(fn=None):
    program = _capture(_Eager(fn), 2, 5, 16)
    return program, match_attention(_only(program, aten.softmax.int, aten._softmax.default))


def test_match_eager_matmul():
    program, op = _eager()
    assert op.form == "eager" and op.scores.target is aten.matmul.default and op.output.target is aten.matmul.default
    assert (op.query, op.key) == tuple(op.scores.args[:2]) and op.value is op.output.args[1]
    roles = {site.path: site for site in find_linear_sites(program).values()}
    assert set(roles) == {"q", "k", "v"}


def test_match_eager_baddbmm_bloom(fresh_capture):
    _, program = fresh_capture("bloom")
    ops = find_attention_ops(program)
    assert [(op.form, op.scores.target, op.output.target) for op in ops] == \
        [("eager", aten.baddbmm.default, aten.bmm.default)] * 2
    assert (ops[0].query, ops[0].key) == tuple(ops[0].scores.args[1:3])


def test_match_eager_llama_eager():
    torch.manual_seed(0)
    model = AUTO_CLASS["llama"].from_config(CONFIGS["llama"](), attn_implementation="eager").eval()
    ops = find_attention_ops(capture(model))
    assert [op.form for op in ops] == ["eager", "eager"] and ops[1].path == "model.layers.1.self_attn"


def test_no_match_eager_softmax_without_scores():
    program = _hand(lambda m, x: torch.softmax(F.linear(x, m.w), -1))
    result = match_attention(_only(program, aten.softmax.int, aten._softmax.default))
    assert str(result) == "no baddbmm/bmm/matmul reaches the softmax through casts, scaling and masking within 12 ops"


def test_no_match_eager_two_score_products():
    _, result = _eager(lambda scores, v: torch.softmax(scores + scores.transpose(-1, -2) @ scores, -1) @ v)
    assert str(result).startswith("2 score products reach the softmax (")


def test_no_match_eager_probabilities_used_twice():
    def fn(scores, v):
        probs = torch.softmax(scores, -1)
        return probs @ v + probs.sum()
    _, result = _eager(fn)
    assert str(result) == "softmax has 2 tensor users, not one chain to bmm/matmul"


def test_no_match_eager_probabilities_second():
    _, result = _eager(lambda scores, v: v.transpose(-1, -2) @ torch.softmax(scores, -1))
    assert str(result).startswith("the probabilities are not the first operand of matmul")


def test_no_match_eager_chain_broken():
    _, result = _eager(lambda scores, v: torch.relu(torch.softmax(scores, -1)) @ v)
    assert str(result) == "the probabilities reach relu (aten.relu) before a bmm/matmul with the values"


# -- views and casts --------------------------------------------------------------------------------------------

def test_match_through_views_and_casts():
    program = _hand(lambda m, x: torch.relu(x.view(2, 4, 4).float().reshape(2, 16).contiguous()))
    relu = _only(program, aten.relu.default)
    chain = patterns.view_chain(relu.args[0])
    assert chain[-1].op == "placeholder" and patterns.through_views(relu.args[0]) is chain[-1]
    assert all(node.target in patterns.VIEWS_AND_CASTS for node in chain[:-1]) and len(chain) >= 3


def test_no_match_through_views_stops_at_compute():
    program = _hand(lambda m, x: torch.relu((x * 2.0).view(2, 4, 4)))
    relu = _only(program, aten.relu.default)
    origin = patterns.through_views(relu.args[0])
    assert origin.target is aten.mul.Tensor
    assert patterns.through_views(3) == 3 and patterns.view_chain(relu) == [relu]


# -- counters ------------------------------------------------------------------------------------------------------

def test_counters_count_candidates_per_form(fresh_capture):
    _, program = fresh_capture("gpt2")
    with fxpeft.debug.counting() as counts:
        find_linear_sites(program)
        find_attention_ops(program)
    assert counts["linear_form", "addmm", "matched"] == 8
    assert counts["linear_form", "linear", "matched"] == 1  # the output head
    assert counts["attention_form", "sdpa", "matched"] == 2
    assert not any(key[2] == "rejected" for key in counts)


def test_counters_count_rejections():
    with fxpeft.debug.counting() as counts:
        find_linear_sites(_hand(lambda m, x: x @ m.w_in_out + x @ m.w.T))
    assert (counts["linear_form", "matmul", "matched"], counts["linear_form", "matmul", "rejected"]) == (1, 1)


def test_counters_api():
    fxpeft.debug.reset_counters()
    with fxpeft.debug.counting() as outer:
        fxpeft.debug.count("test", "x", "matched")
        with fxpeft.debug.counting() as inner:
            fxpeft.debug.count("test", "x", "matched", n=2)
    fxpeft.debug.count("test", "x", "matched")
    assert (outer["test", "x", "matched"], inner["test", "x", "matched"]) == (3, 2)
    snapshot = fxpeft.debug.counters()
    assert snapshot[("test", "x", "matched")] == 4
    snapshot[("test", "x", "matched")] = 0  # a copy
    assert fxpeft.debug.counters()[("test", "x", "matched")] == 4
    fxpeft.debug.reset_counters()
    assert fxpeft.debug.counters() == {}


def test_counters_selector():
    model = mlp()
    with fxpeft.debug.counting() as counts:
        fxpeft.transform(model, fxpeft.LoRA(targets=["fc1", "fc2"], exclude=["fc2"], r=2),
                         example_inputs=(torch.randn(4, 16),))
    assert (counts["selector", "LoRA", "selected"], counts["selector", "LoRA", "excluded"]) == (1, 1)
    program = _capture(mlp(), 4, 16)
    ctx = RewriteContext(program, mlp(), "probe", Adapter([]))
    with fxpeft.debug.counting() as counts, pytest.raises(NoMatchError):
        ctx.select_linear(fxpeft.LoRA(targets=["fc3"]))
    assert counts["selector", "LoRA", "failed"] == 1


# -- the DEBUG log -----------------------------------------------------------------------------------------------

def test_debug_log_reports_matches_and_selection(caplog):
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        fxpeft.transform(mlp(), fxpeft.LoRA(targets=["fc1", "*.nothing"], r=2), example_inputs=(torch.randn(4, 16),))
    lines = [record.getMessage() for record in caplog.records if record.name == "fxpeft"]
    assert "linear form linear: aten.linear at node linear (in fc1): yes: site fc1, weight fc1.weight [out, in], " \
           "16 -> 32" in lines
    assert "selector LoRA: targets ('fc1', '*.nothing') selected 1 of 2 linear(s) (exclude None removed 0): " \
           "fc1" in lines
    assert "selector LoRA: target 'fc1' (name) matches 1 linear(s): fc1" in lines
    assert "selector LoRA: target '*.nothing' (glob) matches 0 linear(s): nothing" in lines


def test_debug_log_reports_rejections(caplog):
    program = _hand(lambda m, x: x @ m.w_in_out)
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        find_linear_sites(program)
    assert [record.getMessage() for record in caplog.records if record.name == "fxpeft"] == [
        "linear form matmul: aten.matmul at node matmul (in <root>): no: second operand is not a transposed 2-D "
        "parameter (it is 2-D parameter w_in_out)"]


def test_no_debug_log_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="fxpeft"):
        find_linear_sites(_hand(lambda m, x: x @ m.w_in_out))
    assert not [record for record in caplog.records if record.name == "fxpeft"]


# -- property: every linear layer is one site ----------------------------------------------------------------------

class _TransposedLinear(nn.Module):
    """``x @ W.T`` with ``W`` stored [out, in], as falcon's FalconLinear computes it."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return x @ self.weight.T


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


_LAYERS = {  # kind -> (constructor, form in the graph)
    "linear": (lambda i, o: nn.Linear(i, o), "linear"),
    "linear-no-bias": (lambda i, o: nn.Linear(i, o, bias=False), "linear"),
    "conv1d": (lambda i, o: Conv1D(o, i), "addmm"),
    "transposed": (_TransposedLinear, "matmul"),
}

@settings(derandomize=True, database=None, max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
       kinds=st.lists(st.sampled_from(sorted(_LAYERS)), min_size=4, max_size=4))
def test_property_every_linear_is_one_site(widths, kinds):
    layers, expected = [], {}
    for index, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        build, form = _LAYERS[kinds[index]]
        expected[f"layers.{index}"] = (form, n_in, n_out)
        layers.append(build(n_in, n_out))
    program = _capture(_Stack(layers), 3, widths[0])
    sites = find_linear_sites(program)
    assert {path: (site.form, site.in_features, site.out_features) for path, site in sites.items()} == expected
    assert all(len(site.nodes) == 1 for site in sites.values())
