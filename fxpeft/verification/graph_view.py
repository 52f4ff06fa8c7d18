"""A graph as the structural check sees it: its live base nodes, with every adapter taken out.

Adapter nodes are the ones a pass tagged (:mod:`fxpeft.graph.tags`) and the placeholders fed from adapters.
Where a base op read an adapter's result, the view reads the base value that result stands for: a ``join``
node (where an adapter's result rejoins the base data flow: LoRA's ``y + delta``, a trained copy's
``where(on, copy, base)``, a scale's ``y * s``) stands for its one operand that is a base value or stands for
one, when every other operand is computed by adapters; an ``output`` node, or any cast of an adapter value,
stands for what its input stands for. A base op that reads any other adapter node is a finding.

Virtual tokens (prompt tuning, P-tuning, prefix tuning) make the sequence ``n`` tokens longer, so the base ops read
lengthened values: sequence inputs with ``n`` positions in front, token embeddings with the virtual rows spliced
in, keys and values with the prefix in front, and the sizes and shape machinery (positions, masks) recomputed for
``n`` more positions. Each node that hands such a value to a base op stands for the base value it lengthens, by its
role (:data:`VIRTUAL_ROLES`; the roles of :mod:`fxpeft.graph.tokens` and passes/prefix.py); a ``shift`` node that
reads shifted values is a copy of a base op recomputed for ``n`` more positions, kept in the view and matched as
the base op it copies. So the view of a virtual-token graph is the base graph, node for node, when the rewrite only
lengthened the sequence.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx

from fxpeft.adapters import ParameterCopy
from fxpeft.graph import tags
from fxpeft.graph.patterns import CAST_OPS
from fxpeft.graph.program import InputSource
from fxpeft.graph.sites import module_path_of
from fxpeft.verification.report import Finding
from fxpeft.verification.values import digest, short

__all__ = ["GraphView", "VIRTUAL_ROLES", "copy_resolver", "is_shift_copy", "target_name"]

# Role of a virtual-token node -> what it stands for (the module docstring): "operand", as a join, its one operand
# that is (or stands for) a base value while its others stand for none; "first", what its first argument is or
# stands for. ``extend``: cat(full, x) and its per-row gather, the input x n tokens longer; ``check``: x, checked
# against the position table; ``splice``/``embeddings``: the token embeddings with the virtual rows in; ``mask``:
# cat(ones, mask); ``shift``: a size s + n (copies of base ops are kept); ``unshift``: a copy sliced back to the s
# real positions; ``key``/``value``: cat(prefix, k).
VIRTUAL_ROLES = {"extend": "operand", "embeddings": "operand", "mask": "operand", "key": "operand", "value": "operand",
                 "check": "first", "splice": "first", "shift": "first", "unshift": "first"}
_SHIFT = "shift"


def target_name(target: Any) -> str:
    """An op's name as messages and comparisons write it (``aten.add.Tensor``)."""
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
        return ("tensor", digest(value))
    return (type(value).__name__, repr(value))


def _value_signature(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shape = ",".join(str(d) if isinstance(d, int) else "?" for d in value.shape)
        return f"{value.dtype}[{shape}]"
    return f"{type(value).__name__}:{value!r}"


def _stands_for(node: fx.Node, adapter: set[fx.Node], stands: dict, join_targets: Mapping[str, Collection] | None
                ) -> fx.Node | None:
    """The base node an adapter node stands for (see the module docstring), or None."""
    if node.op != "call_function":
        return None
    tag = tags.tag_of(node) or {}
    if tag.get("role") == tags.JOIN:
        expected = join_targets.get(tag.get("method")) if join_targets is not None else None
        if expected is not None and node.target not in expected:
            return None  # another op than the one the method joins with, as its declared rules build it
        operand = _join_operand(node, adapter, stands)
        return operand if operand is None or operand not in adapter else stands[operand]
    first = next((arg for arg in node.args if isinstance(arg, fx.Node)), None)
    virtual = VIRTUAL_ROLES.get(tag.get("role"))
    if virtual == "operand":
        operand = _join_operand(node, adapter, stands)
        return operand if operand is None or operand not in adapter else stands[operand]
    if virtual == "first" and first is not None:
        return stands.get(first) if first in adapter else first
    if (tag.get("role") == tags.OUTPUT or node.target in CAST_OPS) and first in adapter:
        return stands.get(first)
    return None


def _computes(node: fx.Node, adapter: set[fx.Node], stands: dict) -> tuple | None:
    """What a call ``node`` computes, as a key: its op, its non-node arguments and the base values it reads (through
    what adapter nodes stand for); None for other nodes and where an input stands for no base value."""
    if node.op != "call_function":
        return None
    refs: list[fx.Node] = []
    const = _constant((node.args, node.kwargs), refs)
    inputs = tuple(stands.get(ref) if ref in adapter else ref for ref in refs)
    return None if None in inputs else (target_name(node.target), repr(const), inputs)


def is_shift_copy(node: fx.Node) -> bool:
    """Whether ``node`` is a base op recomputed for a sequence ``n`` tokens longer (a ``shift`` node that reads
    other adapter nodes; the ``s + n`` sizes read base nodes only)."""
    return tags.role_of(node) == _SHIFT and any(tags.is_adapter_node(arg) for arg in node.all_input_nodes)


def _join_operand(node: fx.Node, adapter: set[fx.Node], stands: dict) -> fx.Node | None:
    """The one operand of a join that is a base value or stands for one, when all its others are adapter values."""
    operands = node.all_input_nodes
    based = [arg for arg in operands if arg not in adapter or stands.get(arg) is not None]
    return based[0] if len(based) == 1 and len(operands) > 1 else None


def _source_key(source: InputSource | None, copy_fqn: str | None) -> str:
    if copy_fqn is not None:
        return f"parameter:{copy_fqn}"
    if source is None:
        return "unknown"
    return f"{source.kind}:{source.target}" if source.kind != "user" else "user"


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "the graph's output"
    args = ", ".join([repr(arg) if not isinstance(arg, fx.Node) else arg.name for arg in node.args]
                     + [f"{key}={value!r}" for key, value in node.kwargs.items()])
    return f"{node.name} = {target_name(node.target)}({short(args, 70)})"


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


def copy_resolver(adapted) -> Callable[[InputSource], str | None]:
    """For an :class:`~fxpeft.AdaptedModel`: the base parameter an adapter input is a trained copy of, or None."""
    def copy_of(source: InputSource) -> str | None:
        try:
            name, key, _ = source.target
            module = adapted.adapters[name].sites[key]
        except (KeyError, TypeError, ValueError):
            return None
        return module.path if isinstance(module, ParameterCopy) else None

    return copy_of


class GraphView:
    """A graph as the structural check sees it: the live base nodes, with every adapter taken out.

    ``copy_of(source)`` names the base parameter an adapter-owned copy stands for (PEFT's
    ``modules_to_save``, trained biases), or None for other adapter inputs. ``join_targets`` maps a method's tag
    to the ops its joins are (as its declared rules build them): a join of that method with another op stands
    for nothing. Everything is read eagerly, so the view stays valid when the graph is rewritten afterwards.
    Attributes, per node name: ``local`` (op, target and non-node arguments), ``inputs`` (the node inputs, slot
    by slot), ``module`` and ``text``; ``tagged``/``adapter_inputs``/``copies`` describe the adapter nodes and
    inputs that were taken out, ``joins`` the join nodes with the operand each stands on, and ``issues`` lists
    adapter values that reach base ops other than as a join.
    """

    def __init__(self, graph: fx.Graph, sources: Sequence[InputSource],
                 copy_of: Callable[[InputSource], str | None] | None = None,
                 join_targets: Mapping[str, Collection] | None = None):
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        source_of = dict(zip(placeholders, sources))
        copy_of = copy_of or (lambda source: None)
        adapter: set[fx.Node] = set()
        shift_copies: set[fx.Node] = set()
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
                    adapter.add(node)  # a copy is read through its join, where(adapter on, copy, base)
                    if fqn is None:
                        self.adapter_inputs.append((node.name, source))
                    else:
                        copies[node] = fqn
                        self.copies.append((node.name, source, fqn))
            elif tags.is_adapter_node(node):
                if is_shift_copy(node):
                    shift_copies.add(node)
                else:
                    adapter.add(node)
                self.tagged.append((node.name, dict(tags.tag_of(node)), module_path_of(node)))
        stands: dict[fx.Node, fx.Node | None] = {}
        self.joins: list[tuple[str, str, bool]] = []  # (join node, its base operand, whether that is a base node)
        for node in graph.nodes:
            if node in adapter:
                stands[node] = _stands_for(node, adapter, stands, join_targets)
                operand = _join_operand(node, adapter, stands) if tags.role_of(node) == tags.JOIN else None
                if operand is not None:
                    self.joins.append((node.name, operand.name, operand not in adapter))
            elif node in shift_copies:  # right after the base op it copies, if that op is still there (say a size
                original = node.prev  # read off the lengthened mask): then it stands for that op
                computes = _computes(node, adapter, stands)
                if original not in adapter and original not in shift_copies and computes is not None and \
                        _computes(original, adapter, stands) == computes:
                    adapter.add(node)
                    stands[node] = original

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
                key = _source_key(source_of.get(node), copies.get(node))
                if key == "user":  # user inputs are anchored by position
                    key, users = f"user {users}", users + 1
                local = f"placeholder|{key}|{_value_signature(node.meta.get('val'))}"
            else:
                const = _constant((node.args, node.kwargs), refs)
                local = f"{node.op}|{target_name(node.target)}|{const!r}"
                if node.op == "get_attr":
                    owned = getattr(graph.owning_module, str(node.target), None) if graph.owning_module else None
                    local += f"|{owned.code if isinstance(owned, fx.GraphModule) else type(owned).__name__}"
            order.append(node)
            self.local[node.name] = local
            self.inputs[node.name] = tuple(self._input(node, ref, adapter, stands) for ref in refs)
            self.module[node.name] = module_path_of(node)
            self.text[node.name] = _describe(node)
        live = _live(graph)
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

    def _input(self, node: fx.Node, ref: fx.Node, adapter: set[fx.Node], stands: dict) -> str:
        """The name of what base node ``node`` reads in one slot: ``ref``, or the base value it stands for."""
        if ref not in adapter:
            return ref.name
        base = stands.get(ref)
        if base is None:
            self.issues.append(Finding(
                "adapter-not-additive", node.name,
                f"the base op {short(_describe(node))} reads the adapter node {ref.name}, which is not "
                "a base value plus an adapter's update, so the adapter changes the base computation itself.",
                module_path_of(node)))
            return f"<adapter {ref.name}>"
        have, want = ref.meta.get("val"), base.meta.get("val")
        if isinstance(have, torch.Tensor) and isinstance(want, torch.Tensor) and \
                (have.dtype != want.dtype or have.dim() != want.dim()):
            self.issues.append(Finding(
                "adapter-not-additive", ref.name,
                f"the adapter's result {ref.name} stands where {base.name} stood but is {have.dtype} with "
                f"{have.dim()} dims instead of {want.dtype} with {want.dim()}.", module_path_of(ref)))
        return base.name
