"""LoRA on convolutions (``nn.Conv1d`` / ``nn.Conv2d``), PEFT 0.21.2's ``lora.Conv1d`` / ``lora.Conv2d`` as graph nodes.

A conv site (:class:`fxpeft.graph.sites.ConvSite`) is a conv op of the captured graph whose weight is a model
parameter. At ``y = conv(x, W, b, stride, padding, dilation, groups)`` the branch is PEFT's, in PEFT's order::

    h = dropout(x.to(lora))                                                     (the input, as for a linear)
    y' = (y + conv(conv(h, A, stride, padding), B, groups) * scaling).to(y.dtype)

``A`` (``lora_A.weight``) is ``[r, in, *kernel]``: a conv with the base's kernel size, stride and padding, and
PEFT's dilation 1 and groups 1; ``B`` (``lora_B.weight``) is ``[out, r / groups, 1, ...]``: a 1x1 conv of stride 1
with the base's groups (PEFT's ``out_kernel``/``out_stride``). Keys, ``r``/``alpha``/``rank_pattern``/
``use_rslora``, gating per batch row (the conv's input and output are ``[batch, channels, ...]``) and the trained
bias copies are as for a linear (:mod:`fxpeft.passes.lora`). A merge adds PEFT's ``get_delta_weight``: for a 1x1
Conv2d ``(B @ A) * scaling`` as kernels, else ``conv(A^T, B)^T * scaling``.

Where PEFT is odd, fxpeft matches it or refuses (an error at ``transform``, before anything is built):

- PEFT requires ``r % groups == 0`` (a RuleError naming the site and the rank); it cannot merge a conv with
  ``groups > 1`` (neither can fxpeft: UnsupportedError at merge, as PEFT's NotImplementedError);
- PEFT's ``lora_A`` ignores the base's dilation. With ``padding="same"`` the shapes still agree and PEFT computes
  an undilated ``A``: fxpeft computes the same, and refuses to merge it (the merged weight would be dilated, so the
  merged model would not be the adapted one). With numeric padding the shapes disagree and PEFT fails in forward:
  fxpeft refuses at transform;
- a conv whose ``padding_mode`` is not ``"zeros"`` (PEFT pads ``A``'s input with zeros, the base pads otherwise),
  ``Conv3d`` sites and ``init="orthogonal"`` (PEFT raises) are refused with an UnsupportedError at transform;
- DoRA (``use_dora=True``) is PEFT's ``DoraConv1d/2dVariant``: a magnitude ``lora_magnitude_vector`` of shape
  ``[1, out, 1, ...]`` starting at ``||W + scaling * B A||`` per output channel (``B A`` as PEFT forms it:
  ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the kernel), then
  ``y + (m / norm - 1) * (y - b) + m / norm * conv(conv(h, A), B) * scaling`` with the norm recomputed each call
  and detached; merge is PEFT's ``m / ||W + dW|| * (W + dW)``. Supported with ``groups=1``, no dilation and
  ``dropout=0`` (else an UnsupportedError at transform: PEFT recomputes the base conv on the dropped input there,
  which fxpeft does not do for convs yet); like every DoRA adapter, it is not mixed per row (``adapter_names``);
- ``add_weighted_adapter`` over an adapter with conv sites is refused (:mod:`fxpeft.passes.lora.combine`).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.sites import ConvSite
from fxpeft.ops.dropout import dropout, next_draw
from fxpeft.passes.lora.embedding import not_per_row
from fxpeft.passes.lora.joins import cast, rejoin
from fxpeft.passes.lora.weights import LoraWeights
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["LoraConvWeights", "check_conv_site", "insert_conv_branch", "CONV_ROLES"]

aten = torch.ops.aten

CONV_ROLES = ("conv_A", "conv_B")  # the tags of the branch's two convs (the linear branch's are lora_A / lora_B)
_CONV = {1: (aten.conv1d.default, aten.conv1d.padding, F.conv1d), 2: (aten.conv2d.default, aten.conv2d.padding,
                                                                      F.conv2d)}


def _dilated(site: ConvSite) -> bool:
    """Whether the base conv's dilation changes its output (a dilation > 1 along a kernel longer than 1)."""
    return any(d > 1 and k > 1 for d, k in zip(site.dilation, site.kernel_size))


def check_conv_site(rule: LoRA, site: ConvSite, ctx: RewriteContext) -> None:
    """Refuse, before anything is built, a conv site that PEFT's LoRA refuses or computes wrongly (module docstring)."""
    where = f"LoRA at the convolution {site.path}"
    if site.dims not in _CONV:
        raise UnsupportedError(f"{where}: LoRA on Conv{site.dims}d is not supported yet (Conv1d and Conv2d are); "
                               "leave it out of `targets` (exclude=[...]).")
    if rule.use_dora and (site.groups > 1 or _dilated(site) or rule.dropout > 0):
        raise UnsupportedError(f"{where}: DoRA (use_dora=True) on a convolution is supported with groups=1, no "
                               f"dilation and dropout=0 (this one has groups={site.groups}, dilation="
                               f"{list(site.dilation)}, dropout={rule.dropout}); use use_dora=False there, or exclude "
                               "it from this rule.")
    if rule.init == "orthogonal":
        raise UnsupportedError(f"{where}: init='orthogonal' is for linears only (PEFT raises 'Unknown "
                               "initialization' for a conv); use init='default' or 'gaussian' for convolutions.")
    r = rule.rank_for(site.path)
    if r % site.groups:
        name, rank = site.path.rpartition(".")[2], site.groups * max(1, r // site.groups)
        raise RuleError(f"{where}: the rank r={r} is not divisible by the conv's groups={site.groups} (PEFT requires "
                        "it: lora_B is a grouped 1x1 conv). Choose a multiple of the groups, e.g. with "
                        f"rank_pattern={{{name!r}: {rank}}}, or exclude it.")
    if _dilated(site) and site.padding != "same":
        raise UnsupportedError(f"{where}: the conv has dilation={list(site.dilation)} with padding "
                               f"{site.padding!r}; PEFT's lora_A ignores the dilation, so its output does not have the "
                               "conv's size (PEFT fails in forward). Exclude this conv from the targets.")
    shared = next((reason for reason in map(lambda node: not_per_row(ctx, node), site.nodes) if reason), None)
    if shared:
        raise UnsupportedError(f"{where}: {shared}; fxpeft gates LoRA per batch row. Exclude it from the targets.")
    module = ctx.get_module(site.path)
    mode = getattr(module, "padding_mode", "zeros")
    if isinstance(module, torch.nn.modules.conv._ConvNd) and mode != "zeros":
        raise UnsupportedError(f"{where}: the conv pads with padding_mode={mode!r}, but PEFT's lora_A pads with "
                               "zeros, which fxpeft does not reproduce yet. Exclude this conv from the targets.")


class LoraConvWeights(LoraWeights):
    """``lora_A`` ``[r, in, *kernel]``, ``lora_B`` ``[out, r / groups, 1, ...]`` and ``scaling`` for one conv site,
    with the conv's geometry (``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``, ``dims``)."""

    site_form = "conv"

    def __init__(self, site: ConvSite, rule: LoRA, device: torch.device, dtype: torch.dtype, base_weight=None):
        ones = (1,) * site.dims
        super().__init__(site.path, site.in_channels, site.out_channels, rule, device, dtype, base_weight=base_weight,
                         shapes=lambda r: ((r, site.in_channels, *site.kernel_size),
                                           (site.out_channels, r // site.groups, *ones), (1, site.out_channels, *ones)))
        self.dims, self.kernel_size, self.stride = site.dims, tuple(site.kernel_size), tuple(site.stride)
        self.padding = site.padding if isinstance(site.padding, str) else tuple(site.padding)
        self.dilation, self.groups = tuple(site.dilation), site.groups
        self.weight_fqn = site.weight_fqn
        if self.groups > 1:
            self.merge_refusal = (f"the LoRA conv at {site.path} has groups={self.groups}; PEFT cannot merge it "
                                  "either ('Merging is not supported for _ConvNd layers with groups > 1'). Keep it "
                                  "unmerged.")
        elif any(d > 1 and k > 1 for d, k in zip(self.dilation, self.kernel_size)):
            self.merge_refusal = (f"the LoRA conv at {site.path} is dilated (dilation={list(self.dilation)}) and "
                                  "PEFT's lora_A is not, so no merged weight computes the adapted conv. Keep it "
                                  "unmerged.")

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA's magnitude, PEFT's ``DoraConv*dLayer.update_layer``: ``||W + scaling * B A||`` per output channel
        (``B A`` as ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the kernel), shaped ``[1, out, 1, ...]``, in the
        base weight's dtype."""
        weight = self.base_weight()
        if weight.device.type == "meta":
            return
        weight = weight.to(self.lora_A.device)
        a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        if weight.dtype == torch.float16:  # PEFT's fp16 detour
            a, b = a.float(), b.float()
        update = torch.mm(b.view(-1, self.r), a.view(self.r, -1)).reshape(weight.shape).to(weight.dtype)
        self.lora_magnitude_vector.copy_(self.dora_norm(weight, self.scaling_value * update))

    def dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """PEFT's ``_DoraConvNdLayer.get_weight_norm`` (scaling 1): the norm over all but the output dimension,
        ``[1, out, 1, ...]``."""
        total = weight + delta
        return total.norm(p=2, dim=tuple(range(1, total.dim())), keepdim=True).transpose(1, 0)

    def delta_weight(self) -> torch.Tensor:
        """PEFT's ``_ConvNd.get_delta_weight``: ``conv(A^T, B)^T * scaling`` in the base weight's layout (for a 1x1
        Conv2d, ``B @ A`` as kernels; with groups > 1 PEFT leaves the conv's result untransposed)."""
        a, b = self.lora_A, self.lora_B
        if self.dims == 2 and self.kernel_size == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * self.scaling
        delta = _CONV[self.dims][2](a.transpose(0, 1), b)
        return delta * self.scaling if self.groups > 1 else delta.transpose(0, 1) * self.scaling

    @torch.no_grad()
    def merge_into(self, base_model: torch.nn.Module) -> None:
        if self.merge_refusal is not None:
            raise UnsupportedError(f"Cannot merge: {self.merge_refusal}")
        super().merge_into(base_model)


def _insert_dora_delta(ctx: RewriteContext, site: ConvSite, base_node: fx.Node, y: fx.Node, h: fx.Node,
                       lora: fx.Node, inputs: dict[str, fx.Node], weights: LoraConvWeights) -> fx.Node:
    """DoRA's addition at a conv (PEFT's ``_DoraConvNdLayer.forward`` without dropout), before the row gate::

        norm  = detach(||W + scaling * detach(B.view(-1, r) @ A.view(r, -1))||)   per output channel, [1, out, 1, ...]
        s     = magnitude / norm
        delta = (s - 1) * (y - b) + s * conv(conv(h, A), B) * scaling
    """
    graph = ctx.program.graph
    call = graph.call_function

    def tag(value: fx.Node, role: str) -> fx.Node:
        return ctx.tag(value, site.path, role)

    weight = base_node.args[1]
    lora_dtype = weights.lora_A.dtype
    shape = list(weight.meta["val"].shape)
    w = cast(graph, weight, weight.meta["val"].dtype, lora_dtype)
    if w is not weight:
        tag(w, "dora_weight")
    flat_b = tag(call(aten.view.default, (inputs["lora_B"], [-1, weights.r])), "dora_weight")
    flat_a = tag(call(aten.view.default, (inputs["lora_A"], [weights.r, -1])), "dora_weight")
    update = tag(call(aten.reshape.default, (tag(call(aten.mm.default, (flat_b, flat_a)), "dora_weight"), shape)),
                 "dora_weight")
    update = tag(call(aten.detach.default, (update,)), "dora_weight")
    total = tag(call(aten.add.Tensor, (w, tag(call(aten.mul.Tensor, (inputs["scaling"], update)), "dora_weight"))),
                "dora_weight")
    dims = list(range(1, len(shape)))
    norm = tag(call(aten.linalg_vector_norm.default, (total, 2, dims, True)), "dora_weight")
    norm = tag(call(aten.detach.default, (tag(call(aten.transpose.int, (norm, 1, 0)), "dora_weight"),)),
               "dora_weight")
    scale = tag(call(aten.div.Tensor, (inputs["lora_magnitude_vector"], norm)), "magnitude")
    bias = base_node.args[2] if len(base_node.args) > 2 else None
    base = y
    if bias is not None:
        column = tag(call(aten.view.default, (bias, [1, -1] + [1] * site.dims)), "dora_base")
        base = tag(call(aten.sub.Tensor, (y, column)), "dora_base")
    base = ctx.rows_on(base, site.path)
    kept = tag(call(aten.mul.Tensor, (tag(call(aten.sub.Tensor, (scale, 1)), "magnitude"), base)), "dora_base")
    added = tag(call(aten.mul.Tensor, (tag(call(aten.mul.Tensor, (scale, lora)), "dora_B"), inputs["scaling"])),
                "dora_B")
    return tag(call(aten.add.Tensor, (kept, added)), "dora_delta")


def _gate_rows(ctx: RewriteContext, path: str, delta: fx.Node) -> fx.Node:
    """``delta`` in the rows whose gate is on, exact zeros elsewhere (DoRA's scaling is inside the delta)."""
    call = ctx.program.graph.call_function
    gate = ctx.gate_input()
    on = ctx.tag(call(aten.unsqueeze.default, (ctx.tag(call(aten.ne.Scalar, (gate, 0)), path, "scale"), 1)), path,
                 "scale")
    rows = ctx.tag(call(aten.reshape.default, (delta, [ctx.tag(call(aten.sym_size.int, (gate, 0)), path, "scale"),
                                                        -1])), path, "scale")
    kept = ctx.tag(call(aten.where.ScalarOther, (on, rows, 0.0)), path, "scale")
    return tags.mark_when_on(ctx.tag(call(aten.view_as.default, (kept, delta)), path, "scale"), "arg", 1)


def insert_conv_branch(ctx: RewriteContext, site: ConvSite, node: fx.Node, inputs: dict[str, fx.Node],
                       weights: LoraConvWeights) -> None:
    """``y`` becomes ``(y + conv(conv(dropout(x.to(lora)), A), B) * scaling).to(y.dtype)`` after ``node``, gated per
    batch row as a linear's branch (``RewriteContext.rows_on`` / ``gated``)."""
    graph = ctx.program.graph
    call = graph.call_function
    x = site.input_of(node)
    lora_dtype = weights.lora_A.dtype
    stack = node.meta.get("nn_module_stack")
    base_node = node
    node = ctx.site_output(node)  # after the adapters already at this site: they compose in adapter order
    readers = set(node.users)
    ones = [1] * site.dims
    plain, padded, _ = _CONV[site.dims]
    with graph.inserting_before(node.next):
        h = cast(graph, x, x.meta["val"].dtype, lora_dtype)
        if h is not x:
            ctx.tag(h, site.path, "input")
        if weights.dropout > 0:
            h = ctx.tag(call(dropout, (h, weights.dropout, True, next_draw())), site.path, "input")
        h = ctx.rows_on(h, site.path)
        op = padded if isinstance(site.padding, str) else plain
        padding = site.padding if isinstance(site.padding, str) else list(site.padding)
        a = ctx.tag(call(op, (h, inputs["lora_A"], None, list(site.stride), padding, ones, 1)), site.path,
                    CONV_ROLES[0])
        b = ctx.tag(call(plain, (a, inputs["lora_B"], None, ones, [0] * site.dims, ones, site.groups)), site.path,
                    CONV_ROLES[1])
        if weights.use_dora:
            delta = _gate_rows(ctx, site.path, _insert_dora_delta(ctx, site, base_node, node, h, b, inputs, weights))
        else:
            delta = ctx.gated(b, inputs["scaling"], site.path, weights.scaling.dtype)
        total = ctx.tag(call(aten.add.Tensor, (node, delta)), site.path, tags.JOIN)
    rejoin(ctx, site.path, node, total, readers, lora_dtype, stack)
