"""A captured program: a lifted fx graph plus where each of its inputs comes from at call time.

``torch.export`` gives a graph whose placeholders are the model's parameters and buffers followed by the
flattened user inputs. fxpeft keeps it in that *lifted* form: the graph owns no tensors, so any number of
graphs (one per argument signature, one per train/eval mode) share the base model's parameters and the
adapters' parameters, which are fetched by name at each call. Passes add placeholders of their own for
adapter tensors. A program also keeps the graphs derived from its rewritten graph for running it
(:mod:`fxpeft.runtime`): the eval twin, the mixed-batch form, the shared-layer twins and the checkpointed train
graph.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpeft.errors import FxpeftError
from fxpeft.runtime.checkpointing import CheckpointOptions, checkpoint_layers, checkpointed_layer_count
from fxpeft.runtime.eval_twin import eval_twin
from fxpeft.runtime.layer_units import LayerWeights, gather_layers, whole_step_layers
from fxpeft.runtime.mixed_batch import mixed_batch_graph
from fxpeft.runtime.regional_compile import regional_twin
from fxpeft.runtime.shared_layers import share_repeated_layers
from fxpeft.runtime.uniform_gates import uniform_twin

__all__ = ["CallArguments", "InputPlan", "InputSource", "Location", "ModuleReads", "Program", "flatten_arguments",
           "signature_key"]

_RESOLVED_KINDS = ("parameter", "buffer", "gate", "adapter")  # what the caller of Program.run resolves
_HELD_KINDS = ("parameter", "buffer", "adapter", "constant")  # tensors the model keeps between forward and backward
_SCALARS = (bool, int, float, str, type(None))


def _tensor_key(tensor: torch.Tensor) -> Any:
    """A tensor's part of a signature key: a floating tensor's dtype is part of it (a graph captured from float32
    inputs casts where one captured from float16 inputs does not: after ``.half()`` both are valid calls)."""
    return ("tensor", tensor.dtype) if tensor.is_floating_point() else "tensor"


def _flattened(value: Any) -> tuple[Any, list]:
    """One argument's part of the signature key, and its leaves as the graph takes them (one flatten)."""
    if isinstance(value, torch.Tensor):
        return _tensor_key(value), [value]
    if type(value) in _SCALARS:  # a leaf (what tree_flatten says too, at a fraction of the cost)
        return repr(value), [value]
    leaves, spec = pytree.tree_flatten(value)
    if spec.is_leaf():
        return repr(value), leaves
    # A pytree of tensors (a KV cache, a list of tensors) is its structure: the tensors' sizes and values change
    # from call to call (each decode step's cache is one longer), its layout does not.
    return (str(spec), tuple(_tensor_key(leaf) if isinstance(leaf, torch.Tensor) else repr(leaf)
                             for leaf in leaves)), leaves


@dataclasses.dataclass(frozen=True)
class CallArguments:
    """A call's keyword arguments flattened once: its ``key`` (see :func:`signature_key`) and each argument's
    leaves, in the order the graph of that signature takes them."""

    key: tuple
    leaves: dict[str, list]


def flatten_arguments(kwargs: dict[str, Any]) -> CallArguments:
    """``kwargs`` as :class:`CallArguments`: the signature key and the leaves :meth:`Program.run` feeds the graph."""
    parts = {name: _flattened(value) for name, value in kwargs.items()}
    return CallArguments(tuple((name, parts[name][0]) for name in sorted(parts)),
                         {name: part[1] for name, part in parts.items()})


def signature_key(kwargs: dict[str, Any]) -> tuple:
    """What makes two calls need different graphs: the argument names, the values of non-tensors, the dtypes of
    floating tensors, and the structure of pytree arguments (a KV cache counts as its tensors)."""
    return flatten_arguments(kwargs).key


@dataclasses.dataclass(frozen=True)
class InputSource:
    """Where one placeholder's value comes from: ``kind`` is parameter, buffer, constant, user, gate or adapter."""

    kind: str
    target: Any


Location = tuple[tuple[str, ...] | None, str]  # (module path from a root, or None: from a mapping; the name there)


class ModuleReads:
    """Reads values that live in modules under a root module, by where they are now: each owner is reached from the
    root by child names (``_modules``, not ``getattr``), then the value is read from its owner's own tables. Built
    once from :data:`Location` s, read at every call; only paths are kept, never a module or tensor, so whatever was
    replaced since (a parameter, a whole module) is read as it is now. A path that no longer leads to a module
    raises ``KeyError``."""

    def __init__(self, locations: list[Location]):
        index: dict[tuple[str, ...], int] = {(): 0}
        self._steps: list[tuple[int, str]] = []  # step i gives owner i + 1: child ``atom`` of owner ``parent``
        self._reads = [(-1 if path is None else self._owner(path, index), name) for path, name in locations]

    def _owner(self, path: tuple[str, ...], index: dict[tuple[str, ...], int]) -> int:
        if path not in index:
            parent = self._owner(path[:-1], index)
            self._steps.append((parent, path[-1]))
            index[path] = len(self._steps)
        return index[path]

    def read(self, root: torch.nn.Module, others: dict[str, Any]) -> list:
        """The values, in order: each from its owner under ``root``, or (no path) ``others[name]``."""
        owners = [root]
        for parent, atom in self._steps:
            owners.append(owners[parent]._modules[atom])
        return [others[name] if owner < 0 else _attribute(owners[owner], name) for owner, name in self._reads]


def _attribute(module: torch.nn.Module, name: str) -> Any:
    """``getattr(module, name)`` without ``nn.Module.__getattr__``'s cost for parameters and buffers."""
    value = module._parameters.get(name)
    if value is None:
        value = module._buffers.get(name)
    return value if value is not None else getattr(module, name)


class InputPlan:
    """How one list of input sources feeds a graph's placeholders, worked out once (``Program.input_plan``).

    ``resolved`` are the sources the caller of :meth:`Program.run` resolves at each call (parameters, buffers,
    gates, adapter tensors), in placeholder order; the plan places them, the call's leaves and the program's
    constants. A plan (with its :meth:`module_reads`) is dropped whenever the program's sources or constants
    change."""

    def __init__(self, sources: list[InputSource], constants: dict[str, torch.Tensor]):
        self.source_list = sources  # the list it was made from (Program.input_plan checks it is still current)
        self.length = len(sources)
        self.resolved = tuple(source for source in sources if source.kind in _RESOLVED_KINDS)
        self.user_count = sum(source.kind == "user" for source in sources)
        self.constants = [constants[source.target] for source in sources if source.kind == "constant"]
        self._module_reads: ModuleReads | None = None
        # Each placeholder's index into [*user leaves, *resolved values, *constants].
        first = {"user": 0, "resolved": self.user_count, "constant": self.user_count + len(self.resolved)}
        self._order = []
        for source in sources:
            group = source.kind if source.kind in ("user", "constant") else "resolved"
            self._order.append(first[group])
            first[group] += 1

    def is_for(self, sources: list[InputSource]) -> bool:
        """Whether the plan still describes ``sources`` (the same list, not grown or shrunk since)."""
        return self.source_list is sources and self.length == len(sources)

    def module_reads(self, locate: Callable[[InputSource], Location]) -> ModuleReads:
        """Where the ``resolved`` values live (``locate``: one source's :data:`Location`), worked out on the first
        call and kept with the plan (a plan has one resolver: the model that runs the program)."""
        if self._module_reads is None:
            self._module_reads = ModuleReads([locate(source) for source in self.resolved])
        return self._module_reads

    def inputs(self, user_leaves: list, resolved: list) -> list:
        """The graph's positional inputs: the call's leaves and the resolved values put in placeholder order."""
        if len(user_leaves) != self.user_count or len(resolved) != len(self.resolved):
            raise FxpeftError(f"A captured graph takes {self.user_count} argument leaves and {len(self.resolved)} "
                              f"model tensors; the call gave {len(user_leaves)} and {len(resolved)}.")
        values = [*user_leaves, *resolved, *self.constants]
        return [values[index] for index in self._order]


def _retarget_device(graph: fx.Graph, old: torch.device, new: torch.device) -> None:
    """Replace device constants baked in at capture (``arange(device=...)``, ``to(device)``) by ``new``."""

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == old.type:
            return new
        return value

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)


class _Twins:
    """Graphs derived from one of a program's graphs on first use, one per graph object (and key), kept until
    :meth:`clear`: a twin is made again when the graph it was made from is no longer the one asked for."""

    def __init__(self):
        self._made: dict[tuple, tuple[fx.GraphModule, Any]] = {}

    def of(self, module: fx.GraphModule, make: Callable[[], Any], key: Any = None) -> Any:
        """``module``'s twin for ``key``, made by ``make()`` the first time."""
        original, twin = self._made.get((id(module), key), (None, None))
        if original is not module:
            twin = make()
            self._made[(id(module), key)] = (module, twin)
        return twin

    def clear(self) -> None:
        self._made.clear()


class Program:
    """One captured signature of the base model, rewritten by the passes.

    ``sources[i]`` says where placeholder ``i`` of ``graph_module`` gets its value. ``constants`` holds
    tensors that export lifted out of the forward (not parameters or buffers of the model).
    """

    def __init__(self, graph_module: fx.GraphModule, sources: list[InputSource], in_spec, out_spec,
                 user_output_count: int, mutated_buffers: dict[int, str], constants: dict[str, torch.Tensor],
                 kwarg_names: tuple[str, ...], fixed_kwargs: dict[str, Any], device: torch.device):
        self.graph_module = graph_module
        self.sources = sources
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.user_output_count = user_output_count
        self.mutated_buffers = mutated_buffers
        self.constants = constants
        self.kwarg_names = kwarg_names
        self.fixed_kwargs = fixed_kwargs
        self.key: tuple = ()  # the signature_key of the call it was captured for (set by capture)
        # Whether that call passed a KV cache: virtual tokens are then in the cache, not added by the graph
        # (fxpeft/runtime/virtual_tokens.py). Set by capture.
        self.reads_cache = False
        self.device = device
        self._eval_module: fx.GraphModule | None = None
        self._mixed_batch_module: fx.GraphModule | None = None
        self._mixed_train_module: fx.GraphModule | None = None  # the same for training calls (from graph_module)
        # The graph as captured, before any pass: rewrites start again from it, and a merged model runs it.
        self.pristine = copy.deepcopy(graph_module)
        self.pristine_sources = list(sources)
        self._pristine_eval: fx.GraphModule | None = None
        # With share_layers, each eval graph's twin whose repeated layers call one shared region
        # (fxpeft/runtime/shared_layers.py), made with the graph it mirrors; what a compiled inference call runs.
        self.share_layers = False
        self._shared: dict[int, tuple[fx.GraphModule, fx.GraphModule]] = {}  # id(graph): (graph, its twin)
        # With checkpointing (set_checkpointing), the train graph whose layers are recomputed in backward
        # (fxpeft/runtime/checkpointing.py): what a training call with autograd runs.
        self.checkpointing: CheckpointOptions | None = None
        self._checkpointed: fx.GraphModule | None = None
        self._plans: dict[bool, InputPlan] = {}  # merged?: how its sources feed the graph (see input_plan)
        # With layers sharded per layer (FSDP2), the layer module of each region key: every graph run is then its
        # layered twin, whose layers gather their weights as they run (fxpeft/runtime/layer_units.py).
        self._sharded_layers: dict[str, LayerWeights] = {}
        self._gathered = _Twins()
        self._whole_step: list[LayerWeights] = []  # sharded modules gathered for a whole call (no layer region)
        # Eager calls in which every row uses the same adapters run a twin without per-row gating
        # (fxpeft/runtime/uniform_gates.py), one per graph and set of active adapters, made on first use.
        self._uniform = _Twins()
        # After AdaptedModel.compile: torch.compile's options, and each graph's regional twin (its repeated layers
        # call one compiled template; fxpeft/runtime/regional_compile.py), made on first use, dropped on changes.
        self.regional_compile: dict[str, Any] | None = None
        self._regional = _Twins()

    # -- graph access for passes ------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def placeholders(self) -> list[fx.Node]:
        return [node for node in self.graph.nodes if node.op == "placeholder"]

    def source_of(self, node: fx.Node) -> InputSource | None:
        """The source feeding ``node`` if it is a placeholder, else None."""
        if node.op != "placeholder":
            return None
        return self.source_map().get(node.name)

    def source_map(self) -> dict[str, InputSource]:
        return {node.name: source for node, source in zip(self.placeholders(), self.sources)}

    def add_input(self, name: str, source: InputSource) -> fx.Node:
        """Add a placeholder fed from ``source``, placed before the first user input."""
        placeholders = self.placeholders()
        index = next((i for i, s in enumerate(self.sources) if s.kind == "user"), len(placeholders))
        anchor = placeholders[index] if index < len(placeholders) else None
        if anchor is not None:
            with self.graph.inserting_before(anchor):
                node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_after(placeholders[-1] if placeholders else None):
                node = self.graph.placeholder(name)
        self.sources.insert(index, source)
        self._plans = {}
        return node

    def as_captured(self) -> "Program":
        """A shallow copy whose graph and sources are the captured ones, before any rewrite: for reading the sites a
        rule would select (a :class:`fxpeft.rewrite.RewriteContext` over it) without touching this program."""
        captured = copy.copy(self)
        captured.graph_module, captured.sources = self.pristine, list(self.pristine_sources)
        return captured

    def reset(self) -> None:
        """Drop every rewrite: back to the graph as captured (passes then run again)."""
        self.graph_module = copy.deepcopy(self.pristine)
        self.sources = list(self.pristine_sources)
        self._eval_module = None
        self._mixed_batch_module = None
        self._mixed_train_module = None
        self._shared = {}
        self._checkpointed = None
        self._drop_twins()
        self._plans = {}

    def _derive_runnables(self) -> None:
        """The eval twin, the mixed-batch graph, the shared-layer twins and the checkpointed train graph of what a
        rewrite left."""
        self._eval_module = eval_twin(self.graph_module, self.sources)
        self._mixed_batch_module = mixed_batch_graph(self._eval_module, self.sources)
        self._mixed_train_module = mixed_batch_graph(self.graph_module, self.sources)
        self._derive_shared()
        self._derive_checkpointed()
        self._drop_twins()

    def _drop_twins(self) -> None:
        """Forget the twins made on first use (the graphs they were made from changed)."""
        for twins in (self._gathered, self._uniform, self._regional):
            twins.clear()

    def set_checkpointing(self, options: CheckpointOptions | None) -> int:
        """Derive (or, with None, drop) the train graph whose layers are recomputed in backward, which training
        calls with autograd then run; see ``AdaptedModel.gradient_checkpointing_enable``. Returns how many layers
        it checkpoints (0: the graph has none, and training calls keep running the flat graph)."""
        self.checkpointing = options
        self._derive_checkpointed()
        return 0 if self._checkpointed is None else checkpointed_layer_count(self._checkpointed)

    def _derive_checkpointed(self) -> None:
        if self.checkpointing is None:
            self._checkpointed = None
            return
        held = {node.name for node, source in zip(self.placeholders(), self.sources) if source.kind in _HELD_KINDS}
        checkpointed = checkpoint_layers(self.graph_module, self.checkpointing, held)
        self._checkpointed = checkpointed if checkpointed is not self.graph_module else None

    def set_sharded_layers(self, layers: dict[str, LayerWeights]) -> None:
        """Run every graph as its layered twin, whose layer regions gather the weights of these sharded layers (keyed by
        module path, ``model.layers.3``) while they run; empty: the flat graphs. See
        fxpeft/runtime/layer_units.py and ``fxpeft.distributed.fully_shard``."""
        self._sharded_layers = dict(layers)
        self._gathered.clear()
        self._whole_step = whole_step_layers(self.graph, self._sharded_layers) if layers else []

    def _gathered_twin(self, module: fx.GraphModule, merged: bool) -> fx.GraphModule:
        def make() -> fx.GraphModule:
            sources = self.pristine_sources if merged else self.sources
            placeholders = [node.name for node in module.graph.nodes if node.op == "placeholder"]
            parameter_of = {name: source.target for name, source in zip(placeholders, sources)
                            if source.kind == "parameter"}
            return gather_layers(module, parameter_of, self._sharded_layers)

        return self._gathered.of(module, make)

    def set_share_layers(self, share: bool) -> None:
        """Derive (or drop) the shared-layer twins of the eval graphs; see ``AdaptedModel.compile_layers_once``."""
        self.share_layers = share
        self._derive_shared()

    def _derive_shared(self) -> None:
        self._shared = {}
        self._share(self._eval_module, self._mixed_batch_module, self._pristine_eval)

    def _share(self, *modules: fx.GraphModule | None) -> None:
        for module in modules:
            if module is not None and self.share_layers:
                self._shared[id(module)] = (module, share_repeated_layers(module))

    def _shared_twin(self, module: fx.GraphModule) -> fx.GraphModule:
        original, twin = self._shared.get(id(module), (None, module))
        return twin if original is module else module

    def finish_rewrite(self) -> None:
        """Call after passes changed the graph: validates it, recompiles the code, derives the eval twin."""
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.graph_module.recompile()
        self._derive_runnables()
        self._plans = {}

    # -- running ----------------------------------------------------------------------------------
    def _retarget(self, device: torch.device) -> None:
        for module in (self.graph_module, self.pristine):
            _retarget_device(module.graph, self.device, device)
            module.recompile()
        self.constants = {key: value.to(device) for key, value in self.constants.items()}
        self._plans = {}
        self.device = device
        self._derive_runnables()
        self._pristine_eval = None

    def module_for(self, training: bool, device: torch.device, merged: bool = False,
                   mixed_batch: bool = False, shared: bool = False,
                   active: frozenset[str] | None = None) -> torch.nn.Module:
        """The graph to run: rewritten or (``merged``) as captured; train mode or its eval twin; ``mixed_batch``: the
        train or eval graph for calls that give each row one adapter (``adapter_names``), see
        fxpeft/runtime/mixed_batch.py (with checkpointing set, training runs the checkpointed graph, gated);
        ``shared``: its twin whose repeated layers are one compile-once region (fxpeft/runtime/shared_layers.py).
        ``active``: every row of the call uses exactly these adapters; an eager call then runs the flat train or eval
        graph's twin without per-row gating (fxpeft/runtime/uniform_gates.py). A training call with autograd runs the
        checkpointed train graph while checkpointing is set (see
        :meth:`set_checkpointing`); merged and no-grad training calls run the flat one. After
        :meth:`set_regional_compile`, an eager call runs the chosen graph's regional twin (its repeated layers call one
        compiled template; fxpeft/runtime/regional_compile.py): the gated graph's, so that switching adapters compiles
        nothing. A model sharded per layer runs the layered twin (fxpeft/runtime/layer_units.py).

        Eval twins and shared twins are derived when a graph changes, never here, so that a compiled caller
        only reads them. A model moved to another device after capture gets its baked device constants
        retargeted (on its first eager call there)."""
        if device != self.device:
            self._retarget(device)
        if merged:
            if not training and self._pristine_eval is None:
                self.prepare_merged()
            chosen = self.pristine if training else self._pristine_eval
        elif training:
            checkpointed = self._checkpointed if torch.is_grad_enabled() else None
            mixed = self._mixed_train_module if mixed_batch and checkpointed is None else None
            chosen = checkpointed if checkpointed is not None else mixed if mixed is not None else self.graph_module
        else:
            mixed = self._mixed_batch_module if mixed_batch else None
            chosen = mixed if mixed is not None else self._eval_module
        if self._sharded_layers:
            if chosen is self._checkpointed:
                raise FxpeftError("Gradient checkpointing and a model sharded per layer (FSDP2) do not combine yet: "
                                  "call gradient_checkpointing_disable() before sharding.")
            return self._gathered_twin(chosen, merged)
        if shared:
            return self._shared_twin(chosen)
        if torch.compiler.is_compiling():  # the graph itself: what dynamo traces must not depend on eager state
            return chosen
        if self.regional_compile is not None:
            return self._regional.of(chosen, lambda: regional_twin(chosen, self.regional_compile))
        if active is not None and (chosen is self.graph_module or chosen is self._eval_module):
            return self._uniform.of(chosen, lambda: uniform_twin(chosen, self.sources, active), active)
        return chosen

    def set_regional_compile(self, options: dict[str, Any] | None) -> None:
        """Run every graph as its regional twin compiled with these ``torch.compile`` options (None: the graphs
        themselves); see ``AdaptedModel.compile``. Twins already made are dropped (compiled again on first use)."""
        self.regional_compile = options
        self._regional.clear()

    def pristine_changed(self) -> None:
        """Call after a pass edited ``pristine`` in place: its derived graphs are made again when needed."""
        if self._pristine_eval is not None:
            self._shared.pop(id(self._pristine_eval), None)
        self._pristine_eval = None
        self._drop_twins()
        self._plans = {}

    def prepare_merged(self) -> None:
        """Derive the merged (as captured) graphs ahead of use; called by ``AdaptedModel.merge``."""
        if self._pristine_eval is None:
            self._pristine_eval = eval_twin(self.pristine, self.pristine_sources)
            self._share(self._pristine_eval)

    def input_plan(self, merged: bool = False) -> InputPlan:
        """How the sources of the graph to run (``merged``: the graph as captured) feed its placeholders; made once
        and kept until the sources or constants change. Under torch.compile a fresh plan, never the kept one, so
        that compiled code reads no cache that eager calls fill (a guard on it would recompile)."""
        sources = self.pristine_sources if merged else self.sources
        if torch.compiler.is_compiling():
            return InputPlan(sources, self.constants)
        plan = self._plans.get(merged)
        if plan is None or not plan.is_for(sources):
            plan = self._plans[merged] = InputPlan(sources, self.constants)
        return plan

    def user_leaves(self, arguments: dict[str, Any] | CallArguments) -> list:
        """The leaves of a call's arguments (keyword arguments, or :class:`CallArguments` of them) in the order of
        the graph's user inputs; the fixed arguments this program was captured with fill in for absent ones."""
        if isinstance(arguments, CallArguments):
            given = arguments.leaves
            missing = [name for name in self.kwarg_names if name not in given]
            if missing:
                given = {**given, **flatten_arguments({n: self.fixed_kwargs.get(n) for n in missing}).leaves}
            return [leaf for name in self.kwarg_names for leaf in given[name]]
        ordered = {name: arguments.get(name, self.fixed_kwargs.get(name)) for name in self.kwarg_names}
        return pytree.tree_leaves(((), ordered))

    def run(self, training: bool, arguments: dict[str, Any] | CallArguments,
            resolve: Callable[[InputPlan], list], merged: bool = False, mixed_batch: bool = False,
            shared: bool = False, active: frozenset[str] | None = None) -> Any:
        """Call the graph with a call's keyword arguments (or their :class:`CallArguments`); returns the model's own
        output structure. ``resolve(plan)`` gives the values of ``plan.resolved`` (see :class:`InputPlan`); for the
        other arguments see :meth:`module_for`."""
        for layer in self._whole_step:
            layer.gather()
        try:
            leaves, resolved = self.user_leaves(arguments), resolve(self.input_plan(merged))
            device = next((value.device for value in itertools.chain(resolved, leaves)
                           if isinstance(value, torch.Tensor)), self.device)
            # (on another device than its last call's, module_for retargets the graphs' constants)
            module = self.module_for(training, device, merged, mixed_batch, shared, active)
            outputs = module(*self.input_plan(merged).inputs(leaves, resolved))
        finally:
            if not torch.is_grad_enabled():  # else FSDP2's root releases them when backward is done
                for layer in self._whole_step:
                    layer.release()
        if self.mutated_buffers:
            mutated = InputPlan([InputSource("buffer", name) for name in self.mutated_buffers.values()], {})
            for index, buffer in zip(self.mutated_buffers, resolve(mutated)):
                buffer.copy_(outputs[index])
        user_outputs = list(outputs[len(outputs) - self.user_output_count:])
        return pytree.tree_unflatten(user_outputs, self.out_spec)
