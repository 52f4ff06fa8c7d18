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
        for fqn in _parameters_of(rule, ctx):
            ctx.train_copy(fqn, peft_name=fqn, shadows=False)

    def allowed_sites(self, rule: Trainable, ctx: RewriteContext) -> dict[str, Trainable]:
        """verify ``--rules``: a declared Trainable rule allows copies of the parameters it would copy."""
        return {fqn: rule for fqn in _parameters_of(rule, ctx)}

    def policy_findings(self, site, allowed, given, declared, state) -> list[str]:
        if allowed is None:
            return ["the adapter trains a copy of this base tensor (modules_to_save), which no trainable rule "
                    "allows."]
        return []


def _parameters_of(rule: Trainable, ctx: RewriteContext) -> list[str]:
    """The parameters (read by the graph) under each module ``rule`` selects, in graph order, once per module."""
    fqns = [source.target for source in ctx.program.sources if source.kind == "parameter"]
    return [fqn for path in ctx.select_modules(rule)
            for fqn in dict.fromkeys(f for f in fqns if f.startswith(path + "."))]


register_method(TrainableMethod())
