"""LoKr (Yeh et al. 2023; LyCORIS), PEFT 0.21.2's ``LoKrConfig``: a linear's (or a convolution's) weight gets a
Kronecker product, ``dW = kron(w1, w2) * (alpha / r)``, with ``w1`` ``[a, c]`` and ``w2`` ``[b, d]`` where
``out = a b``, ``in = c d`` (a convolution: ``in / groups``, and ``w2`` carries the kernel).

The rule :class:`LoKr` takes PEFT's fields (``target_modules``, ``exclude_modules``, ``init_weights``,
``layers_to_transform`` as aliases; ``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``, ``layers_pattern``,
``use_effective_conv2d``, ``decompose_both``, ``decompose_factor``, ``rank_dropout``, ``module_dropout``,
``rank_dropout_scale`` by their names; ``modules_to_save`` through a :class:`~fxpeft.Trainable` rule).

Shapes are PEFT's: ``(a, b) = factorization(out, decompose_factor)``, ``(c, d) = factorization(in, decompose_factor)``
(LyCORIS's search for two factors near the square root, or near ``decompose_factor``); ``w1`` is one matrix
``lokr_w1`` unless ``decompose_both`` and ``r < max(a, c) / 2`` (then ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]``),
``w2`` is ``lokr_w2`` (``[b, d, *kernel]``) unless ``r < max(b, d) / 2``, then ``lokr_w2_a [b, r] @ lokr_w2_b [r, d]``
(a convolution's ``[r, d * prod(kernel)]``), or with ``use_effective_conv2d`` PEFT's CP form ``einsum(lokr_t2 [r, r,
k1, k2], lokr_w2_a [r, b], lokr_w2_b [r, d])``, before which ``w1`` gets two unit axes (PEFT's ``make_kron``). Saved as
``base_model.model.<path>.lokr_w1`` etc. Initialisation is PEFT's: ``init=True`` zeros ``w1`` (``lokr_w1``, or
``lokr_w1_a``) and kaiming-uniform for the rest (a fresh adapter is the base model bit for bit); ``init="lycoris"``
zeros ``w2`` (``lokr_w2``, or ``lokr_w2_b``) instead; ``init=False`` makes all kaiming-uniform.

Numerics are PEFT's ``get_delta_weight``: ``torch.kron(w1, w2) * (alpha / r)`` (the scale a Python float there: here a
0-dim tensor of the adapter's dtype, the same product), then ``linear(x.to(dW.dtype), dW)`` added to the linear's
output and cast back (passes/lycoris.py). Merging adds ``dW``, unmerging subtracts it. What differs from PEFT is in
passes/lycoris.py's docstring (dropouts, per-row ``adapter_names``, transformers' Conv1D and Conv3d refused);
``rank_dropout_scale`` is accepted and means nothing with ``rank_dropout=0``, as in PEFT. A Conv1d whose second factor
would take the CP form (``use_effective_conv2d`` and a small ``r``) is refused: PEFT 0.21.2 fails in forward there
(``torch.kron`` of its ``[b, d, k, 1]`` core raises).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.formats.peft import bool_field
from fxpeft.methods import register_method
from fxpeft.passes.lycoris import LycorisCodec, LycorisMethod, LycorisRule, LycorisSite, rewrite
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import MAX_SIZE

__all__ = ["LoKr", "LokrWeights", "LokrMethod", "factorization"]

aten = torch.ops.aten
KIND = "lokr"
PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
CP = "i j k l, i p, j r -> p r k l"  # PEFT's make_weight_cp: t [r, r, k1, k2], w_a [r, b], w_b [r, d] -> [b, d, ...]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) ``factorization``: ``(m, n)`` with ``m * n == dimension`` and ``m <= n``, ``m`` the
    divisor nearest the square root (no larger than ``factor`` when it is given), or ``(factor, dimension //
    factor)`` when ``factor`` divides ``dimension``. ``factorization(128) == (8, 16)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _decompose_factor(config: dict, name: str) -> Any:
    value = config.get(name, -1)
    return -1 if value is None else value


def _flag(config: dict, name: str) -> Any:
    return bool_field(config, name, False)


@dataclasses.dataclass(frozen=True)
class LoKr(LycorisRule):
    """LoKr at the selected linears (PEFT's ``LoKrConfig``): ``dW = kron(w1, w2) * alpha / r``.

    ``targets``: as for :class:`~fxpeft.LoRA`. ``init`` (PEFT's ``init_weights``): True (``w1`` zeros), ``"lycoris"``
    (``w2`` zeros) or False (all random). ``decompose_both``: ``w1`` low-rank too (when ``r`` is small enough);
    ``decompose_factor``: the factor the Kronecker shapes are split near (-1: the square root).
    ``rank_dropout``/``module_dropout`` must be 0 (see passes/lycoris.py). Example::

        fxpeft.LoKr(targets=["q_proj", "v_proj"], r=4, alpha=8, decompose_both=True)
    """

    method: ClassVar[str] = "lokr"
    _INITS: ClassVar[tuple] = (True, False, "lycoris")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or 1 <= factor <= MAX_SIZE):
            raise RuleError(f"LoKr: `decompose_factor` must be -1 (split near the square root) or an integer >= 1, "
                            f"got {factor!r}.")

    def _flags(self) -> tuple[str, ...]:
        return ("use_effective_conv2d", "decompose_both", "rank_dropout_scale")


class LokrWeights(LycorisSite):
    """LoKr's factors of one linear or convolution: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and ``lokr_w2``,
    ``lokr_t2``/``lokr_w2_a``/``lokr_w2_b`` (an effective convolution) or ``lokr_w2_a``/``lokr_w2_b`` (PEFT's choice,
    see the module docstring)."""

    def __init__(self, path, site, rule: LoKr, device, dtype):
        super().__init__(path, site, rule, device, dtype)
        out_l, out_k = factorization(self.out_features, rule.decompose_factor)
        in_m, in_n = factorization(self.fan_in, rule.decompose_factor)
        r = self.r
        self.use_w1 = not (rule.decompose_both and r < max(out_l, in_m) / 2)
        self.use_w2 = not (r < max(out_k, in_n) / 2)

        def parameter(*shape):
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))

        if self.effective and not self.use_w2 and len(self.kernel) == 1:
            raise UnsupportedError(
                f"LoKr: {path} is a Conv1d with use_effective_conv2d=True and r={r} < max{(out_k, in_n)} / 2, for "
                "which PEFT 0.21.2 fails in forward (torch.kron of its [b, d, k, 1] core: 'view size is not "
                "compatible'). "
                "Use use_effective_conv2d=False there, a larger r, or exclude it.")
        if self.use_w1:
            self.lokr_w1 = parameter(out_l, in_m)
        else:
            self.lokr_w1_a, self.lokr_w1_b = parameter(out_l, r), parameter(r, in_m)
        if self.use_w2:
            self.lokr_w2 = parameter(out_k, in_n, *self.kernel)
        elif self.effective:
            self.lokr_t2 = parameter(r, r, *self.spatial)
            self.lokr_w2_a, self.lokr_w2_b = parameter(r, out_k), parameter(r, in_n)
        else:
            self.lokr_w2_a, self.lokr_w2_b = parameter(out_k, r), parameter(r, in_n * math.prod(self.kernel))
        self.parts = (("lokr_w1",) if self.use_w1 else ("lokr_w1_a", "lokr_w1_b")) + \
            (("lokr_w2",) if self.use_w2 else ("lokr_w2_a", "lokr_w2_b")) + \
            (("lokr_t2",) if self.effective and not self.use_w2 else ())
        self.reset_parameters()

    @torch.no_grad()
    def init_factors(self) -> None:
        """PEFT's ``reset_adapter_parameters`` (True), ``..._lycoris_way`` ("lycoris") or ``..._random`` (False), in
        PEFT's order: ``w1``, ``w2``, then ``lokr_t2``."""
        def kaiming(*tensors):
            for tensor in tensors:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

        lycoris = isinstance(self.init, str)
        if self.use_w1:
            (nn.init.zeros_ if self.init is True else kaiming)(self.lokr_w1)
        elif self.init is True:
            nn.init.zeros_(self.lokr_w1_a)
            kaiming(self.lokr_w1_b)
        else:
            kaiming(self.lokr_w1_a, self.lokr_w1_b)
        if self.use_w2:
            (nn.init.zeros_ if lycoris else kaiming)(self.lokr_w2)
        elif lycoris:
            nn.init.zeros_(self.lokr_w2_b)
            kaiming(self.lokr_w2_a)
        else:
            kaiming(self.lokr_w2_a, self.lokr_w2_b)
        if "lokr_t2" in self.parts:
            kaiming(self.lokr_t2)

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.use_w2:
            w2 = self.lokr_w2
        elif "lokr_t2" in self.parts:
            w2 = torch.einsum(CP, self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:  # PEFT's make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(self.weight_shape)

    def delta_nodes(self, ctx: RewriteContext, inputs: dict[str, fx.Node]) -> fx.Node:
        call = ctx.program.graph.call_function

        def tagged(op, *args):
            return ctx.tag(call(op, args), self.path, "weight")

        w1 = inputs["lokr_w1"] if self.use_w1 else tagged(aten.mm.default, inputs["lokr_w1_a"], inputs["lokr_w1_b"])
        if self.use_w2:
            w2, dims = inputs["lokr_w2"], 2 + len(self.kernel)
        elif "lokr_t2" in self.parts:
            w2, dims = self.einsum(ctx, CP, [inputs[name] for name in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")],
                                   ["lokr_t2", "lokr_w2_a", "lokr_w2_b"]), 4
        else:
            w2, dims = tagged(aten.mm.default, inputs["lokr_w2_a"], inputs["lokr_w2_b"]), 2
        if dims == 4:
            w1 = tagged(aten.unsqueeze.default, tagged(aten.unsqueeze.default, w1, 2), 2)
        weight = tagged(aten.mul.Tensor, tagged(aten.kron.default, w1, w2), inputs["scaling"])
        return self.shaped(ctx, weight)


class LokrMethod(LycorisMethod):
    """LoKr: a gated delta-weight branch (a Kronecker product of two small matrices) at each selected linear."""

    rule_type = LoKr
    tag = KIND
    codec = LycorisCodec(LoKr, "LOKR", "LoKrConfig", {
        "decompose_both": ("decompose_both", _flag), "decompose_factor": ("decompose_factor", _decompose_factor),
        "rank_dropout_scale": ("rank_dropout_scale", _flag)}, PARTS)
    key_form = "<module>.lokr_w1 (or lokr_w1_a / lokr_w1_b) / lokr_w2 (or lokr_w2_a / lokr_w2_b, + lokr_t2)"
    # lokr_w2_a is [b, r] ([r, b] in an effective convolution): the rank is on one axis of w1_a, w1_b, w2_b and t2
    rank_axes = {"lokr_w1": None, "lokr_w1_a": 1, "lokr_w1_b": 0, "lokr_w2": None, "lokr_w2_a": None, "lokr_w2_b": 0,
                 "lokr_t2": 0}

    def rewrite(self, rule: LoKr, ctx: RewriteContext) -> None:
        rewrite(rule, ctx, KIND, LokrWeights)


register_method(LokrMethod())
