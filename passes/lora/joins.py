"""How a LoRA-family branch rejoins the linear it adapts, shared by plain LoRA and DoRA: casts between the base's and
the adapter's dtypes, and the end of a branch (the result cast back to the linear's dtype, standing where its output
stood for the readers it had)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpeft.graph import tags
from fxpeft.rewrite import RewriteContext

__all__ = ["cast", "rejoin"]

aten = torch.ops.aten


def cast(graph: fx.Graph, node: fx.Node, have: torch.dtype, want: torch.dtype) -> fx.Node:
    """``node`` converted from ``have`` to ``want`` (a new ``to`` node), or ``node`` itself when they are equal."""
    return node if have == want else graph.call_function(aten.to.dtype, (node, want))


def rejoin(ctx: RewriteContext, path: str, node: fx.Node, joined: fx.Node, readers: set[fx.Node],
           lora_dtype: torch.dtype, stack) -> None:
    """End the branch at ``path``: ``joined`` (the linear's output ``node`` plus the branch, in the promoted dtype) cast
    back to ``node``'s dtype, read instead of ``node`` by ``readers`` (its readers before the branch was inserted), with
    ``node``'s value metadata (later passes, and a LoRA site fed directly by this one, read ``meta["val"]``) and its
    module stack (``stack``) on every inserted node."""
    y_val = node.meta["val"]
    with ctx.program.graph.inserting_after(joined):
        out = cast(ctx.program.graph, joined, torch.promote_types(y_val.dtype, lora_dtype), y_val.dtype)
    if out is not joined:
        ctx.tag(out, path, tags.OUTPUT)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user in readers)
    out.meta["val"] = y_val
    cursor = out
    while cursor is not node:
        if stack is not None:
            cursor.meta["nn_module_stack"] = stack
        cursor = cursor.prev
