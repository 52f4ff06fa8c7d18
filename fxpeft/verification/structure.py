"""Graph structure: the adapted graph minus its adapter nodes is the base graph, node for node.

Per signature the adapted model was captured with: its graph and the graph a merged model runs are each
compared with a fresh capture of the base model (:func:`~fxpeft.verification.compare.compare_views`); every
adapter node, adapter input and trained copy must be at a site its adapter's config declares, and every join
(:mod:`fxpeft.graph.tags`) must rejoin the base data flow at its own site: on the output of the module its
tag names (or, for a trained copy, on the tensor it copies).
"""

from __future__ import annotations

import torch

from fxpeft.graph.program import Program
from fxpeft.graph.sites import find_linear_sites, module_path_of
from fxpeft.graph.tags import JOIN, OUTPUT, role_of, tag_of
from fxpeft.methods import methods
from fxpeft.verification.compare import Comparison, compare_views
from fxpeft.verification.declared import Declared
from fxpeft.verification.graph_view import GraphView, copy_resolver
from fxpeft.verification.probes import FreshCaptures, signature_text
from fxpeft.verification.report import Findings
from fxpeft.verification.values import short

__all__ = ["check_graphs", "report_comparison"]

aten = torch.ops.aten


def check_graphs(found: Findings, adapted, declared: dict[str, Declared], captures: FreshCaptures,
                 join_targets: dict[str, set] | None = None) -> tuple[str, str]:
    """Compare every graph of ``adapted`` with a fresh capture of the base; returns (compared, holds)."""
    allowed = {name: {module.path for module in item.reference.site_modules()}
               for name, item in declared.items() if item.reference is not None}
    keys = {name: set(item.reference.sites.keys()) for name, item in declared.items() if item.reference is not None}
    copy_of = copy_resolver(adapted)
    nodes = adapter_nodes = downstream = 0
    signatures = []
    for program in adapted.programs():
        fresh = captures.get_like(program)
        if fresh is None:
            found.note(signature_text(program), "this signature has nested inputs; its graph was not compared.")
            continue
        base_view = fresh[1]
        signatures.append(signature_text(program))
        label = f"adapted graph {signature_text(program)}"
        view = GraphView(program.graph, program.sources, copy_of, join_targets)
        found.extend(view.issues)
        _check_declared(found, view, allowed, keys, label)
        _check_joins(found, program, view)
        result = compare_views(base_view, view)
        report_comparison(found, base_view, view, result, label)
        nodes += len(base_view.names)
        adapter_nodes += len(view.tagged) + len(view.adapter_inputs)
        downstream += result.downstream
        pristine = GraphView(program.pristine.graph, program.pristine_sources)
        merged = compare_views(base_view, pristine)
        report_comparison(found, base_view, pristine, merged, f"merged graph {signature_text(program)}")
        if pristine.tagged or pristine.adapter_inputs:
            found.add("extra-op", pristine.tagged[0][0] if pristine.tagged else pristine.adapter_inputs[0][0],
                      "the graph a merged model runs still has adapter nodes.")
        downstream += merged.downstream
    sites = {(tag.get("adapter"), tag.get("site")) for program in adapted.programs() for node in program.graph.nodes
             if (tag := tag_of(node)) is not None}
    compared = (f"{nodes} nodes of the fresh base graph with the adapted graph of {len(signatures)} signature(s) "
                f"{', '.join(signatures)} and with the graph a merged model runs")
    holds = (f"both correspond node for node; the {adapter_nodes} adapter nodes and inputs taken out are all at the "
             f"{len(sites)} declared site(s) and rejoin their base values")
    if downstream:
        compared += f" ({downstream} more nodes differ only downstream of the findings)"
    return compared, holds


def _check_declared(found: Findings, view: GraphView, allowed: dict[str, set[str]], keys: dict[str, set[str]],
                    label: str) -> None:
    """Every adapter node, adapter input and trained copy is at a site its adapter's config declares."""
    reported = set()
    for node, tag, module in view.tagged:
        adapter, site = tag.get("adapter"), tag.get("site")
        if site in allowed.get(adapter, ()) or (adapter, site) in reported:
            continue
        reported.add((adapter, site))
        count = sum(1 for _, other, _ in view.tagged if (other.get("adapter"), other.get("site")) == (adapter, site))
        found.add("undeclared-site", node, f"{count} {tag.get('method', 'adapter')} node(s) of adapter {adapter!r} "
                  f"at {site} in the {label}, a site its config does not declare.", site or module)
    for node, source in view.adapter_inputs + [(node, source) for node, source, _ in view.copies]:
        if source.kind == "gate":
            if source.target not in allowed:
                found.add("undeclared-site", node, f"a gate input for adapter {source.target!r}, which has no config.")
            continue
        adapter, key, _ = source.target
        if key not in keys.get(adapter, ()) and (adapter, key) not in reported:
            reported.add((adapter, key))
            found.add("undeclared-site", node, f"the {label} reads {key!r} of adapter {adapter!r}, a site its "
                      "config does not declare.", key.partition(":")[2].replace("/", "."))


def _check_joins(found: Findings, program: Program, view: GraphView) -> None:
    """A join must rejoin the base value its site computes: the output of the module its tag names (the linear
    site computing it, found from its weight, or the module export recorded for it), or the tensor a trained
    copy stands for. A join on another adapter's result (a second adapter at one site) is that one's concern. A join
    that the site's linear reads as its input (through casts tagged ``output``) rejoins the input it scales (a method
    that rescales a linear's input): that is its site too."""
    linear_sites = find_linear_sites(program).values()
    site_of = {node.name: site.path for site in linear_sites for node in site.nodes}
    input_of: dict[str, set] = {}  # join name: the sites whose linear reads it as its input
    for linear in linear_sites:
        for node in linear.nodes:
            value = linear.input_of(node)
            while role_of(value) in (JOIN, OUTPUT) and value.args:
                input_of.setdefault(value.name, set()).add(linear.path)
                value = value.args[0]
    nodes = {node.name: node for node in program.graph.nodes}
    sources = dict(zip(program.placeholders(), program.sources))
    tag_by_name = {name: tag for name, tag, _ in view.tagged}
    names = {method.tag: method.name for method in methods()}
    reported = set()
    for name, operand, is_base in view.joins:
        if not is_base:
            continue
        tag, base, join = tag_by_name[name], nodes[operand], nodes[name]
        source = sources.get(base)
        origin = site_of.get(base.name) or module_path_of(base) or (str(source.target) if source else "")
        site = tag.get("site")
        if site in (site_of.get(base.name), module_path_of(base), source.target if source else None) or \
                site in input_of.get(name, ()) or site in reported:
            continue
        reported.add(site)
        joined = "added to" if join.target is aten.add.Tensor else "joined with"
        found.add("adapter-misplaced", name, f"the {names.get(tag.get('method'), tag.get('method'))} update tagged "
                  f"for {site} is {joined} {base.name}, the output of {origin or 'no module'}.", site or "")


def report_comparison(found: Findings, base: GraphView, other: GraphView, result: Comparison, label: str) -> None:
    """Findings for what ``result`` left over: extra, replaced, rewired and missing ops."""
    def where(view: GraphView, name: str) -> str:
        if view.module.get(name):
            return view.module[name]
        near = next((view.module[source] for source in view.inputs.get(name, ()) if view.module.get(source)), "")
        return f"near {near}" if near else ""

    for name in result.extra:
        users = [user for user in other.names if name in other.inputs[user]][:2]
        feeds = f"; it feeds {', '.join(users)}" if users else ""
        found.add("extra-op", name, f"the {label} computes {short(other.text[name])}, which is neither in the base "
                  f"graph nor an adapter node{feeds}.", where(other, name), graph=label)
    for name, base_name in result.replaced:
        found.add("base-op-replaced", name, f"the base graph's {short(base.text[base_name])} is "
                  f"{short(other.text[name])} in the {label}.", where(other, name) or where(base, base_name),
                  graph=label, base_node=base_name)
    for name, base_name in result.rewired:
        found.add("base-op-rewired", name, f"the base graph's {short(base.text[base_name])} reads other values in "
                  f"the {label}: {short(other.text[name])}.", where(other, name) or where(base, base_name),
                  graph=label, base_node=base_name, inputs=list(other.inputs[name]),
                  base_inputs=list(base.inputs[base_name]))
    for name in result.missing:
        found.add("base-op-missing", name, f"the base graph's {short(base.text[name])} has no counterpart in the "
                  f"{label}.", where(base, name), graph=label)
