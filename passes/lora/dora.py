"""DoRA's branch (``LoRA(use_dora=True)``), PEFT 0.21.2's ``DoraLinearLayer.forward`` as graph nodes.

At a linear ``y = x W^T + b`` (``W`` read as [out, in]: a Conv1D's stored [in, out] weight is transposed)::

    h      = dropout(x.to(lora))                                        (train mode; the eval twin drops it)
    norm   = detach(||W + scaling * detach(B @ A)||_row)                 the weight norm is a constant in backward
    s      = magnitude / norm                                           [out]
    base   = y - b        (no dropout, or eval mode: the running result, so adapters before this one count)
             h @ W^T      (dropout in train mode: PEFT recomputes the base part on the dropped input)
    y'     = y + ((s - 1) * base + s * B(A(h)) * scaling)              in the rows where the adapter is on

The norm is computed from the base weight as a graph input each call (PEFT does it in Python each step); in a
compiled graph Inductor fuses it with the rest. Rows whose gate is 0 are *selected* away (an Inf in an inactive
adapter reaches no row), and the branch reads ``x`` and ``y - b`` through :meth:`RewriteContext.rows_on`, so no
gradient leaves an inactive row through the adapter either. ``B @ A`` is PEFT's ``lora_B(lora_A(eye)).T`` up to the
order of a sum (the same products), so logits equal PEFT's to rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpeft.errors import UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.patterns import linear_form
from fxpeft.graph.sites import LinearSite
from fxpeft.ops.dropout import dropout, next_draw
from fxpeft.passes.lora.joins import cast, rejoin
from fxpeft.rewrite import RewriteContext

__all__ = ["insert_dora_branch", "check_dora_site", "dropped_base", "EVAL_FORMS"]

aten = torch.ops.aten


def dropped_base(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, bias) -> torch.Tensor:
    """DoRA's base part in train mode with dropout: ``h @ weight^T`` on the dropped input (PEFT's
    ``F.linear(x, transpose(weight))``). Its eval form (:data:`EVAL_FORMS`) is ``y - bias``, PEFT's eval value."""
    return aten.linear.default(h, weight)


def _eval_base(node: fx.Node) -> None:
    """``dropped_base(h, w, y, b)`` in eval mode: ``y - b`` (``y`` without a bias)."""
    _, _, y, bias = node.args
    graph = node.graph
    value = y
    if bias is not None:
        with graph.inserting_before(node):
            value = graph.call_function(aten.sub.Tensor, (y, bias))
        value.meta[tags.KEY] = dict(tags.tag_of(node))
    node.replace_all_uses_with(value)
    graph.erase_node(node)


EVAL_FORMS = {dropped_base: _eval_base}


def check_dora_site(site: LinearSite) -> None:
    """DoRA reads the base weight as a tensor: a quantized (bitsandbytes) layer's packed weight is refused."""
    if site.form == "quantized":
        raise UnsupportedError(
            f"LoRA(use_dora=True) at {site.path}: DoRA on a quantized (bitsandbytes) layer is not supported yet; "
            "use use_dora=False there (exclude=...), or a base model that is not quantized.")


def _weight_and_bias(site: LinearSite, node: fx.Node) -> tuple[fx.Node, bool, fx.Node | None]:
    """The weight argument of ``node``, whether it holds ``W`` transposed ([in, out]), and its bias argument."""
    form = linear_form(site.form)
    check_dora_site(site)
    weight = node.args[form.weight]
    bias = node.args[form.bias] if form.bias is not None and len(node.args) > form.bias else None
    if bias is None and form.bias is not None:
        bias = node.kwargs.get("bias")
    return weight, site.form in ("addmm", "matmul"), bias


def insert_dora_branch(ctx: RewriteContext, site: LinearSite, node: fx.Node, inputs: dict[str, fx.Node],
                       weights) -> None:
    """Insert DoRA's branch (the module docstring) after ``node``, a call of the linear ``site``."""
    graph = ctx.program.graph
    call = graph.call_function
    path = site.path

    def tag(value: fx.Node, role: str) -> fx.Node:
        return ctx.tag(value, path, role)

    x = site.input_of(node)
    x_dtype = x.meta["val"].dtype
    lora_dtype = weights.lora_A.dtype
    stack = node.meta.get("nn_module_stack")
    weight, transposed, bias = _weight_and_bias(site, node)
    weight_dtype = weight.meta["val"].dtype if "val" in weight.meta else lora_dtype
    node = ctx.site_output(node)  # after the adapters already at this site: they compose in adapter order
    readers = set(node.users)  # the graph's readers of ``y``, which read the branch's result instead
    with graph.inserting_before(node.next):
        h = cast(graph, x, x_dtype, lora_dtype)
        if h is not x:
            tag(h, "input")
        if weights.dropout > 0:
            h = tag(call(dropout, (h, weights.dropout, True, next_draw())), "input")  # see fxpeft.ops.dropout
        h = ctx.rows_on(h, path)
        # W as [out, in] in the adapter's dtype, and the norm of each of its rows with the update added.
        w = tag(call(aten.t.default, (weight,)), "dora_weight") if transposed else weight
        w = cast(graph, w, weight_dtype, lora_dtype)
        if w is not weight:
            tag(w, "dora_weight")
        update = tag(call(aten.detach.default, (tag(call(aten.mm.default, (inputs["lora_B"], inputs["lora_A"])),
                                                         "dora_weight"),)), "dora_weight")
        total = tag(call(aten.add.Tensor, (w, tag(call(aten.mul.Tensor, (inputs["scaling"], update)),
                                                   "dora_weight"))), "dora_weight")
        norm = tag(call(aten.linalg_vector_norm.default, (total, 2, [1])), "dora_weight")
        norm = tag(call(aten.detach.default, (norm,)), "dora_weight")
        scale = tag(call(aten.div.Tensor, (inputs["lora_magnitude_vector"], norm)), "magnitude")
        a = tag(call(aten.linear.default, (h, inputs["lora_A"])), "dora_A")
        lora = tag(call(aten.linear.default, (a, inputs["lora_B"])), "dora_B")
        if weights.dropout > 0:
            base = tag(call(dropped_base, (h, w, node, bias)), "dora_base")
        else:
            base = tag(call(aten.sub.Tensor, (node, bias)), "dora_base") if bias is not None else node
        base = ctx.rows_on(base, path)
        kept = tag(call(aten.mul.Tensor, (tag(call(aten.sub.Tensor, (scale, 1)), "magnitude"), base)), "dora_base")
        added = tag(call(aten.mul.Tensor, (tag(call(aten.mul.Tensor, (scale, lora)), "dora_B"), inputs["scaling"])),
                    "dora_B")
        delta = tag(call(aten.add.Tensor, (kept, added)), "dora_delta")
        gate = ctx.gate_input()
        on = tag(call(aten.unsqueeze.default, (tag(call(aten.ne.Scalar, (gate, 0)), "scale"), 1)), "scale")
        batch = tag(call(aten.sym_size.int, (gate, 0)), "scale")
        rows = tag(call(aten.reshape.default, (delta, [batch, -1])), "scale")
        gated = tag(call(aten.view_as.default, (tag(call(aten.where.ScalarOther, (on, rows, 0.0)), "scale"), delta)),
                    "scale")
        tags.mark_when_on(gated, "arg", 1)
        joined = ctx.tag(call(aten.add.Tensor, (node, gated)), path, tags.JOIN)
    rejoin(ctx, path, node, joined, readers, lora_dtype, stack)
