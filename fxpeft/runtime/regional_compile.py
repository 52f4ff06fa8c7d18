"""Regional compilation that is right in training: each repeated layer compiled once by a plain ``torch.compile``.

``adapted.compile(**torch_compile_kwargs)`` (:class:`RegionalCompileMethods`, in place, like ``nn.Module.compile``)
makes every later call run the *regional twin* of the graph it would run: the repeated layer regions of that graph
(found and matched node for node by :mod:`fxpeft.runtime.shared_layers`) become calls of one template graph module
per group, whose weights are inputs, and each template is wrapped once in ``torch.compile(template, **kwargs)``.
Dynamo traces, and AOT autograd and Inductor compile, one layer; the other layers of the group call the same
compiled code with their own weights (tensors with the same metadata pass the same guards). The rest of the graph
(embeddings, rotary tables and masks, the final norm, the head and the loss, the glue between layers) runs eagerly.

Unlike ``compile_layers_once`` (``torch.compiler.nested_compile_region``, inference only: with torch 2.13 Inductor's
backward through such a region is wrong with attention and dynamic shapes), a template is a frame of its own that
goes through the standard AOT autograd path, so its backward is the one a flat compile would produce for that layer
(``tests/test_regional_compile.py`` compares every gradient with the eager step, Inductor, SDPA, two sequence
lengths).

Guards. A layer's inputs must look alike for all layers to hit one compiled entry. They do, except that the first
layer's hidden states come from a frozen embedding and do not require grad while every later layer's do: with
autograd on, such an input (one that another layer of the group receives from a layer) is handed to the template
as a fresh leaf that requires grad, so all layers pass the same guards (the price: the first layer also computes
the gradient of its input, which nothing reads). Dynamic shapes follow ``torch.compile``'s own rule: with the
default ``dynamic=None`` the first call compiles static shapes and a call with a new sequence length compiles the
template once more with dynamic sizes (automatic dynamic), for all layers at once; ``dynamic=True`` compiles
dynamic sizes at once. The N layers share one compiled entry, so ``torch._dynamo.config.recompile_limit`` does not
count them.

Dropout. A train graph's dropout nodes carry their own ``draw`` numbers (fxpeft/ops/dropout.py), which differ from
layer to layer; matching compares them by rank within the layer, so layers with dropout share a template too, and
each call of it draws its own masks, in the order the flat graph draws them.

Limits. A graph with no repeated layers (one layer) falls back to ``torch.compile`` of the whole graph, and so does
the checkpointed train graph (``gradient_checkpointing_enable``: training calls then compile flat, as before).
Switching adapters (``set_adapter``, ``disable_adapters``, ``set_alpha``) changes tensors the templates read: in
eval mode nothing recompiles; in train mode switching changes which adapter weights require grad, which the guards
check (one compile per new pattern, as with a flat compile). Calls run the gated graphs, never the ones folded for
the active adapters (``fold_gates``), so that switching compiles nothing. Under an enclosing
``torch.compile(adapted)`` the flat graph is traced. Models sharded per layer (FSDP2, ZeRO-3) run as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxpeft.ops.dropout import dropout
from fxpeft.runtime.checkpointing import checkpointed_layer_count
from fxpeft.runtime.shared_layers import (
    LayerRegion,
    layer_regions,
    outline_regions,
    outlined_module,
    region_module,
    repeated_groups,
)

__all__ = ["CompiledTemplate", "RegionalCompileMethods", "compiled_templates", "regional_twin"]


class CompiledTemplate(nn.Module):
    """One template graph module of a group of matching layers, compiled once; every layer of the group calls it.

    ``promote``: the positions of inputs that some layer of the group gets from another layer (hidden states); with
    autograd on, such an input that does not require grad (the first layer's) is passed as a leaf that does, so that
    every layer passes the same guards (see the module's docstring)."""

    def __init__(self, template: fx.GraphModule, promote: tuple[int, ...], compile_kwargs: dict[str, Any]):
        super().__init__()
        self.template = template
        self.promote = promote
        self.compiled = torch.compile(template, **compile_kwargs)

    def forward(self, *args: Any) -> Any:
        if self.promote and torch.is_grad_enabled():
            args = list(args)
            for index in self.promote:
                value = args[index]
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
                    args[index] = value.detach().requires_grad_()
        return self.compiled(*args)


def regional_twin(module: fx.GraphModule, compile_kwargs: dict[str, Any]) -> nn.Module:
    """``module`` with each group of repeated layer regions calling one :class:`CompiledTemplate` (the rest of the
    graph eager), or, when it has no two matching regions, ``torch.compile(module, **compile_kwargs)``. A checkpointed
    train graph (fxpeft/runtime/checkpointing.py) is compiled whole too: its layers are checkpoint calls already."""
    groups = [] if checkpointed_layer_count(module) else repeated_groups(layer_regions(module.graph), _draw_position)
    if not groups:
        return torch.compile(module, **compile_kwargs)
    produced = {node for group in groups for region in group for node in region.outputs}
    calls: dict[str, CompiledTemplate] = {}
    template_of: dict[str, CompiledTemplate] = {}
    for index, group in enumerate(groups):
        promote = tuple(i for i in range(len(group[0].inputs)) if any(r.inputs[i] in produced for r in group))
        template = region_module(group[0], owner=module, name=f"LayerTemplate{index}")
        compiled = CompiledTemplate(template, promote, compile_kwargs)
        for region in group:
            template_of[region.key] = compiled

    def call(graph: fx.Graph, region: LayerRegion, args: tuple) -> fx.Node:
        name = "regional_" + region.key.replace(".", "_")
        calls[name] = template_of[region.key]
        return graph.create_node("call_module", name, args, name=name)

    regions = [region for group in groups for region in group]
    return outlined_module(module, outline_regions(module.graph, regions, call), calls)


def _draw_position(node: fx.Node) -> int | None:
    """The position of a dropout node's ``draw`` (:mod:`fxpeft.ops.dropout`), a number that only keeps its draws apart
    from those of the graph's other dropout nodes: layers whose numbers differ still share a template (each call of
    it draws afresh)."""
    return 3 if node.op == "call_function" and node.target is dropout else None


def compiled_templates(twin: nn.Module) -> list[CompiledTemplate]:
    """The distinct compiled templates a regional twin calls (empty for a whole-graph fallback)."""
    found: dict[int, CompiledTemplate] = {}
    for submodule in twin.children() if isinstance(twin, fx.GraphModule) else ():
        if isinstance(submodule, CompiledTemplate):
            found.setdefault(id(submodule), submodule)
    return list(found.values())


class RegionalCompileMethods:
    """``compile`` of :class:`fxpeft.model.AdaptedModel` (a mixin), which provides ``_programs``; each program keeps
    the options in ``regional_compile`` and runs its regional twins (``Program.module_for``)."""

    _regional_compile: dict[str, Any] | None = None  # torch.compile's options once compile() was called

    @property
    def compiled_in_place(self) -> bool:
        """Whether :meth:`compile` was called: every call then runs compiled layer templates."""
        return self._regional_compile is not None

    def compile(self, **torch_compile_kwargs: Any) -> None:
        """Compile this model in place, one layer at a time: every later call (train and eval, with or without
        autograd) runs its graph with each group of repeated layers calling one compiled template, so a deep model's
        layer is traced and compiled once, training included; the rest of the graph runs eagerly.
        A graph without repeated layers is compiled whole. ``torch_compile_kwargs`` go to each ``torch.compile``
        (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``). Calling it again with other options
        compiles again. See fxpeft/runtime/regional_compile.py.

        Example::

            adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8))
            adapted.compile(dynamic=True)
            adapted(**batch).loss.backward()    # layer 0 compiles; layers 1..N-1 reuse it
        """
        self._regional_compile = dict(torch_compile_kwargs)
        for program in self._programs.values():
            program.set_regional_compile(self._regional_compile)
