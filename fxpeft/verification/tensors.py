"""The adapter tensors: the adapter holds what its config declares, in shapes that fit the base model.

Every key of the file is either one the declared rules need (at the shape they need), or a finding: a key of
a registered method (:meth:`fxpeft.methods.Method.key_part`) at a site the config does not declare or that
the base model does not have, a full copy of a base tensor the config does not declare, or no adapter key at
all. Parts of one site that have a rank axis must agree on the rank; every value must be finite.
"""

from __future__ import annotations

import collections

import torch

from fxpeft.methods import KeyPart, Method, method_for, methods
from fxpeft.rewrite import RewriteContext
from fxpeft.verification.declared import Declared
from fxpeft.verification.report import Findings

__all__ = ["PREFIX", "key_owner", "check_tensors"]

PREFIX = "base_model.model."  # PEFT's prefix of every adapter key
_AXIS_WORDS = {0: "rows", 1: "columns"}


def key_owner(key: str) -> tuple[Method, KeyPart] | None:
    """The registered method whose adapter-file key ``key`` is, and what it names; None for other keys."""
    for method in methods():
        part = method.key_part(key)
        if part is not None:
            return method, part
    return None


def _names_method_part(key: str) -> bool:
    """Whether ``key`` reads like a key of a method that writes keys (PEFT names parts ``<tag>_<part>``)."""
    return any(f".{method.tag}_" in key for method in methods() if method.key_form)


def check_tensors(found: Findings, name: str, item: Declared, context: RewriteContext) -> None:
    """Check the tensors of adapter ``name`` against its reference (built on ``context``'s program)."""
    prefix = f"adapter {name!r}: " if name != "default" else ""
    expected = item.reference.peft_keys() if item.reference is not None else {}
    parameters = dict(context.base_model.named_parameters())
    for key in sorted(item.state):
        tensor = item.state[key]
        if item.reference is not None and key not in expected:
            _unexpected_key(found, prefix, key, tensor, context, parameters, item.rules, expected)
        elif key in expected and tuple(tensor.shape) != tuple(expected[key]):
            _wrong_shape(found, prefix, key, tuple(tensor.shape), tuple(expected[key]), context)
        if tensor.device.type != "meta" and (tensor.is_floating_point() or tensor.is_complex()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if nan or inf:
                found.add("adapter-nonfinite", key, f"{prefix}{nan} NaN and {inf} Inf of {tensor.numel()} values; "
                          "the adapter would turn the model's outputs into NaN.", nan=nan, inf=inf)
    for key in sorted(set(expected) - set(item.state)):
        found.add("adapter-key-missing", key, f"{prefix}the config declares this tensor (shape "
                  f"{list(expected[key])}) but the adapter does not have it.", expected=list(expected[key]))
    _check_ranks(found, prefix, {key: tensor for key, tensor in item.state.items()
                                 if key not in expected or tuple(tensor.shape) != tuple(expected[key])})


def _unexpected_key(found: Findings, prefix: str, key: str, tensor: torch.Tensor, context: RewriteContext,
                    parameters: dict, rules: list, expected: dict) -> None:
    owner = key_owner(key)
    shape = list(tensor.shape)
    fqn = key[len(PREFIX):].replace(".base_layer.", ".")
    if owner is not None:
        method, part = owner
        declared = {known[1].path for known in map(key_owner, expected) if known is not None}
        if part.path in declared:  # a declared site, but a part its config does not make (DoRA's without use_dora)
            found.add("not-adapter-key", key, f"{prefix}not an adapter tensor in PEFT's layout for this config: a "
                      f"{method.name} part ({part.part}) that the config does not make at {part.path}; a loader "
                      "would ignore or refuse it.", part.path, shape=shape)
        elif method.describe_site(part.path, context) is not None:
            found.add("undeclared-site", key, f"{prefix}a {method.name} tensor for {part.path}, which the adapter's "
                      "config does not declare (not in target_modules); a loader would ignore or refuse it.",
                      part.path, shape=shape)
        else:
            found.add("unknown-site", key, f"{prefix}a {method.name} tensor for {part.path}, which is not "
                      f"{method.site_kind} of this base model: was the adapter made for another base?", part.path,
                      shape=shape)
    elif key.startswith(PREFIX) and fqn in parameters and ".base_layer." in key and _equal(tensor, parameters[fqn]):
        return  # PEFT's copy of the base tensor beside an adapted embedding or head: the base, unchanged
    elif key.startswith(PREFIX) and fqn in parameters:
        found.add("undeclared-site", key, f"{prefix}a full copy of the base tensor {fqn} (PEFT's layout for "
                  "modules_to_save and trained biases), which the config does not declare; loading it would "
                  "replace the base weight.", fqn.rpartition(".")[0], shape=shape)
    elif key.startswith(PREFIX) and not _names_method_part(key) and fqn.rpartition(".")[2] in ("weight", "bias"):
        found.add("unknown-site", key, f"{prefix}names a tensor this base model does not have: was the adapter "
                  "made for another base?", shape=shape)
    else:
        forms = dict.fromkeys(method_for(rule).key_form for rule in rules)
        expected = "".join(f"{PREFIX}{form}, " for form in forms if form)
        found.add("not-adapter-key", key, f"{prefix}not an adapter tensor in PEFT's layout for this config "
                  f"(expected {expected}modules_to_save or bias copies).", shape=shape)


def _wrong_shape(found: Findings, prefix: str, key: str, have: tuple, want: tuple, context: RewriteContext) -> None:
    owner = key_owner(key)
    if owner is not None and len(have) == len(want):
        method, part = owner
        axis = part.rank_axis
        if axis is not None and axis < len(have) and have[axis] != want[axis] and \
                all(h == w for i, (h, w) in enumerate(zip(have, want)) if i != axis):
            found.add("config-mismatch", key, f"{prefix}the config says r={want[axis]} but this tensor has rank "
                      f"{have[axis]} (shape {list(have)}).", part.path, shape=list(have), expected=list(want))
            return
        description = method.describe_site(part.path, context)
        base_text = f"{part.path} is {description}" if description else ""
        found.add("adapter-shape-mismatch", key, f"{prefix}shape {list(have)} does not fit the base model, which "
                  f"needs {list(want)} ({base_text}): the adapter was made for another base model.", part.path,
                  shape=list(have), expected=list(want))
        return
    found.add("adapter-shape-mismatch", key, f"{prefix}shape {list(have)} does not fit the base model, which needs "
              f"{list(want)}: the adapter was made for another base model.", shape=list(have), expected=list(want))


def _equal(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether a file's tensor is the base tensor's values exactly (shape, dtype and every value)."""
    if tensor.device.type == "meta" or base.device.type == "meta":
        return False
    return tensor.shape == base.shape and tensor.dtype == base.dtype and torch.equal(tensor, base.detach().cpu())


def _check_ranks(found: Findings, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """The parts of one site that have a rank axis must agree on its size (LoRA: lora_A's rows, lora_B's columns).
    ``state`` leaves out the tensors whose shape is the one the config makes: those agree by construction (a grouped
    convolution's lora_B has r / groups columns)."""
    sites: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        owner = key_owner(key)
        if owner is not None and owner[1].rank_axis is not None and tensor.dim() > owner[1].rank_axis:
            part = owner[1]
            sites[part.path][part.part] = (part.rank_axis, int(tensor.shape[part.rank_axis]))
    for path, parts in sorted(sites.items()):
        if len({size for _, size in parts.values()}) < 2:
            continue
        sizes = " but ".join(f"{name} has {size} {_AXIS_WORDS.get(axis, f'entries along axis {axis}')}"
                             for name, (axis, size) in sorted(parts.items()))
        found.add("config-mismatch", f"{PREFIX}{path}", f"{prefix}{sizes}; {'both' if len(parts) == 2 else 'all'} "
                  "must be the rank r.", path)
