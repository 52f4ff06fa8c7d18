"""One harness for every pass: :func:`check_pass` runs the checks every method owes (DESIGN.md, "Tests").

Given a way to build a fresh base model, the rules, and two or more inputs of different sizes, it transforms the
model through the public API and checks, in this order:

1. **node counts**: the nodes the rules inserted, read from their tags (``node.meta["fxpeft"]``: method, site,
   role), are exactly the ones the caller expects, per method and per site (and, for a pass that replaces base
   nodes instead of inserting tagged ones, such as Quantize, ``expected_ops`` counts ops over the whole graph);
2. **a zero adapter is the base model**: in its identity state (by default what ``reset_parameters`` gives:
   LoRA's ``B = 0``, a trained copy equal to its original, a scale of ones) the adapted model gives the eager base
   model's outputs bit for bit (``torch.equal``), in eval mode. A method that has no identity state (virtual
   tokens lengthen the sequence) says ``identity=False`` and must give a ``reference`` instead;
3. **gating** (for rules whose methods are ``gateable``): with adapters on, ``disable_adapters()`` gives the base
   outputs bit for bit, and ``adapter_names`` with ``"__base__"`` rows gives base rows bit for bit and adapted
   rows as the plain call does (``per_row=False``: a method that applies to a whole call, as trained copies do,
   must refuse a batch that mixes it with base rows, with a clear ``UnsupportedError``);
4. **eager parity with a reference**: ``reference(adapted)`` returns a callable (PEFT's model on identical
   weights, an eager model built by hand, ...) whose outputs must match within ``rtol``/``atol`` on every input;
5. **compile without recompiles**: ``torch.compile(adapted, backend=..., fullgraph=True, dynamic=True)`` matches
   eager on every input size with one graph and no graph break, also when adapters are disabled (the switch is
   a tensor: no recompile); ``compile_train`` adds a compiled training step (forward and backward) held against
   the eager one. Cheap backends only (``eager`` / ``aot_eager``): recompiles are dynamo's guards, the same for
   every backend.

Inputs are dicts of keyword arguments or tuples of positional ones; the compared tensor is ``.logits`` where the
output has one. Everything is seeded. Example::

    adapted = check_pass(lambda: build_without_dropout("llama"), [fxpeft.LoRA(targets=["q_proj"], r=4)],
                         inputs=[hf_inputs("llama", 2, 9), hf_inputs("llama", 3, 12)],
                         expected_nodes=per_site("lora", paths, LORA_ROLES), reference=peft_reference)
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxpeft
from fxpeft.errors import UnsupportedError
from fxpeft.methods import method_for

__all__ = ["check_pass", "tagged_nodes", "node_counts", "op_counts", "per_site", "call", "hooked_call", "output_tensor",
           "add_noise", "LORA_ROLES", "COPY_ROLES", "BASE"]

BASE = "__base__"  # an adapter_names entry: this row runs the base model

# The tagged nodes of one LoRA branch per eager call of its linear (float32 base, no dropout): the input in the
# gated rows only (gate != 0, the batch size, a reshape to [batch, -1], a mask column, a select, a view back), two
# linears, the per-row coefficient
# ``scaling * gate``, the rest of the gated scaling (the batch size, a reshape to [batch, -1], the coefficient as a
# column, rows times it, the rows whose gate is on, as a column, the selection of those rows, a view back) and the
# add.
LORA_ROLES = {"rows": 6, "lora_A": 1, "lora_B": 1, "row_scale": 1, "scale": 8, "join": 1}
# A trained copy of one base tensor: ``where(amax(gate) > 0, copy, base)``.
COPY_ROLES = {"gate": 2, "join": 1}

Inputs = Any  # a dict of keyword arguments, or a tuple of positional ones


# -- reading tags --------------------------------------------------------------------------------------------------
def _graph(adapted: fxpeft.AdaptedModel, training: bool = True) -> fx.Graph:
    program = adapted.programs()[0]
    return program.graph if training else program.module_for(False, program.device).graph


def tagged_nodes(adapted: fxpeft.AdaptedModel, training: bool = True) -> list[tuple[fx.Node, dict]]:
    """Every node the passes inserted in the first program's train graph (or its eval twin), with its tag."""
    return [(node, node.meta["fxpeft"]) for node in _graph(adapted, training).nodes if node.meta.get("fxpeft")]


def node_counts(adapted: fxpeft.AdaptedModel, training: bool = True) -> dict[tuple[str, str], dict]:
    """Per ``(method, site)``: ``{"roles": Counter(role), "ops": Counter(op)}`` of the inserted nodes."""
    counts: dict[tuple[str, str], dict] = {}
    for node, tag in tagged_nodes(adapted, training):
        entry = counts.setdefault((tag["method"], tag["site"]), {"roles": collections.Counter(),
                                                                 "ops": collections.Counter()})
        entry["roles"][tag.get("role")] += 1
        entry["ops"][node.target] += 1
    return counts


def op_counts(adapted: fxpeft.AdaptedModel, training: bool = True) -> collections.Counter:
    """How many nodes of each op the whole graph has, tagged or not."""
    return collections.Counter(node.target for node in _graph(adapted, training).nodes if node.op == "call_function")


def per_site(method: str, sites: Iterable[str], expected: Any, calls: Mapping[str, int] | None = None) -> dict:
    """``expected_nodes`` for one method: the same expectation at every site; a role mapping is multiplied by
    ``calls[site]`` (how many times the eager model calls that module; default once)."""
    result = {}
    for site in sites:
        times = (calls or {}).get(site, 1)
        if isinstance(expected, int):
            result[(method, site)] = expected * times
        else:
            result[(method, site)] = {key: count * times for key, count in expected.items()}
    return result


def _check_counts(adapted: fxpeft.AdaptedModel, expected: Mapping[tuple[str, str], Any],
                  expected_ops: Mapping[Any, int] | None) -> None:
    counts = node_counts(adapted)
    assert set(counts) == set(expected), (
        f"inserted nodes at (method, site) {sorted(set(counts) - set(expected))} not expected; expected but "
        f"missing {sorted(set(expected) - set(counts))}")
    for key, want in expected.items():
        have = counts[key]
        if isinstance(want, int):
            assert sum(have["roles"].values()) == want, f"{key}: {sum(have['roles'].values())} nodes, expected {want}"
        elif all(isinstance(name, str) or name is None for name in want):  # roles: exactly these
            assert have["roles"] == collections.Counter(want), f"{key}: roles {dict(have['roles'])}, expected {want}"
        else:  # ops: at least these, exactly as many of each
            got = {op: have["ops"][op] for op in want}
            assert got == dict(want), f"{key}: ops {got}, expected {dict(want)} (all: {dict(have['ops'])})"
    if expected_ops:
        ops = op_counts(adapted)
        got = {op: ops[op] for op in expected_ops}
        assert got == dict(expected_ops), f"graph ops {got}, expected {dict(expected_ops)}"


# -- calling ---------------------------------------------------------------------------------------------------
def hooked_call(model: nn.Module, hooks: Mapping[str, Callable], **inputs) -> Any:
    """``model(**inputs)`` with a forward hook on each module path of ``hooks`` (an eager reference: a formula written
    in the test, applied to the output of the layers an adapter changes), removed afterwards."""
    handles = [model.get_submodule(path).register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        return model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare: ``.logits`` of a transformers output, else the output itself."""
    return output.logits if hasattr(output, "logits") else output


def call(model: Callable, inputs: Inputs, **extra) -> torch.Tensor:
    """``model`` called with ``inputs`` (keyword dict or positional tuple); the tensor to compare."""
    out = model(**inputs, **extra) if isinstance(inputs, dict) else model(*inputs, **extra)
    return output_tensor(out)


def _batch(inputs: Inputs) -> int:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return next(v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0)


@torch.no_grad()
def add_noise(adapted: fxpeft.AdaptedModel, seed: int = 3, scale: float = 0.1) -> None:
    """The default non-identity state: seeded normal noise added to every adapter parameter."""
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted(adapted.adapters.named_parameters()):
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * scale
        parameter.add_(noise.to(parameter.device, parameter.dtype))


def _reset(adapted: fxpeft.AdaptedModel) -> None:
    for site in adapted.site_modules():
        site.reset_parameters()


@contextlib.contextmanager
def _mode(model: Any, training: bool):
    """``model`` in train/eval mode for the block (a plain callable is left alone)."""
    if not isinstance(model, nn.Module):
        yield
        return
    before = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(before)


# -- the checks ------------------------------------------------------------------------------------------------
def _check_identity(adapted: fxpeft.AdaptedModel, base: nn.Module, inputs: Inputs,
                    identity: bool | Callable) -> None:
    if identity is True:
        _reset(adapted)
    else:
        identity(adapted)
    with torch.no_grad(), _mode(base, False), _mode(adapted, False):
        got, want = call(adapted, inputs), call(base, inputs)
    assert torch.equal(got, want), \
        f"a zero adapter differs from the base model by {(got - want).abs().max().item():.3g} (expected bit for bit)"


def _check_gating(adapted: fxpeft.AdaptedModel, base: nn.Module, inputs: Inputs, per_row: bool) -> None:
    with torch.no_grad(), _mode(base, False), _mode(adapted, False):
        want = call(base, inputs)
        adapted_out = call(adapted, inputs)
        with adapted.disable_adapters():
            disabled = call(adapted, inputs)
        assert torch.equal(disabled, want), "disable_adapters() does not give the base outputs bit for bit"
        batch = _batch(inputs)
        rows = [BASE if i % 2 == 0 else adapted.active_adapter for i in range(batch)]
        if not per_row:  # the adapter applies to a whole call: a batch mixing it with base rows is refused
            with pytest.raises(UnsupportedError, match="apply to every row of a call"):
                call(adapted, inputs, adapter_names=rows)
            return
        mixed = call(adapted, inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == BASE:
            assert torch.equal(mixed[i], want[i]), f"adapter_names row {i} ({BASE}) is not the base row bit for bit"
        else:
            torch.testing.assert_close(mixed[i], adapted_out[i], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"adapter_names row {i} ({name}): {m}")


def _check_reference(adapted: fxpeft.AdaptedModel, reference: Callable, inputs: Sequence[Inputs], rtol: float,
                     atol: float, base_outputs: list[torch.Tensor] | None) -> None:
    model = reference(adapted)
    with torch.no_grad(), _mode(model, False), _mode(adapted, False):
        for index, item in enumerate(inputs):
            got, want = call(adapted, item), call(model, item)
            assert got.shape == want.shape, f"input {index}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"input {index}, against the reference: {m}")
            if base_outputs is not None and base_outputs[index].shape == got.shape:
                assert not torch.allclose(got, base_outputs[index], rtol=1e-3, atol=1e-4), \
                    f"input {index}: the non-identity adapter changed nothing"


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _check_compile(adapted: fxpeft.AdaptedModel, base: nn.Module, inputs: Sequence[Inputs], backend: str,
                   gateable: bool, rtol: float, atol: float) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(adapted, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad(), _mode(adapted, False):
        for index, item in enumerate(inputs):
            torch.testing.assert_close(call(compiled, item), call(adapted, item), rtol=rtol, atol=atol,
                                       msg=lambda m: f"input {index}, compiled against eager: {m}")
        if gateable:
            with adapted.disable_adapters(), _mode(base, False):
                torch.testing.assert_close(call(compiled, inputs[-1]), call(base, inputs[-1]), rtol=rtol, atol=atol,
                                           msg=lambda m: f"compiled with adapters disabled, against the base: {m}")
    graphs, breaks = _dynamo_counts()
    assert (graphs, breaks) == (1, 0), f"compiled {graphs} graph(s) with {breaks} graph break(s) over " \
        f"{len(inputs)} input sizes{' and a disabled call' if gateable else ''}; expected one graph, no break"


def _trainable(adapted: fxpeft.AdaptedModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in adapted.named_parameters() if p.requires_grad}


def _check_compile_train(adapted: fxpeft.AdaptedModel, inputs: Sequence[Inputs], backend: str, rtol: float,
                         atol: float) -> None:
    """A compiled forward and backward matches the eager one (outputs and adapter gradients), one graph."""
    from torch._dynamo.utils import counters

    adapted.train()
    trainable = _trainable(adapted)
    assert trainable, "nothing trains"
    for item in inputs:  # every signature is captured eagerly first (capture never happens under compile)
        call(adapted, item)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(adapted, backend=backend, fullgraph=True, dynamic=True)
    try:
        for index, item in enumerate(inputs):
            grads = []
            outputs = []
            for model in (adapted, compiled):
                adapted.zero_grad(set_to_none=True)
                torch.manual_seed(index)  # the same dropout masks, where the graph draws any
                out = call(model, item)
                out.float().square().mean().backward()
                outputs.append(out.detach())
                grads.append({name: p.grad.clone() for name, p in trainable.items() if p.grad is not None})
            torch.testing.assert_close(outputs[1], outputs[0], rtol=rtol, atol=atol,
                                       msg=lambda m: f"train input {index}, compiled against eager: {m}")
            assert grads[0] and grads[0].keys() == grads[1].keys(), "the compiled step reached other parameters"
            for name, grad in grads[0].items():
                torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"gradient of {name}, compiled against eager: {m}")
    finally:
        adapted.zero_grad(set_to_none=True)
        adapted.eval()
    graphs, breaks = _dynamo_counts()
    assert (graphs, breaks) == (1, 0), f"compiled training: {graphs} graph(s), {breaks} graph break(s)"


def check_pass(build: Callable[[], nn.Module], rules: fxpeft.Rule | Sequence[fxpeft.Rule], *,
               inputs: Sequence[Inputs], expected_nodes: Mapping[tuple[str, str], Any],
               expected_ops: Mapping[Any, int] | None = None, identity: bool | Callable = True,
               weights: Callable[[fxpeft.AdaptedModel], None] = add_noise,
               reference: Callable[[fxpeft.AdaptedModel], Callable] | None = None, rtol: float = 1e-5,
               atol: float = 1e-5, per_row: bool = True, compile: bool = True, backend: str = "eager",
               compile_train: bool = False, transform_options: Mapping[str, Any] | None = None) -> fxpeft.AdaptedModel:
    """Transform ``build()`` with ``rules`` and run the checks of the module docstring; returns the adapted model,
    in eval mode, holding the non-identity weights ``weights`` gave it.

    ``inputs``: two or more inputs of different batch/sequence sizes (none of size 1: dynamo specializes it), the
    first one giving the signature captured. ``expected_nodes``: ``{(method tag, site): expectation}`` for every
    site where nodes are inserted, the expectation being a node count, ``{role: count}`` (exact) or ``{op: count}``
    (those ops). ``expected_ops``: ``{op: count}`` over the whole graph. ``identity``: True (``reset_parameters`` is
    the identity state), a function putting the adapter in its identity state, or False (there is none; then
    ``reference`` is required). ``weights``: gives the adapter a non-identity state (default: seeded noise).
    ``reference(adapted)``: a callable to compare with, built after ``weights``. ``per_row``: False where a method
    gates per call rather than per row (a trained copy applies to the whole batch when any row uses its adapter:
    then ``"__base__"`` rows are not checked against the base). ``transform_options``: more
    keyword arguments for :func:`fxpeft.transform` (``example_inputs`` / ``example_kwargs`` default to the first
    input).
    """
    assert len(inputs) >= 2, "give two or more inputs of different sizes"
    assert identity is not False or reference is not None, \
        "a method without an identity state must be checked against a reference"
    rules = [rules] if isinstance(rules, fxpeft.Rule) else list(rules)
    options = dict(transform_options or {})
    first = inputs[0]
    options.setdefault("example_kwargs" if isinstance(first, dict) else "example_inputs", first)
    torch.manual_seed(0)
    adapted = fxpeft.transform(build(), rules, **options).eval()
    base = adapted.base_model  # the eager base, as the rules left it (Quantize changes it; the others never do)
    gateable = all(method_for(rule).gateable for rule in rules)

    _check_counts(adapted, expected_nodes, expected_ops)
    base_outputs = None
    if identity is not False:
        _check_identity(adapted, base, first, identity)
        with torch.no_grad(), _mode(base, False):
            base_outputs = [call(base, item) for item in inputs]
    weights(adapted)
    if gateable:
        _check_gating(adapted, base, first, per_row)
    if reference is not None:
        _check_reference(adapted, reference, inputs, rtol, atol, base_outputs)
    if compile:
        _check_compile(adapted, base, inputs, backend, gateable, rtol, atol)
    if compile_train:
        _check_compile_train(adapted, inputs, backend, rtol, atol)
    assert len(adapted.programs()) == 1, "a new input size made a new capture"
    return adapted.eval()
