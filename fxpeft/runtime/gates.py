"""Adapter gates: per adapter, a ``[batch]`` tensor that is 1 where a row uses the adapter and 0 where it does not.

Graphs read them as inputs (``InputSource("gate", name)``): tensors, not Python values, so that switching, disabling
or mixing adapters changes data a compiled graph reads, never its code. With more than a few adapters, all gates are
made in a handful of ops rather than two per adapter (a decode step makes them once per token).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BASE", "AdapterFlags", "flag_gates", "flag_views", "row_gates"]

BASE = "__base__"  # in ``adapter_names``: this row runs the base model (its index is -1)

_FEW = 2  # up to this many adapters, each gate is made by its own two ops (fewer than the batched form's five)


def flag_gates(active: dict[str, torch.Tensor], enabled: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """The same gate for every row: each adapter's 0-dim ``active`` flag times ``enabled``, expanded to ``batch``."""
    if len(active) <= _FEW:
        return {name: (flag * enabled).expand(batch) for name, flag in active.items()}
    stacked = torch.stack(list(active.values())) * enabled
    return dict(zip(active, stacked.unsqueeze(1).expand(len(active), batch).unbind(0)))


def flag_views(active: dict[str, torch.Tensor], enabled: torch.Tensor, is_enabled: bool,
               batch: int) -> dict[str, torch.Tensor]:
    """:func:`flag_gates` when whether adapters are enabled is known in Python (``is_enabled``, an eager call): each
    gate a view of a flag (an adapter's, or the 0 of ``enabled``), expanded to ``batch``, with no kernel run."""
    return {name: (flag if is_enabled else enabled).expand(batch) for name, flag in active.items()}


def row_gates(names: list[str], indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gates from one adapter index per row (``indices[i]``: row i's adapter in ``names``; -1: none)."""
    if len(names) <= _FEW:
        return {name: (indices == i).to(torch.float32) for i, name in enumerate(names)}
    order = torch.arange(len(names), device=indices.device).unsqueeze(1)
    return dict(zip(names, (indices.unsqueeze(0) == order).to(torch.float32).unbind(0)))


class AdapterFlags(nn.Module):
    """0-dim tensors saying which adapters are active and whether adapters are enabled at all.

    Tensors, not Python values, so that switching or disabling adapters changes data that a compiled
    graph reads, and never the code dynamo guards on (nothing recompiles). Their values are also kept in Python
    (``active_set``), written only through :meth:`set_active` and :meth:`set_enabled`, so that an eager call knows
    them without reading a device tensor. Keyed by the names the graphs use: adapter names, or after
    ``prepare_hotswap`` slot names (fxpeft/runtime/hotswap.py)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("enabled", torch.ones(()), persistent=False)
        self._on: dict[str, bool] = {}
        self._enabled = True

    def add(self, name: str, active: bool, device: torch.device) -> None:
        self.register_buffer(f"active_{name}", torch.tensor(float(active), device=device), persistent=False)
        self._on[name] = bool(active)

    def remove(self, name: str) -> None:
        delattr(self, f"active_{name}")
        del self._on[name]

    def active(self, name: str) -> torch.Tensor:
        return getattr(self, f"active_{name}")

    def is_active(self, name: str) -> bool:
        return self._on[name]

    def set_active(self, name: str, on: bool) -> None:
        self.active(name).fill_(float(on))
        self._on[name] = bool(on)

    def set_enabled(self, on: bool) -> None:
        self.enabled.fill_(float(on))
        self._enabled = bool(on)

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def active_set(self) -> frozenset[str]:
        """The adapters that apply to every row of a call now (none while adapters are disabled)."""
        return frozenset(name for name, on in self._on.items() if on) if self._enabled else frozenset()

    def _apply(self, fn, recurse=True):
        """Flags move with the model but stay float32 through its casts (``.half()``): the graphs read them so."""
        return super()._apply(lambda tensor: tensor.to(fn(tensor).device), recurse)
