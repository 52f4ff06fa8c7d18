"""Trainable modules (PEFT's ``modules_to_save``): the graph reads adapter-owned copies of their tensors.

A tensor that several module paths share (tied weights: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
is read through one placeholder of the captured graph. As PEFT does by default, a copy stands in for the module the
rule selects and nowhere else: only the ops that read the tensor as a selected path (fxpeft/shared_tensors.py
``use_of``) read the copy. Every selected path of one tensor gets the *same* copy (as PEFT's ``ensure_weight_tying``
does), never two that would drift apart, saved under each path's key.
"""

from __future__ import annotations

import torch

from fxpeft.adapters import ParameterCopy, site_key
from fxpeft.graph import tags
from fxpeft.graph.program import InputSource
from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Trainable
from fxpeft.shared_tensors import base_reads, tied_names, use_of

__all__ = ["TrainableMethod"]

aten = torch.ops.aten


class TrainableMethod(Method):
    """Whole modules trained as adapter-owned copies; saved in the file of the adapter's other method, as PEFT's
    ``modules_to_save`` (no codec of its own)."""

    rule_type = Trainable
    tag = "copy"

    def rewrite(self, rule: Trainable, ctx: RewriteContext) -> None:
        """Copy every parameter under each selected module into the adapter and train the copies."""
        tied = tied_names(ctx.base_model)
        for fqn in _parameters_of(rule, ctx):
            if fqn in tied:
                _train_tied_copy(ctx, fqn, tied[fqn])
            else:
                ctx.train_copy(fqn, peft_name=fqn, shadows=False)

    def allowed_sites(self, rule: Trainable, ctx: RewriteContext) -> dict[str, Trainable]:
        """verify ``--rules``: a declared Trainable rule allows copies of the parameters it would copy (of a tied
        tensor: under any of its names, the graph reading it through one of them)."""
        tied = tied_names(ctx.base_model)
        return {name: rule for fqn in _parameters_of(rule, ctx) for name in tied.get(fqn, (fqn,))}

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


def _train_tied_copy(ctx: RewriteContext, fqn: str, names: tuple[str, ...]) -> None:
    """``ctx.train_copy`` for one path ``fqn`` of a tied tensor (all its paths: ``names``): the ops that read the
    tensor as ``fqn`` read ``where(adapter on, copy, base)``; its other uses keep the base tensor.

    The graph reads a tied tensor through one placeholder (export keeps one name for it), so the adapter's one copy
    of the tensor is the site of that name, standing in for every path selected so far (``ParameterCopy.uses``)
    and saved under each one's key."""
    program, graph = ctx.program, ctx.program.graph
    source_of = program.source_map()  # placeholder name: its source
    sources = {InputSource("parameter", name) for name in names}
    reads = [(op, value, placeholder) for placeholder in program.placeholders()
             if source_of.get(placeholder.name) in sources
             for op, value in base_reads(placeholder) if use_of(op, names) == fqn]
    through = source_of[reads[0][2].name].target if reads else fqn
    base = ctx.base_model.get_parameter(fqn)
    site = ctx.site(through, "copy", lambda: ParameterCopy(through, base, peft_name=fqn, shadows=False, uses=(fqn,)))
    site.serve(fqn, peft_name=fqn)
    copy_source = InputSource("adapter", (ctx.adapter_name, site_key(through, "copy"), "weight"))
    copy_node = next((node for node in program.placeholders() if source_of.get(node.name) == copy_source), None)
    chosen = {}  # the value an op read: the join that replaces it
    for op, value, placeholder in reads:
        if value not in chosen:
            if copy_node is None:
                copy_node = ctx.adapter_input(through, "copy", "weight")
            gate = ctx.gate_input()
            # At the top, as train_copy puts its joins; after ``value`` when it is another adapter's join.
            anchor = next(node for node in graph.nodes if node.op != "placeholder") \
                if value.op == "placeholder" else value.next
            with graph.inserting_before(anchor):
                amax = graph.call_function(aten.amax.default, (gate, [0]))
                on = graph.call_function(aten.gt.Scalar, (amax, 0))
                join = tags.mark_when_on(graph.call_function(aten.where.self, (on, copy_node, value)), "arg", 1)
            # Tagged at the name the graph reads the tensor through, where the join stands (as train_copy's).
            for node, role in ((amax, "gate"), (on, "gate"), (join, tags.JOIN)):
                tags.tag(node, ctx.adapter_name, source_of[placeholder.name].target, "copy", role)
            chosen[value] = join
        op.replace_input_with(value, chosen[value])


register_method(TrainableMethod())
