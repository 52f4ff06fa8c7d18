"""A captured program: a lifted fx graph plus where each of its inputs comes from at call time.

``torch.export`` gives a graph whose placeholders are the model's parameters and buffers followed by the
flattened user inputs. fxpeft keeps it in that *lifted* form: the graph owns no tensors, so any number of
graphs (one per argument signature, one per train/eval mode) share the base model's parameters and the
adapters' parameters, which are fetched by name at each call. Passes add placeholders of their own for
adapter tensors. A program also keeps the graphs derived from its rewritten graph for running it
(:mod:`fxpeft.runtime`): the eval twin, the mixed-batch form and the shared-layer twins.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxpeft.runtime.eval_twin import eval_twin
from fxpeft.runtime.mixed_batch import mixed_batch_graph
from fxpeft.runtime.shared_layers import share_repeated_layers

__all__ = ["InputSource", "Program", "signature_key"]


def _signature_part(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "tensor"
    leaves, spec = pytree.tree_flatten(value)
    if spec.is_leaf():
        return repr(value)
    # A pytree of tensors (a KV cache, a list of tensors) is its structure: the tensors' sizes and values change
    # from call to call (each decode step's cache is one longer), its layout does not.
    return str(spec), tuple("tensor" if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in leaves)


def signature_key(kwargs: dict[str, Any]) -> tuple:
    """What makes two calls need different graphs: the argument names, the values of non-tensors, and the
    structure of pytree arguments (a KV cache counts as its tensors)."""
    return tuple((name, _signature_part(kwargs[name])) for name in sorted(kwargs))


@dataclasses.dataclass(frozen=True)
class InputSource:
    """Where one placeholder's value comes from: ``kind`` is parameter, buffer, constant, user or adapter."""

    kind: str
    target: Any


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
        self.device = device
        self._eval_module: fx.GraphModule | None = None
        self._mixed_batch_module: fx.GraphModule | None = None
        # The graph as captured, before any pass: rewrites start again from it, and a merged model runs it.
        self.pristine = copy.deepcopy(graph_module)
        self.pristine_sources = list(sources)
        self._pristine_eval: fx.GraphModule | None = None
        # With share_layers, each eval graph's twin whose repeated layers call one shared region
        # (fxpeft/runtime/shared_layers.py), made with the graph it mirrors; what a compiled inference call runs.
        self.share_layers = False
        self._shared: dict[int, tuple[fx.GraphModule, fx.GraphModule]] = {}  # id(graph): (graph, its twin)

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
        return node

    def reset(self) -> None:
        """Drop every rewrite: back to the graph as captured (passes then run again)."""
        self.graph_module = copy.deepcopy(self.pristine)
        self.sources = list(self.pristine_sources)
        self._eval_module = None
        self._mixed_batch_module = None
        self._shared = {}

    def _derive_runnables(self) -> None:
        """The eval twin, the mixed-batch graph, and the shared-layer twins of what a rewrite left."""
        self._eval_module = eval_twin(self.graph_module, self.sources)
        self._mixed_batch_module = mixed_batch_graph(self._eval_module, self.sources)
        self._derive_shared()

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

    # -- running ----------------------------------------------------------------------------------
    def _retarget(self, device: torch.device) -> None:
        for module in (self.graph_module, self.pristine):
            _retarget_device(module.graph, self.device, device)
            module.recompile()
        self.constants = {key: value.to(device) for key, value in self.constants.items()}
        self.device = device
        self._derive_runnables()
        self._pristine_eval = None

    def module_for(self, training: bool, device: torch.device, merged: bool = False,
                   mixed_batch: bool = False, shared: bool = False) -> fx.GraphModule:
        """The graph to run: rewritten or (``merged``) as captured; train mode or its eval twin; ``mixed_batch``: the
        eval graph for calls that give each row one adapter (``adapter_names``), see fxpeft/runtime/mixed_batch.py;
        ``shared``: its twin whose repeated layers are one compile-once region (fxpeft/runtime/shared_layers.py).

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
            chosen = self.graph_module
        else:
            mixed = self._mixed_batch_module if mixed_batch else None
            chosen = mixed if mixed is not None else self._eval_module
        return self._shared_twin(chosen) if shared else chosen

    def pristine_changed(self) -> None:
        """Call after a pass edited ``pristine`` in place: its derived graphs are made again when needed."""
        if self._pristine_eval is not None:
            self._shared.pop(id(self._pristine_eval), None)
        self._pristine_eval = None

    def prepare_merged(self) -> None:
        """Derive the merged (as captured) graphs ahead of use; called by ``AdaptedModel.merge``."""
        if self._pristine_eval is None:
            self._pristine_eval = eval_twin(self.pristine, self.pristine_sources)
            self._share(self._pristine_eval)

    def run(self, training: bool, kwargs: dict[str, Any], resolve: Callable[[InputSource], Any],
            merged: bool = False, mixed_batch: bool = False, shared: bool = False) -> Any:
        """Call the graph with the user's keyword arguments; returns the model's own output structure."""
        ordered = {name: kwargs.get(name, self.fixed_kwargs.get(name)) for name in self.kwarg_names}
        user_leaves = pytree.tree_leaves(((), ordered))
        inputs = []
        user_index = 0
        for source in (self.pristine_sources if merged else self.sources):
            if source.kind == "user":
                inputs.append(user_leaves[user_index])
                user_index += 1
            elif source.kind == "constant":
                inputs.append(self.constants[source.target])
            else:
                inputs.append(resolve(source))
        device = next((value.device for value in inputs if isinstance(value, torch.Tensor)), self.device)
        outputs = self.module_for(training, device, merged, mixed_batch, shared)(*inputs)
        for index, buffer_name in self.mutated_buffers.items():
            resolve(InputSource("buffer", buffer_name)).copy_(outputs[index])
        user_outputs = list(outputs[len(outputs) - self.user_output_count:])
        return pytree.tree_unflatten(user_outputs, self.out_spec)
