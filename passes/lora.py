"""The LoRA pass: ``y = linear(x)`` becomes ``y + B(A(dropout(x))) * scaling`` at each selected linear.

The inserted nodes read ``A``, ``B`` and ``scaling`` as graph inputs fed from a :class:`LoraWeights`
module owned by the adapter, so the base weights are never touched and the same tensors serve every
captured signature. ``scaling`` is a tensor, so changing ``alpha`` changes no graph. The computation is
PEFT's, in PEFT's order, so equal weights give equal numbers; with ``B = 0`` the added term is exactly
zero and the output is the base model's bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import SiteModule
from fxpeft.rewrite import RewriteContext, register_pass
from fxpeft.rules import LoRA
from fxpeft.sites import LinearSite

__all__ = ["LoraWeights", "apply_lora"]

aten = torch.ops.aten


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT keeps adapters in float32 over half-precision bases (``autocast_adapter_dtype=True``)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point \
        else base_dtype


class LoraWeights(SiteModule):
    """``lora_A`` [r, in], ``lora_B`` [out, r] and ``scaling`` for one linear site."""

    def __init__(self, path: str, in_features: int, out_features: int, rule: LoRA, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.path = path
        self.init = rule.init
        self.r = rule.r
        self.dropout = float(rule.dropout)
        self.scaling_value = float(rule.scaling)
        self.fan_in_fan_out = False  # True when the base stores W as [in, out] (transformers' Conv1D)
        self.lora_A = nn.Parameter(torch.empty(rule.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rule.r, device=device, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(rule.scaling, dtype=torch.float32, device=device),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        self.scaling.fill_(self.scaling_value)
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def set_scaling(self, value: float) -> None:
        """Change the scaling in place (no graph changes, so nothing recompiles)."""
        self.scaling_value = float(value)
        self.scaling.fill_(value)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.path}"
        return {f"{prefix}.lora_A.weight": self.lora_A, f"{prefix}.lora_B.weight": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` in the layout of an ``nn.Linear`` weight ([out, in])."""
        return (self.lora_B @ self.lora_A) * self.scaling


def _cast(graph: fx.Graph, node: fx.Node, have: torch.dtype, want: torch.dtype) -> fx.Node:
    return node if have == want else graph.call_function(aten.to.dtype, (node, want))


def _insert_branch(ctx: RewriteContext, site: LinearSite, node: fx.Node, inputs: dict[str, fx.Node],
                   weights: LoraWeights) -> None:
    graph = ctx.program.graph
    x = site.input_of(node)
    x_dtype = x.meta["val"].dtype
    y_dtype = node.meta["val"].dtype
    tag = {"adapter": ctx.adapter_name, "site": site.path, "method": "lora"}
    with graph.inserting_before(node.next):
        h = x
        if weights.dropout > 0:
            h = graph.call_function(aten.dropout.default, (h, weights.dropout, True))
        h = _cast(graph, h, x_dtype, weights.lora_A.dtype)
        a = graph.call_function(aten.linear.default, (h, inputs["lora_A"]))
        b = graph.call_function(aten.linear.default, (a, inputs["lora_B"]))
        delta = graph.call_function(aten.mul.Tensor, (b, inputs["scaling"]))
        delta = _cast(graph, delta, weights.lora_A.dtype, y_dtype)
        out = graph.call_function(aten.add.Tensor, (node, delta))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    cursor = out
    stack = node.meta.get("nn_module_stack")
    while cursor is not node:
        cursor.meta["fxpeft"] = tag
        if stack is not None:
            cursor.meta["nn_module_stack"] = stack
        cursor = cursor.prev


@register_pass(LoRA)
def apply_lora(rule: LoRA, ctx: RewriteContext) -> None:
    """Add a LoRA branch at every linear site the rule selects (and train biases if asked)."""
    sites = ctx.select_linear(rule)
    for site in sites:
        base = ctx.base_model.get_parameter(site.weight_fqn)
        weights = ctx.site(site.path, "lora", lambda: LoraWeights(
            site.path, site.in_features, site.out_features, rule, base.device, adapter_dtype(base.dtype)))
        weights.fan_in_fan_out = site.form == "addmm"
        inputs = {name: ctx.adapter_input(site.path, "lora", name) for name in ("lora_A", "lora_B", "scaling")}
        for node in site.nodes:
            _insert_branch(ctx, site, node, inputs, weights)
    _train_biases(rule, ctx, {site.path for site in sites})


def _train_biases(rule: LoRA, ctx: RewriteContext, lora_paths: set[str]) -> None:
    """``bias="lora_only"``: biases of the adapted linears train; ``"all"``: every bias does (PEFT's rule)."""
    if rule.bias == "none":
        return
    for source in list(ctx.program.sources):
        if source.kind != "parameter" or not source.target.endswith("bias"):
            continue
        owner = source.target.rpartition(".")[0]
        if owner in lora_paths:
            ctx.train_copy(source.target, peft_name=f"{owner}.base_layer.bias", shadows=True)
        elif rule.bias == "all":
            ctx.train_copy(source.target, peft_name=source.target, shadows=True)
