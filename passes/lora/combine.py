"""Combining LoRA adapters into a new one, as PEFT's ``LoraModel.add_weighted_adapter`` does.

Per linear site, from the adapters that have LoRA there (``A_i`` [r_i, in], ``B_i`` [out, r_i], scaling
``s_i``) and the user's weights ``w_i``::

    cat      A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   B = [B_1 | B_2 | ...]     rank sum(r_i), exact
    linear   A = sum sign(w_i s_i) sqrt(|w_i s_i|) A_i   B = sum sqrt(|w_i s_i|) B_i
             (all ranks equal; an approximation: the cross terms B_i A_j stay in)
    svd      dW = sum w_i s_i B_i A_i, then the best rank-k factors of dW:
             U S Vh = svd(dW), B = U[:, :k] diag(S[:k]), A = Vh[:k]       k = svd_rank or max(r_i)

The new adapter's ``r`` and ``alpha`` are both the new rank (scaling 1; PEFT copies the first adapter's other
fields, ``use_rslora`` included, so with rsLoRA the scaling is ``sqrt(k)``, as in PEFT). The arithmetic
is PEFT's, operation for operation, so identical adapters give identical tensors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from fxpeft.errors import FxpeftError, RuleError, UnsupportedError
from fxpeft.graph.selectors import is_plain_name
from fxpeft.rules import LoRA

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "combine_site"]

COMBINATION_TYPES = ("svd", "linear", "cat")
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
              "magnitude_prune_svd")


def _task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """PEFT's ``merge_utils.task_arithmetic``: the weighted sum of stacked tensors."""
    stacked = torch.stack(tensors, dim=0)
    weights = weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    return (stacked * weights).sum(dim=0)


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def combine_site(combination_type: str, sites: list, weights: list[float], new_rank: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """``(A, B)`` of the combined adapter at one site from ``sites`` (LoRA site modules with ``lora_A``,
    ``lora_B``, ``scaling_value`` and ``fan_in_fan_out``) and their weights; see the module docstring."""
    first = sites[0]
    with torch.no_grad():
        if combination_type == "cat":
            a = torch.zeros(new_rank, first.lora_A.shape[1], dtype=first.lora_A.dtype, device=first.lora_A.device)
            b = torch.zeros(first.lora_B.shape[0], new_rank, dtype=first.lora_B.dtype, device=first.lora_B.device)
            loras_a = torch.cat([site.lora_A.detach() * weight * site.scaling_value
                                 for site, weight in zip(sites, weights)], dim=0)
            loras_b = torch.cat([site.lora_B.detach() for site in sites], dim=1)
            a[:loras_a.shape[0], :] = loras_a
            b[:, :loras_b.shape[1]] = loras_b
            return a, b
        if combination_type == "linear":
            weights_a, weights_b = [], []
            for site, weight in zip(sites, weights):
                scaled = weight * site.scaling_value
                sign = 1 if scaled >= 0 else -1  # the sign goes on A only, or two negatives would cancel
                weights_a.append(math.sqrt(abs(scaled)) * sign)
                weights_b.append(math.sqrt(abs(scaled)))
            device, dtype = first.lora_A.device, first.lora_A.dtype
            a = _task_arithmetic([site.lora_A.detach() for site in sites], torch.tensor(weights_a).to(device))
            b = _task_arithmetic([site.lora_B.detach() for site in sites], torch.tensor(weights_b).to(device))
            return a.to(dtype), b.to(dtype)
        # svd: the weighted sum of the deltas in the base weight's layout (PEFT's get_delta_weight), back to
        # [out, in], then its leading singular vectors.
        deltas = [_transpose(site.lora_B.detach() @ site.lora_A.detach(), site.fan_in_fan_out) * site.scaling_value
                  for site in sites]
        delta = _task_arithmetic(deltas, torch.tensor(weights).to(deltas[0].device))
        delta = _transpose(delta, first.fan_in_fan_out)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        return vh[:new_rank, :], u[:, :new_rank] @ torch.diag(s[:new_rank])


def _lora_rule(adapted, name: str) -> LoRA:
    rules = adapted.adapters[name].rules
    loras = [rule for rule in rules if isinstance(rule, LoRA)]
    others = [type(rule).__name__ for rule in rules if not isinstance(rule, LoRA)]
    if len(loras) != 1 or others:
        raise UnsupportedError(
            f"add_weighted_adapter combines adapters made of one LoRA rule; {name!r} has {len(loras)} LoRA rule(s)"
            + (f" and {others} (modules trained whole cannot be combined)" if others else "") + ".")
    return loras[0]


def _max_rank(rule: LoRA) -> int:
    return max(rule.r, *(r for _, r in rule.rank_pattern)) if rule.rank_pattern else rule.r


def _plain_names(rule: LoRA) -> bool:
    return (not isinstance(rule.targets, str) and rule.exclude is None and rule.layers is None
            and all(is_plain_name(t) for t in rule.targets))


def add_weighted_adapter(adapted, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Add ``adapter_name`` to ``adapted``: the combination of ``adapters`` (see the module docstring).

    The new adapter is inactive until ``set_adapter``; on any error nothing is added."""
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = [float(w) for w in weights]
    unknown = [name for name in adapters if name not in adapted.adapters]
    if not adapters or unknown:
        raise FxpeftError(f"add_weighted_adapter: unknown adapter(s) {unknown or adapters}; "
                          f"known: {list(adapted.adapters)}.")
    if len(weights) != len(adapters):
        raise RuleError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one each.")
    if combination_type in _PEFT_ONLY:
        raise UnsupportedError(f"combination_type={combination_type!r} is not supported by fxpeft; "
                               f"use one of {list(COMBINATION_TYPES)}.")
    if combination_type not in COMBINATION_TYPES:
        raise RuleError(f"Invalid combination_type {combination_type!r}; use one of {list(COMBINATION_TYPES)}.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise RuleError(f"svd_rank must be an integer >= 1, got {svd_rank!r}.")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # PEFT's rule
    rules = [_lora_rule(adapted, name) for name in adapters]
    dora = [name for name, rule in zip(adapters, rules) if rule.use_dora]
    if dora:
        # PEFT 0.21.2 accepts them but combines A and B only: the new adapter's magnitude is the base weight's norm,
        # and the adapters' trained magnitudes are dropped without a word.
        raise UnsupportedError(
            f"add_weighted_adapter: {dora} are DoRA adapters (use_dora=True), whose trained magnitude vectors a "
            "combination of A and B cannot carry (PEFT would drop them silently). Merge them into the base weights "
            "instead (merge(adapter_names=[...])), or combine plain LoRA adapters.")
    ranks = [_max_rank(rule) for rule in rules]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise RuleError(f"combination_type='linear' needs adapters of one rank; {adapters} have ranks {ranks}. "
                            "Use 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    others = sorted({f"{site.path} ({site.site_form})" for name in adapters
                     for site in adapted.adapters[name].site_modules() if getattr(site, "site_form", "linear")
                     != "linear" and hasattr(site, "lora_A")})
    if others:
        raise UnsupportedError(
            f"add_weighted_adapter: {others[:6]} are LoRA sites other than linears (convolutions, embeddings, raw "
            "parameters), which fxpeft does not combine yet. Merge the adapters into the base weights instead "
            "(merge(adapter_names=[...])), or combine adapters that target linears only.")
    # Per site (in the order the adapters selected them), the adapters with LoRA there, and their weights.
    per_site: dict[str, list[tuple[object, float]]] = {}
    for name, rule, weight in zip(adapters, rules, weights):
        sites = {site.path: site for site in adapted.adapters[name].site_modules() if hasattr(site, "lora_A")}
        for path in adapted.adapters[name].selected.get(rule, sites):
            per_site.setdefault(path, []).append((sites[path], weight))
    combined = {}
    for path, pairs in per_site.items():
        sites = [site for site, _ in pairs]
        if combination_type == "linear" and any(site.r != new_rank for site in sites):
            raise RuleError(f"combination_type='linear' needs one rank at every site; {path} has ranks "
                            f"{[site.r for site in sites]} (rank_pattern). Use 'cat' or 'svd'.")
        out_features, in_features = sites[0].lora_B.shape[0], sites[0].lora_A.shape[1]
        if combination_type == "svd" and new_rank > min(out_features, in_features):
            raise RuleError(f"svd_rank {new_rank} exceeds the rank a [{out_features}, {in_features}] update can have "
                            f"at {path}; use at most {min(out_features, in_features)}.")
        combined[path] = combine_site(combination_type, sites, [w for _, w in pairs], new_rank)

    # PEFT's new config: the first adapter's, with r = lora_alpha = the new rank and the union of the targets.
    targets = tuple(sorted({t for rule in rules for t in rule.targets})) if all(map(_plain_names, rules)) \
        else tuple(per_site)
    rule = dataclasses.replace(rules[0], targets=targets, r=new_rank, alpha=new_rank, rank_pattern=(),
                               alpha_pattern=(), exclude=None, layers=None, layers_pattern=None)
    adapted.add_adapter(adapter_name, [rule])
    new_sites = {site.path: site for site in adapted.adapters[adapter_name].site_modules() if hasattr(site, "lora_A")}
    if set(new_sites) != set(combined):
        adapted.delete_adapter(adapter_name)
        raise FxpeftError(f"add_weighted_adapter: the combined targets {targets} select {sorted(new_sites)}, but the "
                          f"adapters have LoRA at {sorted(combined)}; no adapter was added.")
    with torch.no_grad():
        for path, (a, b) in combined.items():
            new_sites[path].lora_A.copy_(a)
            new_sites[path].lora_B.copy_(b)
