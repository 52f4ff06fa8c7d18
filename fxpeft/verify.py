"""Verification: an adapted model is its base model plus its declared adapters, and nothing else.

:func:`verify` compares a trained adapter (an :class:`~fxpeft.AdaptedModel` in memory, or an adapter folder
in PEFT's layout) with its base model and returns a :class:`Report`: a list of :class:`Finding` s, with
``report.ok``, ``report.summary()`` and ``report.to_json()``. ``fxpeft check BASE ADAPTER`` runs the same
check from the command line (:mod:`fxpeft.cli`)::

    report = fxpeft.verify(AutoModelForCausalLM.from_pretrained("base/"), "out/adapter")
    print(report.summary())
    assert report.ok, report.to_json()

The checks, and the kind of finding each reports (one line each)::

    adapter tensors   the adapter holds what its config declares, in shapes that fit the base
      not-adapter-key          a key that is no adapter tensor PEFT's layout knows
      undeclared-site          an adapter tensor, node or input at a site the config does not declare
      unknown-site             an adapter tensor for a module the base model does not have
      targets-unmatched        the config's target_modules select nothing in the base model
      adapter-key-missing      a tensor the config declares is not there
      adapter-shape-mismatch   a tensor's shape does not fit the base model (made for another base?)
      config-mismatch          the config disagrees with the tensors (r against lora_A's rows, ...)
      adapter-nonfinite        NaN or Inf in an adapter tensor
      rules-violation          the adapter holds something the declared rules (``--rules``) do not allow
    graph structure   the adapted graph minus its adapter nodes is the base graph, node for node
      extra-op                 an op that is neither the base model's nor an adapter's
      base-op-replaced         a base op computes something else
      base-op-missing          a base op has no counterpart
      base-op-rewired          a base op reads other values than in the base graph (its data flow changed)
      adapter-not-additive     an adapter's result reaches base ops other than as ``base value + update``
      adapter-misplaced        an adapter's update is added to another module's output than its site's
    base weights      every base tensor the adapted model reads hashes equal to the base model's
      base-weight-changed      a tensor's bytes (or shape) differ
      base-weight-missing      the adapted model reads a tensor the base model does not have
    behaviour         on probe inputs
      disabled-output-differs  adapters disabled, an output is not the base model's bit for bit
      merged-output-differs    merged, an output is farther from the unmerged one than the tolerance
      merge-failed             merge() or unmerge() raised
    skipped           (a note, never a failure) a check that could not run here, and why

**How the graphs are compared.** The base graph is a fresh capture of the base model (never the adapted
model's own copy of it), one per argument signature the adapted model was captured with. Each graph
becomes a :class:`GraphView`: dead code removed, adapter nodes taken out (nodes the passes tagged with
``node.meta["fxpeft"]`` and placeholders fed from adapters), and every base op that read an adapter's
``y + update`` reads ``y`` again. Then the views are matched by walking from the placeholders, which are
anchored by their source (parameter or buffer name, user input position): a node matches a base node
when op, target and non-node arguments are equal and its inputs matched, slot for slot. Duplicates are
taken in graph order. The walk is linear in the graph's size (a 7B llama's ~2,200 nodes take well under a
second), where a generic isomorphism search (VF2) has no such bound; the mapping it finds is confirmed
edge for edge on the two :mod:`networkx` DiGraphs. Nodes left over are reported at their roots: an extra
op, a replaced op or a missing op, naming the node and its module path; the nodes downstream that differ
only because they read a changed value are counted, not listed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Iterator

import networkx as nx
import torch
import torch.fx as fx

from fxpeft.adapters import Adapter, ParameterCopy
from fxpeft.capture.export import capture, forward_kwargs, is_hf_model
from fxpeft.errors import CaptureError, FxpeftError, NoMatchError, RuleError, UnsupportedError
from fxpeft.capture.example_inputs import hf_example_kwargs, widen_example
from fxpeft.formats.files import read_adapter
from fxpeft.formats.peft import rules_and_state
from fxpeft.methods import codec_for_rules, method_for, saved_rules
from fxpeft.model import AdaptedModel
from fxpeft.graph.program import InputSource, Program
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA, Rule, Trainable
from fxpeft.graph.sites import find_linear_sites, module_path_of
from fxpeft.api import transform

__all__ = ["verify", "Report", "Finding", "Check", "GraphView", "compare_views"]

ERROR, NOTE = "error", "note"
aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_[AB])\.weight$")
_PREFIX = "base_model.model."
# Kinds that mean the adapter's tensors cannot be put on this base at all: nothing further to compare.
_DOES_NOT_FIT = {"adapter-shape-mismatch", "unknown-site", "targets-unmatched", "config-mismatch"}
# (rtol, atol) for "merged outputs are close to unmerged ones": a few float roundings per layer.
_TOLERANCE = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
              torch.bfloat16: (5e-2, 1e-2)}


# -- the report ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing that does not hold (``severity="error"``) or a check that could not run (``"note"``).

    ``subject`` is the node, tensor or output concerned; ``module`` its module path where there is one;
    ``message`` a sentence a person understands; ``details`` numbers for machines (shapes, differences)."""

    kind: str
    subject: str
    message: str
    module: str = ""
    severity: str = ERROR
    details: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        # strict JSON has no NaN or Infinity: write them as strings
        details = {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
                   for key, value in self.details.items()}
        return {"kind": self.kind, "severity": self.severity, "subject": self.subject, "module": self.module,
                "message": self.message, "details": details}

    def __str__(self) -> str:
        where = f" ({self.module})" if self.module and self.module not in self.subject else ""
        return f"[{self.kind}] {self.subject}{where}: {self.message}"


@dataclasses.dataclass
class Check:
    """One of the checks: what it compared, whether it holds (``status``: ok, fail, skipped) and how long."""

    name: str
    status: str
    result: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report(Sequence):
    """The findings of :func:`verify` (a sequence of :class:`Finding`), and the checks that produced them."""

    base: str
    adapter: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)

    def __getitem__(self, index):
        return self.findings[index]

    def __len__(self) -> int:
        return len(self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error (notes about skipped checks do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == ERROR]

    def kinds(self) -> set[str]:
        """The kinds of the failing findings."""
        return {finding.kind for finding in self.failures}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "base": self.base, "adapter": self.adapter,
                "checks": [check.to_dict() for check in self.checks],
                "findings": [finding.to_dict() for finding in self.findings]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str, allow_nan=False)

    def summary(self, limit: int = 20) -> str:
        """A few lines: what was compared, what holds, what differs."""
        lines = [f"fxpeft check: base {self.base}", f"              adapter {self.adapter}"]
        width = max((len(check.name) for check in self.checks), default=0)
        for check in self.checks:
            status = {"ok": "ok", "fail": "FAIL", "skipped": "skipped"}[check.status]
            lines.append(f"  {status:<8} {check.name:<{width}}  {check.result} [{check.seconds:.1f}s]")
        errors, notes = self.failures, [f for f in self.findings if f.severity != ERROR]
        for title, group in (("differs", errors), ("notes", notes)):
            if group:
                lines.append(f"{title} ({len(group)}):")
                lines += [f"  {finding}" for finding in group[:limit]]
                if len(group) > limit:
                    lines.append(f"  ... and {len(group) - limit} more (--json lists them all)")
        if self.ok:
            lines.append("result: OK, the adapted model is the base model plus its declared adapters")
        else:
            counts = collections.Counter(finding.kind for finding in errors)
            lines.append("result: FAIL, " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        return "\n".join(lines)


# -- graph views --------------------------------------------------------------------------------------------
def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OperatorBase):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _constant(value: Any, refs: list[fx.Node]) -> Any:
    """``value`` with every node replaced by a slot marker (appended to ``refs``), as a comparable tuple."""
    if isinstance(value, fx.Node):
        refs.append(value)
        return ("$",)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_constant(item, refs) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple((str(key), _constant(value[key], refs)) for key in sorted(value, key=str)))
    if isinstance(value, slice):
        return ("slice", _constant((value.start, value.stop, value.step), refs))
    if isinstance(value, torch.device):
        return ("device",)  # placement is not structure (a model moved to cuda retargets its graph)
    if isinstance(value, torch.Tensor):
        return ("tensor", _digest(value))
    return (type(value).__name__, repr(value))


def _value_signature(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shape = ",".join(str(d) if isinstance(d, int) else "?" for d in value.shape)
        return f"{value.dtype}[{shape}]"
    return f"{type(value).__name__}:{value!r}"


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GraphView:
    """A graph as the structural check sees it: the live base nodes, with every adapter taken out.

    ``copy_of(source)`` names the base parameter an adapter-owned copy stands for (PEFT's
    ``modules_to_save``, trained biases), or None for other adapter inputs. Everything is read eagerly, so
    the view stays valid when the graph is rewritten afterwards. Attributes, per node name: ``local`` (op,
    target and non-node arguments), ``inputs`` (the node inputs, slot by slot), ``module`` and ``text``;
    ``tagged``/``adapter_inputs``/``copies`` describe the adapter nodes and inputs that were taken out, and
    ``issues`` lists adapter values that reach base ops other than additively.
    """

    def __init__(self, graph: fx.Graph, sources: Sequence[InputSource],
                 copy_of: Callable[[InputSource], str | None] | None = None):
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        source_of = dict(zip(placeholders, sources))
        copy_of = copy_of or (lambda source: None)
        adapter: set[fx.Node] = set()
        copies: dict[fx.Node, str] = {}
        self.tagged: list[tuple[str, dict, str]] = []      # (node, meta["fxpeft"], module path)
        self.adapter_inputs: list[tuple[str, InputSource]] = []
        self.copies: list[tuple[str, InputSource, str]] = []  # (node, source, base parameter it stands for)
        self.issues: list[Finding] = []
        for node in graph.nodes:
            if node.op == "placeholder":
                source = source_of.get(node)
                if source is not None and source.kind in ("adapter", "gate"):
                    fqn = copy_of(source) if source.kind == "adapter" else None
                    adapter.add(node)  # a copy is read through where(adapter on, copy, base): see _stands_for
                    if fqn is None:
                        self.adapter_inputs.append((node.name, source))
                    else:
                        copies[node] = fqn
                        self.copies.append((node.name, source, fqn))
            elif "fxpeft" in node.meta:
                adapter.add(node)
                self.tagged.append((node.name, dict(node.meta["fxpeft"]), module_path_of(node)))
        stands: dict[fx.Node, fx.Node | None] = {}
        for node in graph.nodes:
            if node in adapter:
                stands[node] = self._stands_for(node, adapter, stands)

        self.local: dict[str, str] = {}
        self.inputs: dict[str, tuple[str, ...]] = {}
        self.module: dict[str, str] = {}
        self.text: dict[str, str] = {}
        order = []
        users = 0
        for node in graph.nodes:
            if node in adapter:
                continue
            refs: list[fx.Node] = []
            if node.op == "placeholder":
                key = self._source_key(source_of.get(node), copies.get(node))
                if key == "user":  # user inputs are anchored by position
                    key, users = f"user {users}", users + 1
                local = f"placeholder|{key}|{_value_signature(node.meta.get('val'))}"
            else:
                const = _constant((node.args, node.kwargs), refs)
                local = f"{node.op}|{_target_name(node.target)}|{const!r}"
                if node.op == "get_attr":
                    owned = getattr(graph.owning_module, str(node.target), None) if graph.owning_module else None
                    local += f"|{owned.code if isinstance(owned, fx.GraphModule) else type(owned).__name__}"
            inputs = []
            for ref in refs:
                if ref not in adapter:
                    inputs.append(ref.name)
                    continue
                base = stands.get(ref)
                if base is None:
                    self.issues.append(Finding(
                        "adapter-not-additive", node.name,
                        f"the base op {_short(self._describe(node))} reads the adapter node {ref.name}, which is not "
                        "a base value plus an adapter's update, so the adapter changes the base computation itself.",
                        module_path_of(node)))
                    inputs.append(f"<adapter {ref.name}>")
                    continue
                have, want = ref.meta.get("val"), base.meta.get("val")
                if isinstance(have, torch.Tensor) and isinstance(want, torch.Tensor) and \
                        (have.dtype != want.dtype or have.dim() != want.dim()):
                    self.issues.append(Finding(
                        "adapter-not-additive", ref.name,
                        f"the adapter's result {ref.name} stands where {base.name} stood but is {have.dtype} with "
                        f"{have.dim()} dims instead of {want.dtype} with {want.dim()}.", module_path_of(ref)))
                inputs.append(base.name)
            order.append(node)
            self.local[node.name] = local
            self.inputs[node.name] = tuple(inputs)
            self.module[node.name] = module_path_of(node)
            self.text[node.name] = self._describe(node)
        live = self._live(graph)
        self.names: list[str] = [node.name for node in order if node in live]
        self.graph = nx.DiGraph()
        for name in self.names:
            self.graph.add_node(name, local=self.local[name])
        for name in self.names:
            for slot, source in enumerate(self.inputs[name]):
                if source in self.graph:
                    if self.graph.has_edge(source, name):
                        self.graph[source][name]["slots"] += (slot,)
                    else:
                        self.graph.add_edge(source, name, slots=(slot,))

    @staticmethod
    def _stands_for(node: fx.Node, adapter: set[fx.Node], stands: dict) -> fx.Node | None:
        """The base node an adapter node stands for: ``y`` for ``y + update`` (and casts of it), the base
        tensor for ``where(on, copy, base)`` (trained copies), else None."""
        if node.op != "call_function":
            return None
        args = node.args
        if node.target is aten.where.self and node.meta.get("fxpeft", {}).get("method") == "copy":
            base = args[2]  # where(adapter on, adapter's copy, base tensor): stands for the base tensor
            return base if base not in adapter else stands.get(base)
        if node.target is aten.add.Tensor and not node.kwargs and len(args) == 2 and \
                all(isinstance(arg, fx.Node) for arg in args):
            based = [arg for arg in args if arg not in adapter or stands.get(arg) is not None]
            updates = [arg for arg in args if arg in adapter and stands.get(arg) is None]
            if len(based) == 1 and len(updates) == 1:
                return based[0] if based[0] not in adapter else stands[based[0]]
        if node.target in _CASTS and args and isinstance(args[0], fx.Node) and args[0] in adapter:
            return stands.get(args[0])
        return None

    @staticmethod
    def _source_key(source: InputSource | None, copy_fqn: str | None) -> str:
        if copy_fqn is not None:
            return f"parameter:{copy_fqn}"
        if source is None:
            return "unknown"
        return f"{source.kind}:{source.target}" if source.kind != "user" else "user"

    @staticmethod
    def _describe(node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"input {node.name}"
        if node.op == "output":
            return "the graph's output"
        args = ", ".join([repr(arg) if not isinstance(arg, fx.Node) else arg.name for arg in node.args]
                         + [f"{key}={value!r}" for key, value in node.kwargs.items()])
        return f"{node.name} = {_target_name(node.target)}({_short(args, 70)})"

    @staticmethod
    def _live(graph: fx.Graph) -> set[fx.Node]:
        """Nodes the output or a side effect depends on, through base and adapter nodes alike (what
        ``eliminate_dead_code`` keeps): a base value only an adapter reads is still computed."""
        live = {node for node in graph.nodes if node.op == "output" or node.is_impure()}
        stack = list(live)
        while stack:
            for source in stack.pop().all_input_nodes:
                if source not in live:
                    live.add(source)
                    stack.append(source)
        return live


@dataclasses.dataclass
class Comparison:
    """How ``other`` (adapted, minus adapters) corresponds to ``base``: a node mapping and what is left over."""

    mapping: dict[str, str]
    extra: list[str]
    missing: list[str]
    replaced: list[tuple[str, str]]  # (other node, base node): another op on the same inputs
    rewired: list[tuple[str, str]]   # (other node, base node): the same op on other inputs
    downstream: int                  # nodes that differ only because they read a changed value
    isomorphic: bool


def compare_views(base: GraphView, other: GraphView) -> Comparison:
    """Match ``other`` onto ``base`` node for node (see the module docstring); O(nodes + edges)."""
    index: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in base.names:
        index[(base.local[name], base.inputs[name])].append(name)
    mapping: dict[str, str] = {}
    for name in other.names:
        mapped = tuple(mapping.get(source) for source in other.inputs[name])
        if None in mapped:
            continue
        bucket = index.get((other.local[name], mapped))
        if bucket:
            mapping[name] = bucket.popleft()
    matched = set(mapping.values())
    unmatched_other = [name for name in other.names if name not in mapping]
    unmatched_base = [name for name in base.names if name not in matched]

    # Same op at the same module path, but reading a changed value: a consequence, not a cause.
    similar: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in unmatched_base:
        similar[(base.local[name], base.module[name])].append(name)
    paired: dict[str, str] = {}
    for name in unmatched_other:
        bucket = similar.get((other.local[name], other.module[name]))
        if bucket and not other.local[name].startswith("placeholder"):
            paired[name] = bucket.popleft()
    full = {**mapping, **paired}
    # A pair whose inputs all correspond, but to other nodes than the base op's: the data flow changed here.
    rewired = []
    for name, base_name in paired.items():
        inputs = tuple(full.get(source) for source in other.inputs[name])
        if None not in inputs and inputs != base.inputs[base_name]:
            rewired.append((name, base_name))
    left_base = [name for name in unmatched_base if name not in set(paired.values())]
    by_inputs: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for name in left_base:
        if not base.local[name].startswith("placeholder"):
            by_inputs[base.inputs[name]].append(name)
    replaced = []
    for name in unmatched_other:
        if name in paired or other.local[name].startswith("placeholder"):
            continue
        bucket = by_inputs.get(tuple(full.get(source, "?") for source in other.inputs[name]))
        if bucket:
            replaced.append((name, bucket.popleft()))
    replaced_other = {pair[0] for pair in replaced}
    replaced_base = {pair[1] for pair in replaced}
    extra = [name for name in unmatched_other if name not in paired and name not in replaced_other]
    missing = [name for name in left_base if name not in replaced_base]
    isomorphic = not unmatched_other and not unmatched_base
    if isomorphic:  # confirm on the networkx graphs: every edge, with its argument slots, maps onto one
        relabeled = nx.relabel_nodes(other.graph, mapping)
        isomorphic = (relabeled.number_of_edges() == base.graph.number_of_edges() and all(
            base.graph.has_edge(u, v) and base.graph[u][v]["slots"] == data["slots"]
            for u, v, data in relabeled.edges(data=True)))
    return Comparison(mapping, extra, missing, replaced, rewired, len(paired) - len(rewired), isomorphic)


# -- tensors ------------------------------------------------------------------------------------------------
def _digest(tensor: torch.Tensor) -> str:
    """blake2b of a tensor's dtype, shape and bytes."""
    value = tensor.detach()
    hasher = hashlib.blake2b(f"{value.dtype}|{tuple(value.shape)}|".encode(), digest_size=20)
    if value.numel():
        flat = value.cpu().contiguous().reshape(-1)
        hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


def _named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix or "output", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _named_tensors(item, f"{prefix}[{i}]")


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return float((a != b).sum())
    return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max()) if a.numel() else 0.0


def _describe_model(model: torch.nn.Module) -> str:
    where = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{type(model).__name__}" + (f" ({where})" if where else "")


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _signature_key(kwargs: dict[str, Any]) -> tuple:
    items = []
    for name, value in sorted(widen_example({k: v for k, v in kwargs.items() if v is not None}).items()):
        items.append((name, tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor)
                     else (name, repr(value)))
    return tuple(items)


def _hint(dim: Any) -> int:
    if isinstance(dim, int):
        return dim
    hint = getattr(getattr(dim, "node", None), "hint", None)
    return int(hint) if hint is not None else 2


def _kwargs_like(program: Program, model: torch.nn.Module) -> dict[str, Any] | None:
    """Concrete inputs of the shapes and dtypes ``program`` was captured with (None for nested inputs)."""
    users = [node for node, source in zip(program.placeholders(), program.sources) if source.kind == "user"]
    if len(users) != len(program.kwarg_names):
        return None
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size",
                                                            None) or 2
    device = _device_of(model)
    generator = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {}
    for name, node in zip(program.kwarg_names, users):
        if name in program.fixed_kwargs:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            kwargs[name] = value
            continue
        shape = [_hint(dim) for dim in value.shape]
        if value.dtype == torch.bool or (not value.is_floating_point() and "mask" in name):
            tensor = torch.ones(shape, dtype=value.dtype)
        elif value.is_floating_point():
            tensor = torch.randn(shape, generator=generator).to(value.dtype)
        else:
            tensor = torch.randint(0, vocab, shape, generator=generator).to(value.dtype)
        kwargs[name] = tensor.to(device)
    return kwargs


def _signature_text(program: Program) -> str:
    return "(" + ", ".join(name for name in program.kwarg_names if name not in program.fixed_kwargs) + ")"


# -- the verifier -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Declared:
    """One adapter as declared: its config, the rules read from it, its tensors, and the reference adapter
    those rules give on a fresh capture of the base (declared sites and the keys and shapes they need)."""

    config: dict | None
    rules: list[Rule]
    state: dict[str, torch.Tensor]
    reference: Adapter | None = None


class _Verifier:
    def __init__(self, base_model: torch.nn.Module, example_kwargs: dict[str, Any] | None,
                 policy: list[tuple[Rule, set[str]]] | None):
        self.base_model = base_model
        self.example_kwargs = example_kwargs
        self.policy = policy
        self.findings: list[Finding] = []
        self.checks: list[Check] = []
        self._captures: dict[tuple, tuple[Program, GraphView]] = {}
        self._context: RewriteContext | None = None
        self.capture_seconds = 0.0

    # -- bookkeeping ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def check(self, name: str):
        """Run one check. The block sets ``state["compared"]`` (what it compared) and ``state["holds"]`` (what
        holds when no finding is added); the findings added inside the block count for this check."""
        start, before = time.perf_counter(), len(self.findings)
        state = {"compared": "", "holds": "", "skipped": False}
        yield state
        failed = collections.Counter(f.kind for f in self.findings[before:] if f.severity == ERROR)
        outcome = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items())) if failed else state["holds"]
        status = "fail" if failed else "skipped" if state["skipped"] else "ok"
        self.checks.append(Check(name, status, f"{state['compared']}: {outcome}", time.perf_counter() - start))

    def add(self, kind: str, subject: str, message: str, module: str = "", **details) -> None:
        self.findings.append(Finding(kind, subject, message, module, ERROR, details))

    def note(self, subject: str, message: str) -> None:
        self.findings.append(Finding("skipped", subject, message, severity=NOTE))

    def skip(self, name: str, why: str) -> None:
        self.note(name, why)
        self.checks.append(Check(name, "skipped", why))

    # -- fresh captures of the base ---------------------------------------------------------------------
    def fresh(self, kwargs: dict[str, Any]) -> tuple[Program, GraphView]:
        """A fresh capture of the base model for this signature, and its view (taken before any rewrite)."""
        key = _signature_key(kwargs)
        if key not in self._captures:
            start = time.perf_counter()
            program = capture(self.base_model, kwargs)
            self.capture_seconds += time.perf_counter() - start
            program.graph.eliminate_dead_code()  # as finish_rewrite does to every adapted graph
            view = GraphView(program.graph, program.sources)
            self._captures[key] = (program, view)
        return self._captures[key]

    def default_kwargs(self) -> dict[str, Any]:
        if self.example_kwargs is not None:
            return dict(self.example_kwargs)
        if is_hf_model(self.base_model):
            return hf_example_kwargs(self.base_model, _device_of(self.base_model))
        raise CaptureError(f"{type(self.base_model).__name__} is not a transformers model, so fxpeft cannot build "
                           "probe inputs for it: pass them, e.g. fxpeft.verify(model, adapter, "
                           "example_inputs=(torch.randn(4, 16),)).")

    def build_references(self, program: Program, declared: dict[str, _Declared]) -> None:
        """Apply each adapter's declared rules to a fresh capture (its view is taken already): the sites
        they select and the adapter tensors they need, as fxpeft's own passes would make them. The rules
        of ``--rules`` are resolved first, on the graph as captured."""
        context = self._context = RewriteContext(program, self.base_model, "__rules__", Adapter([]))
        if self.policy is not None:
            self._allowed = self._select_policy(context)
        for name, item in declared.items():
            adapter = Adapter(list(item.rules))
            context = context.for_adapter(name, adapter)
            try:
                for rule in adapter.rules:
                    context.apply(rule)
            except NoMatchError as error:
                self.add("targets-unmatched", name, f"the adapter's config selects nothing in this base model: {error}",
                         candidates=error.candidates)
                continue
            item.reference = adapter

    def _select_policy(self, context: RewriteContext) -> tuple[dict, list[str], set[str]]:
        allowed_lora: dict[str, tuple[LoRA, set[str]]] = {}
        allowed_modules: list[str] = []
        bias_modes = set()
        for rule, given in self.policy:
            if isinstance(rule, LoRA):
                for site in context.select_linear(rule):
                    allowed_lora.setdefault(site.path, (rule, given))
                if "bias" in given:
                    bias_modes.add(rule.bias)
            elif isinstance(rule, Trainable):
                allowed_modules += context.select_modules(rule)
            else:
                raise RuleError(f"rules: {type(rule).__name__} rules cannot be checked yet; use lora and trainable "
                                "rules.")
        return allowed_lora, allowed_modules, bias_modes

    # -- adapter tensors ----------------------------------------------------------------------------------
    def check_tensors(self, name: str, item: _Declared) -> None:
        prefix = f"adapter {name!r}: " if name != "default" else ""
        expected = item.reference.peft_keys() if item.reference is not None else {}
        linear = self._context.linear_sites if self._context is not None else {}
        parameters = dict(self.base_model.named_parameters())
        rank_of = {module.path: module.r for module in (item.reference.site_modules() if item.reference else ())
                   if hasattr(module, "r")}
        for key in sorted(item.state):
            tensor = item.state[key]
            if item.reference is not None and key not in expected:
                self._unexpected_key(prefix, key, tensor, linear, parameters)
            elif key in expected and tuple(tensor.shape) != tuple(expected[key]):
                self._wrong_shape(prefix, key, tuple(tensor.shape), tuple(expected[key]), linear, rank_of)
            if tensor.device.type != "meta" and (tensor.is_floating_point() or tensor.is_complex()):
                nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                if nan or inf:
                    self.add("adapter-nonfinite", key, f"{prefix}{nan} NaN and {inf} Inf of {tensor.numel()} values; "
                             "the adapter would turn the model's outputs into NaN.", nan=nan, inf=inf)
        for key in sorted(set(expected) - set(item.state)):
            self.add("adapter-key-missing", key, f"{prefix}the config declares this tensor (shape "
                     f"{list(expected[key])}) but the adapter does not have it.", expected=list(expected[key]))
        sites = collections.defaultdict(dict)
        for key, tensor in item.state.items():
            match = _LORA_KEY.match(key)
            if match and tensor.dim() == 2:
                sites[match["path"]][match["which"]] = tensor.shape
        for path, pair in sorted(sites.items()):
            if len(pair) == 2 and pair["lora_A"][0] != pair["lora_B"][1]:
                self.add("config-mismatch", f"{_PREFIX}{path}", f"{prefix}lora_A has {pair['lora_A'][0]} rows but "
                         f"lora_B has {pair['lora_B'][1]} columns; both must be the rank r.", path)

    def _unexpected_key(self, prefix, key, tensor, linear, parameters) -> None:
        match = _LORA_KEY.match(key)
        shape = list(tensor.shape)
        if match and match["path"] in linear:
            self.add("undeclared-site", key, f"{prefix}a LoRA tensor for {match['path']}, which the adapter's config "
                     "does not declare (not in target_modules); a loader would ignore or refuse it.",
                     match["path"], shape=shape)
        elif match:
            self.add("unknown-site", key, f"{prefix}a LoRA tensor for {match['path']}, which is not a linear module of "
                     "this base model: was the adapter made for another base?", match["path"], shape=shape)
        elif key.startswith(_PREFIX) and key[len(_PREFIX):].replace(".base_layer.", ".") in parameters:
            fqn = key[len(_PREFIX):].replace(".base_layer.", ".")
            self.add("undeclared-site", key, f"{prefix}a full copy of the base tensor {fqn} (PEFT's layout for "
                     "modules_to_save and trained biases), which the config does not declare; loading it would "
                     "replace the base weight.", fqn.rpartition(".")[0], shape=shape)
        elif key.startswith(_PREFIX) and ".lora_" not in key and key[len(_PREFIX):].rpartition(".")[2] in (
                "weight", "bias"):
            self.add("unknown-site", key, f"{prefix}names a tensor this base model does not have: was the adapter "
                     "made for another base?", shape=shape)
        else:
            self.add("not-adapter-key", key, f"{prefix}not an adapter tensor in PEFT's layout for this config "
                     f"(expected {_PREFIX}<module>.lora_A.weight / lora_B.weight, modules_to_save or bias copies).",
                     shape=shape)

    def _wrong_shape(self, prefix, key, have, want, linear, rank_of) -> None:
        match = _LORA_KEY.match(key)
        if match and len(have) == 2 and len(want) == 2:
            rank_axis, base_axis = (0, 1) if match["which"] == "lora_A" else (1, 0)
            site = linear.get(match["path"])
            base_text = f"{match['path']} is a linear {site.in_features} -> {site.out_features}" if site else ""
            if have[base_axis] == want[base_axis] and have[rank_axis] != want[rank_axis]:
                self.add("config-mismatch", key, f"{prefix}the config says r={rank_of.get(match['path'], want[rank_axis])}"
                         f" but this tensor has rank {have[rank_axis]} (shape {list(have)}).", match["path"],
                         shape=list(have), expected=list(want))
                return
            self.add("adapter-shape-mismatch", key, f"{prefix}shape {list(have)} does not fit the base model, which "
                     f"needs {list(want)} ({base_text}): the adapter was made for another base model.",
                     match["path"], shape=list(have), expected=list(want))
            return
        self.add("adapter-shape-mismatch", key, f"{prefix}shape {list(have)} does not fit the base model, which needs "
                 f"{list(want)}: the adapter was made for another base model.", shape=list(have), expected=list(want))

    # -- declared rules (--rules) -------------------------------------------------------------------------
    def check_policy(self, declared: dict[str, _Declared]) -> None:
        allowed_lora, allowed_modules, bias_modes = self._allowed
        for name, item in declared.items():
            if item.reference is None:
                continue
            trainable = [path for rule, paths in item.reference.selected.items() if isinstance(rule, Trainable)
                         for path in paths]
            declared_lora = {path: rule for rule, paths in item.reference.selected.items() if isinstance(rule, LoRA)
                             for path in paths}
            for module in item.reference.site_modules():
                if isinstance(module, ParameterCopy):
                    if any(module.path.startswith(path + ".") for path in trainable):
                        if not any(module.path.startswith(path + ".") for path in allowed_modules):
                            self.add("rules-violation", module.path, "the adapter trains a copy of this base tensor "
                                     "(modules_to_save), which no trainable rule allows.", module.path.rpartition(".")[0])
                    else:
                        bias = next((rule.bias for rule in declared_lora.values()), "none")
                        if bias not in bias_modes:
                            self.add("rules-violation", module.path, f"the adapter trains this bias (bias={bias!r}), "
                                     "which the rules do not allow (give a lora rule with that bias).",
                                     module.path.rpartition(".")[0])
                    continue
                if not hasattr(module, "r"):
                    continue
                path = module.path
                if path not in allowed_lora:
                    self.add("rules-violation", path, "the adapter puts LoRA on this module, which no rule allows.", path)
                    continue
                rule, given = allowed_lora[path]
                tensor = item.state.get(f"{_PREFIX}{path}.lora_A.weight")
                rank = int(tensor.shape[0]) if tensor is not None and tensor.dim() == 2 else module.r
                if rank > rule.r:
                    self.add("rules-violation", path, f"LoRA rank {rank} exceeds the rules' r={rule.r}.", path,
                             rank=rank, allowed=rule.r)
                mine = declared_lora.get(path)
                for field in ("alpha", "dropout", "use_rslora", "init", "bias"):
                    if mine is not None and field in given and getattr(mine, field) != getattr(rule, field):
                        self.add("rules-violation", path, f"the adapter has {field}={getattr(mine, field)!r}; the "
                                 f"rules say {field}={getattr(rule, field)!r}.", path)

    # -- graph structure ----------------------------------------------------------------------------------
    def check_graphs(self, adapted: AdaptedModel, declared: dict[str, _Declared]) -> tuple[str, str]:
        allowed = {name: {module.path for module in item.reference.site_modules()}
                   for name, item in declared.items() if item.reference is not None}
        keys = {name: set(item.reference.sites.keys()) for name, item in declared.items() if item.reference is not None}
        nodes = adapter_nodes = downstream = 0
        signatures = []
        for program in adapted.programs():
            kwargs = _kwargs_like(program, self.base_model)
            if kwargs is None:
                self.note(_signature_text(program), "this signature has nested inputs; its graph was not compared.")
                continue
            _, base_view = self.fresh(kwargs)
            signatures.append(_signature_text(program))
            label = f"adapted graph {_signature_text(program)}"
            view = GraphView(program.graph, program.sources, self._copy_resolver(adapted))
            self.findings += view.issues
            self._check_declared(view, allowed, keys, label)
            self._check_joins(program, view)
            result = compare_views(base_view, view)
            self._report_comparison(base_view, view, result, label)
            nodes += len(base_view.names)
            adapter_nodes += len(view.tagged) + len(view.adapter_inputs)
            downstream += result.downstream
            pristine = GraphView(program.pristine.graph, program.pristine_sources)
            merged = compare_views(base_view, pristine)
            self._report_comparison(base_view, pristine, merged, f"merged graph {_signature_text(program)}")
            if pristine.tagged or pristine.adapter_inputs:
                self.add("extra-op", pristine.tagged[0][0] if pristine.tagged else pristine.adapter_inputs[0][0],
                         "the graph a merged model runs still has adapter nodes.")
            downstream += merged.downstream
        sites = {(tag.get("adapter"), tag.get("site")) for _, tag, _ in self._all_tags(adapted)}
        compared = (f"{nodes} nodes of the fresh base graph with the adapted graph of {len(signatures)} signature(s) "
                    f"{', '.join(signatures)} and with the graph a merged model runs")
        holds = (f"both correspond node for node; the {adapter_nodes} adapter nodes and inputs taken out are all at the "
                 f"{len(sites)} declared site(s) and add to their base values")
        if downstream:
            compared += f" ({downstream} more nodes differ only downstream of the findings)"
        return compared, holds

    @staticmethod
    def _all_tags(adapted: AdaptedModel):
        for program in adapted.programs():
            for node in program.graph.nodes:
                if "fxpeft" in node.meta:
                    yield node.name, node.meta["fxpeft"], module_path_of(node)

    @staticmethod
    def _copy_resolver(adapted: AdaptedModel) -> Callable[[InputSource], str | None]:
        def copy_of(source: InputSource) -> str | None:
            try:
                name, key, _ = source.target
                module = adapted.adapters[name].sites[key]
            except (KeyError, TypeError, ValueError):
                return None
            return module.path if isinstance(module, ParameterCopy) else None

        return copy_of

    def _check_declared(self, view: GraphView, allowed: dict[str, set[str]], keys: dict[str, set[str]],
                        label: str) -> None:
        reported = set()
        for node, tag, module in view.tagged:
            adapter, site = tag.get("adapter"), tag.get("site")
            if site in allowed.get(adapter, ()) or (adapter, site) in reported:
                continue
            reported.add((adapter, site))
            count = sum(1 for _, other, _ in view.tagged if (other.get("adapter"), other.get("site")) == (adapter, site))
            self.add("undeclared-site", node, f"{count} {tag.get('method', 'adapter')} node(s) of adapter {adapter!r} "
                     f"at {site} in the {label}, a site its config does not declare.", site or module)
        for node, source in view.adapter_inputs + [(node, source) for node, source, _ in view.copies]:
            if source.kind == "gate":
                if source.target not in allowed:
                    self.add("undeclared-site", node, f"a gate input for adapter {source.target!r}, which has no config.")
                continue
            adapter, key, _ = source.target
            if key not in keys.get(adapter, ()) and (adapter, key) not in reported:
                reported.add((adapter, key))
                self.add("undeclared-site", node, f"the {label} reads {key!r} of adapter {adapter!r}, a site its "
                         "config does not declare.", key.partition(":")[2].replace("/", "."))

    def _check_joins(self, program: Program, view: GraphView) -> None:
        """An adapter's ``y + update`` must add to the output of the module the adapter is tagged with: the
        linear site computing ``y`` (found from its weight), or the module export recorded for ``y``."""
        site_of = {node.name: site.path for site in find_linear_sites(program).values() for node in site.nodes}
        nodes = {node.name: node for node in program.graph.nodes}
        reported = set()
        for name, tag, _ in view.tagged:
            node = nodes[name]
            if tag.get("method") != "lora" or node.target is not aten.add.Tensor:
                continue
            operands = [arg for arg in node.args if isinstance(arg, fx.Node) and "fxpeft" not in arg.meta]
            if len(operands) != 1:
                continue  # a second adapter's update, added to the first one's result
            base, site = operands[0], tag.get("site")
            if site in (site_of.get(base.name), module_path_of(base)) or site in reported:
                continue
            reported.add(site)
            self.add("adapter-misplaced", name, f"the LoRA update tagged for {site} is added to {base.name}, the "
                     f"output of {site_of.get(base.name) or module_path_of(base) or 'no module'}.", site or "")

    def _report_comparison(self, base: GraphView, other: GraphView, result: Comparison, label: str) -> None:
        def where(view: GraphView, name: str) -> str:
            if view.module.get(name):
                return view.module[name]
            near = next((view.module[source] for source in view.inputs.get(name, ()) if view.module.get(source)), "")
            return f"near {near}" if near else ""

        for name in result.extra:
            users = [user for user in other.names if name in other.inputs[user]][:2]
            feeds = f"; it feeds {', '.join(users)}" if users else ""
            self.add("extra-op", name, f"the {label} computes {_short(other.text[name])}, which is neither in the base "
                     f"graph nor an adapter node{feeds}.", where(other, name), graph=label)
        for name, base_name in result.replaced:
            self.add("base-op-replaced", name, f"the base graph's {_short(base.text[base_name])} is "
                     f"{_short(other.text[name])} in the {label}.", where(other, name) or where(base, base_name),
                     graph=label, base_node=base_name)
        for name, base_name in result.rewired:
            self.add("base-op-rewired", name, f"the base graph's {_short(base.text[base_name])} reads other values in "
                     f"the {label}: {_short(other.text[name])}.", where(other, name) or where(base, base_name),
                     graph=label, base_node=base_name, inputs=list(other.inputs[name]),
                     base_inputs=list(base.inputs[base_name]))
        for name in result.missing:
            self.add("base-op-missing", name, f"the base graph's {_short(base.text[name])} has no counterpart in the "
                     f"{label}.", where(base, name), graph=label)

    # -- base weights ---------------------------------------------------------------------------------------
    def check_weights(self, adapted: AdaptedModel) -> tuple[str, str]:
        used: dict[str, str] = {}
        for program in adapted.programs():
            for source in (*program.sources, *program.pristine_sources):
                if source.kind in ("parameter", "buffer"):
                    used[source.target] = source.kind
        same_object = adapted.base_model is self.base_model
        digests: dict[tuple, str] = {}

        def digest(tensor: torch.Tensor) -> str:
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            if key not in digests:
                digests[key] = _digest(tensor)
            return digests[key]

        compared = on_meta = 0
        for fqn, kind in sorted(used.items()):
            getter = "get_parameter" if kind == "parameter" else "get_buffer"
            try:
                mine = getattr(adapted.base_model, getter)(fqn)
            except AttributeError:
                continue
            try:
                theirs = getattr(self.base_model, getter)(fqn)
            except AttributeError:
                self.add("base-weight-missing", fqn, f"the adapted model reads the {kind} {fqn}, which the base model "
                         "does not have.", fqn.rpartition(".")[0])
                continue
            if mine.device.type == "meta" or theirs.device.type == "meta":
                on_meta += 1
                continue
            compared += 1
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                self.add("base-weight-changed", fqn, f"the adapted model's {kind} is {mine.dtype}{list(mine.shape)}, the "
                         f"base model's {theirs.dtype}{list(theirs.shape)}.", fqn.rpartition(".")[0])
            elif digest(mine) != digest(theirs):
                difference = _max_difference(mine.detach().cpu(), theirs.detach().cpu())
                changed = int((mine.detach().cpu() != theirs.detach().cpu()).sum())
                self.add("base-weight-changed", fqn, f"the adapted model's {kind} differs from the base model's in "
                         f"{changed} of {mine.numel()} values (max |difference| {difference:.3g}); fxpeft never writes "
                         "base weights, so something else did.", fqn.rpartition(".")[0], max_abs_diff=difference,
                         changed=changed)
        for program in adapted.programs():
            kwargs = _kwargs_like(program, self.base_model)
            if kwargs is None:
                continue
            fresh, _ = self.fresh(kwargs)
            for name, tensor in program.constants.items():
                other = fresh.constants.get(name)
                if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                    continue
                compared += 1
                if not isinstance(other, torch.Tensor) or _digest(tensor) != _digest(other):
                    self.add("base-weight-changed", name, "this constant of the adapted graph differs from the one a "
                             "fresh capture of the base model holds.")
        if on_meta:
            self.note("base weights", f"{on_meta} tensors are on the meta device (no values); not hashed.")
        if not compared:
            return "no tensors with values", "nothing to compare"
        if same_object and compared:
            self.note("base weights", "the adapted model's base is the base model object itself, so its weights were "
                      "compared with themselves; pass a freshly loaded base model to compare.")
        return (f"{compared} tensors the adapted graphs read (parameters, buffers, constants)",
                "all hash equal to the base model's (blake2b of their bytes)")

    # -- behaviour -------------------------------------------------------------------------------------------
    def probes(self, adapted: AdaptedModel) -> dict[str, Any]:
        if self.example_kwargs is not None or is_hf_model(self.base_model):
            return self.default_kwargs()
        return _kwargs_like(adapted.programs()[0], self.base_model) or {}

    @torch.no_grad()
    def check_behaviour(self, adapted: AdaptedModel) -> tuple[str, str]:
        probes = self.probes(adapted)
        fixed = adapted.programs()[0].fixed_kwargs
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in probes.items() if isinstance(v, torch.Tensor))
        modes = (self.base_model.training, adapted.training)
        self.base_model.eval()
        adapted.eval()
        try:
            reference = dict(_named_tensors(self.base_model(**probes, **fixed)))
            with adapted.disable_adapters():
                disabled = dict(_named_tensors(adapted(**probes)))
            copy_of = self._copy_resolver(adapted)
            copied = sorted({copy_of(source) for program in adapted.programs() for source in program.sources
                             if source.kind == "adapter" and copy_of(source)})
            copies = (f"; the graph reads trained copies of {copied[:3]}{'...' if len(copied) > 3 else ''} in place of "
                      "the base tensors, and disabling adapters does not switch them back") if copied else ""
            for name, want in reference.items():
                have = disabled.get(name)
                if have is None or have.shape != want.shape or not torch.equal(have, want):
                    difference = _max_difference(have, want) if have is not None else float("inf")
                    self.add("disabled-output-differs", name, f"with adapters disabled, the model's {name} is not the "
                             f"base model's bit for bit (max |difference| {difference:.3g}){copies}.",
                             max_abs_diff=difference)
            holds = f"adapters disabled, {len(reference)} output(s) equal the base model's bit for bit"
            return f"outputs on probe inputs {shapes}", holds + "; " + self._check_merged(adapted, probes)
        finally:
            self.base_model.train(modes[0])
            adapted.train(modes[1])

    def _check_merged(self, adapted: AdaptedModel, probes: dict[str, Any]) -> str:
        enabled = dict(_named_tensors(adapted(**probes)))
        snapshot = {}
        for module in adapted.site_modules():
            try:
                snapshot[module.path] = adapted.base_model.get_parameter(module.path)
            except AttributeError:
                try:
                    owner = adapted.base_model.get_submodule(module.path)
                except AttributeError:
                    continue
                for name, parameter in owner.named_parameters(recurse=False):
                    snapshot[f"{module.path}.{name}"] = parameter
        saved = {fqn: parameter.detach().clone() for fqn, parameter in snapshot.items()}
        try:
            adapted.merge()
        except NotImplementedError as error:  # UnsupportedError too: this adapter cannot merge (yet)
            self._restore(snapshot, saved)
            self.note("merged", f"the adapted model cannot merge this adapter ({error}); merged outputs were not "
                      "compared.")
            return "merge not supported for this adapter"
        except Exception as error:  # merge() is the adapted model's own code: report whatever it raised
            self._restore(snapshot, saved)
            self.add("merge-failed", "merge()", f"merge() raised {type(error).__name__}: {error}")
            return "merge failed"
        try:
            merged = dict(_named_tensors(adapted(**probes)))
        finally:
            try:
                adapted.unmerge()
            except Exception as error:
                self.add("merge-failed", "unmerge()", f"unmerge() raised {type(error).__name__}: {error}")
            drift = self._restore(snapshot, saved)
        worst, tolerance_text = 0.0, ""
        for name, want in enabled.items():
            have = merged.get(name)
            if not want.is_floating_point():
                continue
            rtol, atol = _TOLERANCE.get(want.dtype, (1e-4, 1e-5))
            tolerance = atol + rtol * float(want.detach().abs().max()) if want.numel() else atol
            difference = _max_difference(have, want) if have is not None else float("inf")
            worst = max(worst, difference)
            tolerance_text = f"{tolerance:.2g}"
            if difference > tolerance:
                self.add("merged-output-differs", name, f"merged, the model's {name} differs from the unmerged one's by "
                         f"up to {difference:.3g}, more than the tolerance {tolerance:.3g}.",
                         max_abs_diff=difference, tolerance=tolerance)
        return (f"merged, they are within {worst:.2g} of the unmerged outputs (tolerance {tolerance_text}); unmerge "
                f"left the weights within {drift:.2g} of their values (restored exactly)")

    @staticmethod
    def _restore(snapshot: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> float:
        drift = 0.0
        with torch.no_grad():
            for fqn, parameter in snapshot.items():
                drift = max(drift, _max_difference(parameter.detach(), saved[fqn]))
                parameter.copy_(saved[fqn])
        return drift


# -- the entry point ----------------------------------------------------------------------------------------
def _policy(rules: Sequence[Rule | dict] | None) -> list[tuple[Rule, set[str]]] | None:
    """Rules with the fields they state: a dict states its keys; a Rule the fields that differ from defaults."""
    if rules is None:
        return None
    policy = []
    for entry in rules:
        if isinstance(entry, dict):
            policy.append((Rule.from_dict(entry), set(entry) - {"method"}))
        elif isinstance(entry, Rule):
            default = type(entry)(targets=entry.targets)
            policy.append((entry, {f.name for f in dataclasses.fields(entry)
                                   if getattr(entry, f.name) != getattr(default, f.name)}))
        else:
            raise RuleError(f"rules: expected fxpeft rules or their dicts, got {entry!r}.")
    return policy


def _example_kwargs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return forward_kwargs(model, args, {})


def _declared_from_model(adapted: AdaptedModel) -> dict[str, _Declared]:
    declared = {}
    for name, adapter in adapted.adapters.items():
        state = {key: value.detach() for key, value in adapter.peft_state_dict().items()}
        try:
            codec = codec_for_rules(adapter.rules)
            config = codec.to_config(adapted.base_model, saved_rules(adapter.rules), adapter.selected, adapter)
            rules = codec.to_rules(config, set(state))
        except UnsupportedError:
            config, rules = None, list(adapter.rules)
        declared[name] = _Declared(config, rules, state)
    return declared


def verify(base_model: torch.nn.Module, adapted_or_adapter_dir: AdaptedModel | str | Path,
           example_inputs: Any = None, *, rules: Sequence[Rule | dict] | None = None) -> Report:
    """Check that an adapted model is ``base_model`` plus its declared adapters, and nothing else.

    ``adapted_or_adapter_dir`` is an :class:`~fxpeft.AdaptedModel` (say, right after training) or an adapter
    folder in PEFT's layout (it is put on a copy of ``base_model``; ``base_model`` itself is never changed).
    ``example_inputs`` (positional inputs, or a dict of keyword inputs) are the probe inputs; transformers
    models get them from their config. ``rules`` (fxpeft rules or their dicts) declare what the adapter may
    contain. Raises :class:`fxpeft.errors.AdapterLoadError` for a folder that cannot be read, and the other
    :mod:`fxpeft.errors` when the check cannot run; everything that does not hold is a finding.

    Example::

        report = fxpeft.verify(AutoModelForCausalLM.from_pretrained("base/"), "out/adapter")
        print(report.summary())          # what was compared, what holds, what differs
        if not report.ok:
            raise SystemExit(report.to_json())
    """
    verifier = _Verifier(base_model, _example_kwargs(base_model, example_inputs), _policy(rules))
    device = _device_of(base_model)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        if isinstance(adapted_or_adapter_dir, AdaptedModel):
            description = f"AdaptedModel with adapter(s) {list(adapted_or_adapter_dir.adapters)} on " \
                          f"{_describe_model(adapted_or_adapter_dir.base_model)}"
            _verify_model(verifier, adapted_or_adapter_dir)
        elif isinstance(adapted_or_adapter_dir, (str, Path)):
            description = f"adapter folder {adapted_or_adapter_dir}"
            _verify_folder(verifier, Path(adapted_or_adapter_dir))
        else:
            raise TypeError(f"verify() takes an AdaptedModel or an adapter folder, got "
                            f"{type(adapted_or_adapter_dir).__name__}.")
    if verifier._captures:
        verifier.checks.insert(0, Check("fresh capture", "ok", f"{len(verifier._captures)} signature(s) of the base "
                                        "model captured anew with torch.export", verifier.capture_seconds))
    return Report(_describe_model(base_model), description, verifier.findings, verifier.checks)


def _common_checks(verifier: _Verifier, adapted: AdaptedModel, declared: dict[str, _Declared],
                   behaviour: str | None) -> None:
    with verifier.check("graph structure") as state:
        state["compared"], state["holds"] = verifier.check_graphs(adapted, declared)
    with verifier.check("base weights") as state:
        state["compared"], state["holds"] = verifier.check_weights(adapted)
        state["skipped"] = state["holds"] == "nothing to compare"
    on_meta = _device_of(verifier.base_model).type == "meta" or _device_of(adapted.base_model).type == "meta"
    if on_meta:
        verifier.skip("behaviour", "the model is on the meta device (no values to run)")
    elif behaviour is not None:
        verifier.skip("behaviour", behaviour)
    else:
        with verifier.check("behaviour") as state:
            state["compared"], state["holds"] = verifier.check_behaviour(adapted)


def _check_declared_tensors(verifier: _Verifier, declared: dict[str, _Declared]) -> bool:
    """The adapter tensors and the declared rules; returns whether the adapter fits the base model."""
    with verifier.check("adapter tensors") as state:
        for name, item in declared.items():
            verifier.check_tensors(name, item)
        keys = sum(len(item.state) for item in declared.values())
        sites = sum(len(item.reference.sites) for item in declared.values() if item.reference is not None)
        state["compared"] = f"{keys} tensors against the config and the base model"
        on_meta = any(t.device.type == "meta" for item in declared.values() for t in item.state.values())
        state["holds"] = f"only adapter keys, at the {sites} declared site(s); shapes fit the base and the config; " + \
            ("values not checked (meta device)" if on_meta else "all finite")
    if verifier.policy is not None:
        with verifier.check("rules") as state:
            verifier.check_policy(declared)
            state["compared"] = f"the adapter's sites and ranks against {len(verifier.policy)} declared rule(s)"
            state["holds"] = "everything the adapter holds is allowed"
    return not any(finding.kind in _DOES_NOT_FIT for finding in verifier.findings)


def _verify_folder(verifier: _Verifier, directory: Path) -> None:
    config, state = read_adapter(directory)
    rules, state = rules_and_state(config, state)
    declared = {"default": _Declared(config, rules, state)}
    kwargs = verifier.default_kwargs()
    program, _ = verifier.fresh(kwargs)
    verifier.build_references(program, declared)
    fits = _check_declared_tensors(verifier, declared)
    if not fits:
        for name in ("graph structure", "base weights", "behaviour"):
            verifier.skip(name, "the adapter does not fit this base model")
        return
    adapted = transform(copy.deepcopy(verifier.base_model), declared["default"].rules, example_kwargs=kwargs)
    adapter = adapted.adapters["default"]
    expected = adapter.peft_keys()
    fitting = {key: value for key, value in state.items()
               if key in expected and tuple(value.shape) == tuple(expected[key])}
    for site in adapter.site_modules():
        site.load_peft_state_dict(fitting)
    bad_file = any(finding.severity == ERROR for finding in verifier.findings)
    _common_checks(verifier, adapted, declared,
                   "the adapter failed the checks above; outputs were not compared" if bad_file else None)


def _verify_model(verifier: _Verifier, adapted: AdaptedModel) -> None:
    if getattr(adapted, "_merged", None):
        raise FxpeftError(f"The adapted model has adapters {adapted._merged} merged into its base weights, so they "
                          "are not the base model's; call adapted.unmerge() before checking it.")
    declared = _declared_from_model(adapted)
    kwargs = _kwargs_like(adapted.programs()[0], verifier.base_model)
    if kwargs is None:
        kwargs = verifier.default_kwargs()
    program, _ = verifier.fresh(kwargs)
    for other in adapted.programs()[1:]:  # every signature the model was captured with, captured afresh
        other_kwargs = _kwargs_like(other, verifier.base_model)
        if other_kwargs is not None:
            verifier.fresh(other_kwargs)
    verifier.build_references(program, declared)
    _check_declared_tensors(verifier, declared)
    nonfinite = any(finding.kind == "adapter-nonfinite" for finding in verifier.findings)
    _common_checks(verifier, adapted, declared,
                   "the adapter has NaN or Inf values; outputs were not compared" if nonfinite else None)
