"""LoRA's per-site weights: ``lora_A``, ``lora_B`` and ``scaling`` of one linear, with its site capabilities
(merge and unmerge, ``set_alpha``, in-place reload of ``alpha`` and ``dropout`` from a file)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxpeft.adapters import SiteModule
from fxpeft.errors import FxpeftError
from fxpeft.ops import quantized
from fxpeft.rules import LoRA

__all__ = ["LoraWeights"]


class LoraWeights(SiteModule):
    """``lora_A`` [r, in], ``lora_B`` [out, r] and ``scaling`` for one linear site.

    ``r`` and ``alpha`` are this site's (the rule's ``rank_pattern`` / ``alpha_pattern`` may differ per site)."""

    def __init__(self, path: str, in_features: int, out_features: int, rule: LoRA, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.path = path
        self.init = rule.init
        self.r = rule.rank_for(path)
        self.alpha = rule.alpha_for(path)
        self.use_rslora = rule.use_rslora
        self.dropout = float(rule.dropout)
        self.scaling_value = float(rule.scaling_for(path))
        self.fan_in_fan_out = False  # True when the base stores W as [in, out] (transformers' Conv1D)
        self.weight_fqn = f"{path}.weight"  # the base weight a merge adds to
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, device=device, dtype=dtype))
        # In the adapter's dtype: ``b * scaling`` then rounds ``alpha / r`` as PEFT's ``b * float`` does.
        self.register_buffer("scaling", torch.tensor(self.scaling_value, dtype=dtype, device=device),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        self.scaling.fill_(self.scaling_value)
        if self.init == "orthogonal":  # PEFT's orthogonal_init: rows of A and B from disjoint rows of one Q
            q, _ = torch.linalg.qr(torch.randn(self.r, self.r))
            a = torch.randn(self.lora_A.shape[1], self.r // 2).mm(q[0::2, :]).T / 10.0
            b = torch.randn(self.r // 2, self.lora_B.shape[0]).T.mm(q[1::2, :]) / 10.0
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init == "random":  # PEFT's init_lora_weights=False: both as nn.Linear initialises them
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def set_scaling(self, value: float) -> None:
        """Change the scaling in place (no graph changes, so nothing recompiles)."""
        self.scaling_value = float(value)
        self.scaling.fill_(value)

    def set_alpha(self, alpha: float) -> None:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) as this site's scaling, PEFT's ``set_scale``."""
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
        self.alpha, self.use_rslora = lora.alpha_for(self.path), lora.use_rslora
        self.set_scaling(lora.scaling_for(self.path))
        if self.dropout != float(lora.dropout):
            self.dropout = float(lora.dropout)
            return True
        return False

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.path}"
        return {f"{prefix}.lora_A.weight": self.lora_A, f"{prefix}.lora_B.weight": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` in the layout of the base weight ([out, in], or [in, out] for Conv1D)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        """What :meth:`merge_into` writes (fxpeft/shared_tensors.py): the base weight, right where this linear reads
        it (its own path)."""
        return {self.weight_fqn: (self.weight_fqn,)}

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        if quantized.quantized_kind(base_model.get_submodule(self.path)) is not None:
            self._quantized_original = quantized.merge_delta(base_model, self.path, self.delta_weight())
            return
        weight = base_model.get_parameter(self.weight_fqn)
        weight.add_(self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        original = self.__dict__.pop("_quantized_original", None)
        if original is not None:
            quantized.unmerge_delta(base_model, self.path, original)
            return
        weight = base_model.get_parameter(self.weight_fqn)
        weight.sub_(self.delta_weight().to(weight.dtype))
