"""The adapters as declared, and what their declared rules build on a fresh capture of the base model.

A declared adapter is its config, the rules read from it and its tensors. Applying those rules to a fresh
capture, as fxpeft's own passes would, gives the *reference*: the sites the rules select, the keys and shapes
of the tensors they need, which rule made each site, and the ops each method joins the base data flow with.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxpeft.adapters import Adapter
from fxpeft.errors import NoMatchError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.methods import codec_for_rules, saved_rules
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule
from fxpeft.verification.report import Findings

__all__ = ["Declared", "declared_in_model", "build_references", "join_targets"]


@dataclasses.dataclass
class Declared:
    """One adapter as declared: its config, the rules read from it, its tensors, and the reference adapter
    those rules give on a fresh capture of the base (declared sites and the keys and shapes they need), with
    the rule that made each of its sites (``made_by``, by site key)."""

    config: dict | None
    rules: list[Rule]
    state: dict[str, torch.Tensor]
    reference: Adapter | None = None
    made_by: dict[str, Rule] = dataclasses.field(default_factory=dict)


def declared_in_model(adapted) -> dict[str, Declared]:
    """The adapters of an :class:`~fxpeft.AdaptedModel` as their saved files would declare them."""
    declared = {}
    for name, adapter in adapted.adapters.items():
        state = {key: value.detach() for key, value in adapter.peft_state_dict().items()}
        try:
            codec = codec_for_rules(adapter.rules)
            config = codec.to_config(adapted.base_model, saved_rules(adapter.rules), adapter.selected, adapter)
            rules = codec.to_rules(config, set(state))
        except UnsupportedError:
            config, rules = None, list(adapter.rules)
        declared[name] = Declared(config, rules, state)
    return declared


def build_references(found: Findings, context: RewriteContext, declared: dict[str, Declared]) -> None:
    """Apply each adapter's declared rules to ``context``'s program (a fresh capture whose view is taken
    already): the sites they select and the adapter tensors they need, as fxpeft's own passes would make them.
    An adapter whose rules select nothing gets no reference and a ``targets-unmatched`` finding."""
    for name, item in declared.items():
        adapter = Adapter(list(item.rules))
        context = context.for_adapter(name, adapter)
        made_by: dict[str, Rule] = {}
        try:
            for rule in adapter.rules:
                before = set(adapter.sites.keys())
                context.apply(rule)
                made_by.update((key, rule) for key in adapter.sites.keys() if key not in before)
        except NoMatchError as error:
            found.add("targets-unmatched", name, f"the adapter's config selects nothing in this base model: {error}",
                      candidates=error.candidates)
            continue
        item.reference, item.made_by = adapter, made_by


def join_targets(graph: fx.Graph) -> dict[str, set]:
    """Method tag -> the ops its join nodes are in ``graph`` (a reference: what the declared rules build)."""
    targets: dict[str, set] = {}
    for node in graph.nodes:
        tag = tags.tag_of(node)
        if tag is not None and tag.get("role") == tags.JOIN:
            targets.setdefault(tag.get("method"), set()).add(node.target)
    return targets
