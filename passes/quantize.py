"""The Quantize pass: the selected linears of the base model become bitsandbytes layers, and their graph nodes
become ``fxpeft.quantized_linear`` nodes (the form a model loaded quantized is captured in).

Unlike the adaptation passes, this one changes the base model (that is the point: the full-precision
weights are freed). So it also rewrites the program's graph *as captured* (``Program.pristine``, which
rewrites restart from and a merged model runs) and the context's site table, which LoRA reads next: after
this pass every table and graph says what a fresh capture of the quantized model would say. It is
idempotent: a layer quantized already (by an earlier run of this pass, or by transformers'
``BitsAndBytesConfig``) with the rule's settings is left as it is.
"""

from __future__ import annotations

import sys

import torch
import torch.fx as fx
from torch import nn

from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.sites import LinearSite
from fxpeft.methods import Method, register_method
from fxpeft.ops.quantized import QUANTIZED_LINEAR, model_token, quantize_linear, quantized_kind, require_bitsandbytes
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Quantize

__all__ = ["apply_quantize"]

aten = torch.ops.aten


def _is_conv1d(module: nn.Module) -> bool:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _check_quantizable(rule: Quantize, ctx: RewriteContext, site: LinearSite, module: nn.Module) -> None:
    kind = quantized_kind(module)
    if kind is not None:
        _check_same_settings(rule, site.path, module, kind)
        return
    if site.form == "quantized":  # dequantized since (fxpeft.ops.quantized.dequantize): the op runs any layer
        return
    if not ((site.form == "linear" and _is_plain_linear(module)) or (site.form == "addmm" and _is_conv1d(module))):
        raise UnsupportedError(
            f"Quantize: {site.path} is a {type(module).__module__}.{type(module).__qualname__} (computed as "
            f"{site.form!r} in the graph); fxpeft quantizes torch.nn.Linear and transformers' Conv1D layers. "
            "Exclude it with `exclude=`.")
    adapted = {tags.tag_of(user)["method"] for node in site.nodes for user in node.users if tags.is_adapter_node(user)}
    if site.form == "addmm" and adapted:
        raise RuleError(f"Quantize: {site.path} (a Conv1D) already has {sorted(adapted)} nodes, made for its [in, out] "
                        "weight; put the Quantize rule before the other rules.")
    weight = next(node for node in ctx.program.placeholders()
                  if ctx.program.source_of(node).target == site.weight_fqn)
    others = [user for user in weight.users if user not in site.nodes]
    if others:
        raise UnsupportedError(
            f"Quantize: the weight of {site.path} ({site.weight_fqn}) is also read outside that layer (tied to "
            f"another module, e.g. an embedding, by {others[0].name}); quantizing it would change that module "
            "too. Exclude it with `exclude=`.")


def _check_same_settings(rule: Quantize, path: str, module: nn.Module, kind: str) -> None:
    if kind == "int8":
        have = {"bits": 8, "int8_threshold": float(module.state.threshold)}
        want = {"bits": rule.bits, "int8_threshold": float(rule.int8_threshold)}
    else:
        state = module.weight.quant_state
        compute = module.compute_dtype
        have = {"bits": 4, "quant_type": state.quant_type, "double_quant": bool(state.nested),
                "compute_dtype": str(compute).removeprefix("torch.") if compute is not None else None}
        want = {"bits": rule.bits, "quant_type": rule.quant_type, "double_quant": rule.double_quant,
                "compute_dtype": rule.compute_dtype}
    differ = {name: (have[name], want[name]) for name in have if have[name] != want[name]}
    if differ:
        raise RuleError(
            f"Quantize: {path} is quantized already ({type(module).__name__}, "
            f"{', '.join(f'{k}={v[0]!r}' for k, v in differ.items())}) but the rule asks for "
            f"{', '.join(f'{k}={v[1]!r}' for k, v in differ.items())}. Drop the Quantize rule for a model loaded "
            "quantized, or give it the same settings.")


def _weight_val(value, tensor: torch.Tensor):
    """A fake tensor for a placeholder now fed ``tensor`` (the packed weight), in the graph's fake mode."""
    fake_mode = getattr(value, "fake_mode", None)
    if fake_mode is not None:
        return fake_mode.from_tensor(tensor.detach())
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _rewrite_node(graph: fx.Graph, node: fx.Node, path: str, token: str, in_features: int,
                  out_features: int) -> fx.Node:
    """``linear(x, W, b)`` / ``addmm(b, x, W)`` becomes ``quantized_linear(x, W, b, ...)`` (same output)."""
    if node.target is aten.linear.default:
        x, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:
        if any(node.kwargs.get(name, 1) != 1 for name in ("beta", "alpha")):
            raise UnsupportedError(f"Quantize: {path} is computed as a scaled addmm ({node.kwargs}); fxpeft "
                                   "quantizes plain linears.")
        bias, x, weight = node.args[:3]
    with graph.inserting_before(node):
        new = graph.call_function(QUANTIZED_LINEAR, (x, weight, bias, token, path, in_features, out_features))
    for key in ("val", "nn_module_stack", "stack_trace"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _rewrite_site(ctx: RewriteContext, site: LinearSite, token: str) -> None:
    """Both the working graph and the graph as captured compute ``site`` with the quantized op."""
    program = ctx.program
    packed = ctx.base_model.get_parameter(site.weight_fqn)
    names = {node.name for node in site.nodes}
    site.nodes = [_rewrite_node(program.graph, node, site.path, token, site.in_features, site.out_features)
                  for node in site.nodes]
    pristine = program.pristine.graph
    for node in [node for node in pristine.nodes if node.name in names]:
        _rewrite_node(pristine, node, site.path, token, site.in_features, site.out_features)
    for graph in (program.graph, pristine):
        for node in graph.nodes:
            if node.op == "placeholder" and node.name == site.nodes[0].args[1].name:
                node.meta["val"] = _weight_val(node.meta.get("val"), packed)
    site.form = "quantized"


def apply_quantize(rule: Quantize, ctx: RewriteContext) -> None:
    """Quantize every linear the rule selects (in the base model) and compute it with the quantized op."""
    sites = ctx.select_linear(rule)
    modules = {site.path: ctx.get_module(site.path) for site in sites}
    for site in sites:  # everything is checked before anything changes
        _check_quantizable(rule, ctx, site, modules[site.path])
    todo = [site for site in sites if site.form != "quantized" and quantized_kind(modules[site.path]) is None]
    for device in {modules[site.path].weight.device for site in todo}:
        require_bitsandbytes(device)
    token = model_token(ctx.base_model)
    for site in todo:
        parent, _, name = site.path.rpartition(".")
        module = modules.pop(site.path)
        layer = quantize_linear(module, bits=rule.bits, quant_type=rule.quant_type, double_quant=rule.double_quant,
                                compute_dtype=rule.dtype, threshold=float(rule.int8_threshold),
                                transposed=site.form == "addmm")
        setattr(ctx.base_model.get_submodule(parent), name, layer)
        del module, layer  # the full-precision weight goes with the last reference to its layer
    rewritten = [site for site in sites if site.form != "quantized"]
    for site in rewritten:
        _rewrite_site(ctx, site, token)
    if rewritten:
        ctx.program.pristine.recompile()
        ctx.program.pristine_changed()


class QuantizeMethod(Method):
    """Quantize describes the base model: it rewrites linears into quantized ones and is never saved."""

    rule_type = Quantize
    tag = "quantize"

    def rewrite(self, rule: Quantize, ctx: RewriteContext) -> None:
        apply_quantize(rule, ctx)


register_method(QuantizeMethod())
