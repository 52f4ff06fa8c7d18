"""Small helpers on values that several checks share: tensor digests and differences, named outputs, short text."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Iterator

import torch

__all__ = ["digest", "named_tensors", "max_difference", "short"]


def digest(tensor: torch.Tensor) -> str:
    """blake2b of a tensor's dtype, shape and bytes."""
    value = tensor.detach()
    hasher = hashlib.blake2b(f"{value.dtype}|{tuple(value.shape)}|".encode(), digest_size=20)
    if value.numel():
        flat = value.cpu().contiguous().reshape(-1)
        hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


def named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a model's output (nested mappings, lists, tuples), each with its path (``logits``, ``[0]``)."""
    if isinstance(value, torch.Tensor):
        yield prefix or "output", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from named_tensors(item, f"{prefix}[{i}]")


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference (inf for other shapes or NaN; a count of unequal values for integers)."""
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return float((a != b).sum())
    return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max()) if a.numel() else 0.0


def short(text: str, limit: int = 110) -> str:
    """``text`` cut to ``limit`` characters for a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
