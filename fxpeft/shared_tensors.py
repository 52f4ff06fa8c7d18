"""Base tensors with more than one use: tied weights, and base models that several adapted models share.

A tensor is *shared* when several uses read it, found generically, never from a per-architecture table:

- **tied weights**: one tensor under several parameter paths of the base model
  (``named_parameters(remove_duplicate=False)``; GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``). A
  captured graph reads such a tensor through one placeholder, so each reading op is assigned to the path it reads
  it as by its module stack (``nn_module_stack``): the path whose owning module is innermost on that stack
  (:func:`use_of`). An op that no such module owns is a use of its own ("an op of <module>");
- **another adapted model**: two ``fxpeft.transform`` calls on one base model (or on models sharing parameters).
  Every :class:`~fxpeft.model.AdaptedModel` is tracked here by a weak reference (:func:`track`), so a deleted one
  holds nothing and blocks nothing.

A trained copy (PEFT's ``modules_to_save``) stands in for the uses it was selected for: the Trainable pass gives
every selected use of one tied tensor one copy, and leaves the other uses on the base tensor, as PEFT does. A merge
writes the base tensor itself, so it is right only where the adapter applies at *every* use of the tensor, in this
model and in every other adapted model that reads it: :func:`check_merge` refuses any other merge before anything
is written (:class:`~fxpeft.errors.UnsupportedError` naming the tensor, its other uses and the fix), and
:func:`track` warns at ``transform`` (:class:`SharedTensorWarning`) as PEFT warns at ``get_peft_model``.

What a site's merge writes, and for which uses (:func:`merge_writes`): what its optional ``merged_parameters()``
says (a :class:`~fxpeft.adapters.ParameterCopy`: its base parameter, for the paths it stands in for; LoRA: its
linear's weight, for that path), else the parameters at or under its ``path``, each for its own path.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Hashable, Iterable

import torch
import torch.fx as fx
from torch import nn

from fxpeft.adapters import ParameterCopy, SiteModule
from fxpeft.errors import SharedTensorWarning, UnsupportedError
from fxpeft.graph import tags

__all__ = ["SharedTensorWarning", "storage_key", "tensor_names", "tied_names", "base_reads", "module_of", "use_of",
           "graph_uses", "merge_writes", "copy_conflicts", "merge_problems", "check_merge", "track", "release"]

EVERY = None  # in merge_writes: the site stands in for every read of the tensor


# -- which paths name one tensor ------------------------------------------------------------------------------------
def storage_key(tensor: torch.Tensor) -> Hashable:
    """Equal for tensors that share memory: the storage's address (the tensor itself on ``meta``, where every
    storage is at 0, and for tensors without a plain storage)."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        pointer = 0
    return (str(tensor.device), pointer) if pointer else ("object", id(tensor))


def tensor_names(model: nn.Module) -> dict[Hashable, tuple[str, ...]]:
    """Every parameter of ``model`` by :func:`storage_key`: all the paths it is reachable from, in module order."""
    groups: dict[Hashable, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(storage_key(parameter), []).append(name)
    return {key: tuple(names) for key, names in groups.items()}


def tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each parameter path whose tensor other paths share (tied weights), with all the paths of that tensor."""
    return {name: names for names in tensor_names(model).values() if len(names) > 1 for name in names}


# -- which graph ops read a tensor, and as which path -------------------------------------------------------------
def base_reads(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """The base ops reading ``node`` (a parameter's placeholder): ``(op, value)`` with ``value`` ``node`` itself or
    the adapter join that stands for it there (a trained copy's ``where``; fxpeft/graph/tags.py)."""
    reads, seen, frontier = [], set(), [node]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if not tags.is_adapter_node(user):
                if (user, value) not in seen:
                    seen.add((user, value))
                    reads.append((user, value))
            elif tags.role_of(user) in (tags.JOIN, tags.OUTPUT):
                frontier.append(user)
    return reads


def module_of(op: fx.Node) -> str:
    """The path of the innermost module ``op`` was traced in ('' for the model's own forward)."""
    stack = op.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def use_of(op: fx.Node, names: Iterable[str]) -> str | None:
    """Which of ``names`` (the paths of one tensor) ``op`` reads the tensor as: the one whose owning module is the
    innermost module on ``op``'s module stack that owns one of them; None when no module on the stack does."""
    owners = {name.rpartition(".")[0]: name for name in names}
    stack = op.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path in owners:
            return owners[path]
    return None


def _label(op: fx.Node, names: tuple[str, ...]) -> str:
    name = use_of(op, names)
    if name is not None:
        return name
    module = module_of(op)
    return f"an op of {module}" if module else "an op of the model's own forward"


def graph_uses(programs, groups: dict[Hashable, tuple[str, ...]]) -> dict[Hashable, list[str]]:
    """Per tensor (``groups``: :func:`tensor_names`), its uses in the graphs as captured (``Program.pristine``): a
    path of the tensor, or "an op of <module>" for an op that no module owning one of its paths runs."""
    key_of = {name: key for key, names in groups.items() for name in names}
    uses: dict[Hashable, dict[str, None]] = {}
    for program in programs:
        placeholders = [node for node in program.pristine.graph.nodes if node.op == "placeholder"]
        for node, source in zip(placeholders, program.pristine_sources):
            key = key_of.get(source.target) if source.kind == "parameter" else None
            if key is not None:
                found = uses.setdefault(key, {})
                for op, _ in base_reads(node):
                    found[_label(op, groups[key])] = None
    return {key: list(found) for key, found in uses.items()}


# -- merging ----------------------------------------------------------------------------------------------------------
def merge_writes(site: SiteModule, base_model: nn.Module) -> dict[str, tuple[str, ...] | None]:
    """The base parameters ``site.merge_into`` writes, each with the paths whose uses the written value is right for
    (None: every use). A site says so by an optional ``merged_parameters()`` (LoRA, trained copies); otherwise the
    parameters at or under its ``path``, each right for its own path. Empty for a site that cannot merge."""
    if type(site).merge_into is SiteModule.merge_into:
        return {}
    declared = getattr(site, "merged_parameters", None)
    if callable(declared):
        return dict(declared())
    try:
        return {site.path: (site.path,)} if base_model.get_parameter(site.path) is not None else {}
    except AttributeError:
        pass
    try:
        module = base_model.get_submodule(site.path)
    except AttributeError:
        return {}
    prefix = f"{site.path}." if site.path else ""
    return {prefix + name: (prefix + name,) for name, _ in module.named_parameters()}


def _untie_hint(model: nn.Module, name: str) -> str:
    owner, _, attribute = name.rpartition(".")
    if not owner:
        holder = "model"
    elif all(part.isidentifier() for part in owner.split(".")):
        holder = f"model.{owner}"
    else:
        holder = f"model.get_submodule({owner!r})"
    hint = f"`{holder}.{attribute} = torch.nn.Parameter({holder}.{attribute}.detach().clone())`"
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        hint += " and `model.config.tie_word_embeddings = False` (so that transformers does not tie them again)"
    return hint


def _owners(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[0] or name for name in names))


def _tied_problems(adapted, adapter_names: list[str]) -> tuple[list[str], dict[Hashable, str]]:
    """Uses of the tensors a merge of ``adapter_names`` writes that the adapters do not apply at (one message per
    site and tensor), and the written tensors (storage key: a path)."""
    base = adapted.base_model
    groups = tensor_names(base)
    key_of = {name: key for key, names in groups.items() for name in names}
    uses_of: dict[Hashable, list[str]] | None = None
    problems: list[str] = []
    written: dict[Hashable, str] = {}
    for adapter_name in adapter_names:
        for site in adapted.adapters[adapter_name].site_modules():
            for name, serves in merge_writes(site, base).items():
                key = key_of.get(name)
                if key is None:
                    continue
                written.setdefault(key, name)
                if uses_of is None:
                    uses_of = graph_uses(adapted.programs(), groups)
                names = groups[key]
                uses = uses_of.get(key) or list(names)
                if serves is EVERY or (len(names) == 1 and len(uses) == 1):  # not shared within this model
                    continue
                others = [use for use in uses if use not in serves]
                if not others:
                    continue
                copy = isinstance(site, ParameterCopy) and bool(serves)
                shown = serves[0] if copy else name
                what = f"the trained copy of {', '.join(serves)}" if copy else f"{type(site).__name__} at {site.path}"
                tied = [other for other in names if other != shown]
                also = f" (tied: the same tensor as {', '.join(tied)})" if tied else ""
                fix = f"untie the weights, then transform the untied model: {_untie_hint(base, shown)}"
                if copy and all(use in names for use in others):
                    fix += f"; or train every use as one copy: Trainable(targets={_owners(serves + tuple(others))})"
                problems.append(
                    f"{shown}{also}, written by {what} of adapter {adapter_name!r}, has uses where the adapter does "
                    f"not apply ({', '.join(others)}): merging would change their outputs too. Keep the adapter "
                    f"unmerged (its outputs are right), or {fix}.")
    return problems, written


def copy_conflicts(adapted, adapter_names: Iterable[str]) -> list[str]:
    """Base tensors of which two of ``adapter_names`` each train a copy (``Trainable``, LoRA's ``bias``), one message
    each. Such adapters cannot apply together: the graph would read one adapter's copy and a merge would write the
    other's. PEFT refuses them too (``modules_to_save`` takes one active adapter at a time)."""
    key_of = {name: key for key, names in tensor_names(adapted.base_model).items() for name in names}
    owners: dict[Hashable, list[tuple[str, str]]] = {}
    for adapter_name in dict.fromkeys(adapter_names):
        for site in adapted.adapters[adapter_name].site_modules():
            if isinstance(site, ParameterCopy):
                key = key_of.get(site.path, site.path)
                owners.setdefault(key, []).append((adapter_name, site.path))
    return [f"{found[0][1]} (trained copies in adapters {[name for name, _ in found]})"
            for found in owners.values() if len({name for name, _ in found}) > 1]


def merge_problems(adapted, adapter_names: Iterable[str]) -> list[str]:
    """Why merging ``adapter_names`` into ``adapted``'s base model would change a use the adapters do not apply at:
    another use of a tied tensor, another live adapted model on the same tensors, two adapters' trained copies of one
    tensor (:func:`copy_conflicts`). Empty when the merge is safe."""
    names = list(adapter_names)
    problems, written = _tied_problems(adapted, names)
    copies = [f"{conflict}: a merge can write only one of them; merge one of these adapters at a time"
              for conflict in copy_conflicts(adapted, names)]
    return copies + problems + _other_models(adapted, written)


def check_merge(adapted, adapter_names: Iterable[str]) -> None:
    """Raise :class:`~fxpeft.errors.UnsupportedError` (before anything is written) when merging ``adapter_names``
    would change a use of a shared tensor that the adapters do not apply at (:func:`merge_problems`)."""
    problems = merge_problems(adapted, adapter_names)
    if problems:
        raise UnsupportedError("merge() refused, nothing was merged: it would write base tensors that other uses "
                               "share.\n  " + "\n  ".join(problems[:8]) +
                               (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""))


# -- adapted models sharing base tensors ----------------------------------------------------------------------------
_LIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # adapted models that may still run (track / release)


def _describe(adapted) -> str:
    return (f"the adapted model at 0x{id(adapted):x} (adapters {list(adapted.adapters)}, base model "
            f"{type(adapted.base_model).__name__} at 0x{id(adapted.base_model):x})")


def _shared_with_others(adapted, keys: Iterable[Hashable]) -> list[tuple[object, list[str]]]:
    """The other live adapted models whose base model reads one of ``keys`` (storage keys), with those paths."""
    keys = set(keys)
    found = []
    for other in list(_LIVE):
        if other is adapted:
            continue
        names = [name for key, names in tensor_names(other.base_model).items() if key in keys for name in names]
        if names:
            found.append((other, names))
    return found


def _other_models(adapted, written: dict[Hashable, str]) -> list[str]:
    problems = []
    for other, names in _shared_with_others(adapted, written):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        problems.append(
            f"{_describe(other)} reads {shown}, which this merge would write: its base model shares these tensors "
            "with this one's (fxpeft.transform called twice on one base model?), so merging would change its "
            "outputs too. Give each adapted model its own base model (fxpeft.transform(copy.deepcopy(model), ...)), "
            "or delete the other adapted model first (`del` it; fxpeft holds it by a weak reference only), or keep "
            "both unmerged.")
    return problems


def track(adapted) -> None:
    """Register a new adapted model (weakly) and warn, as PEFT warns at ``get_peft_model``, about what a merge of
    it would refuse: adapters on tensors that other uses share, a base model another live adapted model shares."""
    for problem in _tied_problems(adapted, list(adapted.adapters))[0]:
        warnings.warn(SharedTensorWarning(f"merge() will refuse this adapter: {problem}"), stacklevel=4)
    shared = _shared_with_others(adapted, tensor_names(adapted.base_model))
    for other, names in shared:
        warnings.warn(SharedTensorWarning(
            f"This adapted model's base model shares {len(names)} parameter tensors with {_describe(other)}. Both run "
            "correctly unmerged, but merging either would change the other's outputs, so merge() refuses while both "
            "are alive. Give each its own base model: fxpeft.transform(copy.deepcopy(model), ...)."), stacklevel=4)
    _LIVE.add(adapted)


def release(adapted) -> None:
    """``adapted`` no longer runs (``merge_and_unload`` handed its base model back): it no longer counts as a use."""
    _LIVE.discard(adapted)

