"""Trainable modules (PEFT's ``modules_to_save``): the graph reads adapter-owned copies of their tensors."""

from __future__ import annotations

from fxpeft.rewrite import RewriteContext, register_pass
from fxpeft.rules import Trainable

__all__ = ["apply_trainable"]


@register_pass(Trainable)
def apply_trainable(rule: Trainable, ctx: RewriteContext) -> None:
    """Copy every parameter under each selected module into the adapter and train the copies."""
    fqns = [source.target for source in ctx.program.sources if source.kind == "parameter"]
    for path in ctx.select_modules(rule):
        for fqn in dict.fromkeys(f for f in fqns if f.startswith(path + ".")):
            ctx.train_copy(fqn, peft_name=fqn, shadows=False)
