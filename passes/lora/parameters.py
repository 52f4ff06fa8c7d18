"""LoRA on raw parameters, PEFT's ``LoraConfig(target_parameters=[...])`` (its ``lora.ParamWrapper``).

transformers 5 keeps the expert weights of mixture-of-experts blocks as raw 3-D parameters
(``experts.gate_up_proj`` ``[experts, 2 * inter, hidden]``, ``experts.down_proj``) used directly by the forward (a
batched or grouped matmul), with no ``nn.Linear`` to put a branch on. PEFT adapts such a parameter at the weight
side: while its ``ParamWrapper`` runs, the parameter reads ``W + scaling * delta(A, B)``. fxpeft does the same in the
captured graph: the parameter's placeholder (``ctx.program.sources``, kind ``"parameter"``, matched by name as
PEFT matches ``target_parameters``) is read, by every op that reads it, through one join node
:func:`adapted_parameter` that computes PEFT's expression:

- a 3-D parameter ``[E, d0, d1]`` (``E`` experts): ``lora_A`` is ``[r * E, in]`` and ``lora_B`` ``[out, r * E]``
  (PEFT's ``nn.Linear`` shapes) with ``in, out = d1, d0`` (PEFT swaps them unless the owning module says
  ``is_transposed``, in which case ``in, out = d0, d1``). ``A`` is read ``reshape(E, r, in)`` and ``B``
  ``reshape(out, r, E).permute(2, 0, 1)``; the forward is PEFT's ``baddbmm(W, lhs, rhs, alpha=scaling)`` with
  ``lhs, rhs`` cast to ``W``'s dtype (``_LoraFactorsProxy``), bit for bit; a merge adds PEFT's einsum
  ``get_delta_weight``;
- a 2-D parameter ``[out, in]`` (one "expert"): ``W + (B @ A * scaling).to(W.dtype)`` (``_LoraParameterProxy``).

The join takes the adapter's on/off flag (``amax(gate) > 0``: the adapter applies to the whole call, as a trained
copy does, see ``RewriteContext.train_copy``), so disabling or switching adapters changes tensors, never the graph:
compiled once, nothing recompiles (PEFT's ``parametrize`` recompiles and breaks graphs). Off, it returns ``W``
exactly (a copy: an operator's output cannot alias its input, so a disabled adapter still costs one copy of the
parameter per call; merged, the graph as captured runs). A batch with ``adapter_names`` naming this adapter is
refused, as PEFT refuses it. Gradients reach ``A`` and ``B`` through the operator's own backward (baddbmm's),
traceable by AOT autograd: a compiled training step is one graph too.

File keys are PEFT's: ``<module>.lora_A.weight`` / ``lora_B.weight``, where ``<module>`` is the module holding the
parameter followed by one ``.base_layer`` per targeted parameter of that module registered after it (PEFT nests a
``ParamWrapper`` per parameter, the first registered innermost): Mixtral's ``experts.base_layer.lora_A.weight`` is
``gate_up_proj``'s and ``experts.lora_A.weight`` ``down_proj``'s.

Differences from PEFT: several adapters active together on one parameter add their deltas one after the other
(``(W + d1) + d2``), PEFT sums them first (``W + (d1 + d2)``, einsum form): equal within float rounding. float8
parameters (PEFT's upcast path) are refused.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import SiteModule, adapter_dtype
from fxpeft.errors import FxpeftError, NoMatchError, RuleError, UnsupportedError
from fxpeft.graph import tags
from fxpeft.graph.program import InputSource
from fxpeft.param_targets import parameter_matches
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA

__all__ = ["KIND", "ParameterLoraWeights", "adapted_parameter", "apply_parameter_lora", "nesting_depth",
           "describe_parameter_site", "allowed_parameters", "parameter_findings"]

aten = torch.ops.aten
KIND = "lora_param"  # the site kind (site_key) of a raw-parameter LoRA site


@torch.library.custom_op("fxpeft::lora_parameter", mutates_args=())
def adapted_parameter(weight: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scaling: torch.Tensor,
                      on: torch.Tensor, fold: bool) -> torch.Tensor:
    """``weight`` as PEFT's ``ParamWrapper`` makes it read when ``on`` (a 0-d bool) holds, else ``weight`` itself.

    ``fold`` (a 3-D expert stack): ``baddbmm(weight, lhs, rhs, alpha=scaling)`` (``_LoraFactorsProxy``); else
    ``weight + (lhs @ rhs * scaling).to(weight.dtype)`` (``_LoraParameterProxy`` over ``get_delta_weight``). An
    operator of its own so that ``scaling`` stays a tensor (no graph change for ``set_alpha``) while ``baddbmm``
    takes it as the number PEFT passes."""
    if not bool(on):
        return weight.clone()
    alpha = float(scaling)
    if fold:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=alpha)
    return weight + ((lhs @ rhs) * alpha).to(weight.dtype)


@adapted_parameter.register_fake
def _(weight, lhs, rhs, scaling, on, fold):
    return torch.empty_like(weight)


def _setup(ctx, inputs, output):
    _, lhs, rhs, scaling, on, fold = inputs
    ctx.save_for_backward(lhs, rhs, scaling, on)
    ctx.fold = fold


def _backward(ctx, grad):
    """Traced by AOT autograd under torch.compile: no Python branch on ``on`` (zeros where the adapter is off)."""
    lhs, rhs, scaling, on = ctx.saved_tensors
    if ctx.fold:  # baddbmm's derivative (derivatives.yaml): grad.bmm(rhs^T) * alpha, lhs^T.bmm(grad) * alpha
        grad_lhs, grad_rhs = grad.bmm(rhs.transpose(1, 2)) * scaling, lhs.transpose(1, 2).bmm(grad) * scaling
    else:
        inner = grad.to(lhs.dtype) * scaling
        grad_lhs, grad_rhs = inner @ rhs.T, lhs.T @ inner
    return grad, torch.where(on, grad_lhs, 0.0), torch.where(on, grad_rhs, 0.0), None, None, None


adapted_parameter.register_autograd(_backward, setup_context=_setup)


def nesting_depth(owner: nn.Module, name: str, names: tuple[str, ...], owner_path: str) -> int:
    """How many ``.base_layer`` PEFT puts between ``owner_path`` and the parameter ``name``'s LoRA weights: the
    targeted parameters of ``owner`` registered after ``name`` (each wraps the ones before it)."""
    targeted = [own for own, _ in owner.named_parameters(recurse=False)
                if parameter_matches(f"{owner_path}.{own}", names)]
    return len(targeted) - 1 - targeted.index(name)


class ParameterLoraWeights(SiteModule):
    """``lora_A`` ``[r * E, in]``, ``lora_B`` ``[out, r * E]`` and ``scaling`` for one raw parameter (PEFT's
    ``ParamWrapper``; the module docstring). ``path`` is the parameter's path; ``key_path`` the module path PEFT
    saves its tensors under (with the ``.base_layer`` nesting)."""

    per_row_refusal = ("LoRA on raw parameters (target_parameters) changes a weight for the whole call and cannot "
                       "apply to some rows only; PEFT refuses it too ('does not support mixed batch inference'). "
                       "Run this adapter's rows in a call of their own (set_adapter).")
    site_form = "raw parameter, target_parameters"  # add_weighted_adapter combines linear sites only: it refuses

    def __init__(self, path: str, key_path: str, shape: tuple[int, ...], transposed: bool, rule: LoRA,
                 device: torch.device, dtype: torch.dtype, param_dtype: torch.dtype):
        super().__init__()
        self.path, self.key_path = path, key_path
        self.init, self.use_rslora = rule.init, rule.use_rslora
        self.r, self.alpha = rule.rank_for(path), rule.alpha_for(path)
        self.scaling_value = float(rule.scaling_for(path))
        self.fold = len(shape) == 3
        self.num_experts = shape[0] if self.fold else 1
        if self.fold:  # PEFT's _get_in_out_features + update_layer's swap
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        else:
            self.in_features, self.out_features = shape[1], shape[0]
        self.transposed = transposed
        self.param_dtype = param_dtype
        width = self.r * self.num_experts
        self.lora_A = nn.Parameter(torch.empty(width, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, width, device=device, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(self.scaling_value, dtype=torch.float64, device=device),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's ``reset_lora_parameters``: A kaiming-uniform (gaussian std 1/r), B zero; ``init="random"``
        (``init_lora_weights=False``): both as ``nn.Linear`` initialises them."""
        if self.lora_A.device.type == "meta":
            return
        self.scaling.fill_(self.scaling_value)
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init == "random":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.scaling.data = self.scaling.data.double()  # a number, as PEFT's float scaling: keep it exact
        return result

    def set_alpha(self, alpha: float) -> None:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), in place: a tensor, so no graph change."""
        self.alpha = alpha
        self.scaling_value = alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r
        with torch.no_grad():
            self.scaling.fill_(self.scaling_value)

    def reload(self, rules: list) -> bool:
        """The file's LoRA rule gives this site its ``alpha`` and ``use_rslora`` (tensors: no graph change)."""
        loras = [rule for rule in rules if isinstance(rule, LoRA) and rule.target_parameters]
        if len(loras) != 1:
            raise FxpeftError(f"The adapter file has {len(loras)} LoRA rules with target_parameters for the site "
                              f"{self.path}; expected one.")
        self.use_rslora = loras[0].use_rslora
        self.set_alpha(loras[0].alpha_for(self.path))
        return False

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.key_path}"
        return {f"{prefix}.lora_A.weight": self.lora_A, f"{prefix}.lora_B.weight": self.lora_B}

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """PEFT's ``ParamWrapper.get_delta_weight`` (what a merge adds), in ``dtype`` (default: the parameter's)."""
        a, b = self.lora_A, self.lora_B
        if not self.fold:
            delta = (b @ a) * self.scaling_value
        else:
            a = a.reshape(self.num_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, self.num_experts)
            form = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
            delta = torch.einsum(form, b, a) * self.scaling_value
        return delta.to(dtype or self.param_dtype)

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """What :meth:`merge_into` writes (fxpeft/shared_tensors.py): the parameter, for its own path."""
        return {self.path: (self.path,)}

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        """PEFT's ``param.data += get_delta_weight``."""
        param = base_model.get_parameter(self.path)
        param.add_(self.delta_weight(param.dtype).to(param.device))

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        """PEFT's ``param.data -= delta.to(dtype)``: the original within float rounding."""
        param = base_model.get_parameter(self.path)
        param.sub_(self.delta_weight(param.dtype).to(param.device))


def _matched(rule: LoRA, ctx: RewriteContext) -> list[str]:
    """The parameter paths of the graph that ``rule.target_parameters`` names (PEFT's matching)."""
    found = [source.target for source in ctx.program.sources
             if source.kind == "parameter" and parameter_matches(source.target, rule.target_parameters)]
    if not found:
        candidates = [source.target for source in ctx.program.sources if source.kind == "parameter"
                      and ctx.base_model.get_parameter(source.target).dim() == 3]
        raise NoMatchError(
            f"LoRA: target_parameters={list(rule.target_parameters)} names no parameter the captured graph reads. "
            "Give parameter paths or their ends (e.g. 'experts.gate_up_proj'); the graph's 3-D parameters are "
            f"{candidates[:6]}.", candidates=candidates[:8])
    return list(dict.fromkeys(found))


def _check(rule: LoRA, ctx: RewriteContext, fqn: str, param: torch.Tensor) -> None:
    owner = fqn.rpartition(".")[0]
    if not owner:
        raise RuleError(f"LoRA: target_parameters names {fqn!r}, a parameter of the top-level module, which PEFT "
                        "cannot wrap either. Target parameters of submodules.")
    if owner in ctx.adapter.selected.get(rule, ()):
        raise RuleError(f"LoRA: {owner} is selected by `targets` and its parameter {fqn} by `target_parameters` of "
                        "the same rule (PEFT refuses this too). Drop one of them (exclude=[...] for the module).")
    shape = tuple(param.shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] == 1):
        raise UnsupportedError(f"LoRA: target_parameters takes 2-D parameters and 3-D expert stacks [experts > 1, "
                               f"d0, d1] (PEFT's ParamWrapper), but {fqn} has shape {list(shape)}.")
    if not param.dtype.is_floating_point or param.dtype.itemsize < 2:
        raise UnsupportedError(f"LoRA: target_parameters on {fqn} of dtype {param.dtype} is not supported (float32, "
                               "float16, bfloat16 and float64 are; PEFT upcasts float8 in a way fxpeft does not).")


def apply_parameter_lora(rule: LoRA, ctx: RewriteContext) -> None:
    """Make every read of each parameter ``rule.target_parameters`` names read PEFT's adapted weight (the module
    docstring), through this adapter's on/off flag."""
    if not rule.target_parameters:
        return
    for fqn in _matched(rule, ctx):
        param = ctx.base_model.get_parameter(fqn)
        _check(rule, ctx, fqn, param)
        owner_path, _, name = fqn.rpartition(".")
        owner = ctx.base_model.get_submodule(owner_path)
        transposed = bool(getattr(owner, "is_transposed", False))
        depth = nesting_depth(owner, name, rule.target_parameters, owner_path)
        site = ctx.site(fqn, KIND, lambda: ParameterLoraWeights(
            fqn, owner_path + ".base_layer" * depth, tuple(param.shape), transposed, rule, param.device,
            adapter_dtype(param.dtype), param.dtype))
        site.param_dtype = param.dtype  # a cast since (``.half()``) recaptures and rewrites again
        inputs = {name: ctx.adapter_input(fqn, KIND, name) for name in ("lora_A", "lora_B", "scaling")}
        source = InputSource("parameter", fqn)
        for node in [n for n in ctx.program.placeholders() if ctx.program.source_of(n) == source]:
            _rewrite_reads(ctx, fqn, node, site, inputs)


def _rewrite_reads(ctx: RewriteContext, fqn: str, node: fx.Node, site: ParameterLoraWeights,
                   inputs: dict[str, fx.Node]) -> None:
    """Insert the join for parameter placeholder ``node`` (after the adapters already on it) and point its readers
    at it."""
    graph = ctx.program.graph
    current = ctx.site_output(node)
    if current.op == "placeholder":
        where = graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder"))
    else:
        where = graph.inserting_before(current.next)
    call = graph.call_function
    with where:
        gate = ctx.gate_input()
        on = ctx.tag(call(aten.gt.Scalar, (ctx.tag(call(aten.amax.default, (gate, [0])), fqn, "gate"), 0)), fqn,
                     "gate")
        a, b = inputs["lora_A"], inputs["lora_B"]
        if site.fold:  # PEFT's get_delta_factors
            e = site.num_experts
            a = ctx.tag(call(aten.reshape.default, (a, [e, -1, site.in_features])), fqn, "lora_A")
            b = ctx.tag(call(aten.permute.default, (ctx.tag(call(aten.reshape.default, (
                b, [site.out_features, -1, e])), fqn, "lora_B"), [2, 0, 1])), fqn, "lora_B")
            lhs, rhs = (a, b) if site.transposed else (b, a)
            if site.transposed:
                lhs = ctx.tag(call(aten.transpose.int, (lhs, -2, -1)), fqn, "lora_A")
                rhs = ctx.tag(call(aten.transpose.int, (rhs, -2, -1)), fqn, "lora_B")
            if site.lora_A.dtype != site.param_dtype:
                lhs = ctx.tag(call(aten.to.dtype, (lhs, site.param_dtype)), fqn, "scale")
                rhs = ctx.tag(call(aten.to.dtype, (rhs, site.param_dtype)), fqn, "scale")
        else:
            lhs, rhs = b, a
        joined = ctx.tag(call(torch.ops.fxpeft.lora_parameter.default,
                              (current, lhs, rhs, inputs["scaling"], on, site.fold)), fqn, tags.JOIN)
    joined.meta["val"] = current.meta.get("val")
    current.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)


# -- what `fxpeft check` reads (passes/lora/checks.py) -----------------------------------------------------------
def describe_parameter_site(path: str, ctx: RewriteContext) -> str | None:
    """For a key path PEFT writes for raw parameters (``<module>[.base_layer...]``): ``"a module holding the
    raw parameters [...]"`` when the module holds 3-D (or, at a ``.base_layer`` path, 2-D) parameters; else None."""
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    module = ctx.get_module(owner)
    if module is None:
        return None
    dims = (2, 3) if owner != path else (3,)
    raw = [f"{name} {list(p.shape)}" for name, p in module.named_parameters(recurse=False) if p.dim() in dims]
    return f"a module holding the raw parameters {raw} (target_parameters)" if raw else None


def allowed_parameters(rule: LoRA, ctx: RewriteContext) -> dict[str, LoRA]:
    """The parameters of the graph that ``rule.target_parameters`` names (none without it), each with ``rule``."""
    return {source.target: rule for source in ctx.program.sources if source.kind == "parameter"
            and rule.target_parameters and parameter_matches(source.target, rule.target_parameters)}


def parameter_findings(site: ParameterLoraWeights, allowed: LoRA | None, state: dict) -> list:
    """A raw-parameter LoRA site must be allowed, of rank (``lora_A``'s rows / experts) at most the rule's ``r``."""
    if allowed is None:
        return [f"the adapter puts LoRA on the parameter {site.path} (target_parameters), which no rule allows."]
    tensor = state.get(f"base_model.model.{site.key_path}.lora_A.weight")
    rank = int(tensor.shape[0]) // site.num_experts if tensor is not None and tensor.dim() == 2 else site.r
    if rank > allowed.r:
        return [(f"LoRA rank {rank} exceeds the rules' r={allowed.r}.", {"rank": rank, "allowed": allowed.r})]
    return []
