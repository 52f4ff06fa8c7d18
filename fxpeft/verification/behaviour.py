"""Behaviour on probe inputs: adapters disabled, the outputs are the base model's bit for bit; merged, they are
within a few roundings of the unmerged outputs, and unmerging gives the base weights back."""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.verification.graph_view import copy_resolver
from fxpeft.verification.report import Findings
from fxpeft.verification.values import max_difference, named_tensors

__all__ = ["TOLERANCE", "check_behaviour"]

# (rtol, atol) for "merged outputs are close to unmerged ones": a few float roundings per layer.
TOLERANCE = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
             torch.bfloat16: (5e-2, 1e-2)}


@torch.no_grad()
def check_behaviour(found: Findings, adapted, base_model: torch.nn.Module, probes: dict[str, Any]) -> tuple[str, str]:
    """Run ``base_model`` and ``adapted`` (disabled, enabled, merged) on ``probes``; returns (compared, holds)."""
    fixed = adapted.programs()[0].fixed_kwargs
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in probes.items() if isinstance(v, torch.Tensor))
    modes = (base_model.training, adapted.training)
    base_model.eval()
    adapted.eval()
    try:
        reference = dict(named_tensors(base_model(**probes, **fixed)))
        with adapted.disable_adapters():
            disabled = dict(named_tensors(adapted(**probes)))
        copy_of = copy_resolver(adapted)
        copied = sorted({copy_of(source) for program in adapted.programs() for source in program.sources
                         if source.kind == "adapter" and copy_of(source)})
        copies = (f"; the graph reads trained copies of {copied[:3]}{'...' if len(copied) > 3 else ''} in place of "
                  "the base tensors, and disabling adapters does not switch them back") if copied else ""
        for name, want in reference.items():
            have = disabled.get(name)
            if have is None or have.shape != want.shape or not torch.equal(have, want):
                difference = max_difference(have, want) if have is not None else float("inf")
                found.add("disabled-output-differs", name, f"with adapters disabled, the model's {name} is not the "
                          f"base model's bit for bit (max |difference| {difference:.3g}){copies}.",
                          max_abs_diff=difference)
        holds = f"adapters disabled, {len(reference)} output(s) equal the base model's bit for bit"
        return f"outputs on probe inputs {shapes}", holds + "; " + _check_merged(found, adapted, probes)
    finally:
        base_model.train(modes[0])
        adapted.train(modes[1])


def _check_merged(found: Findings, adapted, probes: dict[str, Any]) -> str:
    enabled = dict(named_tensors(adapted(**probes)))
    snapshot = {}
    for module in adapted.site_modules():
        try:
            snapshot[module.path] = adapted.base_model.get_parameter(module.path)
        except AttributeError:
            try:
                owner = adapted.base_model.get_submodule(module.path)
            except AttributeError:
                continue
            for name, parameter in owner.named_parameters(recurse=False):
                snapshot[f"{module.path}.{name}"] = parameter
    saved = {fqn: parameter.detach().clone() for fqn, parameter in snapshot.items()}
    try:
        adapted.merge()
    except NotImplementedError as error:  # UnsupportedError too: this adapter cannot merge (yet)
        _restore(snapshot, saved)
        found.note("merged", f"the adapted model cannot merge this adapter ({error}); merged outputs were not "
                   "compared.")
        return "merge not supported for this adapter"
    except Exception as error:  # merge() is the adapted model's own code: report whatever it raised
        _restore(snapshot, saved)
        found.add("merge-failed", "merge()", f"merge() raised {type(error).__name__}: {error}")
        return "merge failed"
    try:
        merged = dict(named_tensors(adapted(**probes)))
    finally:
        try:
            adapted.unmerge()
        except Exception as error:
            found.add("merge-failed", "unmerge()", f"unmerge() raised {type(error).__name__}: {error}")
        drift = _restore(snapshot, saved)
    worst, tolerance_text = 0.0, ""
    for name, want in enabled.items():
        have = merged.get(name)
        if not want.is_floating_point():
            continue
        rtol, atol = TOLERANCE.get(want.dtype, (1e-4, 1e-5))
        tolerance = atol + rtol * float(want.detach().abs().max()) if want.numel() else atol
        difference = max_difference(have, want) if have is not None else float("inf")
        worst = max(worst, difference)
        tolerance_text = f"{tolerance:.2g}"
        if difference > tolerance:
            found.add("merged-output-differs", name, f"merged, the model's {name} differs from the unmerged one's by "
                      f"up to {difference:.3g}, more than the tolerance {tolerance:.3g}.",
                      max_abs_diff=difference, tolerance=tolerance)
    return (f"merged, they are within {worst:.2g} of the unmerged outputs (tolerance {tolerance_text}); unmerge "
            f"left the weights within {drift:.2g} of their values (restored exactly)")


def _restore(snapshot: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> float:
    drift = 0.0
    with torch.no_grad():
        for fqn, parameter in snapshot.items():
            drift = max(drift, max_difference(parameter.detach(), saved[fqn]))
            parameter.copy_(saved[fqn])
    return drift
