"""Activation checkpointing as a graph rewrite: each layer of the train graph is recomputed in backward.

transformers checkpoints a model by wrapping each decoder layer's ``forward`` in ``torch.utils.checkpoint``. A
captured graph has no layers to wrap: it is flat, and ``torch.export`` inlines a checkpoint it meets. So fxpeft
derives, from the rewritten train graph, a *checkpointed twin* in which every layer region (the nodes of
``model.layers.3``, found from the graph as :mod:`fxpeft.runtime.shared_layers` finds them, no table) is a
submodule called through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. Only the layer's inputs
stay alive until backward; the layer runs again there, with the random state of its first run (same dropout masks).
An input that is cheap to compute from the graph's own inputs (the attention mask, RoPE's cos and sin, the token
embeddings) is computed inside the layer instead, so that backward keeps the small tensors it comes from, not it
(AOT autograd's partitioner makes the same choice for compiled graphs). Weights reach a layer by reference, as a
transformers layer reads its own, not as saved checkpoint inputs.
Under ``torch.compile`` dynamo turns each call into its ``tag_activation_checkpoint`` region, which AOT autograd's
partitioner recomputes (and whose random ops it replays with the forward's random state).

The twin is a graph like the eval twin: switching checkpointing on or off chooses which graph a training call
runs, and never captures again. Eval-mode calls and calls without autograd (``torch.no_grad``) run the graphs they
ran before. :class:`CheckpointingMethods` is the adapted model's public side of it, with transformers' names.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Any, Collection, Mapping

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from fxpeft.errors import UnsupportedError
from fxpeft.runtime.shared_layers import LayerRegion, layer_regions, outline_regions, outlined_module, region_module

__all__ = ["CheckpointOptions", "CheckpointedLayer", "CheckpointingMethods", "base_checkpointing",
           "checkpoint_layers", "checkpointed_layer_count"]

# torch.utils.checkpoint.checkpoint's own keywords that fxpeft passes on (use_reentrant is checked, then fixed).
_CHECKPOINT_KEYWORDS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn")
# transformers' activation_checkpointing_enable arguments that its Trainer also accepts inside the kwargs dict.
_ENABLE_KEYWORDS = ("every_n_layers", "offload")


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How layers are checkpointed. ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (always with
    ``use_reentrant=False``); ``every_n_layers``: checkpoint layers 0, n, 2n, ... only (transformers' meaning);
    ``offload``: keep the layers' saved inputs in host memory (``torch.autograd.graph.save_on_cpu``; eager calls of a
    model on an accelerator only)."""

    checkpoint_kwargs: tuple[tuple[str, Any], ...] = ()
    every_n_layers: int = 1
    offload: bool = False

    @classmethod
    def from_arguments(cls, kwargs: Mapping[str, Any] | None, every_n_layers: int = 1,
                       offload: bool = False) -> "CheckpointOptions":
        """Options from ``gradient_checkpointing_enable``'s arguments, checked; mistakes raise
        :class:`~fxpeft.errors.UnsupportedError` naming the argument and the fix."""
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise UnsupportedError(f"gradient_checkpointing_kwargs must be a dict of torch.utils.checkpoint "
                                   f"arguments, not {type(kwargs).__name__}.")
        kwargs = dict(kwargs)
        every_n_layers = kwargs.pop("every_n_layers", every_n_layers)
        offload = kwargs.pop("offload", offload)
        unknown = sorted(set(kwargs) - set(_CHECKPOINT_KEYWORDS))
        if unknown:
            accepted = list(_CHECKPOINT_KEYWORDS + _ENABLE_KEYWORDS)
            raise UnsupportedError(f"gradient_checkpointing_kwargs has {unknown}, which torch.utils.checkpoint."
                                   f"checkpoint does not take; accepted: {accepted}.")
        if kwargs.pop("use_reentrant", None):
            raise UnsupportedError(
                "use_reentrant=True is not supported: fxpeft recomputes the layers of its graph with the "
                "non-reentrant torch.utils.checkpoint, the one torch.compile traces and that needs no "
                "enable_input_require_grads(). Pass gradient_checkpointing_kwargs={'use_reentrant': False}, or "
                "nothing (the default); the gradients are the same.")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise UnsupportedError(f"every_n_layers must be a whole number >= 1 (1: every layer), not "
                                   f"{every_n_layers!r}.")
        return cls(tuple(sorted(kwargs.items())), every_n_layers, bool(offload))


class CheckpointedLayer(torch.nn.Module):
    """One layer region of a graph, called through ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
    its activations are not kept for backward but recomputed there. ``body`` is the region as a graph module.

    Called as ``layer(held, *computed)``: ``held`` are the inputs the model keeps anyway (weights, buffers, adapter
    tensors), at positions ``held_positions`` of the body's inputs, passed by reference as transformers' layers read
    their weights, not saved as checkpoint inputs; ``computed`` are the others, in order."""

    def __init__(self, body: fx.GraphModule, options: CheckpointOptions, held_positions: tuple[int, ...] = ()):
        super().__init__()
        self.body = body
        self.held_positions = held_positions
        self.checkpoint_kwargs = {"use_reentrant": False, **dict(options.checkpoint_kwargs)}
        self.offload = options.offload

    def forward(self, held: tuple, *computed):
        if self.offload and not torch.compiler.is_compiling() and _on_accelerator(computed):
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return checkpoint(self._run, held, *computed, **self.checkpoint_kwargs)
        return checkpoint(self._run, held, *computed, **self.checkpoint_kwargs)

    def _run(self, held: tuple, *computed):
        args = list(computed)
        for position, value in zip(self.held_positions, held):
            args.insert(position, value)
        return self.body(*args)


def _is_tensor(node: fx.Node) -> bool:
    """Whether ``node``'s value is a tensor (a node without a recorded value is taken to be one)."""
    return not isinstance(node.meta.get("val"), (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool))


def _on_accelerator(args: tuple) -> bool:
    return any(isinstance(arg, torch.Tensor) and arg.device.type not in ("cpu", "meta") for arg in args)


# Ops that do a layer's worth of work: an input computed with one is kept, never computed again in each layer.
_HEAVY = frozenset({
    "linear", "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "einsum", "convolution", "conv1d", "conv2d",
    "conv3d", "conv_transpose1d", "conv_transpose2d", "lstm", "gru", "rnn_tanh", "rnn_relu",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
})
_CONE_LIMIT = 96  # nodes: a mask or RoPE's tables take about 40


def _cheap(node: fx.Node) -> bool:
    """Whether ``node`` may be computed again in every layer that reads it: a light ATen op (or Python's arithmetic
    on sizes) that draws no random numbers and writes into nothing."""
    target = node.target
    if node.op != "call_function":
        return False
    if getattr(target, "__module__", None) == operator.__name__:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    if target._schema.name.split("::")[-1] in _HEAVY or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not any(argument.alias_info is not None and argument.alias_info.is_write
                   for argument in target._schema.arguments)


def _cone(node: fx.Node, layered: set[fx.Node]) -> set[fx.Node] | None:
    """The nodes ``node`` is computed with from the graph's inputs, when all of them are cheap and outside every layer
    (``layered``); None otherwise."""
    cone: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in cone or current.op in ("placeholder", "get_attr"):
            continue
        if current in layered or not _cheap(current) or len(cone) >= _CONE_LIMIT:
            return None
        cone.add(current)
        stack.extend(current.all_input_nodes)
    return cone


def _recomputed_inputs(region: LayerRegion, layered: set[fx.Node],
                       order: dict[fx.Node, int]) -> tuple[LayerRegion, LayerRegion]:
    """``region`` as the checkpointed call sees it (its ``nodes`` as in the graph, its inputs those of the body), and
    its body: the region with the cheap computations of its inputs (:func:`_cone`) copied in front."""
    pulled: set[fx.Node] = set()
    for node in region.inputs:
        cone = _cone(node, layered)
        if cone:
            pulled |= cone
    if not pulled:
        return region, region
    nodes = sorted(pulled, key=order.__getitem__) + region.nodes
    inside = set(nodes)
    inputs = list(dict.fromkeys(arg for node in nodes for arg in node.all_input_nodes if arg not in inside))
    return (LayerRegion(region.key, region.nodes, inputs, region.outputs),
            LayerRegion(region.key, nodes, inputs, region.outputs))


def checkpoint_layers(module: fx.GraphModule, options: CheckpointOptions, held: Collection[str] = ()) -> fx.GraphModule:
    """A copy of ``module`` (a train graph) whose layer regions (every ``options.every_n_layers``-th, in graph order)
    are :class:`CheckpointedLayer` submodules ``checkpointed_<layer path>``; ``module`` itself when it has none.
    ``held``: names of placeholders whose tensors the model keeps anyway (weights): layers take them by reference."""
    found = layer_regions(module.graph, local_writes=True)  # a recomputed in-place op on its own temporary is fine
    if not found:
        return module
    layered = {node for region in found for node in region.nodes}
    order = {node: index for index, node in enumerate(module.graph.nodes)}
    calls, bodies = zip(*(_recomputed_inputs(region, layered, order) for region in found[::options.every_n_layers]))
    regions = list(calls)
    bodies_by_key = {body.key: body for body in bodies}
    layers: dict[str, CheckpointedLayer] = {}

    def call(graph: fx.Graph, region: LayerRegion, args: tuple) -> fx.Node:
        name = "checkpointed_" + region.key.replace(".", "_")
        positions = tuple(i for i, arg in enumerate(args) if arg.op == "placeholder" and arg.name in held)
        if not any(_is_tensor(arg) for i, arg in enumerate(args) if i not in positions):
            positions = ()  # checkpoint reads the device (whose random state it restores) from its tensor arguments
        body = region_module(bodies_by_key[region.key], module, "CheckpointedBody")
        layers[name] = CheckpointedLayer(body, options, positions)
        kept = tuple(args[i] for i in positions)
        return graph.create_node("call_module", name, (kept, *(a for i, a in enumerate(args) if i not in positions)),
                                 name=name)

    # Without what only the layers read: each layer now computes it itself.
    return outlined_module(module, outline_regions(module.graph, regions, call), layers, drop_dead_code=True)


def checkpointed_layer_count(module: fx.GraphModule) -> int:
    """How many :class:`CheckpointedLayer` calls ``module``'s graph makes (0: none, it keeps every activation)."""
    return sum(1 for node in module.graph.nodes
               if node.op == "call_module" and isinstance(module.get_submodule(node.target), CheckpointedLayer))


def base_checkpointing(model: torch.nn.Module) -> CheckpointOptions | None:
    """The checkpointing a transformers model was set to before ``transform`` (``model.is_gradient_checkpointing``),
    as options for its adapted model; None when it was off. Its ``torch.utils.checkpoint`` keywords and
    ``every_n_layers`` carry over; ``use_reentrant=True`` becomes False, with a warning."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    enabled = model.is_activation_checkpointing if flag is not None else getattr(model, "is_gradient_checkpointing",
                                                                               False)
    if not enabled:
        return None
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    flags = [bool(getattr(module, "gradient_checkpointing", False)) for module in layers]
    every_n = next((i for i, on in enumerate(flags) if on and i > 0), 1) if flags and not all(flags) else 1
    function = next((getattr(module, "_gradient_checkpointing_func", None) for module in model.modules()
                     if getattr(module, "gradient_checkpointing", False)), None)
    kwargs = {key: value for key, value in dict(getattr(function, "keywords", None) or {}).items()
              if key in _CHECKPOINT_KEYWORDS}
    if kwargs.pop("use_reentrant", False):
        warnings.warn("The base model had gradient checkpointing with use_reentrant=True; fxpeft's adapted model "
                      "recomputes its layers with use_reentrant=False (the same gradients).", stacklevel=3)
    return CheckpointOptions(tuple(sorted(kwargs.items())), every_n)


class CheckpointingMethods:
    """Activation (gradient) checkpointing of the adapted model, with transformers' names and meanings.

    ``gradient_checkpointing_enable()`` makes training calls run the train graph whose layers are recomputed in
    backward instead of keeping their activations (see :mod:`fxpeft.runtime.checkpointing`): gradients and losses
    are those of the run without it, dropout masks included, and it works under ``torch.compile`` and with every
    adapter method (prefix tuning too, which PEFT refuses). Nothing is captured again. Example::

        adapted.gradient_checkpointing_enable()             # what Trainer(gradient_checkpointing=True) calls
        loss = adapted(**batch, labels=ids).loss; loss.backward()
        adapted.gradient_checkpointing_disable()
    """

    supports_gradient_checkpointing = True  # read by transformers' Trainer and PEFT's prepare_model_for_kbit_training
    _checkpointing: CheckpointOptions | None = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each layer in backward from now on (training calls with autograd only).

        ``gradient_checkpointing_kwargs`` are ``torch.utils.checkpoint.checkpoint``'s keywords
        (``preserve_rng_state``, ``determinism_check``, ``debug``, ``context_fn``; ``use_reentrant`` may be False
        or absent: True raises :class:`~fxpeft.errors.UnsupportedError`). ``every_n_layers``: checkpoint layers 0, n,
        2n, ... only; ``offload``: keep the checkpointed layers' inputs in host memory (eager, accelerators). Raises
        :class:`~fxpeft.errors.UnsupportedError` when the graph has no layers (numbered children of a module list)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Mapping[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (what its Trainer calls)."""
        options = CheckpointOptions.from_arguments(activation_checkpointing_kwargs, every_n_layers, offload)
        previous = self._checkpointing
        if not self._apply_checkpointing(options):
            self._apply_checkpointing(previous)
            raise UnsupportedError(
                f"gradient_checkpointing_enable: the captured graph of {type(self.base_model).__name__} has no layers "
                "to recompute (fxpeft checkpoints each numbered child of a module list, such as model.layers.0, found "
                "in the graph); nothing was changed.")

    def gradient_checkpointing_disable(self) -> None:
        """Keep every activation for backward again (the default)."""
        self._apply_checkpointing(None)

    def activation_checkpointing_disable(self) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_disable`."""
        self._apply_checkpointing(None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether training calls recompute layers in backward (:meth:`gradient_checkpointing_enable`)."""
        return self._checkpointing is not None

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers 5's name for :attr:`is_gradient_checkpointing`."""
        return self._checkpointing is not None

    def _apply_checkpointing(self, options: CheckpointOptions | None) -> int:
        """Set ``options`` (None: off) on every program; returns how many layers their train graphs checkpoint."""
        self._checkpointing = options
        return sum(program.set_checkpointing(options) for program in self._programs.values())

