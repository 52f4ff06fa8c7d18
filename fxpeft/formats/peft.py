"""PEFT's adapter configs, whatever the method: the task type, ``modules_to_save``, and the codec dispatch.

Each method's codec (:class:`fxpeft.methods.PeftCodec`, registered with the method) writes and reads its own
fields; this module picks the codec, by the adapter's rules when saving (:func:`adapter_files`) and by the
file's ``peft_type`` when loading (:func:`rules_and_state`), and holds what every codec shares.
"""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.errors import AdapterSaveError
from fxpeft.methods import codec_for_peft_type, codec_for_rules, saved_rules
from fxpeft.rules import Rule, Trainable

__all__ = ["TASK_HEADS", "task_type_of", "enum_value", "modules_to_save_of", "adapter_files", "rules_and_state"]

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
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
_DEFAULT_PEFT_TYPE = "LORA"  # PEFT's own default, for a config that does not say


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


def enum_value(value: Any) -> Any:
    """PEFT's enums (``PeftType.LORA``, ``TaskType.SEQ_CLS``) as their plain values."""
    return getattr(value, "value", value)


def modules_to_save_of(rules: list[Rule], selected: dict[Rule, list[str]]) -> list[str] | None:
    """PEFT's ``modules_to_save``: the module paths the adapter's :class:`Trainable` rules selected."""
    return sorted({path for rule in rules if isinstance(rule, Trainable) for path in selected.get(rule, [])}) or None


def adapter_files(adapted, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and CPU tensors one adapter of ``adapted`` is saved as (checked before anything is written)."""
    adapter = adapted.adapters[adapter_name]
    rules = saved_rules(adapter.rules)
    codec = codec_for_rules(rules)
    config = codec.to_config(adapted.base_model, rules, adapter.selected, adapter)
    tensors = codec.state_to_file(adapted.adapter_state_dict(adapter_name))
    on_meta = sorted(key for key, value in tensors.items() if value.device.type == "meta")
    if on_meta:
        raise AdapterSaveError(f"The adapter {adapter_name!r} has tensors on the meta device ({on_meta[:3]}...): "
                               "give the model real weights first (AdaptedModel.load_base_model), then save.")
    return config, {key: value.detach().contiguous().cpu() for key, value in tensors.items()}


def rules_and_state(config: dict[str, Any], state: dict[str, torch.Tensor]):
    """The rules an adapter config describes, and its tensors keyed as fxpeft's adapter expects them, through the
    codec registered for the config's ``peft_type``."""
    codec = codec_for_peft_type(enum_value(config.get("peft_type") or _DEFAULT_PEFT_TYPE))
    return codec.to_rules(config, set(state)), codec.state_from_file(state)
