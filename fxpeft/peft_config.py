"""Conversion between fxpeft rules and PEFT's ``adapter_config.json`` (``LoraConfig`` fields)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedError
from .rules import LoRA, Rule, Trainable
from .selectors import ALL_LINEAR, ROLES, _GLOB_CHARS, _as_regex

__all__ = ["to_peft_config", "rules_from_peft_config", "task_type_of"]

_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)
# Heads that PEFT's model class for a task type trains whole (it adds them to modules_to_save on load).
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}
# Fields PEFT writes that carry no behaviour, and fields whose default is not falsy.
_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "auto_mapping"}
_TRUTHY_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
# Initialisations that only set A and B (the saved tensors replace them anyway); the others (PiSSA, OLoRA,
# LoftQ, CorDA, ...) also rewrite the base weights, so their adapters do not fit the original base.
_LOADABLE_INITS = (True, False, "gaussian", "eva")
_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
             "init_lora_weights", "modules_to_save", "fan_in_fan_out"}


def task_type_of(model: torch.nn.Module) -> str | None:
    """PEFT's task type for a transformers model class, read from the class name's conventional suffix."""
    name = type(model).__name__
    if "Seq2Seq" in name or (name.endswith("ForConditionalGeneration") and
                             getattr(getattr(model, "config", None), "is_encoder_decoder", False)):
        return "SEQ_2_SEQ_LM"
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix) and suffix != "ForConditionalGeneration":
            return task
    return None


def _is_plain_name(entry: Any) -> bool:
    return isinstance(entry, str) and entry not in ROLES and entry != ALL_LINEAR and not (_GLOB_CHARS & set(entry))


def _peft_targets(targets: Any, selected: list[str]) -> Any:
    """Targets as PEFT reads them: a regex or names as written, else the resolved module paths."""
    if isinstance(targets, str) and targets not in ROLES and _as_regex(targets) is not None:
        return targets  # a regex, or "all-linear": PEFT reads both as we do
    entries = (targets,) if isinstance(targets, (str, type)) else tuple(targets)
    if all(_is_plain_name(entry) for entry in entries):
        return sorted(entries)
    return sorted(selected)


def to_peft_config(model: torch.nn.Module, rules: list[Rule], selected: dict[Rule, list[str]],
                   conv1d: bool) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for one adapter's rules."""
    loras = [rule for rule in rules if isinstance(rule, LoRA)]
    trainables = [rule for rule in rules if isinstance(rule, Trainable)]
    unknown = [type(rule).__name__ for rule in rules if not isinstance(rule, (LoRA, Trainable))]
    if unknown or len(loras) != 1:
        raise UnsupportedError(
            f"Saving in PEFT's format needs exactly one LoRA rule per adapter (plus Trainable rules); "
            f"this adapter has {len(loras)} LoRA rule(s) and {unknown or 'no'} other rules.")
    lora = loras[0]
    rewritten = _peft_targets(lora.targets, selected.get(lora, []))
    written_as_given = rewritten != sorted(selected.get(lora, [])) or rewritten == lora.targets
    exclude = None
    if lora.exclude is not None and written_as_given:
        exclude = lora.exclude if isinstance(lora.exclude, str) else sorted(map(str, lora.exclude))
    modules_to_save = sorted({path for rule in trainables for path in selected.get(rule, [])}) or None
    config = getattr(model, "config", None)
    task_type = task_type_of(model)
    heads = _TASK_HEADS.get(task_type, ())
    if any(name.rpartition(".")[2] in heads and name not in (modules_to_save or ())
           for name, _ in model.named_modules()):
        # PEFT's class for this task would expect the head's trained weights in the file and fail to load
        # without them; with no task type it loads the adapter onto the head as it is, as fxpeft ran it.
        task_type = None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": rewritten,
        "exclude_modules": exclude,
        "bias": lora.bias,
        "use_rslora": lora.use_rslora,
        "init_lora_weights": True if lora.init == "default" else lora.init,
        "modules_to_save": modules_to_save,
        "fan_in_fan_out": conv1d,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }


def rules_from_peft_config(config: dict[str, Any], saved_keys: set[str]) -> list[Rule]:
    """Rules equivalent to a PEFT ``LoraConfig`` dict; unsupported non-default fields are an error."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"adapter_config.json has peft_type {config.get('peft_type')!r}; "
                               "fxpeft loads LORA adapters.")
    unsupported = sorted(
        name for name, value in config.items()
        if name not in _HONOURED and name not in _METADATA and value not in (None, False, {}, [], "", 0)
        and _TRUTHY_DEFAULTS.get(name, object()) != value)
    if unsupported:
        raise UnsupportedError(f"adapter_config.json sets {unsupported}, which fxpeft does not support yet; "
                               "remove them or convert the adapter without them.")
    init = config.get("init_lora_weights", True)
    if init not in _LOADABLE_INITS:
        raise UnsupportedError(
            f"adapter_config.json sets init_lora_weights={init!r}, which fxpeft does not support: that "
            "initialisation also rewrites the base weights, so the saved A and B only fit that changed base. "
            "Convert the adapter to a plain LoRA with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)).")
    targets = config.get("target_modules")
    if not targets:
        raise UnsupportedError("adapter_config.json has no target_modules (PEFT's target_parameters is not supported).")
    targets = targets if isinstance(targets, str) else tuple(sorted(targets))
    exclude = config.get("exclude_modules")
    exclude = exclude if exclude is None or isinstance(exclude, str) else tuple(sorted(exclude))
    rules: list[Rule] = [LoRA(targets=targets, exclude=exclude, r=int(config.get("r", 8)),
                              alpha=config.get("lora_alpha", 8), dropout=float(config.get("lora_dropout", 0.0)),
                              use_rslora=bool(config.get("use_rslora", False)), bias=config.get("bias", "none"),
                              init="gaussian" if init == "gaussian" else "default")]
    wanted = list(config.get("modules_to_save") or [])
    wanted += _TASK_HEADS.get(config.get("task_type"), ())  # PEFT trains these heads for the task
    present = [name for name in dict.fromkeys(wanted)
               if any(key.startswith("base_model.model.") and (f".{name}." in key or key.startswith(
                   f"base_model.model.{name}.")) and ".lora_" not in key for key in saved_keys)]
    if present:
        rules.append(Trainable(targets=tuple(present)))
    return rules
