"""Adapter parameters: owned by fxpeft, grouped by adapter name, keyed by site — never in the base model.

An :class:`Adapter` holds the rules it was made from and one module per site. Every site module follows
the small :class:`SiteModule` protocol, so the adapter state dict is *read from this registry* and never
found by filtering parameter names.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from fxpeft.capture.export import device_of
from fxpeft.errors import UnsupportedError
from fxpeft.formats.files import check_state_fits
from fxpeft.rules import Rule

__all__ = ["SiteModule", "Adapter", "ParameterCopy", "site_key", "init_like_linear", "adapter_dtype"]


@torch.no_grad()
def init_like_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``nn.Linear``'s default initialisation (what PEFT's encoders get): kaiming-uniform weight, uniform bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapter parameters next to base tensors of ``base_dtype``: float32 over half precision and over
    quantized (integer) weights, as PEFT's ``autocast_adapter_dtype=True`` keeps them; else the base's own."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point \
        else base_dtype


def site_key(path: str, kind: str) -> str:
    """A ModuleDict-safe key for a site: module paths contain dots, which ModuleDict refuses."""
    return f"{kind}:{path.replace('.', '/')}"


class SiteModule(nn.Module):
    """What every adapter site module offers. ``path`` is the base model's module path of the site.

    The per-site capabilities of a method (:mod:`fxpeft.methods`) are methods here with defaults that do
    nothing or say "not supported", so the engine calls them on every site without asking what it is:
    :meth:`merge_into` / :meth:`unmerge_from`, :meth:`set_alpha`, :meth:`reload` (new hyper-parameters from a
    file, in place) and :meth:`retarget` (a new base model)."""

    path: str

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """This site's tensors under the keys PEFT saves them with (``base_model.model.<path>...``)."""
        raise NotImplementedError

    def peft_keys(self) -> dict[str, tuple[int, ...]]:
        """Expected keys and shapes, for validating a file before loading it."""
        return {key: tuple(value.shape) for key, value in self.peft_state_dict().items()}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors (already validated by key and shape) into this site's parameters."""
        own = self.peft_state_dict()
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))

    def reset_parameters(self) -> None:
        """Give this site's parameters their initial values (used after creating them on ``meta``)."""
        raise NotImplementedError

    def merge_into(self, base_model: nn.Module) -> None:
        """Fold this site into the base model's weights (``AdaptedModel.merge``)."""
        raise UnsupportedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge_from(self, base_model: nn.Module) -> None:
        """Undo :meth:`merge_into`."""
        raise UnsupportedError(f"{type(self).__name__} cannot be unmerged from the base weights.")

    def shadowed_base_parameters(self) -> int:
        """How many base parameters this site replaces rather than adds to (for PEFT's parameter count)."""
        return 0

    def set_alpha(self, alpha: float) -> None:
        """Take a new ``alpha`` in place (``AdaptedModel.set_alpha``); sites without one ignore it."""

    def reload(self, rules: list[Rule]) -> bool:
        """Take the hyper-parameters of ``rules`` (an adapter file's, loaded in place over this adapter) without
        touching the graph where possible; returns True when the graph must be rewritten again."""
        return False

    @torch.no_grad()
    def retarget(self, base_model: nn.Module) -> None:
        """The adapted model's base model was replaced by ``base_model`` (same structure): tensors created on
        ``meta`` move to its device and get their initial values."""
        if any(tensor.device.type == "meta" for tensor in self.parameters()):
            self.to_empty(device=device_of(base_model))
            self.reset_parameters()


class ParameterCopy(SiteModule):
    """A trainable copy of one base parameter (PEFT's ``modules_to_save`` and trained biases).

    The graph reads the copy instead of the base tensor, so the base model is never written.
    ``peft_name`` is the key PEFT saves it under, without the ``base_model.model.`` prefix.
    """

    def __init__(self, fqn: str, source: torch.Tensor, peft_name: str, shadows: bool):
        super().__init__()
        self.path = fqn
        self.peft_name = peft_name
        self.shadows = shadows
        self.weight = nn.Parameter(source.detach().clone(), requires_grad=True)
        self._source = [source]  # not a submodule: only to re-initialise from

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{self.peft_name}": self.weight}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.copy_(self._source[0].to(self.weight.device))

    def retarget(self, base_model: nn.Module) -> None:
        """Point the copy at the new base model's tensor and copy its values."""
        source = base_model.get_parameter(self.path)
        self._source = [source]
        with torch.no_grad():
            if self.weight.device != source.device:
                self.weight.data = torch.empty_like(source)
            self.weight.copy_(source)

    def shadowed_base_parameters(self) -> int:
        return self.weight.numel() if self.shadows else 0

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        """The base tensor takes the trained values; the original is kept to restore on unmerge."""
        base = base_model.get_parameter(self.path)
        self._original = base.detach().clone()
        base.copy_(self.weight)

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        base_model.get_parameter(self.path).copy_(self._original)
        del self._original


class Adapter(nn.Module):
    """One named adapter: the rules it was made from and its site modules."""

    def __init__(self, rules: list[Rule]):
        super().__init__()
        self.rules = list(rules)
        self.sites = nn.ModuleDict()
        self.frozen = False  # True for an adapter loaded for inference only (is_trainable=False)
        self.selected: dict[Rule, list[str]] = {}  # module paths each rule selected, for the saved config

    def get_or_create(self, key: str, factory) -> SiteModule:
        if key not in self.sites:
            self.sites[key] = factory()
        return self.sites[key]

    def site_modules(self) -> Iterator[SiteModule]:
        return iter(self.sites.values())

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Every site's tensors (the live parameters) under PEFT's saved key names."""
        state: dict[str, torch.Tensor] = {}
        for site in self.site_modules():
            state.update(site.peft_state_dict())
        return state

    def peft_keys(self) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a state dict must have to load into this adapter."""
        expected: dict[str, tuple[int, ...]] = {}
        for site in self.site_modules():
            expected.update(site.peft_keys())
        return expected

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], where: str = "the state dict") -> None:
        """Copy a state dict keyed as PEFT saves it (``get_peft_model_state_dict``) into this adapter.

        Every key and shape is checked first; on a mismatch :class:`fxpeft.errors.AdapterLoadError` lists
        them all and nothing is written. Example::

            adapted.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model))
        """
        check_state_fits(self.peft_keys(), state, where)
        for site in self.site_modules():
            site.load_peft_state_dict(state)
