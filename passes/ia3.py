"""(IA)³ (Liu et al. 2022), PEFT 0.21.2's ``IA3``: a learned vector ``ia3_l`` per selected linear that multiplies
the linear's *output* (``y * l``), or its *input* for the linears PEFT calls feed-forward (``W (x * l)``).

The rule :class:`IA3` takes PEFT's ``IA3Config`` fields (``target_modules``, ``feedforward_modules``,
``exclude_modules``, ``init_ia3_weights`` as aliases). Which targets are feed-forward is PEFT's test on the module
path, exactly: a regex string must ``re.fullmatch`` the path, a list of names matches a path that *ends with* one of
them (``str.endswith``, no dot boundary, as PEFT's ``_check_target_module_feedforward``). Left out (None), targets and
feed-forward modules are PEFT's defaults for the model's ``model_type`` (peft's tables; without peft installed, or
for a model type PEFT does not know, give them).

The vector is PEFT's parameter as PEFT shapes it: ``[out, 1]``, or ``[1, in]`` for a feed-forward linear, ones at
first (``init=False``: ``torch.randn``, PEFT's ``init_ia3_weights=False``). Gating per batch row, so that switching,
disabling and ``adapter_names`` change tensors, never the graph::

    factor = where(gate[row] != 0, l, 1)        [batch, features]: the row's vector, or exactly 1
    y'     = y * factor                         the join (an input join for a feed-forward linear: W (x * factor))

A row whose gate is off is multiplied by exactly 1, the base value bit for bit; an inactive adapter's vector is
selected away, never multiplied by 0, so an ``inf`` in it cannot make a NaN (nor a NaN gradient) in another row. A
value whose rows are flattened (transformers' ``Conv1D`` computes ``[batch * seq, features]``) gets the factor
expanded over each row's positions.

Numerics are PEFT's: ``(y * l).to(y.dtype)``, and ``(x.to(l.dtype) * l).to(x.dtype)`` for a feed-forward input.
Merging multiplies the base weight's rows (output) or columns (feed-forward input; rows and columns swapped for
``Conv1D``, PEFT's ``fan_in_fan_out``, read off the graph) and, for an output vector, the bias; unmerging divides by
``l + 1e-8`` as PEFT does. ``add_weighted_adapter`` is PEFT's (``sum w_i l_i`` per linear). Files are PEFT's
(``peft_type`` IA3, ``base_model.model.<path>.ia3_l``, ``modules_to_save`` from Trainable rules), and ``fxpeft check``
knows the keys and what a declared IA3 rule allows (its linears, and the side its ``feedforward`` says). There is no
``alpha`` (``set_alpha`` leaves IA3 alone). What differs from PEFT, on purpose:

- several active adapters at one linear apply one after another (``y * l1 * l2``, in adapter order, the order
  :meth:`AdaptedModel.merge` folds them), where PEFT multiplies the vectors first (``y * (l1 * l2)``): equal within
  float32 rounding;
- a feed-forward IA3 scales the input of the adapters added to the linear before it as well (so that merging, in
  adapter order, is the graph); a method added to the same linear *after* a feed-forward IA3 reads the scaled input.
  PEFT cannot put two methods on one linear of one model, so there is nothing of PEFT's to match there;
- a quantized base (bitsandbytes) runs IA3 but does not merge (PEFT refuses that too);
- ``nn.Conv2d``/``Conv3d`` targets (PEFT's IA3 conv layers) are not supported: only linear sites;
- ``add_weighted_adapter`` leaves trained copies (``modules_to_save``) out of the new adapter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import ParameterCopy, SiteModule, adapter_dtype
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft import (
    TASK_HEADS,
    bool_field,
    modules_to_save_of,
    names_field,
    saved_task_type,
    shown,
    str_field,
    the_one_rule,
)
from fxpeft.graph import tags
from fxpeft.graph.selectors import as_peft_names
from fxpeft.graph.sites import LinearSite
from fxpeft.methods import KeyPart, Method, PeftCodec, register_method
from fxpeft.ops import quantized
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule, Trainable, normalize_targets

__all__ = ["IA3", "IA3Vector", "IA3Codec", "IA3Method", "peft_defaults", "is_feedforward"]

aten = torch.ops.aten

KIND = "ia3"  # the site kind: adapter keys ``ia3:<path>``
KEY = "ia3_l"  # the file key's part: ``base_model.model.<path>.ia3_l``
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.ia3_l$")
_FORMS = ("linear", "addmm", "matmul", "quantized")


@dataclasses.dataclass(frozen=True)
class IA3(Rule):
    """(IA)³ at the selected linears: a learned vector scaling the output, or the input of ``feedforward`` ones.

    ``targets``: as for :class:`~fxpeft.LoRA` (names, a regex, ``"all-linear"``, globs, roles, types); None for
    PEFT's default targets of the model's type. ``feedforward``: the targets whose *input* the vector scales, in
    PEFT's terms (a regex fully matching the module path, or names a path ends with); None for PEFT's default of the
    model's type; ``()`` for none. When both are lists of names, ``feedforward`` must be a subset of ``targets``
    (PEFT's rule). ``init``: True for ones (the identity), False for ``torch.randn`` (PEFT's
    ``init_ia3_weights``). Example::

        fxpeft.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    """

    method: ClassVar[str] = "ia3"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "feedforward_modules": "feedforward",
                                         "exclude_modules": "exclude", "init_ia3_weights": "init"}
    peft_hints: ClassVar[dict[str, str]] = {
        "fan_in_fan_out": "fxpeft reads the layout from the graph (transformers' Conv1D); drop it"}

    targets: Any = None
    feedforward: Any = None
    exclude: Any = None
    init: bool = True

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "IA3", allow_none=True))
        object.__setattr__(self, "feedforward", normalize_targets(self.feedforward, "feedforward", "IA3",
                                                                  allow_none=True, allow_empty=True))
        object.__setattr__(self, "exclude", normalize_targets(self.exclude, "exclude", "IA3", allow_none=True))
        if not isinstance(self.init, bool):
            raise RuleError(f"IA3: `init` must be True (ones) or False (random), got {self.init!r}.")
        if isinstance(self.feedforward, tuple) and not all(isinstance(item, str) for item in self.feedforward):
            raise RuleError("IA3: `feedforward` takes module names or one regex (PEFT's feedforward_modules), not "
                            f"types: {self.feedforward!r}.")
        if isinstance(self.feedforward, tuple) and isinstance(self.targets, tuple) and \
                all(isinstance(item, str) for item in self.targets):
            extra = sorted(set(self.feedforward) - set(self.targets))
            if extra:
                raise RuleError(f"IA3: feedforward {extra} are not among targets {list(self.targets)}; PEFT requires "
                                "feedforward_modules to be a subset of target_modules. Add them to `targets` or "
                                "drop them from `feedforward`.")

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["feedforward"] = list(self.feedforward) if isinstance(self.feedforward, tuple) else self.feedforward
        return data


def peft_defaults(model: nn.Module, which: str) -> Any:
    """PEFT's default IA3 ``target_modules`` (``which="target"``) or ``feedforward_modules`` (``"feedforward"``) for
    ``model``'s ``config.model_type``, from peft's tables; RuleError when there is none (as PEFT raises)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import constants  # optional dependency
    except ImportError:
        table: dict = {}
    else:
        table = getattr(constants, f"TRANSFORMERS_MODELS_TO_IA3_{which.upper()}_MODULES_MAPPING", {})
    if model_type not in table:
        field = "targets" if which == "target" else "feedforward"
        raise RuleError(f"IA3: `{field}` was left out, and PEFT has no default {which} modules for model type "
                        f"{model_type!r}{'' if table else ' (or peft is not installed)'}. Give `{field}=` (module "
                        "names or a regex; `feedforward=()` for none).")
    value = table[model_type]
    return value if isinstance(value, str) else tuple(value)


def resolved(rule: IA3, model: nn.Module) -> IA3:
    """``rule`` with PEFT's defaults for ``model`` in place of the fields left out."""
    targets = rule.targets if rule.targets is not None else peft_defaults(model, "target")
    feedforward = rule.feedforward if rule.feedforward is not None else peft_defaults(model, "feedforward")
    if targets is rule.targets and feedforward is rule.feedforward:
        return rule
    return dataclasses.replace(rule, targets=targets, feedforward=feedforward)


def is_feedforward(feedforward: Any, path: str) -> bool:
    """PEFT's test: ``re.fullmatch`` for a regex string, ``str.endswith`` for a list of names."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


class IA3Vector(SiteModule):
    """``ia3_l`` of one linear: ``[out, 1]``, or ``[1, in]`` when it scales the input (``feedforward``)."""

    def __init__(self, path: str, site: LinearSite, feedforward: bool, init: bool, device, dtype):
        super().__init__()
        self.path = path
        self.feedforward = feedforward
        self.init = init
        self.weight_fqn = site.weight_fqn
        self.bias_fqn = site.bias_fqn
        self.fan_in_fan_out = site.form == "addmm"  # Conv1D: W stored [in, out]
        shape = (1, site.in_features) if feedforward else (site.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def features(self) -> int:
        return int(self.ia3_l.numel())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.ia3_l.device.type == "meta":
            return
        if self.init:
            self.ia3_l.fill_(1.0)
        else:
            self.ia3_l.copy_(torch.randn(self.ia3_l.shape))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{self.path}.{KEY}": self.ia3_l}

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """What :meth:`merge_into` writes: the weight, and an output vector's bias."""
        written = {self.weight_fqn: (self.weight_fqn,)}
        if self.bias_fqn and not self.feedforward:
            written[self.bias_fqn] = (self.bias_fqn,)
        return written

    def _for_weight(self, base_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if quantized.quantized_kind(base_model.get_submodule(self.path)) is not None:
            raise UnsupportedError(f"IA3: {self.path} is quantized; an IA3 vector cannot be merged into quantized "
                                   "weights (PEFT refuses too). Run it unmerged, or merge into a float base.")
        weight = base_model.get_parameter(self.weight_fqn)
        # PEFT: ``transpose(ia3_l, fan_in_fan_out)``: [out, 1] scales W's rows, [1, in] its columns (swapped for
        # Conv1D's [in, out]).
        vector = self.ia3_l.T if self.fan_in_fan_out else self.ia3_l
        return weight, vector

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        weight, vector = self._for_weight(base_model)
        weight.copy_(torch.mul(weight, vector).to(weight.dtype))
        if self.bias_fqn and not self.feedforward:
            bias = base_model.get_parameter(self.bias_fqn)
            bias.copy_(torch.mul(bias, self.ia3_l.reshape(bias.shape)).to(bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        weight, vector = self._for_weight(base_model)
        weight.copy_(torch.div(weight, vector + 1e-8).to(weight.dtype))  # PEFT's tolerance
        if self.bias_fqn and not self.feedforward:
            bias = base_model.get_parameter(self.bias_fqn)
            bias.copy_(torch.div(bias, self.ia3_l.reshape(bias.shape) + 1e-8).to(bias.dtype))


# -- the rewrite ----------------------------------------------------------------------------------------------
def _factor(ctx: RewriteContext, site: str, vector: fx.Node, features: int) -> fx.Node:
    """``where(gate[row] != 0, l, 1)``: [batch, features], each row's vector or exactly one."""
    call = ctx.program.graph.call_function
    gate = ctx.gate_input()
    on = ctx.tag(call(aten.ne.Scalar, (gate, 0)), site, "gate")
    column = ctx.tag(call(aten.unsqueeze.default, (on, 1)), site, "gate")
    flat = ctx.tag(call(aten.reshape.default, (vector, [features])), site, "scale")
    return ctx.tag(call(aten.where.ScalarOther, (column, flat, 1.0)), site, "scale")


def _scaled(ctx: RewriteContext, site: str, value: fx.Node, vector: fx.Node, features: int,
            dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
    """``value * factor`` with the factor broadcast to ``value``'s rows (the join), and the value standing for
    ``value`` (the join, or its cast back to ``value``'s dtype). Nodes go at the caller's insertion point."""
    call = ctx.program.graph.call_function
    val = value.meta["val"]
    factor = _factor(ctx, site, vector, features)
    flat = factor.args[1]  # the vector as [features]: the factor of every row when every row is on
    batch = ctx.tag(call(aten.sym_size.int, (ctx.gate_input(), 0)), site, "scale")
    if val.dim() >= 3:  # [batch, ..., features]
        factor = ctx.tag(call(aten.reshape.default, (factor, [batch] + [1] * (val.dim() - 2) + [features])),
                         site, "scale")
    elif val.dim() == 2:  # [batch * positions, features], the rows of each batch row in order
        rows = ctx.tag(call(aten.reshape.default, (value, [batch, -1, features])), site, "scale")
        positions = ctx.tag(call(aten.sym_size.int, (rows, 1)), site, "scale")
        factor = ctx.tag(call(aten.unsqueeze.default, (factor, 1)), site, "scale")
        factor = ctx.tag(call(aten.expand.default, (factor, [batch, positions, features])), site, "scale")
        factor = ctx.tag(call(aten.reshape.default, (factor, [-1, features])), site, "scale")
    else:
        raise UnsupportedError(f"IA3: {site} has a {val.dim()}-D activation; gating per row needs a batch dimension.")
    join = tags.mark_when_on(ctx.tag(call(aten.mul.Tensor, (value, factor)), site, tags.JOIN), "product", value, flat)
    out = join
    if torch.promote_types(val.dtype, dtype) != val.dtype:
        out = ctx.tag(call(aten.to.dtype, (join, val.dtype)), site, tags.OUTPUT)
    out.meta["val"] = val
    return join, out


def _copy_stack(node: fx.Node, last: fx.Node, first: fx.Node) -> None:
    stack = node.meta.get("nn_module_stack")
    cursor = last
    while stack is not None and cursor is not first:
        cursor.meta.setdefault("nn_module_stack", stack)
        cursor = cursor.prev


def _scale_output(ctx: RewriteContext, site: LinearSite, node: fx.Node, vector: fx.Node, features: int,
                  dtype: torch.dtype) -> None:
    """``y`` (one call of the linear, after the adapters already at this site, as merge() folds them) becomes
    ``y * factor`` for every node that read it."""
    graph = ctx.program.graph
    value = ctx.site_output(node)
    readers = list(value.users)
    with graph.inserting_before(value.next):
        _, out = _scaled(ctx, site.path, value, vector, features, dtype)
    for user in readers:
        user.replace_input_with(value, out)
    _copy_stack(node, out, value)


def _scale_input(ctx: RewriteContext, site: LinearSite, node: fx.Node, vector: fx.Node, features: int,
                 dtype: torch.dtype) -> None:
    """The linear's input ``x`` becomes ``x * factor``, for the base op and the branches of the adapters already at
    this site (the module docstring)."""
    graph = ctx.program.graph
    x = site.input_of(node)
    readers = [user for user in x.users if user is node or (tags.tag_of(user) or {}).get("site") == site.path]
    before = node.prev
    with graph.inserting_before(node):
        _, out = _scaled(ctx, site.path, x, vector, features, dtype)
    for user in readers:
        user.replace_input_with(x, out)
    _copy_stack(node, out, before)


def _rewrite(rule: IA3, ctx: RewriteContext) -> None:
    wanted = resolved(rule, ctx.base_model)
    sites = ctx.select_linear(wanted)
    ctx.adapter.selected[rule] = [site.path for site in sites]
    for site in sites:
        if site.form not in _FORMS:
            raise UnsupportedError(f"IA3: {site.path} is computed as {site.form!r}, which IA3 does not support.")
        if any(tags.tag_of(joined).get("adapter") == ctx.adapter_name and tags.tag_of(joined).get("method") == KIND
               for node in site.nodes for joined in ctx.joined_after(node)):
            raise RuleError(f"IA3: {site.path} is selected by more than one IA3 rule of adapter "
                            f"{ctx.adapter_name!r}; each linear takes one IA3 vector per adapter. Narrow the targets "
                            "or add `exclude=` to one rule.")
        feedforward = is_feedforward(wanted.feedforward, site.path)
        weight = ctx.base_model.get_parameter(site.weight_fqn)
        module = ctx.site(site.path, KIND, lambda: IA3Vector(site.path, site, feedforward, rule.init, weight.device,
                                                             adapter_dtype(weight.dtype)))
        vector = ctx.adapter_input(site.path, KIND, "ia3_l")
        scale = _scale_input if module.feedforward else _scale_output
        for node in site.nodes:
            scale(ctx, site, node, vector, module.features, module.ia3_l.dtype)


# -- the PEFT file --------------------------------------------------------------------------------------------
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping", "fan_in_fan_out"}  # fan_in_fan_out: read off the graph
_HONOURED = {"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "init_ia3_weights"}




def config_fields(rule: IA3, model: nn.Module, selected: list[str]) -> dict[str, Any]:
    """``target_modules`` / ``exclude_modules`` / ``feedforward_modules`` for one IA3 rule on ``model``: as given when
    PEFT reads them the same way, else the module paths the rule selected (and the feed-forward ones among them)."""
    wanted = resolved(rule, model)
    targets, feedforward = as_peft_names(wanted.targets), as_peft_names(wanted.feedforward)
    exclude = None if wanted.exclude is None else as_peft_names(wanted.exclude)
    # PEFT refuses feedforward names that are not among the target names: then the paths, which are.
    names_apart = isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets)
    if targets is None or names_apart or (wanted.exclude is not None and exclude is None) or (
            wanted.feedforward and feedforward is None):
        paths = sorted(selected)
        return {"target_modules": paths, "exclude_modules": None,
                "feedforward_modules": [path for path in paths if is_feedforward(wanted.feedforward, path)]}
    return {"target_modules": targets, "exclude_modules": exclude,
            "feedforward_modules": feedforward if feedforward is not None else []}


class IA3Codec(PeftCodec):
    """``peft_type`` IA3: one IA3 rule (plus Trainable rules as ``modules_to_save``) <-> PEFT's ``IA3Config``."""

    peft_types = ("IA3",)

    def to_config(self, model, rules, selected, adapter) -> dict[str, Any]:
        rule = the_one_rule(rules, IA3, "Put them in one rule (targets and feedforward take lists).")
        modules_to_save = modules_to_save_of(rules, selected)
        task_type = saved_task_type(model, modules_to_save)
        conv1d = any(getattr(site, "fan_in_fan_out", False) for site in adapter.site_modules())
        return {
            "peft_type": "IA3",
            "task_type": task_type,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            **config_fields(rule, model, selected.get(rule, [])),
            "fan_in_fan_out": conv1d,
            "modules_to_save": modules_to_save,
            "init_ia3_weights": rule.init,
        }

    def to_rules(self, config, saved_keys) -> list:
        peft_type = str_field(config, "peft_type", "IA3")
        if peft_type != "IA3":
            raise UnsupportedError(f"adapter_config.json has peft_type {shown(peft_type)}; this codec reads IA3.")
        unsupported = sorted(name for name, value in config.items() if name not in _HONOURED and
                             name not in _METADATA and value not in (None, False, {}, [], "", 0))
        if unsupported:
            raise UnsupportedError(f"adapter_config.json sets {unsupported[:10]}, which fxpeft's IA3 does not "
                                   "support; remove them or convert the adapter without them.")

        def selector(field: str) -> Any:
            value = config.get(field)
            return value if value is None or isinstance(value, str) else tuple(sorted(names_field(config, field)))

        rules: list = [IA3(targets=selector("target_modules"), exclude=selector("exclude_modules"),
                           feedforward=selector("feedforward_modules"),
                           init=bool_field(config, "init_ia3_weights", True))]
        wanted = list(dict.fromkeys(list(names_field(config, "modules_to_save") or ()) +
                                    list(TASK_HEADS.get(str_field(config, "task_type", None), ()))))
        if saved_keys is not None:
            wanted = [name for name in wanted if any(
                key.startswith(f"base_model.model.{name}.") or f".{name}." in key for key in saved_keys
                if not key.endswith(f".{KEY}"))]
        if wanted:
            rules.append(Trainable(targets=tuple(wanted)))
        return rules

    def rule_to_peft_config(self, rule, modules_to_save=None):
        from peft import IA3Config  # optional dependency

        fields = {"target_modules": as_peft_names(rule.targets) if rule.targets is not None else None,
                  "feedforward_modules": as_peft_names(rule.feedforward) if rule.feedforward is not None else None,
                  "exclude_modules": as_peft_names(rule.exclude) if rule.exclude is not None else None}
        odd = [name for name, value in fields.items() if value is None and getattr(
            rule, {"target_modules": "targets", "feedforward_modules": "feedforward",
                   "exclude_modules": "exclude"}[name]) is not None]
        if odd:
            raise UnsupportedError(f"IA3: {odd} hold globs, roles or types, which PEFT's IA3Config cannot express; "
                                   "write module names or one regex.")
        return IA3Config(**fields, init_ia3_weights=rule.init,
                         modules_to_save=sorted(modules_to_save) if modules_to_save else None)


# -- add_weighted_adapter -------------------------------------------------------------------------------------
def add_weighted_adapter(adapted, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """PEFT's ``IA3Model.add_weighted_adapter``: a new adapter at the union of the adapters' linears whose vector
    is ``0 + w_1 l_1 + w_2 l_2 + ...`` over the adapters that have that linear (PEFT's order of operations), inactive
    until ``set_adapter``. A linear must be on one side (output or feed-forward input) in every adapter."""
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = [float(weight) for weight in weights]
    if len(weights) != len(names):
        raise RuleError(f"add_weighted_adapter: {len(names)} adapters but {len(weights)} weights; give one each.")
    vectors: dict[str, list[tuple[IA3Vector, float]]] = {}
    for name, weight in zip(names, weights):
        for site in adapted.adapters[name].site_modules():
            if isinstance(site, IA3Vector):
                vectors.setdefault(site.path, []).append((site, weight))
            elif not isinstance(site, ParameterCopy):  # trained copies are not combined (as PEFT's)
                raise UnsupportedError(f"add_weighted_adapter: adapter {name!r} holds {type(site).__name__} at "
                                       f"{site.path}; IA3 adapters combine with IA3 adapters only.")
    mixed = sorted(path for path, pairs in vectors.items() if len({site.feedforward for site, _ in pairs}) > 1)
    if mixed:
        raise UnsupportedError(f"add_weighted_adapter: {mixed[:4]} scale the output in some of {names} and the "
                               "input in others; their vectors have different lengths and cannot be added. Combine "
                               "adapters that agree on `feedforward`.")
    paths = tuple(sorted(vectors))
    feedforward = tuple(path for path in paths if vectors[path][0][0].feedforward)
    adapted.add_adapter(adapter_name, [IA3(targets=paths, feedforward=feedforward)])
    new = {site.path: site for site in adapted.adapters[adapter_name].site_modules() if isinstance(site, IA3Vector)}
    with torch.no_grad():
        for path, pairs in vectors.items():
            target = new[path].ia3_l
            target.zero_()
            for site, weight in pairs:
                target += site.ia3_l * weight


# -- the method -----------------------------------------------------------------------------------------------
class IA3Method(Method):
    """(IA)³: a gated per-channel scale of each selected linear's output (or input, for feed-forward linears)."""

    rule_type = IA3
    tag = KIND
    codec = IA3Codec()
    key_form = f"<module>.{KEY}"
    site_kind = "a linear module"

    def rewrite(self, rule: IA3, ctx: RewriteContext) -> None:
        _rewrite(rule, ctx)

    def combine(self, adapted, adapters, weights, adapter_name, **options) -> None:
        """PEFT's ``add_weighted_adapter`` for IA3 (no ``combination_type``: PEFT's IA3 takes none)."""
        odd = {key: value for key, value in options.items() if value not in (None, "svd", "linear")}
        if odd:
            raise UnsupportedError(f"add_weighted_adapter: IA3 adapters take no {sorted(odd)} (PEFT's IA3 sums the "
                                   "vectors with the weights); leave them out.")
        add_weighted_adapter(adapted, adapters, weights, adapter_name)

    def key_part(self, key: str) -> KeyPart | None:
        match = _KEY.match(key)
        return KeyPart(match["path"], KEY) if match else None

    def describe_site(self, path: str, ctx: RewriteContext) -> str | None:
        site = ctx.linear_sites.get(path)
        return f"a linear {site.in_features} -> {site.out_features}" if site is not None else None

    def allowed_sites(self, rule: IA3, ctx: RewriteContext) -> dict[str, IA3]:
        """The linears a declared IA3 rule selects (PEFT's defaults for the model where it leaves them out)."""
        wanted = resolved(rule, ctx.base_model)
        return {site.path: wanted for site in ctx.select_linear(wanted)}

    def policy_findings(self, site, allowed, given, declared, state) -> list:
        """An IA3 vector must be allowed, and scale the side (input or output) the declared rule says."""
        if not isinstance(site, IA3Vector):
            return []
        if allowed is None:
            return ["the adapter puts an IA3 vector on this module, which no rule allows."]
        if "feedforward" in given and is_feedforward(allowed.feedforward, site.path) != site.feedforward:
            side = "input" if site.feedforward else "output"
            return [f"the adapter's IA3 vector scales this module's {side}; the rules' feedforward says otherwise."]
        return []


register_method(IA3Method())
