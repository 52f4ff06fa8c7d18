"""Adapter gates: per adapter, a ``[batch]`` tensor that is 1 where a row uses the adapter and 0 where it does not.

Graphs read them as inputs (``InputSource("gate", name)``): tensors, not Python values, so that switching, disabling
or mixing adapters changes data a compiled graph reads, never its code. With more than a few adapters, all gates are
made in a handful of ops rather than two per adapter (a decode step makes them once per token).
"""

from __future__ import annotations

import torch

__all__ = ["BASE", "flag_gates", "flag_views", "row_gates"]

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
