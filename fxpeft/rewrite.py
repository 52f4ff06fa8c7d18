"""Stage 3, rewrite: apply each rule's method to a captured program.

Methods register themselves per rule type (:mod:`fxpeft.methods`); the engine never imports a pass by name.
A method's ``rewrite`` receives the rule and a :class:`RewriteContext`, the small interface it may use: the
sites found in the graph, target selection, adapter parameters (get-or-create, so a re-capture for a new
signature reuses the same tensors), graph inputs fed from those parameters, and node tagging.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from fxpeft.adapters import Adapter, ParameterCopy, SiteModule, site_key
from fxpeft.graph import tags
from fxpeft.graph.program import InputSource, Program
from fxpeft.graph.selectors import select_paths
from fxpeft.graph.sites import (
    AttentionOp,
    ConvSite,
    EmbeddingSite,
    LinearSite,
    find_attention_ops,
    find_conv_sites,
    find_embedding_sites,
    find_linear_sites,
    output_heads,
    role_paths,
)
from fxpeft.methods import method_for
from fxpeft.rules import Rule

__all__ = ["RewriteContext", "apply_rules", "SITE_KINDS"]

SITE_KINDS = ("linear", "conv", "embedding")
"""The kinds of module site :meth:`RewriteContext.select_sites` chooses from."""
_KIND_WORDS = {("linear",): "linear", ("conv",): "convolution", ("embedding",): "embedding"}

aten = torch.ops.aten


class RewriteContext:
    """What a pass sees: the program, the base model, one adapter, and the sites found in the graph."""

    def __init__(self, program: Program, base_model: torch.nn.Module, adapter_name: str, adapter: Adapter):
        self.program = program
        self.base_model = base_model
        self.adapter_name = adapter_name
        self.adapter = adapter
        # Read the graph's structure before any pass inserts nodes: an inserted LoRA branch would
        # otherwise join two layers' data flow and confuse role finding.
        self.linear_sites: dict[str, LinearSite] = find_linear_sites(program)
        self.conv_sites: dict[str, ConvSite] = find_conv_sites(program)
        self.embedding_sites: dict[str, EmbeddingSite] = find_embedding_sites(program)
        self.attention_ops: list[AttentionOp] = find_attention_ops(program)
        self.roles: dict[str, set[str]] = role_paths(program, self.linear_sites, self.attention_ops)
        self.all_linear: set[str] = self._all_linear()
        self._gate: fx.Node | None = None
        self.method_tag = ""  # the tag of the method whose rewrite runs now (set by :meth:`apply`)

    def apply(self, rule: Rule) -> None:
        """Run ``rule``'s method (found in the registry) over the program, for this context's adapter."""
        method = method_for(rule)
        self.method_tag = method.tag
        method.rewrite(rule, self)

    @staticmethod
    def joined_after(node: fx.Node) -> list[fx.Node]:
        """The ``join`` / ``output`` nodes (fxpeft/graph/tags.py) of the adapters that already rejoined ``node`` (a
        base op's output), in the order they apply."""
        chain, current = [], node
        while True:
            following = [user for user in current.users if tags.role_of(user) == tags.JOIN
                         or (tags.role_of(user) == tags.OUTPUT and user.args[0] is current)]
            if len(following) != 1:
                return chain
            current = following[0]
            chain.append(current)

    def site_output(self, node: fx.Node) -> fx.Node:
        """The value that stands for ``node`` (a base op's output) after the adapters inserted so far: ``node``
        itself, or the last join of :meth:`joined_after`.

        A method attaches its own join *there*, so adapters at one site compose in the order they were added, the
        order ``AdaptedModel.merge`` folds them in: LoRA then a scale is ``(y + BAx) * s``, not ``y * s + BAx``."""
        chain = self.joined_after(node)
        return chain[-1] if chain else node

    def tag(self, node: fx.Node, site: str, role: str | None = None) -> fx.Node:
        """Tag ``node`` as inserted by the running method for this adapter at ``site`` (see fxpeft/graph/tags.py)."""
        return tags.tag(node, self.adapter_name, site, self.method_tag, role)

    def for_adapter(self, adapter_name: str, adapter: Adapter) -> "RewriteContext":
        """The same graph facts, for another adapter."""
        other = object.__new__(RewriteContext)
        other.__dict__.update(self.__dict__, adapter_name=adapter_name, adapter=adapter, _gate=None)
        return other

    def _all_linear(self) -> set[str]:
        """Every linear site but the output head, as PEFT defines it: for a transformers model the output
        embedding (a classifier head stays in, as in PEFT without a task type); for any other model, the
        linears whose result reaches a model output directly."""
        get_output = getattr(self.base_model, "get_output_embeddings", None)
        if callable(get_output):
            head = get_output()
            excluded = {name for name, module in self.base_model.named_modules() if module is head} \
                if isinstance(head, torch.nn.Module) else set()
        else:
            excluded = output_heads(self.program, self.linear_sites)
        return {path for path in self.linear_sites if path not in excluded}

    def get_module(self, path: str) -> torch.nn.Module | None:
        try:
            return self.base_model.get_submodule(path)
        except AttributeError:
            return None

    def select_linear(self, rule) -> list[LinearSite]:
        """The linear sites ``rule.targets`` selects (minus ``rule.exclude``); raises NoMatchError."""
        return self.select_sites(rule, ("linear",))

    def select_conv(self, rule) -> list[ConvSite]:
        """The convolution sites ``rule.targets`` selects (minus ``rule.exclude``); raises NoMatchError."""
        return self.select_sites(rule, ("conv",))

    def select_sites(self, rule, kinds: tuple[str, ...] = SITE_KINDS) -> list[LinearSite | ConvSite | EmbeddingSite]:
        """The sites of ``kinds`` (of :data:`SITE_KINDS`) that ``rule.targets`` selects (minus ``rule.exclude``), in
        graph order; raises NoMatchError when there is none. Names, globs, a regex and module types select any kind;
        ``"all-linear"`` and the roles select linears only (PEFT's rule). The paths go in ``adapter.selected``."""
        found = {"linear": self.linear_sites, "conv": self.conv_sites, "embedding": self.embedding_sites}
        candidates: dict[str, LinearSite | ConvSite | EmbeddingSite] = {}
        for kind in kinds:
            for path, site in found[kind].items():
                candidates.setdefault(path, site)
        if len(kinds) > 1:
            order = {node: index for index, node in enumerate(self.program.graph.nodes)}
            candidates = dict(sorted(candidates.items(), key=lambda item: order.get(item[1].nodes[0], 0)))
        present = tuple(kind for kind in kinds if found[kind]) or tuple(kinds)  # the words name what the model has
        what = _KIND_WORDS.get(present) or "/".join(present) + " module"
        paths = select_paths(rule.targets, getattr(rule, "exclude", None), candidates, what=what,
                             rule=type(rule).__name__, get_module=self.get_module, roles=self.roles,
                             all_linear=self.all_linear)
        self.adapter.selected[rule] = paths
        return [candidates[path] for path in paths]

    def select_modules(self, rule) -> list[str]:
        """Module paths (of modules whose parameters the graph reads) that ``rule.targets`` selects."""
        owners: dict[str, None] = {}
        for source in self.program.sources:
            if source.kind == "parameter":
                parts = source.target.split(".")[:-1]
                for depth in range(1, len(parts) + 1):
                    owners[".".join(parts[:depth])] = None
        paths = select_paths(rule.targets, getattr(rule, "exclude", None), owners, what="module",
                             rule=type(rule).__name__, get_module=self.get_module)
        self.adapter.selected[rule] = paths
        return paths

    def site(self, path: str, kind: str, factory: Callable[[], SiteModule]) -> SiteModule:
        """The adapter's module for a site, created by ``factory`` the first time."""
        return self.adapter.get_or_create(site_key(path, kind), factory)

    def adapter_input(self, path: str, kind: str, attribute: str) -> fx.Node:
        """A graph input fed, at each call, with ``attribute`` of this adapter's site module."""
        key = site_key(path, kind)
        name = f"fxpeft_{self.adapter_name}_{kind}_{path}_{attribute}".replace(".", "_").replace("-", "_")
        return self.program.add_input(name, InputSource("adapter", (self.adapter_name, key, attribute)))

    def gate_input(self) -> fx.Node:
        """This adapter's gate: a graph input of shape [batch], 1 where the adapter applies, 0 where not."""
        if self._gate is None:
            self._gate = self.program.add_input(f"fxpeft_{self.adapter_name}_gate".replace("-", "_"),
                                                InputSource("gate", self.adapter_name))
        return self._gate

    def gated(self, delta: fx.Node, scaling: fx.Node, site: str, dtype: torch.dtype = torch.float32) -> fx.Node:
        """``delta * scaling`` per batch row, times this adapter's gate for the row (1 active, 0 not), and exactly
        zero in the rows whose gate is 0.

        The gate is a graph input of shape [batch], so switching, disabling and mixing adapters per row
        change tensors, never the graph (nothing recompiles). With the gate at 1 the product is exactly
        ``delta * scaling``, PEFT's expression. Rows whose gate is 0 are *selected* away, not multiplied by 0:
        ``0 * inf`` is NaN, and an inactive adapter with a non-finite value must not reach the active adapters'
        or the base model's rows. ``dtype`` is the dtype of ``scaling``. Nodes go at the caller's insertion point,
        tagged for ``site``: ``row_scale`` (``scaling * gate``, [batch]) and ``scale`` (the rest)."""
        graph = self.program.graph
        gate = self.gate_input()
        call = graph.call_function
        if dtype != torch.float32:  # the gate is float32; keep ``scaling`` in its own precision
            gate = self.tag(call(aten.to.dtype, (gate, dtype)), site, "scale")
        row_scale = self.tag(call(aten.mul.Tensor, (scaling, gate)), site, "row_scale")
        batch = self.tag(call(aten.sym_size.int, (self.gate_input(), 0)), site, "scale")
        rows = self.tag(call(aten.reshape.default, (delta, [batch, -1])), site, "scale")
        column = self.tag(call(aten.unsqueeze.default, (row_scale, 1)), site, "scale")
        scaled = self.tag(call(aten.mul.Tensor, (rows, column)), site, "scale")
        on = self.tag(call(aten.ne.Scalar, (self.gate_input(), 0)), site, "scale")
        on_rows = self.tag(call(aten.unsqueeze.default, (on, 1)), site, "scale")
        kept = self.tag(call(aten.where.ScalarOther, (on_rows, scaled, 0.0)), site, "scale")
        result = self.tag(call(aten.view_as.default, (kept, delta)), site, "scale")
        return tags.mark_when_on(result, "scaled", delta, scaling)  # every row on: ``delta * scaling``

    def rows_on(self, value: fx.Node, site: str) -> fx.Node:
        """``value`` in the batch rows where this adapter's gate is on, exact zeros elsewhere: an adapter's branch
        starts from it so that in training no gradient leaves an inactive row through the adapter's weights (a
        zero gradient times an Inf weight would be NaN). ``value``'s leading dimensions hold the batch rows in order
        (``[batch, ...]``, or ``[batch * seq, ...]`` as GPT-2's Conv1D flattens them). Nodes tagged ``rows`` for
        ``site``; the input of the first reshape is ``value``."""
        call = self.program.graph.call_function
        role = "rows"
        on = self.tag(call(aten.ne.Scalar, (self.gate_input(), 0)), site, role)
        batch = self.tag(call(aten.sym_size.int, (self.gate_input(), 0)), site, role)
        rows = self.tag(call(aten.reshape.default, (value, [batch, -1])), site, role)
        mask = self.tag(call(aten.unsqueeze.default, (on, 1)), site, role)
        kept = self.tag(call(aten.where.ScalarOther, (mask, rows, 0.0)), site, role)
        return tags.mark_when_on(self.tag(call(aten.view_as.default, (kept, value)), site, role), "arg", 1)

    def train_copy(self, fqn: str, peft_name: str, shadows: bool) -> None:
        """Make base parameter ``fqn`` trainable as an adapter-owned copy, read instead of the base tensor
        whenever the adapter applies: ``where(adapter on, copy, base)``, so disabling adapters gives the
        base tensor back bit for bit and nothing recompiles. A copy serves a whole call: in a mixed batch it
        is on when any row uses the adapter.

        ``peft_name`` is PEFT's key for it (without ``base_model.model.``); ``shadows`` says PEFT trains the
        tensor in place (counted once) rather than next to a kept original (counted twice).
        """
        base = self.base_model.get_parameter(fqn)
        self.site(fqn, "copy", lambda: ParameterCopy(fqn, base, peft_name, shadows))
        graph = self.program.graph
        readers = [node for node in self.program.placeholders()
                   if self.program.source_of(node) == InputSource("parameter", fqn)]
        for base_node in readers:
            copy_node = self.adapter_input(fqn, "copy", "weight")
            gate = self.gate_input()
            first_op = next(node for node in graph.nodes if node.op != "placeholder")
            with graph.inserting_before(first_op):
                on = graph.call_function(aten.gt.Scalar, (graph.call_function(aten.amax.default, (gate, [0])), 0))
                chosen = tags.mark_when_on(graph.call_function(aten.where.self, (on, copy_node, base_node)), "arg", 1)
            for node, role in ((on.args[0], "gate"), (on, "gate"), (chosen, tags.JOIN)):
                tags.tag(node, self.adapter_name, fqn, "copy", role)
            base_node.replace_all_uses_with(chosen, delete_user_cb=lambda user: user is not chosen)


def apply_rules(program: Program, base_model: torch.nn.Module, adapters: dict[str, Adapter]) -> None:
    """Run every adapter's rules, in order, over ``program`` (creating adapter parameters as needed)."""
    context = None
    for name, adapter in adapters.items():
        context = RewriteContext(program, base_model, name, adapter) if context is None else \
            context.for_adapter(name, adapter)
        for rule in adapter.rules:
            context.apply(rule)
    program.finish_rewrite()
