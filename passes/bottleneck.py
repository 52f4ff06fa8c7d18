"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP on a sublayer's output.

At each selected linear (the last linear of a residual sublayer), its output ``h`` becomes, *before* the sublayer's
residual add::

    h' = h + scaling * W_up(act(W_down(h)))        W_down: hidden -> hidden // reduction_factor (at least 1),
                                                    W_up: back to hidden, both linears with bias

``placement="houlsby"`` puts one after every attention sublayer's output projection and one after every feed-forward
sublayer's output linear; ``placement="pfeiffer"`` only after the feed-forward ones. The sites are found by data flow,
through the engine's roles (:mod:`fxpeft.graph.sites`): ``attention.output`` (the linear that reads an attention op's
output: ``o_proj``, ``out_proj``, GPT-2's attention ``c_proj``, T5's ``o``) and ``feedforward.output`` (the linear
that ends any other residual sublayer: ``down_proj``, ``fc2``, GPT-2's MLP ``c_proj``, T5's ``wo``); there is no
table of module names. Cross-attention sublayers of encoder-decoder models are attention sublayers too, so Houlsby
adapts them as well (AdapterHub leaves them out by default: ``cross_adapter=False``); ``exclude`` removes any.
``targets`` names the linears instead (names, globs, a regex, roles, types, as for LoRA); ``placement`` is then
recorded but selects nothing.

Initialisation: ``W_down`` normal with std 1e-2 (the near-identity init of Houlsby et al.; AdapterHub's default
``init_weights="bert"`` uses std 0.02 for *both* projections), ``b_down`` zero; ``W_up`` and ``b_up`` zero (as
AdapterHub's ``init_weights="mam_adapter"``), so a fresh adapter adds exactly zero: the base outputs bit for bit.
``non_linearity`` left out is AdapterHub's default for the placement: ``"swish"`` (SiLU) for Houlsby, ``"relu"`` for
Pfeiffer; ``"gelu"`` is the exact (erf) GELU.

Gating per batch row, so that switching, disabling and ``adapter_names`` change tensors, never the graph: the branch
reads ``h`` in the rows where the adapter is on and exact zeros elsewhere (``RewriteContext.rows_on``), and its
result is *selected* per row (``RewriteContext.gated``: rows whose gate is 0 get exactly 0, never ``0 * x``), then
added: a row whose adapter is off gets ``h + 0``, the base value. Over a half-precision base the adapter is float32
and the branch computes in float32 (``h`` cast up, the sum cast back), as fxpeft's other methods.

What differs from AdapterHub (``adapters`` 1.3 requires transformers ~=4.57 and does not install beside transformers
5, so the reference is the formula above, by hand, in tests/passes/test_bottleneck.py):

- the adapter reads the linear's output; AdapterHub reads the sublayer output after its dropout (the same in eval
  mode and with dropout 0), and its ``SeqBnConfig`` (Pfeiffer) feeds the adapter the sum with the residual after the
  original layer norm (``original_ln_before=True``), where this follows the papers' ``h + f(h)`` on the sublayer
  output;
- AdapterHub's optional adapter layer norms, ``phm`` layers and ``is_parallel`` are not supported.

A bottleneck is not linear in ``h``, so it cannot be folded into the base weights: ``merge()`` (and
``merge_and_unload()``) raises :class:`~fxpeft.errors.UnsupportedError` saying so, and the model is unchanged when the
merged adapters hold only bottleneck sites. (``AdaptedModel.merge`` folds trained copies and other sites in one pass
before it reaches a bottleneck, so merging a bottleneck adapter that also holds Trainable or LoRA sites writes those
first: the engine has no per-site "cannot merge" check before writing yet.) PEFT has no
bottleneck adapters, so there is no PEFT format: ``save_adapter`` writes an fxpeft-specific folder
(``adapter_config.json`` with ``"peft_type": "FXPEFT_BOTTLENECK"``, which PEFT refuses as an unknown type rather than
misreading, and the rule's fields; ``adapter_model.safetensors`` with
``base_model.model.<path>.bottleneck_down.weight`` / ``.bias`` and ``bottleneck_up.weight`` / ``.bias``), which
``fxpeft.load_adapter`` and ``fxpeft check`` read.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import SiteModule, adapter_dtype
from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft import (
    int_field,
    modules_to_save_of,
    names_field,
    number_field,
    shown,
    str_field,
    the_one_rule,
)
from fxpeft.graph import tags
from fxpeft.graph.sites import LinearSite
from fxpeft.methods import KeyPart, Method, PeftCodec, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rule_checks import check_number
from fxpeft.rules import MAX_SIZE, Rule, Trainable, normalize_targets

__all__ = ["Bottleneck", "BottleneckSite", "BottleneckCodec", "BottleneckMethod", "PEFT_TYPE", "PLACEMENTS",
           "NON_LINEARITIES"]

aten = torch.ops.aten

PEFT_TYPE = "FXPEFT_BOTTLENECK"  # not one of PEFT's types: PEFT refuses the folder instead of misreading it
KIND = "bottleneck"  # the site kind (adapter keys ``bottleneck:<path>``) and the method's tag
DOWN, UP = "bottleneck_down", "bottleneck_up"  # the file key's parts: ``base_model.model.<path>.<part>.weight``
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<part>bottleneck_down|bottleneck_up)\.(?P<name>weight|bias)$")
# placement -> the roles its adapters go after (fxpeft.graph.sites)
PLACEMENTS = {"houlsby": ("attention.output", "feedforward.output"), "pfeiffer": ("feedforward.output",)}
# non_linearity -> the aten op of the activation (AdapterHub's names)
NON_LINEARITIES = {"relu": aten.relu.default, "gelu": aten.gelu.default, "swish": aten.silu.default,
                   "tanh": aten.tanh.default}
_DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's DoubleSeqBnConfig / SeqBnConfig
DOWN_STD = 1e-2  # W_down ~ normal(0, 1e-2): Houlsby et al.'s near-identity initialisation


@dataclasses.dataclass(frozen=True)
class Bottleneck(Rule):
    """Bottleneck adapters ``h + scaling * W_up(act(W_down(h)))`` on the output of the selected linears.

    ``placement``: ``"houlsby"`` (after every attention output projection and feed-forward output linear) or
    ``"pfeiffer"`` (after the feed-forward output linears only), found by data flow; ``targets`` (names, globs, a
    regex, roles, types) selects the linears instead. ``reduction_factor``: the bottleneck width is the linear's
    output size // reduction_factor (at least 1). ``non_linearity``: ``"relu"``, ``"gelu"``, ``"swish"`` or
    ``"tanh"``; left out, AdapterHub's default for the placement (swish for Houlsby, relu for Pfeiffer).
    ``scaling``: the factor on the adapter's output (AdapterHub's ``scaling``, default 1). Example::

        fxpeft.Bottleneck(reduction_factor=16, placement="pfeiffer")
        fxpeft.Bottleneck(targets=["o_proj", "down_proj"], non_linearity="gelu")
    """

    method: ClassVar[str] = "bottleneck"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "exclude_modules": "exclude"}

    targets: Any = None
    reduction_factor: int = 16
    placement: str = "houlsby"
    non_linearity: str | None = None
    scaling: float = 1.0
    exclude: Any = None

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "Bottleneck", allow_none=True))
        object.__setattr__(self, "exclude", normalize_targets(self.exclude, "exclude", "Bottleneck", allow_none=True))
        check_number("Bottleneck", "reduction_factor", self.reduction_factor, integer=True, minimum=1,
                     maximum=MAX_SIZE)
        if self.placement not in PLACEMENTS:
            raise RuleError(f"Bottleneck: `placement` must be one of {sorted(PLACEMENTS)}, got "
                            f"{shown(self.placement)}: 'houlsby' adapts attention and feed-forward outputs, "
                            "'pfeiffer' feed-forward outputs only.")
        if self.non_linearity is None:
            object.__setattr__(self, "non_linearity", _DEFAULT_ACTIVATION[self.placement])
        if self.non_linearity not in NON_LINEARITIES:
            raise RuleError(f"Bottleneck: `non_linearity` must be one of {sorted(NON_LINEARITIES)}, got "
                            f"{shown(self.non_linearity)}.")
        check_number("Bottleneck", "scaling", self.scaling)

    @property
    def selector(self) -> Any:
        """What selects the linears: ``targets`` when given, else the roles of ``placement``."""
        return self.targets if self.targets is not None else PLACEMENTS[self.placement]


class BottleneckSite(SiteModule):
    """``W_down`` [width, hidden], ``b_down`` [width], ``W_up`` [hidden, width], ``b_up`` [hidden] and ``scaling``
    of one site; it cannot merge (the branch is not linear in ``h``)."""

    def __init__(self, path: str, hidden: int, width: int, non_linearity: str, scaling: float, device, dtype):
        super().__init__()
        self.path = path
        self.hidden = hidden
        self.width = width
        self.non_linearity = non_linearity
        self.scaling_value = float(scaling)
        self.down_weight = nn.Parameter(torch.empty(width, hidden, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.up_weight = nn.Parameter(torch.empty(hidden, width, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(self.scaling_value, device=device, dtype=dtype),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``W_down`` ~ normal(0, 1e-2), the rest zero (the module docstring): a fresh adapter adds exactly 0."""
        if self.down_weight.device.type == "meta":
            return
        nn.init.normal_(self.down_weight, std=DOWN_STD)
        for tensor in (self.down_bias, self.up_weight, self.up_bias):
            tensor.zero_()
        self.scaling.fill_(self.scaling_value)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.path}"
        return {f"{prefix}.{DOWN}.weight": self.down_weight, f"{prefix}.{DOWN}.bias": self.down_bias,
                f"{prefix}.{UP}.weight": self.up_weight, f"{prefix}.{UP}.bias": self.up_bias}

    def merged_parameters(self) -> dict:
        """The base parameters a merge would write: none (it cannot merge; fxpeft/shared_tensors.py reads this)."""
        return {}

    merge_refusal = ("a bottleneck adapter h + W_up(act(W_down(h))) is not linear in h, so it cannot be folded into "
                     "the base weights. Keep the adapter unmerged (disable it with disable_adapters() for base "
                     "outputs).")

    def merge_into(self, base_model: nn.Module) -> None:
        raise UnsupportedError(f"Bottleneck at {self.path}: {self.merge_refusal}")

    def unmerge_from(self, base_model: nn.Module) -> None:
        raise UnsupportedError(f"Bottleneck at {self.path}: bottleneck adapters are never merged.")

    @torch.no_grad()
    def set_scaling(self, value: float) -> None:
        """A new ``scaling`` in place (a tensor the graph reads: nothing recompiles)."""
        self.scaling_value = float(value)
        self.scaling.fill_(self.scaling_value)

    def reload(self, rules: list[Rule]) -> bool:
        """A file's rule over this site: ``scaling`` in place; another ``non_linearity`` needs a new graph."""
        rule = next((rule for rule in rules if isinstance(rule, Bottleneck)), None)
        if rule is None:
            return False
        self.set_scaling(rule.scaling)
        changed = rule.non_linearity != self.non_linearity
        self.non_linearity = rule.non_linearity
        return changed


def width_of(hidden: int, reduction_factor: int) -> int:
    """The bottleneck width: ``hidden // reduction_factor``, at least 1."""
    return max(1, hidden // reduction_factor)


# -- the rewrite ------------------------------------------------------------------------------------------------
def _insert(ctx: RewriteContext, site: LinearSite, node: fx.Node, inputs: dict[str, fx.Node],
            module: BottleneckSite) -> None:
    """``h`` (one call of the linear, after the adapters already at this site) becomes
    ``(h + gated(W_up(act(W_down(rows_on(h)))) * scaling)).to(h.dtype)`` for every node that read it."""
    graph = ctx.program.graph
    call = graph.call_function
    stack = node.meta.get("nn_module_stack")
    value = ctx.site_output(node)
    val = value.meta["val"]
    dtype = module.down_weight.dtype
    readers = list(value.users)
    path = site.path
    with graph.inserting_before(value.next):
        h = value
        if val.dtype != dtype:
            h = ctx.tag(call(aten.to.dtype, (value, dtype)), path, "input")
        h = ctx.rows_on(h, path)
        down = ctx.tag(call(aten.linear.default, (h, inputs["down_weight"], inputs["down_bias"])), path, DOWN)
        act = ctx.tag(call(NON_LINEARITIES[module.non_linearity], (down,)), path, "act")
        up = ctx.tag(call(aten.linear.default, (act, inputs["up_weight"], inputs["up_bias"])), path, UP)
        delta = ctx.gated(up, inputs["scaling"], path, dtype)
        total = ctx.tag(call(aten.add.Tensor, (value, delta)), path, tags.JOIN)
        out = total
        if torch.promote_types(val.dtype, dtype) != val.dtype:
            out = ctx.tag(call(aten.to.dtype, (total, val.dtype)), path, tags.OUTPUT)
    for user in readers:
        user.replace_input_with(value, out)
    out.meta["val"] = val
    cursor = out
    while stack is not None and cursor is not value:
        cursor.meta["nn_module_stack"] = stack
        cursor = cursor.prev


def _select(rule: Bottleneck, ctx: RewriteContext) -> list[LinearSite]:
    """The linears ``rule`` selects (its ``targets``, else its placement's roles), recorded under ``rule``."""
    wanted = dataclasses.replace(rule, targets=rule.selector)
    sites = ctx.select_linear(wanted)
    ctx.adapter.selected.pop(wanted, None)
    ctx.adapter.selected[rule] = [site.path for site in sites]
    return sites


def _rewrite(rule: Bottleneck, ctx: RewriteContext) -> None:
    sites = _select(rule, ctx)
    for site in sites:
        if any(tags.tag_of(joined).get("adapter") == ctx.adapter_name and tags.tag_of(joined).get("method") == KIND
               for node in site.nodes for joined in ctx.joined_after(node)):
            raise RuleError(f"Bottleneck: {site.path} is selected by more than one Bottleneck rule of adapter "
                            f"{ctx.adapter_name!r}; each linear takes one bottleneck per adapter. Narrow the "
                            "targets or add `exclude=` to one rule.")
        weight = ctx.base_model.get_parameter(site.weight_fqn)
        width = width_of(site.out_features, rule.reduction_factor)
        module = ctx.site(site.path, KIND, lambda: BottleneckSite(site.path, site.out_features, width,
                                                                  rule.non_linearity, rule.scaling, weight.device,
                                                                  adapter_dtype(weight.dtype)))
        module.non_linearity = rule.non_linearity
        inputs = {name: ctx.adapter_input(site.path, KIND, name)
                  for name in ("down_weight", "down_bias", "up_weight", "up_bias", "scaling")}
        for node in site.nodes:
            if node.meta["val"].dim() < 2:
                raise UnsupportedError(f"Bottleneck: {site.path} gives a {node.meta['val'].dim()}-D output; gating "
                                       "per row needs a batch dimension.")
            _insert(ctx, site, node, inputs, module)


# -- the adapter folder (fxpeft's own format: PEFT has no bottleneck adapters) ---------------------------------
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "fxpeft_method"}
_HONOURED = {"target_modules", "reduction_factor", "placement", "non_linearity", "scaling", "modules_to_save"}


class BottleneckCodec(PeftCodec):
    """``peft_type`` FXPEFT_BOTTLENECK: one Bottleneck rule (plus Trainable rules as ``modules_to_save``) <-> a
    config holding the rule's fields, with the module paths the rule selected as ``target_modules``."""

    peft_types = (PEFT_TYPE,)

    def to_config(self, model, rules, selected, adapter) -> dict[str, Any]:
        rule = the_one_rule(rules, Bottleneck, "Put the bottlenecks in one rule (targets takes a list), and other "
                            "methods in another adapter.", what="Saving a bottleneck adapter")
        return {
            "peft_type": PEFT_TYPE,
            "fxpeft_method": Bottleneck.method,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "inference_mode": True,
            "target_modules": sorted(selected.get(rule, [])),
            "reduction_factor": rule.reduction_factor,
            "placement": rule.placement,
            "non_linearity": rule.non_linearity,
            "scaling": rule.scaling,
            "modules_to_save": modules_to_save_of(rules, selected),
        }

    def to_rules(self, config: dict[str, Any], saved_keys) -> list:
        peft_type = str_field(config, "peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise UnsupportedError(f"adapter_config.json has peft_type {shown(peft_type)}; this codec reads "
                                   f"{PEFT_TYPE}.")
        unsupported = sorted(name for name, value in config.items() if name not in _HONOURED and
                             name not in _METADATA and value not in (None, False, {}, [], "", 0))
        if unsupported:
            raise UnsupportedError(f"adapter_config.json sets {unsupported[:10]}, which fxpeft's Bottleneck does not "
                                   "support; remove them.")
        targets = names_field(config, "target_modules")
        if not targets:
            raise UnsupportedError("adapter_config.json of a bottleneck adapter lists no `target_modules`; save the "
                                   "adapter again with fxpeft.")
        rules: list = [Bottleneck(
            targets=tuple(targets), reduction_factor=int_field(config, "reduction_factor", 16),
            placement=str_field(config, "placement", "houlsby", choices=tuple(PLACEMENTS)),
            non_linearity=str_field(config, "non_linearity", None, choices=tuple(NON_LINEARITIES)),
            scaling=number_field(config, "scaling", 1.0))]
        wanted = list(names_field(config, "modules_to_save") or ())
        if wanted:
            rules.append(Trainable(targets=tuple(wanted)))
        return rules


# -- the method -------------------------------------------------------------------------------------------------
class BottleneckMethod(Method):
    """Bottleneck adapters: a gated residual MLP on the output of each selected linear (the module docstring)."""

    rule_type = Bottleneck
    tag = KIND
    codec = BottleneckCodec()
    key_form = f"<module>.{DOWN}.weight / .bias, {UP}.weight / .bias"
    site_kind = "a linear module"

    def rewrite(self, rule: Bottleneck, ctx: RewriteContext) -> None:
        _rewrite(rule, ctx)

    def key_part(self, key: str) -> KeyPart | None:
        """``base_model.model.<path>.bottleneck_down|up.weight|bias``; the width is axis 0 of ``W_down`` and
        ``b_down`` and axis 1 of ``W_up``."""
        match = _KEY.match(key)
        if match is None:
            return None
        axis = {(DOWN, "weight"): 0, (DOWN, "bias"): 0, (UP, "weight"): 1}.get((match["part"], match["name"]))
        return KeyPart(match["path"], f"{match['part']}.{match['name']}", axis)

    def describe_site(self, path: str, ctx: RewriteContext) -> str | None:
        site = ctx.linear_sites.get(path)
        return f"a linear {site.in_features} -> {site.out_features}" if site is not None else None

    def allowed_sites(self, rule: Bottleneck, ctx: RewriteContext) -> dict[str, Bottleneck]:
        """The linears a declared Bottleneck rule selects (its ``targets``, else its placement's roles)."""
        return {site.path: rule for site in _select(rule, ctx)}

    def policy_findings(self, site, allowed, given, declared, state) -> list:
        """A bottleneck must be allowed, and have the width and activation the declared rule states."""
        if not isinstance(site, BottleneckSite):
            return []
        if allowed is None:
            return ["the adapter puts a bottleneck adapter on this module, which no rule allows."]
        findings = []
        width = width_of(site.hidden, allowed.reduction_factor)
        if "reduction_factor" in given and site.width != width:
            findings.append((f"the adapter's bottleneck is {site.width} wide; the rules' reduction_factor "
                             f"{allowed.reduction_factor} gives {width}.", {"width": site.width, "allowed": width}))
        if "non_linearity" in given and site.non_linearity != allowed.non_linearity:
            findings.append(f"the adapter's bottleneck uses {site.non_linearity}; the rules say "
                            f"{allowed.non_linearity}.")
        return findings


register_method(BottleneckMethod())
