"""What LoHa (passes/loha.py) and LoKr (passes/lokr.py) share, as PEFT 0.21.2 shares ``peft/tuners/lycoris_utils.py``:
the rule's common fields, the site module's scaling / merge / unmerge, the rewrite, the PEFT codec and the verify hooks.

Both methods add a *delta weight* to a linear or a convolution (``nn.Conv1d``/``nn.Conv2d``, the engine's conv sites),
PEFT's ``LycorisLayer`` forward::

    dW = (<the method's weight from its factors> * (alpha / r)).reshape(W.shape)     in the adapter's dtype
    y' = (y + linear(x.to(dW.dtype), dW)).to(y.dtype)                 PEFT's order: the scale is inside dW
    y' = (y + conv(x.to(dW.dtype), dW, None, <the base conv's stride, padding, dilation, groups>)).to(y.dtype)

A convolution's factors are PEFT's: its weight flattened to ``[out, in / groups * prod(kernel)]``, or with
``use_effective_conv2d`` (and a kernel other than all ones, as PEFT decides) PEFT's CP form, a core ``[r, r, k1, k2]``
(``[r, r, k, 1]`` for a Conv1d) contracted with ``torch.einsum`` as PEFT does (the same contraction path).

In the graph the branch is gated per batch row like LoRA's (``RewriteContext.rows_on`` on the input, and
``RewriteContext.gated`` on the branch's output with a coefficient of exactly 1, so an active row is PEFT's sum bit
for bit and an inactive one is the base row bit for bit); switching, disabling and ``adapter_names`` change tensors,
never the graph. ``alpha / r`` is a tensor input (``set_alpha`` recompiles nothing).

What differs from PEFT, on purpose (each method's docstring adds its own):

- ``rank_dropout`` and ``module_dropout`` must be 0 (a rule with others is an UnsupportedError): PEFT draws them with
  ``torch.rand`` in its forward, per layer and per call, which fxpeft does not reproduce in a graph. (PEFT draws
  ``torch.rand(1)`` per layer in every training call even with ``module_dropout=0``; fxpeft draws nothing.)
- ``adapter_names`` (one adapter per batch row) is honoured; PEFT 0.21.2 accepts it for LoHa/LoKr and ignores it
  (``PeftModel.forward`` drops it, ``LycorisTuner`` has no forward hooks), running every row with the active adapter.
- transformers' ``Conv1D`` (GPT-2's ``c_attn``, ...) is refused with an UnsupportedError, as PEFT refuses it
  ("Target module of type Conv1D not supported"); quantized (bitsandbytes) linears are refused too.
- ``Conv3d`` and transposed convolutions (PEFT has no layer for them) and convolutions with a ``padding_mode`` other
  than zeros (PEFT's delta conv pads the unpadded input with zeros; the graph reads the padded one) are refused with
  an UnsupportedError at transform.
- gradients are autograd's of PEFT's forward. PEFT's LoHa computes them with its own ``HadaWeight``/``HadaWeightCP``
  backward: the same for a linear or a flattened convolution, but ``HadaWeightCP.backward`` (``use_effective_conv2d``)
  contracts ``hada_w1_a``'s gradient with ``hada_t2``/``hada_w2_b`` and ``hada_w2_a``'s with ``hada_t1``/``hada_w1_b``
  (swapped), which is not the gradient of its forward; fxpeft trains with the true one (tests/passes/test_loha.py
  holds both against an eager autograd reference).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Iterable

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import SiteModule, adapter_dtype
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft import (
    TASK_HEADS,
    bool_field,
    int_field,
    mapping_field,
    modules_to_save_of,
    names_field,
    number_field,
    saved_task_type,
    shown,
    str_field,
    the_one_rule,
)
from fxpeft.graph import tags
from fxpeft.graph.selectors import as_peft_names, matches_any
from fxpeft.graph.sites import ConvSite, LinearSite
from fxpeft.methods import KeyPart, Method, PeftCodec
from fxpeft.passes.lora.joins import rejoin
from fxpeft.passes.lora.targeting import narrow, trained_whole
from fxpeft.rewrite import RewriteContext
from fxpeft.rule_checks import check_number
from fxpeft.rules import MAX_SIZE, LoRA, Rule, Targets, Trainable, check_alpha

__all__ = ["LycorisRule", "LycorisSite", "LycorisCodec", "LycorisMethod", "rewrite", "key_regex", "einsum_path"]

aten = torch.ops.aten
_FORMS = ("linear", "matmul")  # nn.Linear as F.linear, and Falcon's matmul(x, W.T): W is [out, in] in both
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclasses.dataclass(frozen=True)
class LycorisRule(Rule):
    """The fields LoHa and LoKr share, PEFT's ``LycorisConfig`` (not a rule of its own: use :class:`LoHa` or
    :class:`LoKr`). ``targets``/``exclude``/``layers``/``layers_pattern``/``rank_pattern``/``alpha_pattern`` select
    and size sites exactly as :class:`~fxpeft.LoRA`'s do (PEFT's ``get_pattern_key`` and ``layers_to_transform``)."""

    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "exclude_modules": "exclude",
                                         "init_weights": "init", "layers_to_transform": "layers"}
    _INITS: ClassVar[tuple] = (True, False)

    targets: Targets = None
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: Any = True
    use_effective_conv2d: bool = False
    exclude: Targets | None = None
    rank_pattern: Any = ()   # {regex: r}, kept as a tuple of (regex, r) pairs in order (rules are hashable)
    alpha_pattern: Any = ()  # {regex: alpha}, likewise
    layers: Any = None       # PEFT's layers_to_transform
    layers_pattern: Any = None

    def __post_init__(self):
        name = type(self).__name__
        try:  # LoRA's rule holds the same selection fields, checked the same way
            selection = LoRA(targets=self.targets, exclude=self.exclude, r=self.r, alpha=self.alpha,
                             rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern, layers=self.layers,
                             layers_pattern=self.layers_pattern)
        except RuleError as error:
            raise RuleError(str(error).replace("LoRA:", f"{name}:").replace("LoRA `", f"{name} `")) from None
        for field in ("targets", "exclude", "rank_pattern", "alpha_pattern", "layers", "layers_pattern"):
            object.__setattr__(self, field, getattr(selection, field))
        object.__setattr__(self, "_selection", selection)
        check_alpha(self.alpha, name)
        for field in ("rank_dropout", "module_dropout"):
            check_number(name, field, getattr(self, field), minimum=0, below=1)
            if getattr(self, field):
                raise UnsupportedError(
                    f"{name}: `{field}={getattr(self, field)}` is not supported: PEFT draws it with torch.rand in its "
                    "forward, per layer and call, which fxpeft does not reproduce in a graph. Use "
                    f"{field}=0 (PEFT applies it only in training: an adapter trained with it runs the same at "
                    "inference with 0).")
        if not any(self.init is init or (isinstance(init, str) and self.init == init) for init in self._INITS):
            raise RuleError(f"{name}: `init` (PEFT's init_weights) must be one of {list(self._INITS)}, got "
                            f"{self.init!r}.")
        for flag in self._flags():
            if not isinstance(getattr(self, flag), bool):
                raise RuleError(f"{name}: `{flag}` must be True or False, got {getattr(self, flag)!r}.")

    def _flags(self) -> tuple[str, ...]:
        return ("use_effective_conv2d",)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["rank_pattern"] = dict(self.rank_pattern)
        data["alpha_pattern"] = dict(self.alpha_pattern)
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["layers_pattern"] = list(self.layers_pattern) if isinstance(self.layers_pattern, tuple) else \
            self.layers_pattern
        return data

    def rank_for(self, path: str) -> int:
        """``r`` at the site ``path`` (``rank_pattern`` first, PEFT's ``get_pattern_key``)."""
        return self._selection.rank_for(path)

    def alpha_for(self, path: str) -> float:
        """``alpha`` at the site ``path`` (``alpha_pattern`` first)."""
        return self._selection.alpha_for(path)

    def selects_layer(self, path: str) -> bool:
        """Whether ``layers`` keeps the site ``path`` (always, without ``layers``)."""
        return self._selection.selects_layer(path)


class LycorisSite(SiteModule):
    """One linear's or convolution's LoHa or LoKr factors, with ``scaling`` (``alpha / r``, a 0-dim tensor) and
    ``unit`` (1: the per-row gate's coefficient). Subclasses create the factors, give them their initial values, and
    build the delta weight twice: eagerly (:meth:`delta_weight`, for merging) and as graph nodes
    (:meth:`delta_nodes`), the same ops in the same order."""

    #: names of the parameters this site has, in PEFT's order (a subclass sets them per site)
    parts: tuple[str, ...] = ()

    def __init__(self, path: str, site: LinearSite | ConvSite, rule: LycorisRule, device, dtype: torch.dtype):
        super().__init__()
        self.path = path
        self.weight_fqn = site.weight_fqn
        if isinstance(site, ConvSite):  # W [out, in / groups, *kernel]
            self.out_features, self.fan_in = site.out_channels, site.in_channels // site.groups
            self.kernel: tuple[int, ...] = tuple(site.kernel_size)
        else:
            self.out_features, self.fan_in, self.kernel = site.out_features, site.in_features, ()
        self.weight_shape = (self.out_features, self.fan_in, *self.kernel)
        # PEFT's use_effective_conv2d, which it turns off for a kernel of ones (Conv2d 1x1, Conv1d of size 1)
        self.effective = bool(rule.use_effective_conv2d and any(size != 1 for size in self.kernel))
        self.init = rule.init
        self.r = rule.rank_for(path)
        self.alpha = rule.alpha_for(path)
        self.scaling_value = self.alpha / self.r
        self.register_buffer("scaling", torch.zeros((), device=device, dtype=dtype), persistent=False)
        self.register_buffer("unit", torch.ones((), device=device, dtype=torch.float32), persistent=False)
        self._fill_scaling()

    def _scale_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``alpha / r`` as PEFT's forward multiplies by it, in ``dtype`` (a subclass may round it first)."""
        return torch.tensor(self.scaling_value, dtype=dtype)

    @torch.no_grad()
    def _fill_scaling(self) -> None:
        if self.scaling.device.type != "meta":
            self.scaling.copy_(self._scale_in(self.scaling.dtype))

    def _apply(self, fn, recurse=True):
        """Moves and casts (the adapter dtype policy); ``scaling`` is then recomputed in its new dtype from ``alpha``
        and ``r``, as PEFT's forward recomputes it from the Python float."""
        result = super()._apply(fn, recurse)
        self._fill_scaling()
        return result

    def factor(self, name: str) -> nn.Parameter:
        return getattr(self, name)

    @property
    def columns(self) -> int:
        """The width of the flattened weight, ``in / groups * prod(kernel)`` (PEFT's non-effective shape)."""
        return self.fan_in * math.prod(self.kernel)

    @property
    def spatial(self) -> tuple[int, int]:
        """The last two axes of PEFT's CP core (``hada_t1``, ``lokr_t2``): the kernel, ``(k, 1)`` for Conv1d."""
        return (self.kernel[0], self.kernel[1] if len(self.kernel) > 1 else 1)

    def shaped(self, ctx: RewriteContext, weight: fx.Node) -> fx.Node:
        """``weight.reshape(base weight shape)``, PEFT's last step (a linear's weight has that shape already)."""
        if not self.kernel:
            return weight
        return ctx.tag(ctx.program.graph.call_function(aten.reshape.default, (weight, list(self.weight_shape))),
                       self.path, "weight")

    def einsum(self, ctx: RewriteContext, equation: str, operands: list[fx.Node], names: list[str]) -> fx.Node:
        """``torch.einsum(equation, *operands)`` as one ``aten.einsum`` node with the contraction path eager
        ``torch.einsum`` would pass (opt_einsum's, when it is installed and enabled; ``names``: the parameters the
        operands read, for their shapes), so the graph contracts in PEFT's order."""
        return ctx.tag(ctx.program.graph.call_function(
            aten.einsum.default, (equation, operands), {"path": einsum_path(equation, [self.factor(name) for name in
                                                                                        names])}),
            self.path, "weight")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{self.path}.{name}": self.factor(name) for name in self.parts}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if next(self.parameters()).device.type == "meta":
            return
        self._fill_scaling()
        self.unit.fill_(1.0)
        self.init_factors()

    def init_factors(self) -> None:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """PEFT's ``get_delta_weight`` (scaled, in the base weight's shape), eagerly."""
        raise NotImplementedError

    def delta_nodes(self, ctx: RewriteContext, inputs: dict[str, fx.Node]) -> fx.Node:
        """The nodes of :meth:`delta_weight` at the caller's insertion point, reading ``inputs`` (one graph input per
        part, and ``scaling``); tagged ``weight``."""
        raise NotImplementedError

    def set_alpha(self, alpha: float) -> None:
        """``alpha / r`` as this site's scaling (PEFT's ``LycorisLayer.set_scale`` with scale 1); no graph change."""
        self.alpha = alpha
        self.scaling_value = alpha / self.r
        self._fill_scaling()

    def reload(self, rules: list) -> bool:
        """The file's rule gives this site its ``alpha`` (a tensor: no graph change)."""
        own = [rule for rule in rules if isinstance(rule, LycorisRule)]
        if len(own) == 1:
            self.set_alpha(own[0].alpha_for(self.path))
        return False

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """What :meth:`merge_into` writes: this module's weight, where this module reads it."""
        return {self.weight_fqn: (self.weight_fqn,)}

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        """PEFT's ``LycorisLayer.merge``: ``weight.data += get_delta_weight()``."""
        base_model.get_parameter(self.weight_fqn).add_(self.delta_weight())

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        """PEFT's ``unmerge``: ``weight.data -= get_delta_weight()``."""
        base_model.get_parameter(self.weight_fqn).sub_(self.delta_weight())


# -- the rewrite ----------------------------------------------------------------------------------------------
def _check_convs(rule: LycorisRule, ctx: RewriteContext) -> None:
    """Refuse the convolutions the targets name that PEFT's method does not adapt as fxpeft computes them: Conv3d and
    transposed convolutions (PEFT has no layer for them), and a ``padding_mode`` other than zeros (PEFT's delta conv
    pads the unpadded input with zeros)."""
    name = type(rule).__name__
    named = [(path, module) for path, module in ctx.base_model.named_modules() if isinstance(module, _CONVS)
             and matches_any(rule.targets, path, ctx.get_module, ctx.roles, ctx.all_linear)
             and not (rule.exclude is not None and matches_any(rule.exclude, path, ctx.get_module, ctx.roles,
                                                               ctx.all_linear))]
    odd = [path for path, module in named if not isinstance(module, (nn.Conv1d, nn.Conv2d))]
    if odd:
        raise UnsupportedError(f"{name}: targets {odd[:4]} are Conv3d or transposed convolutions; PEFT's {name} adapts "
                               "nn.Linear, nn.Conv1d and nn.Conv2d only. Narrow the targets or exclude them.")
    padded = [path for path, module in named if module.padding_mode != "zeros"]
    if padded:
        raise UnsupportedError(f"{name}: the convolutions {padded[:4]} pad with padding_mode != 'zeros'; PEFT's {name} "
                               "convolves the unpadded input with zero padding there, which fxpeft does not reproduce. "
                               "Exclude them.")



def _check_site(rule: LycorisRule, ctx: RewriteContext, site: LinearSite | ConvSite) -> None:
    name = type(rule).__name__
    form = getattr(site, "form", "conv")
    if form == "addmm":
        raise UnsupportedError(
            f"{name}: {site.path} is a transformers Conv1D (GPT-2 style, weight stored [in, out]); PEFT 0.21.2's "
            f"{name} refuses it too ('Target module of type Conv1D not supported': only nn.Linear, Conv1d and "
            "Conv2d). Use LoRA or IA3 there, or exclude it.")
    if form not in (*_FORMS, "conv"):
        raise UnsupportedError(f"{name}: {site.path} is computed as {form!r} (a quantized linear), which fxpeft's "
                               f"{name} does not adapt; use a float base model, or LoRA.")
    for node in site.nodes:
        for joined in ctx.joined_after(node):
            tag = tags.tag_of(joined)
            if tag.get("adapter") == ctx.adapter_name and tag.get("method") == ctx.method_tag:
                raise RuleError(f"{name}: {site.path} is selected by more than one {name} rule of adapter "
                                f"{ctx.adapter_name!r}; each module takes one {name} per adapter. Narrow the targets "
                                "or add `exclude=` to one rule.")


def _insert_branch(ctx: RewriteContext, site: LinearSite | ConvSite, node: fx.Node, module: LycorisSite,
                   inputs: dict[str, fx.Node]) -> None:
    """``y`` becomes ``(y + linear(x.to(dW.dtype), dW) gated per row).to(y.dtype)``, PEFT's order; at a convolution
    the base's conv op with ``dW`` and no bias in place of ``linear`` (PEFT's ``F.conv2d(x, dW, stride=..., ...)``)."""
    graph = ctx.program.graph
    path = site.path
    x = site.input_of(node)
    x_dtype = x.meta["val"].dtype
    dtype = module.scaling.dtype
    stack = node.meta.get("nn_module_stack")
    base_op = node
    node = ctx.site_output(node)  # after the adapters already at this site: they compose in adapter order
    readers = set(node.users)
    with graph.inserting_before(node.next):
        weight = module.delta_nodes(ctx, inputs)
        h = x if x_dtype == dtype else ctx.tag(graph.call_function(aten.to.dtype, (x, dtype)), path, "input")
        h = ctx.rows_on(h, path)
        if module.kernel:  # conv(x, W, b, stride, padding, ...) -> conv(h, dW, None, stride, padding, ...)
            call = (base_op.target, (h, weight, None, *base_op.args[3:]), dict(base_op.kwargs))
        else:
            call = (aten.linear.default, (h, weight), {})
        delta = ctx.tag(graph.call_function(*call), path, "delta")
        delta = ctx.gated(delta, inputs["unit"], path, torch.float32)
        total = ctx.tag(graph.call_function(aten.add.Tensor, (node, delta)), path, tags.JOIN)
    rejoin(ctx, path, node, total, readers, dtype, stack)


def rewrite(rule: LycorisRule, ctx: RewriteContext, kind: str, make_site) -> None:
    """Add ``rule``'s delta-weight branch at every linear and convolution it selects; ``make_site(path, site, rule,
    device, dtype)`` builds the site module (kind ``kind``)."""
    _check_convs(rule, ctx)
    sites = narrow(rule, ctx, ctx.select_sites(rule, ("linear", "conv")), trained_whole(ctx))
    for site in sites:
        _check_site(rule, ctx, site)
    for site in sites:
        base = ctx.base_model.get_parameter(site.weight_fqn)
        module = ctx.site(site.path, kind, lambda: make_site(site.path, site, rule, base.device,
                                                             adapter_dtype(base.dtype)))
        inputs = {name: ctx.adapter_input(site.path, kind, name) for name in (*module.parts, "scaling", "unit")}
        for node in site.nodes:
            _insert_branch(ctx, site, node, module, inputs)


def einsum_path(equation: str, operands: list[torch.Tensor]) -> list[int] | None:
    """The ``path`` eager ``torch.einsum`` passes to ATen for these operands (torch/functional.py): opt_einsum's
    contraction path for three or more operands when it is available and enabled, else None."""
    from torch.backends import opt_einsum

    if len(operands) <= 2 or not opt_einsum.enabled or not opt_einsum.is_available():
        return None
    path = opt_einsum.get_opt_einsum().contract_path(equation, *operands, optimize=opt_einsum.strategy)[0]
    return [index for pair in path for index in pair]


def key_regex(parts: tuple[str, ...]) -> re.Pattern:
    """The file keys of ``parts``: ``base_model.model.<path>.<part>`` (groups ``path`` and ``part``)."""
    names = "|".join(sorted(parts, key=len, reverse=True))
    return re.compile(rf"^base_model\.model\.(?P<path>.+)\.(?P<part>{names})$")


# -- the PEFT file --------------------------------------------------------------------------------------------
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping"}




def _selector(config: dict, field: str) -> Any:
    value = config.get(field)
    return value if value is None or isinstance(value, str) else tuple(sorted(names_field(config, field)))


class LycorisCodec(PeftCodec):
    """``peft_type`` LOHA or LOKR: one rule of ``rule_type`` (plus Trainable rules as ``modules_to_save``) <-> PEFT's
    config. ``extra``: the method's own fields, PEFT's name -> (the rule's field, a reader of the file's value)."""

    def __init__(self, rule_type: type, peft_type: str, config_class: str, extra: dict[str, tuple[str, Any]],
                 parts: tuple[str, ...]):
        self.rule_type = rule_type
        self.peft_types = (peft_type,)
        self.config_class = config_class
        self.extra = extra
        self.key = key_regex(parts)

    @property
    def _honoured(self) -> set[str]:
        return {"r", "alpha", "rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d",
                "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "modules_to_save", *self.extra}

    def config_fields(self, rule: LycorisRule, modules_to_save: list[str] | None,
                      selected: list[str] | None = None) -> dict[str, Any]:
        """The config's fields for ``rule``: selectors as given where PEFT reads them the same way, else (with
        ``selected``) the module paths the rule selected; UnsupportedError without them."""
        targets = as_peft_names(rule.targets)
        exclude = None if rule.exclude is None else as_peft_names(rule.exclude)
        layers, pattern = rule.layers, rule.layers_pattern
        if targets is None or (rule.exclude is not None and exclude is None) or (
                layers is not None and isinstance(targets, str)):
            if selected is None:
                raise UnsupportedError(f"{type(rule).__name__}: targets {rule.targets!r} / exclude {rule.exclude!r} "
                                       "hold globs, roles or types (or `layers` with a regex), which PEFT's config "
                                       "cannot express; write module names or one regex.")
            targets, exclude, layers, pattern = sorted(selected), None, None, None
        fields = {
            "r": rule.r, "alpha": rule.alpha, "rank_dropout": rule.rank_dropout,
            "module_dropout": rule.module_dropout, "init_weights": rule.init,
            "use_effective_conv2d": rule.use_effective_conv2d, "target_modules": targets,
            "exclude_modules": exclude, "layers_to_transform": list(layers) if layers is not None else None,
            "layers_pattern": list(pattern) if isinstance(pattern, tuple) else pattern,
            "rank_pattern": dict(rule.rank_pattern), "alpha_pattern": dict(rule.alpha_pattern),
            "modules_to_save": sorted(modules_to_save) if modules_to_save else None}
        fields.update({peft_name: getattr(rule, field) for peft_name, (field, _) in self.extra.items()})
        return fields

    def to_config(self, model, rules, selected, adapter) -> dict[str, Any]:
        name = self.rule_type.__name__
        rule = the_one_rule(rules, self.rule_type, f"Per-site ranks and alphas fit in one rule: "
                                                   f"{name}(rank_pattern={{...}}, alpha_pattern={{...}}).")
        modules_to_save = modules_to_save_of(rules, selected)
        task_type = saved_task_type(model, modules_to_save)
        return {
            "peft_type": self.peft_types[0],
            "task_type": task_type,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            **self.config_fields(rule, modules_to_save, selected.get(rule, [])),
        }

    def to_rules(self, config, saved_keys) -> list:
        peft_type = str_field(config, "peft_type", self.peft_types[0])
        if peft_type != self.peft_types[0]:
            raise UnsupportedError(f"adapter_config.json has peft_type {shown(peft_type)}; this codec reads "
                                   f"{self.peft_types[0]}.")
        unsupported = sorted(name for name, value in config.items() if name not in self._honoured and
                             name not in _METADATA and value not in (None, False, {}, [], "", 0))
        if unsupported:
            raise UnsupportedError(f"adapter_config.json sets {unsupported[:10]}, which fxpeft's "
                                   f"{self.rule_type.__name__} does not support; remove them or convert the adapter "
                                   "without them.")
        init = config.get("init_weights", True)
        pattern = config.get("layers_pattern")
        fields = dict(
            targets=_selector(config, "target_modules"), exclude=_selector(config, "exclude_modules"),
            r=int_field(config, "r", 8), alpha=number_field(config, "alpha", 8, above=0),
            rank_dropout=number_field(config, "rank_dropout", 0.0, minimum=0, below=1),
            module_dropout=number_field(config, "module_dropout", 0.0, minimum=0, below=1),
            init=init, use_effective_conv2d=bool_field(config, "use_effective_conv2d", False),
            rank_pattern=mapping_field(config, "rank_pattern", integer=True, minimum=1, maximum=MAX_SIZE),
            alpha_pattern=mapping_field(config, "alpha_pattern", above=0),
            layers=config.get("layers_to_transform"),
            layers_pattern=pattern if pattern is None or isinstance(pattern, str) else
            names_field(config, "layers_pattern"))
        for peft_name, (field, read) in self.extra.items():
            fields[field] = read(config, peft_name)
        if not fields["targets"]:
            raise UnsupportedError(f"adapter_config.json has no target_modules for {self.rule_type.__name__}.")
        rules: list = [self.rule_type(**fields)]
        wanted = list(dict.fromkeys(list(names_field(config, "modules_to_save") or ()) +
                                    list(TASK_HEADS.get(str_field(config, "task_type", None), ()))))
        if saved_keys is not None:
            wanted = [name for name in wanted if any(
                (key.startswith(f"base_model.model.{name}.") or f".{name}." in key) and not self.key.match(key)
                for key in saved_keys)]
        if wanted:
            rules.append(Trainable(targets=tuple(wanted)))
        return rules

    def rule_to_peft_config(self, rule, modules_to_save=None):
        import peft  # optional dependency

        return getattr(peft, self.config_class)(**self.config_fields(rule, modules_to_save))


# -- verify ---------------------------------------------------------------------------------------------------
class LycorisMethod(Method):
    """The verify hooks LoHa and LoKr share; subclasses set ``rule_type``, ``tag``, ``codec``, ``key_form``,
    ``rank_axes`` (part -> the axis of its tensor that has the rank, None for none) and ``rewrite``."""

    site_kind = "a linear or convolution module"
    rank_axes: ClassVar[dict[str, int | None]] = {}

    def key_part(self, key: str) -> KeyPart | None:
        match = key_regex(tuple(self.rank_axes)).match(key)
        return KeyPart(match["path"], match["part"], self.rank_axes[match["part"]]) if match else None

    def describe_site(self, path: str, ctx: RewriteContext) -> str | None:
        site = ctx.linear_sites.get(path)
        if site is not None and site.form in _FORMS:
            return f"a linear {site.in_features} -> {site.out_features}"
        conv = ctx.conv_sites.get(path)
        if conv is not None and conv.dims in (1, 2):
            kernel = "x".join(map(str, conv.kernel_size))
            return f"a conv{conv.dims}d {conv.in_channels} -> {conv.out_channels} ({kernel})"
        return None

    def allowed_sites(self, rule, ctx: RewriteContext) -> dict[str, Any]:
        return {site.path: rule for site in ctx.select_sites(rule, ("linear", "conv"))}

    def policy_findings(self, site, allowed, given: set[str], declared, state: dict) -> list:
        """A site must be allowed, of rank at most the declared rule's (at that path), with the stated fields equal."""
        if not isinstance(site, LycorisSite):
            return []
        name = self.rule_type.__name__
        if allowed is None:
            return [f"the adapter puts {name} on this module, which no rule allows."]
        found: list = []
        limit = allowed.rank_for(site.path)
        if site.r > limit:
            found.append((f"{name} rank {site.r} exceeds the rules' r={limit}.", {"rank": site.r, "allowed": limit}))
        for field in _stated_fields(allowed, given):
            if getattr(declared, field) != getattr(allowed, field):
                found.append(f"the adapter has {field}={getattr(declared, field)!r}; the rules say "
                             f"{field}={getattr(allowed, field)!r}.")
        return found


def _stated_fields(rule: LycorisRule, given: Iterable[str]) -> list[str]:
    skip = {"targets", "exclude", "r", "rank_pattern", "layers", "layers_pattern"}
    return [field.name for field in dataclasses.fields(rule) if field.name in given and field.name not in skip]
