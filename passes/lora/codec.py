"""LoRA's PEFT codec: fxpeft's :class:`~fxpeft.rules.LoRA` rule <-> PEFT's ``adapter_config.json`` (``LoraConfig``).

One LoRA rule holds a whole ``LoraConfig``: ``r``/``lora_alpha`` with ``rank_pattern``/``alpha_pattern`` (per
site, PEFT's ``get_pattern_key``), ``target_modules``/``exclude_modules`` as names or one regex,
``layers_to_transform``/``layers_pattern`` as ``layers``/``layers_pattern``, ``target_parameters`` as itself
(written with ``target_modules=[]`` when the rule has no ``targets``, as PEFT writes it); ``modules_to_save`` becomes a
:class:`~fxpeft.rules.Trainable` rule. ``fan_in_fan_out`` is read off the graph (transformers' ``Conv1D``
computes ``x @ W`` with ``W`` stored ``[in, out]``), as PEFT itself corrects the flag per layer type.
Fields fxpeft does not support are an :class:`~fxpeft.errors.UnsupportedError` that names them.

Reading a config (:func:`rules_from_peft_config`) checks every field's type and value through
:mod:`fxpeft.formats.peft`'s typed readers (an :class:`~fxpeft.errors.AdapterLoadError` naming the field: ``r``
is an integer, ``lora_alpha`` a finite number > 0, ``target_modules`` a bounded regex or a list of names, ...);
with the file's tensors, the rank each of the file's modules takes (``rank_pattern``, else ``r``) must be at most
the largest dimension of the file's LoRA tensors (a rank is at most a layer's width), so that a config cannot make
fxpeft allocate more than the layers it adapts. (``r`` when ``rank_pattern`` covers every module of the file sizes
no tensor, and no tensor bounds it: a site that takes it is not in the file, which the key check refuses.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fxpeft.adapters import ParameterCopy
from fxpeft.errors import AdapterLoadError, UnsupportedError
from fxpeft.formats.peft import (
    MAX_LIST_ENTRIES,
    TASK_HEADS,
    bool_field,
    check_size,
    int_field,
    mapping_field,
    modules_to_save_of,
    names_field,
    number_field,
    saved_task_type,
    shown,
    str_field,
    the_one_rule,
)
from fxpeft.graph.bounded_regex import regex_problem
from fxpeft.graph.selectors import ALL_LINEAR, ROLES, as_regex, is_plain_name
from fxpeft.methods import PeftCodec
from fxpeft.passes.lora.checks import key_part
from fxpeft.rules import MAX_SIZE, LoRA, Rule, Trainable, number_problem

__all__ = ["LoraCodec", "lora_config_fields", "to_peft_config", "rules_from_peft_config"]

# Fields PEFT writes that carry no behaviour, and fields whose default is not falsy.
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping"}
_TRUTHY_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
# PEFT's init_lora_weights -> fxpeft's LoRA.init. These only set A and B; the others (PiSSA, OLoRA, LoftQ,
# CorDA, ...) also rewrite the base weights, so their adapters do not fit the original base. EVA's data-driven
# A is computed by a separate PEFT call; until then (and when loading, where the file replaces it) it is the
# default initialisation.
_INITS_FROM_PEFT = {True: "default", False: "random", "gaussian": "gaussian", "orthogonal": "orthogonal",
                    "eva": "default"}
_INITS_TO_PEFT = {"default": True, "random": False, "gaussian": "gaussian", "orthogonal": "orthogonal"}
_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
             "init_lora_weights", "modules_to_save", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
             "layers_to_transform", "layers_pattern", "ensure_weight_tying", "use_dora", "target_parameters"}


def _peft_selector(value: Any, field: str) -> Any:
    """``targets``/``exclude`` as PEFT reads them: one regex (or ``"all-linear"``), or a sorted list of names.

    Roles, globs and module types mean something only against a captured graph: they raise."""
    if isinstance(value, str) and value not in ROLES and as_regex(value) is not None:
        return value
    entries = (value,) if isinstance(value, (str, type)) else tuple(value)
    odd = [entry if isinstance(entry, str) else getattr(entry, "__name__", repr(entry))
           for entry in entries if not is_plain_name(entry)]
    if odd:
        raise UnsupportedError(
            f"LoRA `{field}` has {odd}, which PEFT's config cannot express (it takes module names or one regex). "
            "Save the adapter from a transformed model (AdaptedModel.save_adapter), which writes the module paths "
            "these resolve to, or write the targets as names or a regex.")
    return sorted(entries)


def lora_config_fields(rule: LoRA, modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` keyword arguments for one LoRA rule (plus ``modules_to_save``), without a model.

    Raises :class:`UnsupportedError` for what PEFT's config cannot say: roles, globs or module types in
    ``targets``/``exclude``, and ``layers`` with a regex ``targets`` (PEFT applies ``layers_to_transform``
    only to a list of names). Example::

        peft.LoraConfig(**lora_config_fields(fxpeft.LoRA(targets=["q_proj"], r=4), ["classifier"]))
    """
    targets = [] if rule.targets is None else _peft_selector(rule.targets, "targets")  # [] as PEFT writes it
    exclude = None if rule.exclude is None else _peft_selector(rule.exclude, "exclude")
    if rule.layers is not None and isinstance(targets, str):
        raise UnsupportedError(
            f"LoRA `layers={list(rule.layers)}` with the regex targets {targets!r}: PEFT applies "
            "layers_to_transform only to a list of target names. Put the layer in the regex "
            r"(e.g. '.*\.layers\.(0|1)\..*q_proj') or list the names.")
    pattern = rule.layers_pattern
    return {
        "r": rule.r,
        "lora_alpha": rule.alpha,
        "lora_dropout": rule.dropout,
        "target_modules": targets,
        "exclude_modules": exclude,
        "bias": rule.bias,
        "use_rslora": rule.use_rslora,
        "use_dora": rule.use_dora,
        "init_lora_weights": _INITS_TO_PEFT[rule.init],
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "rank_pattern": dict(rule.rank_pattern),
        "alpha_pattern": dict(rule.alpha_pattern),
        "layers_to_transform": list(rule.layers) if rule.layers is not None else None,
        "layers_pattern": list(pattern) if isinstance(pattern, tuple) else pattern,
        "target_parameters": list(rule.target_parameters) or None,  # passes/lora/parameters.py
    }


def to_peft_config(model: torch.nn.Module, rules: list[Rule], selected: dict[Rule, list[str]],
                   conv1d: bool, tied: bool = False) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for one adapter's rules on ``model``.

    Targets are written as given when PEFT reads them the same way (names, a regex, ``"all-linear"``);
    otherwise as the module paths they selected in the graph (then ``exclude`` and ``layers`` are already
    applied, and written as nothing). ``tied``: one trained copy serves several paths of a tied tensor, which PEFT
    does with ``ensure_weight_tying`` (written only then)."""
    lora = the_one_rule(rules, LoRA, "Per-site ranks and alphas fit in one rule: LoRA(rank_pattern={...}, "
                                     "alpha_pattern={...}).")
    modules_to_save = modules_to_save_of(rules, selected)
    try:
        fields = lora_config_fields(lora, modules_to_save)
    except UnsupportedError:
        resolved = dataclasses.replace(lora, targets=tuple(selected.get(lora, [])), exclude=None, layers=None,
                                       layers_pattern=None)
        fields = lora_config_fields(resolved, modules_to_save)
    config = getattr(model, "config", None)
    task_type = saved_task_type(model, modules_to_save)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        **fields,
        "fan_in_fan_out": conv1d,
        **({"ensure_weight_tying": True} if tied or lora.ensure_weight_tying else {}),
    }


def _unsupported_fields(config: dict[str, Any]) -> list[str]:
    init = config.get("init_lora_weights", True)
    ignored = {"eva_config"} if init == "eva" else set()  # only drives EVA's data-driven init
    return sorted(
        name for name, value in config.items()
        if name not in _HONOURED and name not in _METADATA and name not in ignored
        and value not in (None, False, {}, [], "", 0) and _TRUTHY_DEFAULTS.get(name, object()) != value)


def _selector_from_peft(config: dict[str, Any], field: str) -> Any:
    """``target_modules``/``exclude_modules``: one regex (or ``"all-linear"``) or a list of names, checked."""
    value = config.get(field)
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        problem = regex_problem(value) if as_regex(value) is not None else None
        if problem is not None:
            raise AdapterLoadError(f"`{field}` {shown(value)} {problem}. A regex from a file is matched in bounded "
                                   "time; write a simpler one (e.g. '.*\\.(q_proj|v_proj)') or list the names.")
        return value
    names = names_field(config, field)
    return None if names is None else tuple(sorted(names))


def _layers_from_peft(config: dict[str, Any]) -> Any:
    """``layers_to_transform``: one layer index or a list of them (integers >= 0), or None."""
    value = config.get("layers_to_transform")
    items = value if isinstance(value, (list, tuple)) else [value]
    if value is not None and (len(items) > MAX_LIST_ENTRIES or any(
            number_problem(item, integer=True, minimum=0) for item in items)):
        raise AdapterLoadError(f"`layers_to_transform` must be a layer index or a list of at most {MAX_LIST_ENTRIES} "
                               f"(integers >= 0), got {shown(value)}. Fix that field of the file.")
    return value


def _check_ranks(rule: LoRA, saved_keys) -> None:
    """Every rank that sizes a tensor of the file at most the largest dimension of the file's LoRA tensors (the module
    docstring): the rank each of the file's modules takes (``rank_pattern`` first, else ``r``, as PEFT's
    ``get_pattern_key``). A rank no module of the file takes (``r`` when ``rank_pattern`` covers them all) sizes none
    of its tensors, so none bounds it; a site that would take it is not in the file, which the key check refuses."""
    shapes = getattr(saved_keys, "shapes", None)
    if shapes is None:
        return
    parts = {key: key_part(key) for key in shapes}
    dims = [size for key, shape in shapes.items() if parts[key] is not None for size in shape]
    if not dims:
        raise AdapterLoadError("the adapter file holds no LoRA tensors (<module>.lora_A.weight / lora_B.weight), so "
                               "it is not the LoRA adapter its config says; save the adapter again.")
    what = "the largest dimension of the file's LoRA tensors (a rank is at most a layer's width)"
    for path in dict.fromkeys(part.path for part in parts.values() if part is not None):
        key = rule.rank_pattern_key(path)
        check_size("r" if key is None else f"rank_pattern[{shown(key)}]", rule.rank_for(path), max(dims), what)


def _saves(key: str, module: str) -> bool:
    """Whether file key ``key`` is a tensor of module ``module`` trained whole (``modules_to_save``)."""
    return key.startswith("base_model.model.") and (f".{module}." in key or key.startswith(
        f"base_model.model.{module}.")) and ".lora_" not in key


def _tied_modules(saved_keys, wanted: list[str]) -> list[str]:
    """With ``ensure_weight_tying``, PEFT saves the copy of a tied tensor under every tied module's key as well
    (``lm_head.weight`` beside ``embed_tokens.weight``) and drops those modules from ``modules_to_save``: the
    modules of the file's other weights, which fxpeft trains as the same one copy."""
    found = []
    for key in sorted(saved_keys):
        path = key.removeprefix("base_model.model.")
        if path != key and path.endswith(".weight") and ".lora_" not in key and not any(
                _saves(key, module) for module in wanted):
            found.append(path.rpartition(".")[0])
    return list(dict.fromkeys(found))


def rules_from_peft_config(config: dict[str, Any], saved_keys: set[str] | None = None) -> list[Rule]:
    """Rules equivalent to a PEFT ``LoraConfig`` dict; unsupported non-default fields are an error naming them.

    ``saved_keys``: the keys of the adapter file the config came with. Then ``modules_to_save`` (and the head
    that PEFT's class for the ``task_type`` trains) become a :class:`Trainable` rule only where the file holds
    their tensors. ``None`` (no file): ``modules_to_save`` as given, plus the task type's heads, as
    ``peft.get_peft_model`` does.
    """
    peft_type = str_field(config, "peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedError(f"adapter_config.json has peft_type {shown(peft_type)}; fxpeft loads LORA adapters.")
    unsupported = _unsupported_fields(config)
    if unsupported:
        raise UnsupportedError(f"adapter_config.json sets {unsupported[:10]}, which fxpeft does not support yet; "
                               "remove them or convert the adapter without them.")
    init = config.get("init_lora_weights", True)
    if not any(init is key or (isinstance(init, str) and init == key) for key in _INITS_FROM_PEFT):
        raise UnsupportedError(
            f"adapter_config.json sets init_lora_weights={shown(init)}, which fxpeft does not support: that "
            "initialisation also rewrites the base weights, so the saved A and B only fit that changed base. "
            "Convert the adapter to a plain LoRA with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)).")
    targets = _selector_from_peft(config, "target_modules")
    parameters = names_field(config, "target_parameters") or ()
    if not targets and not parameters:
        raise UnsupportedError("adapter_config.json has neither target_modules nor target_parameters: it adapts "
                               "nothing. Name the modules (or parameters) the adapter was trained on.")
    r = int_field(config, "r", 8)
    ranks = mapping_field(config, "rank_pattern", integer=True, minimum=1, maximum=MAX_SIZE)
    lora = LoRA(
        targets=targets or None, target_parameters=parameters,
        exclude=_selector_from_peft(config, "exclude_modules"), r=r,
        alpha=number_field(config, "lora_alpha", 8, above=0), dropout=number_field(
            config, "lora_dropout", 0.0, minimum=0, below=1), use_rslora=bool_field(config, "use_rslora", False),
        use_dora=bool_field(config, "use_dora", False),
        ensure_weight_tying=bool_field(config, "ensure_weight_tying", False),
        bias=str_field(config, "bias", "none"), init=_INITS_FROM_PEFT[init], rank_pattern=ranks,
        alpha_pattern=mapping_field(config, "alpha_pattern", above=0), layers=_layers_from_peft(config),
        layers_pattern=config.get("layers_pattern") if isinstance(config.get("layers_pattern"), str) else
        names_field(config, "layers_pattern"))
    _check_ranks(lora, saved_keys)
    rules: list[Rule] = [lora]
    wanted = list(dict.fromkeys(list(names_field(config, "modules_to_save") or ()) +
                                list(TASK_HEADS.get(str_field(config, "task_type", None), ()))))
    if saved_keys is not None:
        wanted = [name for name in wanted if any(_saves(key, name) for key in saved_keys)]
        if bool_field(config, "ensure_weight_tying", False):
            wanted += _tied_modules(saved_keys, wanted)
    if wanted:
        rules.append(Trainable(targets=tuple(wanted)))
    return rules


class LoraCodec(PeftCodec):
    """``peft_type`` LORA: the functions above, and ``fan_in_fan_out`` read from the adapter's sites."""

    peft_types = ("LORA",)

    def to_config(self, model, rules, selected, adapter):
        conv1d = any(getattr(site, "fan_in_fan_out", False) for site in adapter.site_modules())
        tied = any(isinstance(site, ParameterCopy) and len(site.peft_names) > 1 for site in adapter.site_modules())
        return to_peft_config(model, rules, selected, conv1d, tied)

    def to_rules(self, config, saved_keys):
        return rules_from_peft_config(config, saved_keys)

    def rule_to_peft_config(self, rule, modules_to_save=None):
        from peft import LoraConfig  # optional dependency

        return LoraConfig(**lora_config_fields(rule, modules_to_save))
