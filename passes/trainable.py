"""Trainable modules (PEFT's ``modules_to_save``): the graph reads adapter-owned copies of their tensors."""

from __future__ import annotations

from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Trainable

__all__ = ["TrainableMethod"]


class TrainableMethod(Method):
    """Whole modules trained as adapter-owned copies; saved in the file of the adapter's other method, as PEFT's
    ``modules_to_save`` (no codec of its own)."""

    rule_type = Trainable
    tag = "copy"

    def rewrite(self, rule: Trainable, ctx: RewriteContext) -> None:
        """Copy every parameter under each selected module into the adapter and train the copies."""
        fqns = [source.target for source in ctx.program.sources if source.kind == "parameter"]
        for path in ctx.select_modules(rule):
            for fqn in dict.fromkeys(f for f in fqns if f.startswith(path + ".")):
                ctx.train_copy(fqn, peft_name=fqn, shadows=False)


register_method(TrainableMethod())
