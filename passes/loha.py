"""LoHa (Hyeon-Woo et al. 2021, FedPara; LyCORIS), PEFT 0.21.2's ``LoHaConfig``: a linear's (or a convolution's)
weight gets the Hadamard product of two low-rank matrices, ``dW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * (alpha / r)``.

The rule :class:`LoHa` takes PEFT's fields (``target_modules``, ``exclude_modules``, ``init_weights``,
``layers_to_transform`` as aliases; ``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``, ``layers_pattern``,
``use_effective_conv2d``, ``rank_dropout``, ``module_dropout`` by their names; ``modules_to_save`` through a
:class:`~fxpeft.Trainable` rule). A site holds PEFT's parameters under PEFT's names: ``hada_w1_a`` / ``hada_w2_a``
``[out, r]`` and ``hada_w1_b`` / ``hada_w2_b`` ``[r, in]`` (a convolution: ``in / groups * prod(kernel)``), saved as
``base_model.model.<path>.hada_w1_a`` etc.; an effective convolution (``use_effective_conv2d``) has PEFT's CP form,
``hada_t1`` / ``hada_t2`` ``[r, r, k1, k2]``, ``hada_w*_a`` ``[r, out]``, ``hada_w*_b`` ``[r, in / groups]`` and
``dW = einsum(t1, w1_b, w1_a) * einsum(t2, w2_b, w2_a) * (alpha / r)``. PEFT's initialisation: kaiming-uniform
(``a = sqrt(5)``) for all but ``hada_w2_b``, zeros (so a fresh adapter is the base model bit for bit);
``init=False`` (PEFT's ``init_weights=False``) makes ``hada_w2_b`` kaiming-uniform too.

Numerics are PEFT's ``HadaWeight`` (forward and, through autograd, its hand-written backward's order): ``w1_a @ w1_b``,
``w2_a @ w2_b``, their product, times the scale as PEFT passes it, ``torch.tensor(alpha / r)`` (float32: a float64
adapter gets the float32-rounded scale, as in PEFT), then ``linear(x.to(dW.dtype), dW)`` added to the linear's output
and cast back (passes/lycoris.py). Merging adds ``dW`` to the weight, unmerging subtracts it (PEFT's
``LycorisLayer.merge``/``unmerge``). What differs from PEFT is in passes/lycoris.py's docstring (dropouts, per-row
``adapter_names``, transformers' Conv1D and Conv3d refused, and the gradient of ``hada_w1_a``/``hada_w2_a`` in the
effective form, where PEFT's ``HadaWeightCP.backward`` is wrong and fxpeft's is autograd's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.fx as fx
from torch import nn

from fxpeft.methods import register_method
from fxpeft.passes.lycoris import LycorisCodec, LycorisMethod, LycorisRule, LycorisSite, rewrite
from fxpeft.rewrite import RewriteContext

__all__ = ["LoHa", "LohaWeights", "LohaMethod"]

aten = torch.ops.aten
KIND = "loha"
PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CP = "i j k l, j r, i p -> p r k l"  # PEFT's HadaWeightCP: t [r, r, k1, k2], w_b [r, in], w_a [r, out] -> [out, in, ..]


@dataclasses.dataclass(frozen=True)
class LoHa(LycorisRule):
    """LoHa at the selected linears (PEFT's ``LoHaConfig``): ``dW = ((w1_a w1_b) * (w2_a w2_b)) * alpha / r``.

    ``targets``: as for :class:`~fxpeft.LoRA` (names, a regex, ``"all-linear"``, globs, roles, types). ``init``
    (PEFT's ``init_weights``): True (``hada_w2_b`` zeros: the identity) or False (all random).
    ``rank_dropout``/``module_dropout`` must be 0 (see passes/lycoris.py). Example::

        fxpeft.LoHa(targets=["q_proj", "v_proj"], r=8, alpha=16)
    """

    method: ClassVar[str] = "loha"


class LohaWeights(LycorisSite):
    """``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``, ``hada_t2`` for an effective
    convolution) of one linear or convolution, PEFT's shapes (the module docstring)."""

    def __init__(self, path, site, rule: LoHa, device, dtype):
        super().__init__(path, site, rule, device, dtype)
        out, r = self.out_features, self.r

        def parameter(*shape):
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))

        if self.effective:  # PEFT's create_adapter_parameters for a 3-D or 4-D shape
            self.hada_t1, self.hada_w1_a, self.hada_w1_b = \
                parameter(r, r, *self.spatial), parameter(r, out), parameter(r, self.fan_in)
            self.hada_t2, self.hada_w2_a, self.hada_w2_b = \
                parameter(r, r, *self.spatial), parameter(r, out), parameter(r, self.fan_in)
            self.parts = PARTS + ("hada_t1", "hada_t2")
        else:  # a linear, or a convolution's weight flattened to [out, in / groups * prod(kernel)]
            self.hada_w1_a, self.hada_w1_b = parameter(out, r), parameter(r, self.columns)
            self.hada_w2_a, self.hada_w2_b = parameter(out, r), parameter(r, self.columns)
            self.parts = PARTS
        self.reset_parameters()

    def _scale_in(self, dtype: torch.dtype) -> torch.Tensor:
        """PEFT passes ``torch.tensor(alpha / r)``: float32 whatever the adapter's dtype."""
        return torch.tensor(self.scaling_value, dtype=torch.float32).to(dtype)

    @torch.no_grad()
    def init_factors(self) -> None:
        """PEFT's ``reset_adapter_parameters`` (``init_weights=True``) or ``..._random`` (False), in PEFT's order."""
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        if self.init:
            nn.init.zeros_(self.hada_w2_b)
        else:
            nn.init.kaiming_uniform_(self.hada_w2_b, a=math.sqrt(5))
        if self.effective:
            nn.init.kaiming_uniform_(self.hada_t1, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.hada_t2, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        if self.effective:  # PEFT's HadaWeightCP.forward
            first = torch.einsum(CP, self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            second = torch.einsum(CP, self.hada_t2, self.hada_w2_b, self.hada_w2_a)
            weight = first * second * self.scaling
        else:  # HadaWeight.forward
            weight = ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)) * self.scaling
        return weight.reshape(self.weight_shape)

    def delta_nodes(self, ctx: RewriteContext, inputs: dict[str, fx.Node]) -> fx.Node:
        call = ctx.program.graph.call_function

        def tagged(op, *args):
            return ctx.tag(call(op, args), self.path, "weight")

        if self.effective:
            first, second = (self.einsum(ctx, CP, [inputs[f"hada_t{i}"], inputs[f"hada_w{i}_b"],
                                                   inputs[f"hada_w{i}_a"]],
                                         [f"hada_t{i}", f"hada_w{i}_b", f"hada_w{i}_a"]) for i in (1, 2))
        else:
            first = tagged(aten.mm.default, inputs["hada_w1_a"], inputs["hada_w1_b"])
            second = tagged(aten.mm.default, inputs["hada_w2_a"], inputs["hada_w2_b"])
        return self.shaped(ctx, tagged(aten.mul.Tensor, tagged(aten.mul.Tensor, first, second), inputs["scaling"]))


class LohaMethod(LycorisMethod):
    """LoHa: a gated delta-weight branch (a Hadamard product of two low-rank matrices) at each selected linear."""

    rule_type = LoHa
    tag = KIND
    codec = LycorisCodec(LoHa, "LOHA", "LoHaConfig", {}, PARTS + ("hada_t1", "hada_t2"))
    key_form = "<module>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b (/ hada_t1 / hada_t2)"
    # w_a is [out, r] ([r, out] in an effective convolution): only w_b and the CP cores have the rank on one axis
    rank_axes = {"hada_w1_a": None, "hada_w1_b": 0, "hada_w2_a": None, "hada_w2_b": 0, "hada_t1": 0, "hada_t2": 0}

    def rewrite(self, rule: LoHa, ctx: RewriteContext) -> None:
        rewrite(rule, ctx, KIND, LohaWeights)


register_method(LohaMethod())
