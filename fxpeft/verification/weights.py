"""Base weights: every base tensor the adapted model reads hashes equal to the base model's.

Parameters and buffers are compared by name (blake2b of dtype, shape and bytes), constants of each adapted
graph with those of a fresh capture of the same signature.
"""

from __future__ import annotations

import torch

from fxpeft.verification.probes import FreshCaptures
from fxpeft.verification.report import Findings
from fxpeft.verification.values import digest, max_difference

__all__ = ["check_weights"]


def check_weights(found: Findings, adapted, captures: FreshCaptures) -> tuple[str, str]:
    """Compare the base tensors ``adapted`` reads with ``captures.base_model``'s; returns (compared, holds)."""
    base_model = captures.base_model
    used: dict[str, str] = {}
    for program in adapted.programs():
        for source in (*program.sources, *program.pristine_sources):
            if source.kind in ("parameter", "buffer"):
                used[source.target] = source.kind
    digests: dict[tuple, str] = {}

    def cached_digest(tensor: torch.Tensor) -> str:
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in digests:
            digests[key] = digest(tensor)
        return digests[key]

    compared = on_meta = 0
    for fqn, kind in sorted(used.items()):
        getter = "get_parameter" if kind == "parameter" else "get_buffer"
        try:
            mine = getattr(adapted.base_model, getter)(fqn)
        except AttributeError:
            continue
        try:
            theirs = getattr(base_model, getter)(fqn)
        except AttributeError:
            found.add("base-weight-missing", fqn, f"the adapted model reads the {kind} {fqn}, which the base model "
                      "does not have.", fqn.rpartition(".")[0])
            continue
        if mine.device.type == "meta" or theirs.device.type == "meta":
            on_meta += 1
            continue
        compared += 1
        if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
            found.add("base-weight-changed", fqn, f"the adapted model's {kind} is {mine.dtype}{list(mine.shape)}, the "
                      f"base model's {theirs.dtype}{list(theirs.shape)}.", fqn.rpartition(".")[0])
        elif cached_digest(mine) != cached_digest(theirs):
            difference = max_difference(mine.detach().cpu(), theirs.detach().cpu())
            changed = int((mine.detach().cpu() != theirs.detach().cpu()).sum())
            found.add("base-weight-changed", fqn, f"the adapted model's {kind} differs from the base model's in "
                      f"{changed} of {mine.numel()} values (max |difference| {difference:.3g}); fxpeft never writes "
                      "base weights, so something else did.", fqn.rpartition(".")[0], max_abs_diff=difference,
                      changed=changed)
    for program in adapted.programs():
        fresh = captures.get_like(program)
        if fresh is None:
            continue
        for name, tensor in program.constants.items():
            other = fresh[0].constants.get(name)
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            compared += 1
            if not isinstance(other, torch.Tensor) or digest(tensor) != digest(other):
                found.add("base-weight-changed", name, "this constant of the adapted graph differs from the one a "
                          "fresh capture of the base model holds.")
    if on_meta:
        found.note("base weights", f"{on_meta} tensors are on the meta device (no values); not hashed.")
    if not compared:
        return "no tensors with values", "nothing to compare"
    if adapted.base_model is base_model:
        found.note("base weights", "the adapted model's base is the base model object itself, so its weights were "
                   "compared with themselves; pass a freshly loaded base model to compare.")
    return (f"{compared} tensors the adapted graphs read (parameters, buffers, constants)",
            "all hash equal to the base model's (blake2b of their bytes)")
