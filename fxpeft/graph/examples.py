"""Stage 2, graph facts: a call like the one a program was captured with, to capture that signature again.

A captured graph keeps each user input's example as its placeholder's ``meta["val"]`` (a fake tensor whose symbolic
sizes carry the example's sizes as hints, or the constant itself) and the call's structure as ``in_spec``.
:func:`call_example` turns them back into keyword arguments: tensors of those sizes, dtypes and device (masks ones,
other integers zeros or token ids, floats seeded normal), put back in the call's structure (a KV cache is rebuilt
by its pytree).
``torch.export`` traces with fake tensors, so only sizes, dtypes and structure shape the graph, and the example keeps
them. ``AdaptedModel`` captures its signatures again from these examples after a dtype change (``.half()``) and after
unpickling (graphs are not pickled).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from fxpeft.graph.program import Program

__all__ = ["call_example"]


def _hint(size: Any) -> int:
    """A size as the example had it (a symbolic size's hint)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 2


def _concrete(value: Any, name: str, device: torch.device, dtypes: dict[torch.dtype, torch.dtype],
              generator: torch.Generator, vocab: int | None) -> Any:
    if isinstance(value, torch.SymInt):
        return _hint(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        return value.node.hint
    if not isinstance(value, torch.Tensor):
        return value
    shape = [_hint(size) for size in value.shape]
    dtype = dtypes.get(value.dtype, value.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if value.dtype == torch.bool or "mask" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    if vocab is not None:
        return torch.randint(0, vocab, shape, generator=generator).to(device=device, dtype=dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def call_example(program: Program, device: torch.device, dtypes: dict[torch.dtype, torch.dtype] | None = None,
                 vocab: int | None = None) -> dict[str, Any] | None:
    """Keyword arguments of the sizes, dtypes and structure ``program`` was captured with, on ``device``; floating
    inputs of a dtype in ``dtypes`` get the dtype it maps to (the model's new dtype after a cast). Integer inputs other
    than masks are zeros, or with ``vocab`` token ids drawn below it (inputs whose values matter: verify's probes).
    None when the program's inputs cannot be read back (a graph whose placeholders do not match its call
    structure)."""
    users = [node for node, source in zip(program.placeholders(), program.sources) if source.kind == "user"]
    if program.in_spec is None or len(users) != program.in_spec.num_leaves:
        return None
    generator = torch.Generator().manual_seed(0)
    leaves = [_concrete(node.meta.get("val"), node.name, device, dtypes or {}, generator, vocab) for node in users]
    args, kwargs = pytree.tree_unflatten(leaves, program.in_spec)
    return dict(kwargs) if not args else None
