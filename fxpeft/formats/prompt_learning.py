"""What PEFT's prompt-learning files have in common, for the codecs of the virtual-token methods.

PEFT writes one ``adapter_config.json`` layout for every method that adds virtual tokens: the common fields
(``peft_type``, ``task_type``, ``base_model_name_or_path``, ``modules_to_save``, ``num_virtual_tokens``,
``num_transformer_submodules`` and the model's ``num_layers``, ``token_dim``, ``num_attention_heads``), then the
method's own. :class:`VirtualTokenCodec` writes and reads the common part; each method's codec subclasses it
in the method's pass (``passes/``) and adds its own fields (:meth:`VirtualTokenCodec.method_fields`) and its
rule (:meth:`VirtualTokenCodec.rule_from_config`)::

    class MyCodec(VirtualTokenCodec):
        peft_types = ("MY_PEFT_TYPE",)

        def method_fields(self, rule, common):
            return {"my_field": rule.my_field}

        def rule_from_config(self, config, num_virtual_tokens, saved_keys):
            return MyRule(num_virtual_tokens, my_field=config.get("my_field"))

The tensors: PEFT's prompt-learning models have no inner ``.model``, so a trained head saved next to the
virtual tokens is keyed ``base_model.<path>``; :meth:`VirtualTokenCodec.state_to_file` and
:meth:`~VirtualTokenCodec.state_from_file` map fxpeft's ``base_model.model.<path>`` keys to and from that.

Reading a config checks its fields (:mod:`fxpeft.formats.peft`'s typed readers; an AdapterLoadError names the
field): ``num_virtual_tokens`` is an integer >= 1 and, with the file's tensors, at most the rows of its
``prompt_embeddings`` (which every PEFT prompt-learning file holds), so that no prompt larger than the file's own
is allocated. A method's sizes (an encoder's hidden size, its layer count) are bounded by its own tensors in its
:meth:`~VirtualTokenCodec.rule_from_config` (:func:`sizes_bound`).

**Task heads.** PEFT's model class for a task with a head (``SEQ_CLS``: ``classifier`` / ``score``, ``TOKEN_CLS``,
``QUESTION_ANS``) trains the head whole and, loading a folder, expects its weights in the file (``KeyError:
'base_model.classifier.weight'`` without them). An fxpeft adapter that does not train the head still writes it
(:func:`head_copies`): the tensors the adapted model uses for it (the base model's own, or the adapter's trained copy
where another part of a composed adapter trains it), so that PEFT's class loads the folder and computes fxpeft's
outputs. The weights file names them in its safetensors metadata (``HEAD_COPIES``), and fxpeft's reader leaves them
out (:mod:`fxpeft.formats.files`): for fxpeft the adapter trains no head, as before it was saved.

**Composed adapters.** An adapter of LoRA and a virtual-token method is saved as two PEFT folders
(:mod:`fxpeft.formats.composed`); read back, the virtual-token part's config carries the other part's rules in
memory under ``COMPOSED_RULES`` (never in a file: its value must be rule objects), and
:meth:`VirtualTokenCodec.to_rules` returns them before its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fxpeft.errors import AdapterLoadError, AdapterSaveError, UnsupportedError
from fxpeft.formats.peft import (
    TASK_HEADS,
    check_size,
    int_field,
    modules_to_save_of,
    names_field,
    shown,
    task_type_of,
)
from fxpeft.methods import PeftCodec
from fxpeft.rules import Rule, Trainable

__all__ = ["VirtualTokenCodec", "PROMPT_KEY", "HEAD_COPIES", "COMPOSED_RULES", "model_dims", "transformer_submodules",
           "to_prompt_keys", "from_prompt_keys", "sizes_bound", "head_copies"]

PROMPT_KEY = "prompt_embeddings"  # every PEFT prompt-learning file holds the virtual tokens under this key
HEAD_COPIES = "fxpeft_head_copies"  # safetensors metadata: the head tensors written only for PEFT's task class
COMPOSED_RULES = "fxpeft_composed_rules"  # in memory only: the rules of a composed adapter's other part
_MODEL_PREFIX = "base_model.model."
_PROMPT_PREFIX = "base_model."


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_dims(model: torch.nn.Module, key_value: bool = False) -> dict[str, int]:
    """``num_layers``, ``token_dim`` and ``num_attention_heads`` as PEFT fills them from a model's config.

    ``key_value``: the sizes of the attention's keys and values, which for grouped-query models are the
    key/value heads' (what a method that prefixes keys and values stores)."""
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
    else:  # virtual-token rows are as wide as the token embeddings (narrower than the hidden size in opt-350m)
        dim = _embedding_width(model) or dim
    return {"num_layers": int(layers), "token_dim": int(dim), "num_attention_heads": int(heads)}


def _embedding_width(model: torch.nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except NotImplementedError:
        return None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def transformer_submodules(model: torch.nn.Module) -> int:
    """PEFT's ``num_transformer_submodules``: 2 for a seq2seq LM (it keeps ``2n`` virtual-token rows), else 1."""
    return 2 if task_type_of(model) == "SEQ_2_SEQ_LM" else 1


def sizes_bound(saved_keys, prefix: str) -> int | None:
    """The largest dimension of the file's tensors whose keys start with ``prefix`` (a method's own weights), which
    bounds every hidden size its config may give; None without shapes (a config alone); AdapterLoadError when the
    file has no such tensor."""
    shapes = getattr(saved_keys, "shapes", None)
    if shapes is None:
        return None
    dims = [size for key, shape in shapes.items() if key.startswith(prefix) for size in shape]
    if not dims:
        raise AdapterLoadError(f"the adapter file has no {prefix}* tensors, which its config's sizes describe; save "
                               "the adapter again.")
    return max(dims)


def head_copies(model: torch.nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The task heads' tensors a prompt-learning folder must hold for PEFT's class of ``config``'s ``task_type``
    (the module docstring), for the heads its ``modules_to_save`` does not list: as the adapted model uses them,
    the adapter's trained copy in ``state`` (fxpeft's keys, ``base_model.model.<path>``) or else ``model``'s own,
    keyed as PEFT's prompt-learning files key them (``base_model.<path>``). Empty for a task without a head."""
    heads = TASK_HEADS.get(config.get("task_type"), ())
    listed = set(config.get("modules_to_save") or ())
    copies: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not path or path.rpartition(".")[2] not in heads or path in listed:
            continue
        for name, parameter in module.named_parameters():
            value = state.get(f"{_MODEL_PREFIX}{path}.{name}", parameter)
            if value.device.type == "meta":
                raise AdapterSaveError(f"The head {path} is on the meta device, and PEFT's class for task_type "
                                       f"{config.get('task_type')} needs its weights in the file: give the model real "
                                       "weights first (AdaptedModel.load_base_model), then save.")
            copies[f"{_PROMPT_PREFIX}{path}.{name}"] = value.detach().contiguous().cpu()
    return copies


def to_prompt_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fxpeft's adapter state keyed as PEFT's prompt-learning models save it (``base_model.model.`` ->
    ``base_model.``; the virtual tokens' own keys have neither prefix and stay)."""
    return {(_PROMPT_PREFIX + key[len(_MODEL_PREFIX):]) if key.startswith(_MODEL_PREFIX) else key: value
            for key, value in state.items()}


def from_prompt_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT prompt-learning state keyed as fxpeft's adapter expects it (the inverse of :func:`to_prompt_keys`)."""
    return {(_MODEL_PREFIX + key[len(_PROMPT_PREFIX):]) if key.startswith(_PROMPT_PREFIX) else key: value
            for key, value in state.items()}


class VirtualTokenCodec(PeftCodec):
    """The PEFT codec of a virtual-token method: the common prompt-learning fields and keys (module docstring);
    a subclass gives its ``peft_types`` and implements :meth:`method_fields` and :meth:`rule_from_config`.

    An adapter holds one rule of the method plus :class:`~fxpeft.rules.Trainable` rules, which are written as
    ``modules_to_save`` and read back as one Trainable rule."""

    key_value_dims: ClassVar[bool] = False  # record the key/value heads' sizes (:func:`model_dims`)

    def method_fields(self, rule: Rule, common: dict[str, Any]) -> dict[str, Any]:
        """The method's own config fields for ``rule``, written after the ``common`` ones (which it may read)."""
        raise NotImplementedError

    def rule_from_config(self, config: dict[str, Any], num_virtual_tokens: int, saved_keys: set[str] | None) -> Rule:
        """The rule a config of one of ``peft_types`` describes (``saved_keys``: as :meth:`to_rules` gets them)."""
        raise NotImplementedError

    def to_config(self, model, rules: list, selected: dict, adapter) -> dict[str, Any]:
        """The common fields, then :meth:`method_fields`; UnsupportedError unless the adapter holds exactly one
        rule besides Trainable ones."""
        own = [rule for rule in rules if not isinstance(rule, Trainable)]
        if len(own) != 1:
            raise UnsupportedError(
                f"Saving in PEFT's format needs exactly one virtual-token rule per adapter (plus Trainable rules and "
                f"one LoRA, saved beside it); this adapter has {[type(rule).__name__ for rule in own]}. Keep one "
                "virtual-token rule in the adapter; for another, transform a separate copy of the base model (an "
                "adapted model holds one virtual-token adapter).")
        rule = own[0]
        config = getattr(model, "config", None)
        common: dict[str, Any] = {
            "peft_type": self.peft_types[0],
            "task_type": task_type_of(model),
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            "auto_mapping": None,
            "modules_to_save": modules_to_save_of(rules, selected),
            "num_virtual_tokens": rule.num_virtual_tokens,
            "num_transformer_submodules": transformer_submodules(model),
            **model_dims(model, key_value=self.key_value_dims),
        }
        return {**common, **self.method_fields(rule, common)}

    def to_rules(self, config: dict[str, Any], saved_keys: set[str] | None) -> list:
        """:meth:`rule_from_config`, plus a Trainable rule for ``modules_to_save`` (fields checked: the module
        docstring); after the rules of a composed adapter's other part (``COMPOSED_RULES``, in memory only)."""
        composed = config.get(COMPOSED_RULES)
        if composed is not None and (not isinstance(composed, tuple) or
                                     not all(isinstance(rule, Rule) for rule in composed)):
            raise AdapterLoadError(f"`{COMPOSED_RULES}` is not a field of PEFT's configs (got {shown(composed)}); "
                                   "remove it. A composed adapter's other part is read from the sub-folder its "
                                   "weights file names, never from the config.")
        count = int_field(config, "num_virtual_tokens")
        shapes = getattr(saved_keys, "shapes", None)
        if shapes is not None:
            rows = shapes.get(PROMPT_KEY)
            if not rows:
                raise AdapterLoadError("the adapter file has no prompt_embeddings tensor, which every PEFT "
                                       "prompt-learning adapter holds; save the adapter again.")
            check_size("num_virtual_tokens", count, rows[0], "the number of rows of the file's prompt_embeddings")
        rules: list[Rule] = [*(composed or ()), self.rule_from_config(config, count, saved_keys)]
        modules = list(names_field(config, "modules_to_save") or ())
        if modules:
            rules.append(Trainable(targets=tuple(modules)))
        return rules

    def state_to_file(self, state: dict) -> dict:
        """The adapter state keyed as PEFT's prompt-learning models save it (:func:`to_prompt_keys`)."""
        return to_prompt_keys(state)

    def state_from_file(self, state: dict) -> dict:
        """A file's tensors keyed as fxpeft's adapter expects them (:func:`from_prompt_keys`)."""
        return from_prompt_keys(state)
