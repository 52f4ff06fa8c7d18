"""Layers whose weights are gathered only while the layer computes: the graph for a model sharded per layer.

``torch.distributed.fsdp.fully_shard`` (FSDP2) on a transformer layer keeps 1/N of its weights on each rank and
all-gathers the rest in a forward pre-hook of that layer module, frees them in its forward post-hook, and does both
again around its backward. A captured graph is flat: it never calls the layer modules, so none of those hooks fire,
and the graph would read each rank's shard (a ``DTensor``) where it needs the whole weight.

This module derives, from a flat graph, a *layered twin* in which every layer region (the nodes of ``model.layers.3``:
see :mod:`fxpeft.runtime.shared_layers`) whose layer module is sharded is one :class:`GatheredLayer` call. That call
gathers its layer's weights through the sharding engine's public API (:class:`LayerWeights`; FSDP2's
``FSDPModule.unshard()``), reads them from the layer module by name, runs the region, and frees them (``reshard()``).
When autograd records, a pre-hook of the autograd nodes that made the region's outputs gathers the weights again
before the region's backward (its saved tensors are views of the gathered storage, which the gather refills) and a
hook on its inputs' gradients frees them after it, as FSDP2's own hooks do. (The pre-hook runs after every hook on
those tensors, the next layer's release among them, so two layers are never whole at once.) A layer whose inputs need
no gradient (the first) is freed by the engine's root at the end of backward.

Only the layer's base parameters are read inside the call. Everything else (adapter tensors, gates, the root's
parameters, buffers) reaches the region as an argument from the top-level graph, as in the flat graph. The top-level
graph still resolves the sharded parameters' placeholders; it no longer reads them.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import torch.fx as fx
from torch import nn

from fxpeft.runtime.shared_layers import LayerRegion, layer_regions, outline_regions, outlined_module, region_module

__all__ = ["FsdpLayer", "GatheredLayer", "LayerWeights", "gathered_layer_count", "gather_layers", "sharded_modules",
           "whole_step_layers"]


@runtime_checkable
class LayerWeights(Protocol):
    """A sharded layer as :class:`GatheredLayer` uses it: ``module``, the layer whose parameters the region reads by
    name once :meth:`gather` has made them whole; :meth:`release` frees them again. Each engine that shards (FSDP2
    here, DeepSpeed ZeRO-3 in fxpeft/distributed/zero3.py) gives its own."""

    module: nn.Module

    def gather(self) -> None: ...

    def release(self) -> None: ...


class FsdpLayer:
    """A layer module sharded with FSDP2's ``fully_shard``: gathered by its ``unshard()``, released by ``reshard()``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def gather(self) -> None:
        self.module.unshard()

    def release(self) -> None:
        self.module.reshard()


class GatheredLayer(nn.Module):
    """One layer region run with its layer's weights gathered (see the module's docstring).

    ``body`` takes the region's other inputs, then the layer's weights ``weight_names`` (paths inside ``layer.module``).
    ``layer`` is held, not registered: the graph that calls this owns no tensors."""

    def __init__(self, body: fx.GraphModule, layer: LayerWeights, weight_names: tuple[str, ...]):
        super().__init__()
        self.body = body
        self.weight_names = weight_names
        self._layer = (layer,)

    def forward(self, *args):
        layer = self._layer[0]
        layer.gather()
        weights = [layer.module.get_parameter(name) for name in self.weight_names]
        recording = torch.is_grad_enabled()
        try:
            outputs = self.body(*args, *weights)
        finally:
            layer.release()
        if recording:
            _gather_around_backward(layer, args, outputs)
        return outputs


def _gather_around_backward(layer: LayerWeights, args: tuple, outputs: Any) -> None:
    """Gather ``layer``'s weights before its backward: in a pre-hook of the autograd nodes that produced the region's
    outputs, which runs after every hook on those tensors, the next layer's release among them (a hook on the output
    tensors themselves would run first, and two layers would be whole at once); free them when the gradients of all its
    inputs that autograd computes are there (after it); a layer whose inputs need no gradient (the first) is freed by
    the sharding engine's root at the end of backward."""
    produced = [value for value in _tensors(outputs) if value.requires_grad]
    if not produced:
        return
    for node in {value.grad_fn for value in produced if value.grad_fn is not None}:
        node.register_prehook(lambda grad_outputs: layer.gather())
    # Activations only: a hook on a leaf (an adapter's parameter) would stay registered and fire in later steps.
    consumed = [value for value in _tensors(args) if value.requires_grad and value.grad_fn is not None]
    if consumed:
        torch.autograd.graph.register_multi_grad_hook(consumed, lambda grads: layer.release(), mode="all")


def _tensors(values: Any) -> list[torch.Tensor]:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value for value in values if isinstance(value, torch.Tensor)]


def sharded_modules(model: nn.Module) -> dict[str, FsdpLayer]:
    """The submodules of ``model`` sharded on their own with FSDP2 (``fully_shard``), by path; ``model`` itself not."""
    from torch.distributed.fsdp import FSDPModule

    return {path: FsdpLayer(module) for path, module in model.named_modules()
            if path and isinstance(module, FSDPModule)}


def whole_step_layers(graph: fx.Graph, layers: Mapping[str, LayerWeights]) -> list[LayerWeights]:
    """The sharded modules of ``layers`` that are no layer region of ``graph`` (Accelerate's FSDP2 wraps the input
    embeddings and the head on their own): the graph reads their weights outside any :class:`GatheredLayer`, so they
    are gathered before a call reads its inputs, and released after it, or, when autograd records, by FSDP2's root at
    the end of backward."""
    keys = {region.key for region in layer_regions(graph, local_writes=True)}
    return [layer for key, layer in layers.items() if key not in keys]


def gathered_layer_count(module: fx.GraphModule) -> int:
    """How many :class:`GatheredLayer` calls ``module``'s graph makes."""
    return sum(1 for node in module.graph.nodes
               if node.op == "call_module" and isinstance(module.get_submodule(node.target), GatheredLayer))


def gather_layers(module: fx.GraphModule, parameter_of: Mapping[str, str], layers: Mapping[str, LayerWeights]
                  ) -> fx.GraphModule:
    """The layered twin of ``module``: each layer region whose key (``model.layers.3``) is in ``layers`` becomes a
    :class:`GatheredLayer` call of that sharded layer. Sharded modules that are no layer region of the graph (an
    embedding, a head: :func:`whole_step_layers`) are gathered for the whole call by its runner instead.

    ``parameter_of`` maps a placeholder's name to the base parameter it is fed (``model.layers.3.mlp.up_proj.weight``);
    a region's placeholders that name a parameter under its layer are read inside the call."""
    regions = {region.key: region for region in layer_regions(module.graph, local_writes=True)}
    chosen = [regions[key] for key in layers if key in regions]
    calls: dict[str, GatheredLayer] = {}

    def call(graph: fx.Graph, region: LayerRegion, args: tuple) -> fx.Node:
        prefix = region.key + "."
        is_weight = [node.op == "placeholder" and parameter_of.get(node.name, "").startswith(prefix)
                     for node in region.inputs]
        inputs = [node for node, weight in zip(region.inputs, is_weight) if not weight]
        weights = [node for node, weight in zip(region.inputs, is_weight) if weight]
        body = region_module(LayerRegion(region.key, region.nodes, inputs + weights, region.outputs), module,
                             "GatheredBody")
        names = tuple(parameter_of[node.name][len(prefix):] for node in weights)
        name = "gathered_" + region.key.replace(".", "_")
        calls[name] = GatheredLayer(body, layers[region.key], names)
        kept = tuple(arg for arg, weight in zip(args, is_weight) if not weight)
        return graph.create_node("call_module", name, kept, name=name)

    return outlined_module(module, outline_regions(module.graph, chosen, call), calls)
