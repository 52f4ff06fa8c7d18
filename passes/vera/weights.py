"""VeRA's adapter tensors: an adapter's shared frozen projections (:class:`VeraProjections`) and each linear's
trained vectors (:class:`VeraVectors`), initialised and merged as PEFT's ``VeraModel`` / ``vera.Linear`` do."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fxpeft.adapters import SiteModule
from fxpeft.errors import UnsupportedError
from fxpeft.graph.sites import LinearSite
from fxpeft.passes.vera.rule import VeRA

__all__ = ["projections", "VeraProjections", "VeraVectors", "PROJECTIONS"]

PROJECTIONS = "vera_projections"  # the path of the one projections site of an adapter (not a module)


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``vera_A`` [r, max_in] and ``vera_B`` [max_out, r] for ``projection_prng_key`` ``key``: bit for bit
    ``VeraModel._init_vera_A_vera_B`` (on the CPU, in the default dtype)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    made = []
    for shape in ((r, max_in), (max_out, r)):
        tensor = torch.empty(shape)
        std = math.sqrt(2) / math.sqrt(shape[1])  # PEFT's _kaiming_init: gain / sqrt(fan_in)
        bound = math.sqrt(3.0) * std
        with torch.no_grad():
            made.append(tensor.uniform_(-bound, bound, generator=generator))
    return made[0], made[1]


def _as_peft_stores(value: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """``value`` (made in float32) as PEFT holds it: moved to the base layer's floating dtype, then upcast."""
    return value.to(base_dtype) if base_dtype.is_floating_point else value


class VeraProjections(SiteModule):
    """An adapter's shared frozen projections ``vera_A`` [r, max_in] and ``vera_B`` [max_out, r] (buffers)."""

    path = PROJECTIONS
    def __init__(self, key: int, r: int, max_in: int, max_out: int, save_projection: bool, base_dtype, device, dtype):
        super().__init__()
        self.key, self.r, self.max_in, self.max_out = key, r, max_in, max_out
        self.save_projection = save_projection
        self.base_dtype = base_dtype
        self.register_buffer("vera_A", torch.empty(r, max_in, device=device, dtype=dtype))
        self.register_buffer("vera_B", torch.empty(max_out, r, device=device, dtype=dtype))
        self.reset_parameters()

    def generated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections ``key`` makes, as this adapter holds them (the base's rounding, this module's dtype)."""
        a, b = projections(self.key, self.r, self.max_in, self.max_out)
        return tuple(_as_peft_stores(t, self.base_dtype).to(self.vera_A.dtype) for t in (a, b))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.vera_A.device.type == "meta":
            return
        a, b = self.generated()
        self.vera_A.copy_(a)
        self.vera_B.copy_(b)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's keys for the projections (no adapter name, no ``model.``), when ``save_projection``."""
        return {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B} if self.save_projection else {}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the file's projections as they are (PEFT's), warning when they are not what ``key`` makes."""
        super().load_peft_state_dict(state)
        if self.save_projection and "base_model.vera_A" in state and self.vera_A.device.type != "meta":
            differs = self.differences()
            if differs:
                warnings.warn(f"VeRA: the file's {differs} differ from what projection_prng_key={self.key} makes; "
                              "they are used as the file holds them (as PEFT does).", stacklevel=2)

    def differences(self, state: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Which projections (of ``state``, or this module's) differ from what ``key`` makes."""
        made = dict(zip(("vera_A", "vera_B"), self.generated()))
        held = {name: (state or {}).get(f"base_model.{name}", getattr(self, name)) for name in made}
        return [name for name in made if held[name].shape != made[name].shape or
                not torch.equal(held[name].detach().cpu().to(made[name].dtype), made[name])]

    def reload(self, rules: list) -> bool:
        """A file loaded in place (same shapes) with another ``projection_prng_key``: the projections that key makes,
        in the same graph (the file's own projections, when it holds them, are loaded over them next)."""
        found = [rule for rule in rules if isinstance(rule, VeRA)]
        if len(found) == 1 and found[0].projection_prng_key != self.key:
            self.key = found[0].projection_prng_key
            self.reset_parameters()
        return False

    def merge_into(self, base_model: nn.Module) -> None:
        """Nothing: the projections live in the vectors' delta (:meth:`VeraVectors.merge_into`)."""

    def unmerge_from(self, base_model: nn.Module) -> None:
        """Nothing (see :meth:`merge_into`)."""

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        return {}


class VeraVectors(SiteModule):
    """``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] of one linear, and its ``dropout``."""

    def __init__(self, path: str, site: LinearSite, rule: VeRA, r: int, base_dtype, device, dtype):
        super().__init__()
        self.path = path
        self.r, self.in_features, self.out_features = r, site.in_features, site.out_features
        self.init, self.d_initial, self.dropout = rule.init, float(rule.d_initial), float(rule.dropout)
        self.weight_fqn = site.weight_fqn
        self.fan_in_fan_out = site.form == "addmm"  # Conv1D: W stored [in, out]
        self.base_dtype = base_dtype
        self.projections: list[VeraProjections] = []  # the adapter's (a list: not a submodule of this one)
        self.vera_lambda_b = nn.Parameter(torch.empty(site.out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.vera_lambda_d.device.type == "meta":
            return
        b, d = torch.ones(self.out_features), torch.randn(self.r)  # PEFT draws randn whatever init says
        if self.init:
            d.fill_(self.d_initial)
            b.zero_()
        self.vera_lambda_b.copy_(_as_peft_stores(b, self.base_dtype))
        self.vera_lambda_d.copy_(_as_peft_stores(d, self.base_dtype))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = f"base_model.model.{self.path}"
        return {f"{prefix}.vera_lambda_b": self.vera_lambda_b, f"{prefix}.vera_lambda_d": self.vera_lambda_d}

    def reload(self, rules: list) -> bool:
        """A file's VeRA rule: its ``dropout`` is part of the graph (True: rewrite again when it changes)."""
        found = [rule for rule in rules if isinstance(rule, VeRA)]
        if len(found) == 1 and float(found[0].dropout) != self.dropout:
            self.dropout = float(found[0].dropout)
            return True
        return False

    def delta_weight(self) -> torch.Tensor:
        """PEFT's ``get_delta_weight``: ``(lambda_b B[:out]) @ (lambda_d A[:, :in])``, in the base weight's layout."""
        if not self.projections:
            raise UnsupportedError(f"VeRA: the site {self.path} has no projections; create it with fxpeft.transform.")
        shared = self.projections[0]
        a, b = shared.vera_A, shared.vera_B
        lambda_d, lambda_b = self.vera_lambda_d, self.vera_lambda_b
        cast = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)  # PEFT's CPU detour
        if cast:
            a, b, lambda_d, lambda_b = a.float(), b.float(), lambda_d.float(), lambda_b.float()
        sliced_a = a[:, :self.in_features].to(lambda_d.device)
        sliced_b = b[:self.out_features, :].to(lambda_d.device)
        delta = (lambda_b.unsqueeze(-1) * sliced_b) @ (lambda_d.unsqueeze(-1) * sliced_a)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(shared.vera_B.dtype) if cast else delta

    def merged_parameters(self) -> dict[str, tuple[str, ...]]:
        return {self.weight_fqn: (self.weight_fqn,)}

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        weight = base_model.get_parameter(self.weight_fqn)
        weight.add_(self.delta_weight())  # PEFT's ``weight += delta``

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        weight = base_model.get_parameter(self.weight_fqn)
        weight.sub_(self.delta_weight())  # PEFT's ``weight -= delta``
