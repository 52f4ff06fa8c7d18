"""PEFT's config *objects* (``peft.LoraConfig(...)``, ``PromptTuningConfig``, ``PromptEncoderConfig``,
``PrefixTuningConfig``) as fxpeft rules, and adapter configs back as PEFT's objects.

``fxpeft.transform(model, peft.LoraConfig(...))`` takes a PEFT config where it takes rules: :func:`as_rules` turns
the config's ``to_dict()`` into rules through the codec registered for its ``peft_type``, the same one that reads an
``adapter_config.json`` (:mod:`fxpeft.formats.peft`), given no file (as ``peft.get_peft_model`` takes a config).
What PEFT's model class for the config's ``task_type`` trains whole (a classification head) is trained here too, as
PEFT adds it to ``modules_to_save``.

Nothing is dropped silently: a field the codec refuses is an :class:`~fxpeft.errors.UnsupportedError`, a value it
refuses a :class:`~fxpeft.errors.RuleError`, both naming the config class; and a field set away from PEFT's default
that the codec never read (say ``prompt_tuning_init_text``: fxpeft takes a text initialisation from its own rule)
is an UnsupportedError naming it, instead of an adapter that differs from PEFT's. Fields fxpeft takes from the model
or the graph (``task_type``, the model's sizes, ``fan_in_fan_out``, ...; :data:`FROM_THE_MODEL`) are not read.

peft is optional: a config is recognised by its ``peft_type`` and ``to_dict()`` (:func:`is_peft_config`), never by
importing peft; only :func:`config_object` imports it, and without it gives the plain dict.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from fxpeft.errors import AdapterLoadError, RuleError, UnsupportedError
from fxpeft.formats.peft import TASK_HEADS, check_config, enum_value
from fxpeft.methods import codec_for_peft_type
from fxpeft.rules import Rule, as_rule_list

__all__ = ["FROM_THE_MODEL", "is_peft_config", "rules_from_config", "as_rules", "asks_inference_mode",
           "config_object"]

# Fields fxpeft takes from the model, the graph or the call, not from a config object: metadata, the model's sizes
# (PEFT fills them from the model too), Conv1D's layout (read off the graph) and one copy per tied tensor.
FROM_THE_MODEL = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules", "fan_in_fan_out",
    "ensure_weight_tying", "eva_config"})


def is_peft_config(value: Any) -> bool:
    """Whether ``value`` is a PEFT config object (a ``peft_type`` and a ``to_dict()``), told without importing peft."""
    return not isinstance(value, (Rule, dict)) and hasattr(value, "peft_type") and callable(
        getattr(value, "to_dict", None))


class _ReadFields(dict):
    """A config dict that records which fields a codec read (``get`` or ``[]``)."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@functools.lru_cache(maxsize=None)
def _defaults(config_class: type) -> dict[str, Any]:
    """PEFT's defaults of a config class (its ``to_dict()`` when built with no arguments); {} when it needs some."""
    try:
        return dict(config_class().to_dict())
    except (TypeError, ValueError):
        return {}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.;])\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".;") + "."


def _default_targets(peft_type: str, model: Any) -> Any:
    """PEFT's default ``target_modules`` for ``model``'s ``model_type`` (what ``get_peft_model`` fills in for a
    config without them, from peft's table), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from peft.utils import constants  # optional dependency: installed, since a PEFT config was given
    except ImportError:
        return None
    table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING", {})
    targets = table.get(model_type)
    return targets if targets is None or isinstance(targets, str) else list(targets)


def rules_from_config(config: Any, model: Any = None) -> list[Rule]:
    """The fxpeft rules a PEFT config object describes (the module docstring), as ``peft.get_peft_model`` would
    build the adapter on ``model``: e.g. ``LoraConfig(target_modules=["q_proj"], r=8, modules_to_save=["score"])``
    is ``[LoRA(targets=("q_proj",), r=8), Trainable(targets=("score",))]``. Without ``target_modules`` (and with a
    ``model``), PEFT's default targets for the model's type, as ``get_peft_model`` fills them in."""
    name = type(config).__name__
    data = dict(config.to_dict())
    peft_type = str(enum_value(data.get("peft_type")) or "LORA")
    if "target_modules" in data and data["target_modules"] is None and not data.get("target_parameters"):
        data["target_modules"] = _default_targets(peft_type, model)
    heads = TASK_HEADS.get(enum_value(data.get("task_type")), ())
    if heads:  # PEFT's model class for the task trains these whole, whatever the method
        data["modules_to_save"] = list(dict.fromkeys([*(data.get("modules_to_save") or ()), *heads]))
    fields = _ReadFields(data)
    try:
        check_config(data)
        codec = codec_for_peft_type(peft_type)
        rules = codec.to_rules(fields, None)
    except AdapterLoadError as error:
        raise RuleError(f"{name}: {_first_sentence(str(error))} Set that field of the {name} to a valid value.") \
            from None
    except UnsupportedError as error:
        message = str(error).replace("adapter_config.json", name)
        raise UnsupportedError(message if message.startswith(name) else f"{name}: {message}") from None
    except RuleError as error:
        raise RuleError(f"{name} (as fxpeft rules): {error}") from None
    defaults = _defaults(type(config))
    ignored = sorted(field for field, value in data.items() if field not in fields.read and field not in
                     FROM_THE_MODEL and value != defaults.get(field) and value not in
                     (None, False, {}, [], "", 0))
    if ignored:
        kinds = sorted({f"fxpeft.{type(rule).__name__}" for rule in rules})
        raise UnsupportedError(
            f"{name} sets {ignored}, which fxpeft does not take from a PEFT config (the adapter would differ from "
            f"PEFT's). Leave them at PEFT's defaults, or write the rules yourself ({', '.join(kinds)}; help() lists "
            "their fields) and pass those to fxpeft.transform.")
    return rules


def as_rules(value: Any, what: str, model: Any = None) -> list[Rule]:
    """``value`` as a list of rules, for ``what`` (say ``"transform()"``): rules as :func:`fxpeft.rules.as_rule_list`
    takes them, where a PEFT config object (alone or in the list) stands for its rules on ``model``
    (:func:`rules_from_config`)."""
    if is_peft_config(value):
        return rules_from_config(value, model)
    if isinstance(value, (list, tuple)):
        value = [rule for item in value for rule in (rules_from_config(item, model) if is_peft_config(item) else
                                                     [item])]
    return as_rule_list(value, what)


def asks_inference_mode(value: Any) -> bool:
    """Whether a PEFT config in ``value`` (one, or in a list) has ``inference_mode=True``: ``get_peft_model`` then
    freezes the adapter."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return any(is_peft_config(item) and bool(getattr(item, "inference_mode", False)) for item in items)


def config_object(fields: dict[str, Any]) -> Any:
    """An adapter config dict (``adapter_config.json``'s fields) as PEFT's config object (``peft.LoraConfig``, ...),
    built as ``PeftConfig.from_pretrained`` builds it from the file; the dict itself (a copy) without peft."""
    try:
        from peft import PeftConfig  # optional dependency
    except ImportError:
        return dict(fields)
    return PeftConfig.from_peft_type(**fields)
