"""PEFT's config files for the virtual-token methods (prompt tuning, p-tuning, prefix tuning).

The LoRA conversion lives in :mod:`fxpeft.peft_config`; this module is its twin for PEFT's
``PromptTuningConfig`` (``PROMPT_TUNING``), ``PromptEncoderConfig`` (``P_TUNING``) and
``PrefixTuningConfig`` (``PREFIX_TUNING``). The file engine dispatches here when :func:`handles_rules` (saving)
or :func:`handles_config` (loading) says so::

    config = to_peft_config(model, adapter.rules, adapter.selected)       # -> adapter_config.json
    state = to_peft_state(adapted.adapter_state_dict(name), adapter.rules)  # -> adapter_model.safetensors
    rules = rules_from_peft_config(config, set(state))                     # <- adapter_config.json
    state = from_peft_state(state)                                         # then adapter.load_peft_state_dict

The tensors: PEFT saves one ``prompt_embeddings`` tensor (the prompt, or the prompt encoder's
*output*). fxpeft saves the same tensor, and next to it the prompt encoder's weights under ``fxpeft.``-prefixed
keys, which PEFT ignores, so training resumes from an fxpeft file; PEFT's own p-tuning file (the output only)
loads as the fixed prompt it is, a :class:`PromptTuning` rule, just as PEFT reloads it.
A trained head saved by PEFT next to a prompt is keyed ``base_model.<path>`` (PEFT's prompt-learning
models have no inner ``.model``); :func:`to_peft_state` / :func:`from_peft_state` map fxpeft's
``base_model.model.<path>`` keys to and from that.
"""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.errors import UnsupportedError
from fxpeft.methods import PeftCodec
from fxpeft.rules import PrefixTuning, PromptTuning, PTuning, Rule, Trainable

__all__ = ["PEFT_TYPES", "handles_rules", "handles_config", "to_peft_config", "rules_from_peft_config",
           "to_peft_state", "from_peft_state", "model_dims", "transformer_submodules"]

PEFT_TYPES: dict[type, str] = {PromptTuning: "PROMPT_TUNING", PTuning: "P_TUNING", PrefixTuning: "PREFIX_TUNING"}
_RULE_OF_TYPE = {value: key for key, value in PEFT_TYPES.items()}
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_MODEL_PREFIX = "base_model.model."
_PROMPT_PREFIX = "base_model."


def _virtual(rules: list[Rule]) -> list[Rule]:
    return [rule for rule in rules if type(rule) in PEFT_TYPES]


def handles_rules(rules: list[Rule]) -> bool:
    """True when an adapter's rules are a virtual-token method (the file engine then calls this module)."""
    return bool(_virtual(rules))


def handles_config(config: dict[str, Any]) -> bool:
    """True for an ``adapter_config.json`` of a virtual-token method."""
    return config.get("peft_type") in _RULE_OF_TYPE


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_dims(model: torch.nn.Module, key_value: bool = False) -> dict[str, int]:
    """``num_layers``, ``token_dim`` and ``num_attention_heads`` as PEFT fills them from a model's config.

    ``key_value``: prefix tuning's sizes, which for grouped-query models are the key/value heads'."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = _config_value(config, "num_hidden_layers", "num_layers", "n_layer")
    dim = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if None in (layers, dim, heads):
        raise UnsupportedError(f"{type(model).__name__}: its config does not say its layer count, hidden size and "
                               "head count, which PEFT's virtual-token configs record.")
    if key_value:
        kv_heads = _config_value(config, "num_key_value_heads")
        head_dim = _config_value(config, "head_dim") or dim // heads
        if kv_heads is not None and kv_heads != heads:
            dim, heads = head_dim * kv_heads, kv_heads
    return {"num_layers": int(layers), "token_dim": int(dim), "num_attention_heads": int(heads)}


def transformer_submodules(model: torch.nn.Module) -> int:
    """PEFT's ``num_transformer_submodules``: 2 for a seq2seq LM (it keeps ``2n`` prompt rows), else 1."""
    from fxpeft.formats.peft import task_type_of

    return 2 if task_type_of(model) == "SEQ_2_SEQ_LM" else 1


def to_peft_config(model: torch.nn.Module, rules: list[Rule], selected: dict[Rule, list[str]]) -> dict[str, Any]:
    """PEFT's config fields for one adapter: one virtual-token rule, plus Trainable rules (``modules_to_save``)."""
    from fxpeft.formats.peft import task_type_of

    virtual = _virtual(rules)
    others = [type(rule).__name__ for rule in rules if rule not in virtual and not isinstance(rule, Trainable)]
    if len(virtual) != 1 or others:
        raise UnsupportedError(
            f"Saving in PEFT's format needs exactly one virtual-token rule per adapter (plus Trainable rules); this "
            f"adapter has {[type(r).__name__ for r in virtual]} and {others or 'no'} other rules. Save the methods "
            "as separate adapters.")
    rule = virtual[0]
    config = getattr(model, "config", None)
    task_type = task_type_of(model)
    modules_to_save = sorted({path for r in rules if isinstance(r, Trainable) for path in selected.get(r, [])})
    fields: dict[str, Any] = {
        "peft_type": PEFT_TYPES[type(rule)],
        "task_type": task_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": modules_to_save or None,
        "num_virtual_tokens": rule.num_virtual_tokens,
        "num_transformer_submodules": transformer_submodules(model),
        **model_dims(model, key_value=isinstance(rule, PrefixTuning)),
    }
    if isinstance(rule, PrefixTuning):
        projection = rule.projection
        fields.update(prefix_projection=projection is not None,
                      encoder_hidden_size=fields["token_dim"] if projection in (None, True) else projection)
    elif isinstance(rule, PromptTuning):
        tokenizer = rule.tokenizer if isinstance(rule.tokenizer, str) or rule.tokenizer is None else \
            getattr(rule.tokenizer, "name_or_path", None)
        fields.update(prompt_tuning_init=_INITS[rule.init], prompt_tuning_init_text=rule.init_text,
                      tokenizer_name_or_path=tokenizer, tokenizer_kwargs=None)
    else:
        fields.update(encoder_reparameterization_type=rule.encoder.upper(),
                      encoder_hidden_size=rule.encoder_hidden_size or fields["token_dim"],
                      encoder_num_layers=rule.encoder_num_layers, encoder_dropout=rule.encoder_dropout)
    return fields


def rules_from_peft_config(config: dict[str, Any], saved_keys: set[str] | None = None) -> list[Rule]:
    """Rules equivalent to a PEFT virtual-token config (plus a Trainable rule for ``modules_to_save``)."""
    peft_type = config.get("peft_type")
    cls = _RULE_OF_TYPE.get(peft_type)
    if cls is None:
        raise UnsupportedError(f"adapter_config.json has peft_type {peft_type!r}, not a virtual-token method.")
    n = int(config["num_virtual_tokens"])
    rule: Rule
    if cls is PrefixTuning:
        # PEFT saves the projection's output only, and reloads that as a plain prefix; fxpeft's own files keep
        # the projection's weights, so training resumes through it.
        projected = config.get("prefix_projection") and (
            saved_keys is None or any(key.startswith("fxpeft.prefix_encoder.") for key in saved_keys))
        rule = PrefixTuning(n, projection=int(config.get("encoder_hidden_size") or config["token_dim"])
                            if projected else None)
    elif cls is PromptTuning:
        init = {value: key for key, value in _INITS.items()}.get(config.get("prompt_tuning_init") or "RANDOM",
                                                                   "random")
        # The saved embeddings replace any initialisation; "text" would need the tokenizer only to initialise.
        rule = PromptTuning(n, init="random" if init == "text" else init)
    elif saved_keys is not None and not any(key.startswith("fxpeft.prompt_encoder.") for key in saved_keys):
        # PEFT saves only the encoder's output, and itself reloads that as a plain prompt (inference mode).
        rule = PromptTuning(n)
    else:
        rule = PTuning(n, encoder=str(config.get("encoder_reparameterization_type") or "MLP").lower(),
                       encoder_hidden_size=config.get("encoder_hidden_size"),
                       encoder_num_layers=int(config.get("encoder_num_layers") or 2),
                       encoder_dropout=float(config.get("encoder_dropout") or 0.0))
    rules: list[Rule] = [rule]
    modules = list(config.get("modules_to_save") or [])
    if modules:
        rules.append(Trainable(targets=tuple(modules)))
    return rules


def to_peft_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fxpeft's adapter state keyed as PEFT's prompt-learning models save it."""
    return {(_PROMPT_PREFIX + key[len(_MODEL_PREFIX):]) if key.startswith(_MODEL_PREFIX) else key: value
            for key, value in state.items()}


def from_peft_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT prompt-learning state keyed as fxpeft's adapter expects it (inverse of :func:`to_peft_state`)."""
    return {(_MODEL_PREFIX + key[len(_PROMPT_PREFIX):]) if key.startswith(_PROMPT_PREFIX) else key: value
            for key, value in state.items()}


class PromptLearningCodec(PeftCodec):
    """The codec of one virtual-token method (``peft_type`` given): the functions above."""

    def __init__(self, peft_type: str):
        self.peft_types = (peft_type,)

    def to_config(self, model, rules, selected, adapter):
        return to_peft_config(model, rules, selected)

    def to_rules(self, config, saved_keys):
        return rules_from_peft_config(config, saved_keys)

    def state_to_file(self, state):
        return to_peft_state(state)

    def state_from_file(self, state):
        return from_peft_state(state)
