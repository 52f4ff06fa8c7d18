"""LoRA's per-site weights: ``lora_A``, ``lora_B`` and ``scaling`` of one linear, with its site capabilities
(merge and unmerge, ``set_alpha``, in-place reload of ``alpha`` and ``dropout`` from a file).

With ``use_dora`` a site also holds DoRA's magnitude vector ``lora_magnitude_vector`` ([out], PEFT's key without
``.weight``), initialised as PEFT's ``DoraLinearLayer.update_layer`` does: the row norms of ``W + scaling * B A``
(``W`` as [out, in], so a Conv1D's stored [in, out] weight is transposed first), computed in the base weight's dtype
as PEFT computes it (over a bfloat16 base the norm is rounded to bfloat16, so a fresh adapter there is not the base
model bit for bit: PEFT's is not either). Merging a DoRA site writes PEFT's
``m / ||W + dW||_row * (W + dW)`` and keeps that norm for the unmerge, as PEFT's ``DoraLinearVariant`` does.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
from torch import nn

from fxpeft.adapters import SiteModule
from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.ops import quantized
from fxpeft.rules import LoRA

__all__ = ["LoraWeights", "dora_weight_norm"]

# How many LoRA sites are merged into each base weight now (by id, with a weak reference that checks it is still
# that tensor): DoRA's merge needs the weight without the others. (A WeakKeyDictionary would compare tensors by value.)
_MERGED: dict[int, tuple[weakref.ref, int]] = {}


def _merged_count(weight: torch.Tensor) -> int:
    ref, count = _MERGED.get(id(weight), (None, 0))
    return count if ref is not None and ref() is weight else 0


def _count_merge(weight: torch.Tensor, step: int) -> None:
    count = max(_merged_count(weight) + step, 0)
    if count:
        _MERGED[id(weight)] = (weakref.ref(weight), count)
    else:
        _MERGED.pop(id(weight), None)


def dora_weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling) -> torch.Tensor:
    """PEFT's ``DoraLinearLayer.get_weight_norm``: the L2 norm of each row of ``weight + scaling * lora_weight``
    (both [out, in]), in the sum's dtype."""
    total = weight + scaling * lora_weight
    return torch.linalg.norm(total, dim=1).to(total.dtype)


class LoraWeights(SiteModule):
    """``lora_A`` [r, in], ``lora_B`` [out, r] and ``scaling`` for one linear site.

    ``r`` and ``alpha`` are this site's (the rule's ``rank_pattern`` / ``alpha_pattern`` may differ per site).
    With ``rule.use_dora``, ``lora_magnitude_vector`` [out] too; ``base_weight`` then returns the base weight
    (as the base stores it) that the magnitude starts from. ``shapes``: ``r -> (A's shape, B's shape)`` for a
    subclass whose factors are not matrices (``LoraConvWeights``; a third entry: the magnitude's shape)."""

    site_form = "linear"  # what the site adapts: "linear", "conv" (passes/lora/conv.py), "embedding" (embedding.py)
    # Hot swap (fxpeft/runtime/hotswap.py): ``lora_A`` / ``lora_B`` hold ``capacity`` rows / columns, of which the first
    # ``r`` are this site's factors and the rest zero (``r == 0``: a slot's site the adapter does not target). None:
    # the factors are the whole tensors.
    capacity: int | None = None

    def __init__(self, path: str, in_features: int, out_features: int, rule: LoRA, device: torch.device,
                 dtype: torch.dtype, base_weight=None, fan_in_fan_out: bool = False, shapes=None):
        super().__init__()
        self.path = path
        self.init = rule.init
        self.r = rule.rank_for(path)
        self.alpha = rule.alpha_for(path)
        self.use_rslora = rule.use_rslora
        self.dropout = float(rule.dropout)
        self.scaling_value = float(rule.scaling_for(path))
        self.fan_in_fan_out = fan_in_fan_out  # True when the base stores W as [in, out] (transformers' Conv1D)
        self.weight_fqn = f"{path}.weight"  # the base weight a merge adds to
        self.use_dora = bool(rule.use_dora)
        if self.use_dora:  # PEFT's LoraLayer._check_forward_args refuses it too
            self.per_row_refusal = ("DoRA adapters (use_dora=True) cannot be mixed per row, as in PEFT ('Cannot pass "
                                    "`adapter_names` when DoRA is enabled'). Run their rows in a call of their own "
                                    "(set_adapter), or use use_dora=False for adapters you mix per row.")
        self.base_weight = base_weight  # () -> the base weight (DoRA's magnitude starts from its row norms)
        # ``shapes(r)``: the shapes of A and B where they are not [r, in] and [out, r] (a conv's kernels)
        a_shape, b_shape, *magnitude = shapes(self.r) if shapes is not None else \
            ((self.r, in_features), (out_features, self.r))
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))
        # In the adapter's dtype: ``b * scaling`` then rounds ``alpha / r`` as PEFT's ``b * float`` does.
        self.register_buffer("scaling", torch.tensor(self.scaling_value, dtype=dtype, device=device),
                             persistent=False)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(magnitude[0] if magnitude else out_features,
                                                                  device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        self.scaling.fill_(self.scaling_value)
        if self.capacity is not None:  # the padding stays zero; a site of rank 0 is all zeros
            self.lora_A.zero_()
            self.lora_B.zero_()
            if self.r == 0:
                return
        lora_a, lora_b = self.factors()
        if self.init == "orthogonal":  # PEFT's orthogonal_init: rows of A and B from disjoint rows of one Q
            q, _ = torch.linalg.qr(torch.randn(self.r, self.r))
            a = torch.randn(lora_a.shape[1], self.r // 2).mm(q[0::2, :]).T / 10.0
            b = torch.randn(self.r // 2, lora_b.shape[0]).T.mm(q[1::2, :]) / 10.0
            lora_a.copy_(a)
            lora_b.copy_(b)
        else:
            if self.init == "gaussian":
                nn.init.normal_(lora_a, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            if self.init == "random":  # PEFT's init_lora_weights=False: both as nn.Linear initialises them
                nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(lora_b)
        if self.use_dora:
            self.reset_magnitude()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of this site's rank ``r``: the parameters themselves, or (hot swap, ``capacity`` set) views of
        their first ``r`` rows / columns."""
        if self.capacity is None:
            return self.lora_A, self.lora_B
        return self.lora_A[: self.r], self.lora_B[:, : self.r]

    def hotswap_refusal(self, capacity: int) -> str | None:
        """Hot swap takes LoRA on linears without DoRA, of rank at most ``capacity``."""
        if self.use_dora or self.site_form != "linear":
            return (f"the LoRA at {self.path} is {'DoRA' if self.use_dora else 'on a ' + self.site_form}; hot swap "
                    "takes LoRA on linear layers without DoRA.")
        if self.r > capacity:
            return f"the LoRA at {self.path} has rank {self.r}, over max_rank={capacity}."
        return None

    @torch.no_grad()
    def pad_to(self, capacity: int) -> None:
        """Hot swap: ``lora_A`` / ``lora_B`` become new parameters of ``capacity`` rows / columns, this site's factors
        first and zeros after (the added zeros change no output and get exactly zero gradients)."""
        refusal = self.hotswap_refusal(capacity)
        if refusal:
            raise UnsupportedError(f"Hot swap: {refusal}")
        lora_a, lora_b = self.factors()
        padded_a = lora_a.new_zeros(capacity, lora_a.shape[1])
        padded_b = lora_b.new_zeros(lora_b.shape[0], capacity)
        padded_a[: self.r] = lora_a
        padded_b[:, : self.r] = lora_b
        self.lora_A = nn.Parameter(padded_a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(padded_b, requires_grad=self.lora_B.requires_grad)
        self.capacity = capacity

    def spare(self, capacity: int) -> "LoraWeights":
        """Hot swap: a site of rank 0 at this site's path, of this site's shapes padded to ``capacity``."""
        a, b = self.lora_A, self.lora_B
        spare = type(self)(self.path, a.shape[1], b.shape[0], LoRA(targets=[self.path], r=capacity), a.device,
                           a.dtype, fan_in_fan_out=self.fan_in_fan_out)
        spare.weight_fqn = self.weight_fqn
        spare.capacity = capacity
        spare.take(None)
        return spare

    def hold_graph_settings(self, settings: dict) -> None:
        """Hot swap: the slots' dropout, which the rewrite puts in the train graph."""
        self.dropout = float(settings.get("dropout", self.dropout))

    def hotswap_keys(self, rule: LoRA) -> dict[str, tuple[int, ...]]:
        """The keys and shapes ``rule``'s adapter saves for this linear: ``[r, in]`` and ``[out, r]``."""
        prefix, r = f"base_model.model.{self.path}", rule.rank_for(self.path)
        return {f"{prefix}.lora_A.weight": (r, self.lora_A.shape[1]),
                f"{prefix}.lora_B.weight": (self.lora_B.shape[0], r)}

    @torch.no_grad()
    def take(self, rule: LoRA | None) -> None:
        """Hot swap: this padded site becomes ``rule``'s at its path (rank, alpha, rsLoRA, init, in place: the
        parameters stay the same tensors), or, for ``rule`` None, a site of rank 0 (zeros, nothing saved). The graph's
        dropout stays the slot's (``dropout`` is not changed)."""
        if rule is None:
            self.r, self.alpha, self.scaling_value = 0, 0.0, 0.0
        else:
            self.r, self.alpha = rule.rank_for(self.path), rule.alpha_for(self.path)
            self.init, self.use_rslora = rule.init, rule.use_rslora
            self.scaling_value = float(rule.scaling_for(self.path))
        self.reset_parameters()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA's magnitude: the row norms of ``W + scaling * B A`` (PEFT's ``update_layer``; ``||W||`` for B = 0)."""
        if self.base_weight is None:
            raise FxpeftError(f"The DoRA site {self.path} has no base weight to start its magnitude from; "
                              "create it through fxpeft.transform.")
        weight = self.base_weight()
        if weight.device.type == "meta":
            return
        weight = (weight.T if self.fan_in_fan_out else weight).to(self.lora_A.device)
        # PEFT computes it before casting the adapter to float32 (autocast_adapter_dtype), in the base's dtype: over a
        # half-precision base the magnitude is the rounded norm, so a fresh adapter moves the outputs by that rounding.
        a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        update = (b.float() @ a.float()).half() if weight.dtype == torch.float16 else b @ a  # PEFT's fp16 detour
        self.lora_magnitude_vector.copy_(dora_weight_norm(weight, update, self.scaling_value))

    def retarget(self, base_model: nn.Module) -> None:
        """A new base model: DoRA's magnitude starts from its weight (see ``SiteModule.retarget``)."""
        if self.base_weight is not None:
            self.base_weight = functools.partial(base_model.get_parameter, self.weight_fqn)
        super().retarget(base_model)

    @torch.no_grad()
    def set_scaling(self, value: float) -> None:
        """Change the scaling in place (no graph changes, so nothing recompiles)."""
        self.scaling_value = float(value)
        self.scaling.fill_(value)

    def set_alpha(self, alpha: float) -> None:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) as this site's scaling, PEFT's ``set_scale``. A hot-swap
        site of rank 0 (not targeted) keeps scaling 0."""
        if self.r == 0:
            return
        self.alpha = alpha
        self.set_scaling(alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r)

    def reload(self, rules: list) -> bool:
        """The file's LoRA rule gives this site its ``alpha`` and ``use_rslora`` (a tensor: no graph change) and
        its ``dropout`` (part of the graph: True, rewrite again)."""
        loras = [rule for rule in rules if isinstance(rule, LoRA)]
        if len(loras) != 1:
            raise FxpeftError(f"The adapter file has {len(loras)} LoRA rules for the LoRA site {self.path}; "
                              "expected one.")
        lora = loras[0]
        if lora.use_dora != self.use_dora:
            raise FxpeftError(f"The adapter file has use_dora={lora.use_dora} for the LoRA site {self.path}, which "
                              f"has use_dora={self.use_dora}; load it as a new adapter (load_adapter(..., "
                              "adapter_name=...)) instead of into this one.")
        self.alpha, self.use_rslora = lora.alpha_for(self.path), lora.use_rslora
        self.set_scaling(lora.scaling_for(self.path))
        if self.dropout != float(lora.dropout):
            self.dropout = float(lora.dropout)
            return True
        return False

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if self.r == 0:  # a hot-swap slot's site that this adapter does not target
            return {}
        prefix = f"base_model.model.{self.path}"
        lora_a, lora_b = self.factors()
        state = {f"{prefix}.lora_A.weight": lora_a, f"{prefix}.lora_B.weight": lora_b}
        if self.use_dora:
            state[f"{prefix}.lora_magnitude_vector"] = self.lora_magnitude_vector
        return state

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` in the layout of the base weight ([out, in], or [in, out] for Conv1D)."""
        lora_a, lora_b = self.factors()
        delta = (lora_b @ lora_a) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """What a merge adds to the base ``weight``: :meth:`delta_weight` (an embedding's is cast to the weight's
        dtype first, as PEFT's ``Embedding.merge`` casts it)."""
        return self.delta_weight()

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """What :meth:`merge_into` writes (fxpeft/shared_tensors.py): the base weight, right where this linear reads
        it (its own path)."""
        return {self.weight_fqn: (self.weight_fqn,)}

    def dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA's norm of ``weight + delta`` per output (PEFT's ``get_weight_norm`` with scaling 1), shaped as the
        magnitude vector."""
        return dora_weight_norm(weight, delta, 1)

    def _dora_factor(self, weight_norm: torch.Tensor) -> torch.Tensor:
        """PEFT's ``dora_factor``: ``m / ||W + dW||_row`` as a column, in the base weight's layout."""
        factor = (self.lora_magnitude_vector / weight_norm).view(-1, *([1] * (self.lora_A.dim() - 1)))
        return factor.T if self.fan_in_fan_out else factor

    @torch.no_grad()
    def _merge_dora(self, weight: torch.Tensor) -> None:
        """PEFT's ``DoraLinearVariant.merge_unsafe``: ``W = m / ||W + dW||_row * (W + dW)``, the norm kept."""
        if _merged_count(weight):
            raise UnsupportedError(
                f"Merging the DoRA adapter at {self.path}, whose base weight already holds another merged adapter: "
                "DoRA's norm is the unmerged weight's. Merge the DoRA adapter first (merge(adapter_names=[...])), or "
                "alone.")
        delta = self.delta_weight()
        oriented = delta.T if self.fan_in_fan_out else delta
        norm = self.dora_norm(weight.T if self.fan_in_fan_out else weight, oriented).detach()
        self._dora_norm = norm
        weight.copy_((self._dora_factor(norm) * (weight + delta)).to(weight.dtype))

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        if self.use_dora:
            if quantized.quantized_kind(base_model.get_submodule(self.path)) is not None:
                raise UnsupportedError(f"Merging the DoRA adapter at {self.path} into a quantized layer is not "
                                       "supported; dequantize the model first (fxpeft.ops.quantized.dequantize).")
            weight = base_model.get_parameter(self.weight_fqn)
            self._merge_dora(weight)
            _count_merge(weight, 1)
            return
        if quantized.quantized_kind(base_model.get_submodule(self.path)) is not None:
            self._quantized_original = quantized.merge_delta(base_model, self.path, self.delta_weight())
            return
        weight = base_model.get_parameter(self.weight_fqn)
        _count_merge(weight, 1)
        # PEFT's ``weight.data += delta``: added in the adapter's dtype and rounded once to a half-precision base's
        # (its unmerge, below, rounds the delta first, as PEFT's ``-= delta.to(dtype)`` does).
        weight.add_(self.merged_delta(weight))

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        original = self.__dict__.pop("_quantized_original", None)
        if original is not None:
            quantized.unmerge_delta(base_model, self.path, original)
            return
        weight = base_model.get_parameter(self.weight_fqn)
        _count_merge(weight, -1)
        if self.use_dora:  # PEFT's DoraLinearVariant.unmerge: W / (m / norm) - dW, with the norm kept at merge
            norm = self.__dict__.pop("_dora_norm")
            weight.copy_((weight / self._dora_factor(norm) - self.delta_weight()).to(weight.dtype))
            return
        weight.sub_(self.delta_weight().to(weight.dtype))
