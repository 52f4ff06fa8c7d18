"""PEFT's adapter configs, whatever the method: the task type, ``modules_to_save``, and the codec dispatch.

Each method's codec (:class:`fxpeft.methods.PeftCodec`, registered with the method) writes and reads its own
fields; this module picks the codec, by the adapter's rules when saving (:func:`adapter_files`) and by the
file's ``peft_type`` when loading (:func:`rules_and_state`), and holds what every codec shares.

**A config is input from strangers.** :func:`read_config` reads at most ``MAX_CONFIG_BYTES`` (1 MiB; PEFT's
are a few KiB) of one before parsing it, and refuses one nested more than ``MAX_CONFIG_DEPTH`` (32; PEFT's nest 3
deep) levels deep, however deep (never a RecursionError).
Codecs read its fields through the typed readers here (:func:`int_field`, :func:`number_field`,
:func:`bool_field`, :func:`str_field`, :func:`names_field`, :func:`mapping_field`): a field of the wrong type, a
non-integral count (``r: 4.9``), NaN or inf, or a value out of range is an :class:`AdapterLoadError` naming the
field, which :func:`rules_and_state` prefixes with the file. Lists hold at most ``MAX_LIST_ENTRIES`` (4096)
entries. Codecs get the file's tensor shapes with its keys (:class:`SavedKeys`) and check every size the config
gives (a rank, a virtual-token count, a hidden size) against them, so that nothing is allocated for a size the
file's own tensors do not bound (``r: 1000000000`` is refused before any parameter exists).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from fxpeft.errors import AdapterLoadError, AdapterSaveError, RuleError, UnsupportedError
from fxpeft.methods import codec_for_peft_type, codec_for_rules, saved_rules
from fxpeft.rules import MAX_SIZE, Rule, Trainable, number_problem

__all__ = ["TASK_HEADS", "task_type_of", "saved_task_type", "the_one_rule", "enum_value", "modules_to_save_of",
           "adapter_files", "rules_and_state",
           "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_LIST_ENTRIES", "read_config", "check_config", "shown",
           "SavedKeys", "without_base_layers", "int_field", "number_field", "bool_field", "str_field", "names_field",
           "mapping_field", "check_size"]

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_LIST_ENTRIES = 4096
_REQUIRED = object()

_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel, OpenAIGPTLMHeadModel, CTRLLMHeadModel: causal LMs, not encoders
    ("Model", "FEATURE_EXTRACTION"),
)
# Heads that PEFT's model class for a task type trains whole (it adds them to modules_to_save on load).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
_DEFAULT_PEFT_TYPE = "LORA"  # PEFT's own default, for a config that does not say


def task_type_of(model: torch.nn.Module) -> str | None:
    """PEFT's task type for a transformers model class, read from the class name's conventional suffix; an
    encoder-decoder model with a language-model head (``EncoderDecoderModel`` included) is ``SEQ_2_SEQ_LM``."""
    name = type(model).__name__
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if "Seq2Seq" in name or (encoder_decoder and _has_lm_head(model)):
        return "SEQ_2_SEQ_LM"
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix) and suffix != "ForConditionalGeneration":
            return task
    return None


def _has_lm_head(model: torch.nn.Module) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return callable(get_output) and get_output() is not None
    except (NotImplementedError, AttributeError):
        return False


def enum_value(value: Any) -> Any:
    """PEFT's enums (``PeftType.LORA``, ``TaskType.SEQ_CLS``) as their plain values."""
    return getattr(value, "value", value)


def modules_to_save_of(rules: list[Rule], selected: dict[Rule, list[str]]) -> list[str] | None:
    """PEFT's ``modules_to_save``: the module paths the adapter's :class:`Trainable` rules selected."""
    return sorted({path for rule in rules if isinstance(rule, Trainable) for path in selected.get(rule, [])}) or None


def saved_task_type(model: torch.nn.Module, modules_to_save: list[str] | None) -> str | None:
    """The ``task_type`` an adapter of ``model`` is saved with: :func:`task_type_of`, or None when the model has that
    task's head and the adapter does not train it. PEFT's class for the task would expect the head's trained weights
    in the file and fail to load without them; with no task type it loads the adapter onto the head as it is, as
    fxpeft ran it."""
    task_type = task_type_of(model)
    heads = TASK_HEADS.get(task_type, ())
    if any(name.rpartition(".")[2] in heads and name not in (modules_to_save or ())
           for name, _ in model.named_modules()):
        return None
    return task_type


def the_one_rule(rules: list[Rule], rule_type: type, hint: str = "", what: str = "Saving in PEFT's format"):
    """The one rule of ``rule_type`` among an adapter's ``rules`` (beside :class:`Trainable` rules), which a codec
    saves; else an :class:`~fxpeft.errors.UnsupportedError` saying what the adapter holds, then ``hint``."""
    name = rule_type.__name__
    own = [rule for rule in rules if isinstance(rule, rule_type)]
    other = [type(rule).__name__ for rule in rules if not isinstance(rule, (rule_type, Trainable))]
    if len(own) != 1 or other:
        raise UnsupportedError(f"{what} needs exactly one {name} rule per adapter (plus Trainable rules); this adapter "
                               f"has {len(own)} {name} rule(s) and {other or 'no'} other rules. {hint}".rstrip())
    return own[0]


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


def rules_and_state(config: dict[str, Any], state: dict[str, torch.Tensor], where: str | None = None):
    """The rules an adapter config describes, and its tensors keyed as fxpeft's adapter expects them, through the
    codec registered for the config's ``peft_type``. A field that describes no valid adapter (the module
    docstring) is an :class:`AdapterLoadError` that names ``where`` (the config file) and the field."""
    try:
        check_config(config)
        peft_type = str_field(config, "peft_type", _DEFAULT_PEFT_TYPE) or _DEFAULT_PEFT_TYPE
        codec = codec_for_peft_type(peft_type)
        rules = codec.to_rules(config, SavedKeys(state))
    except AdapterLoadError as error:
        raise AdapterLoadError(f"{where or 'adapter config'}: {error}", mismatches=error.mismatches) from None
    except RuleError as error:  # a field the codec passed on that its rule refuses (named as the rule names it)
        raise AdapterLoadError(f"{where or 'adapter config'}: {error} Fix that field of the file, or save the adapter "
                               "again with PEFT or fxpeft.") from None
    return rules, codec.state_from_file(state)


_BASE_LAYER = ".base_layer."


def without_base_layers(state: dict[str, torch.Tensor], expected: Iterable[str], base_model: torch.nn.Module,
                        where: str) -> dict[str, torch.Tensor]:
    """``state`` without the base weights PEFT saves next to a LoRA on an embedding or head
    (``base_model.model.<module>.base_layer.<name>`` that the adapter does not ``expected``; PEFT's
    ``save_embedding_layers``, on by default for such targets, while a trained LoRA bias has a key of that form too).
    PEFT writes them into the base model when loading (for a resized vocabulary); fxpeft never writes a base tensor,
    so each must equal ``base_model``'s tensor ``<module>.<name>``, and one that differs is an
    :class:`AdapterLoadError` saying how to load it (nothing was loaded)."""
    expected = set(expected)
    checked = set()
    for key, value in state.items():
        if key in expected or not key.startswith("base_model.model.") or _BASE_LAYER not in key:
            continue
        path = key.removeprefix("base_model.model.").replace(_BASE_LAYER, ".")
        try:
            own = base_model.get_parameter(path)
        except AttributeError:
            continue  # not a base weight of this model: the key check names it as unexpected
        checked.add(key)
        if own.device.type == "meta":
            continue  # a model planned on meta: nothing to compare yet
        if tuple(own.shape) != tuple(value.shape) or not torch.equal(own.detach().cpu(), value.to(own.dtype)):
            raise AdapterLoadError(
                f"{where}: the file holds the base weight {key} (PEFT saves it for a LoRA on an embedding or head), "
                f"and it differs from this base model's {path} (shape {tuple(value.shape)} vs {tuple(own.shape)}): "
                "the adapter was trained on a changed base, e.g. a resized vocabulary. fxpeft never writes base "
                f"tensors: give the base model those weights first (resize_token_embeddings, then copy the file's "
                f"tensor into {path}), then load the adapter.", mismatches=[key])
    return {key: value for key, value in state.items() if key not in checked}


# -- reading configs from strangers (the module docstring) ---------------------------------------------------------
class SavedKeys(frozenset):
    """The keys of an adapter file, as :meth:`fxpeft.methods.PeftCodec.to_rules` takes them, with the shape of
    each tensor in ``shapes``."""

    shapes: dict[str, tuple[int, ...]]

    def __new__(cls, state: dict[str, torch.Tensor]):
        keys = super().__new__(cls, state)
        keys.shapes = {key: tuple(value.shape) for key, value in state.items()}
        return keys


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a stranger's value may be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_config(path) -> Any:
    """The JSON in ``path``, read within ``MAX_CONFIG_BYTES`` and ``MAX_CONFIG_DEPTH``; AdapterLoadError else."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise AdapterLoadError(f"Could not read {path}: {error.strerror or error}.") from error
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes; adapter configs are a few KiB, so "
                               "this is not one (or it was tampered with). Write or save it again.")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise AdapterLoadError(f"{path} nests JSON arrays or objects more than {MAX_CONFIG_DEPTH} deep; adapter "
                               "configs nest 3 deep. Write or save it again.") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, a number of over 4300 digits
        raise AdapterLoadError(f"{path} is not valid JSON: {str(error)[:200]}") from None
    try:
        check_config(value)
    except AdapterLoadError as error:
        raise AdapterLoadError(f"{path}: {error}") from None
    return value


def check_config(value: Any) -> None:
    """AdapterLoadError, naming the top-level field, when ``value`` nests lists or dicts more than
    ``MAX_CONFIG_DEPTH`` deep (checked without recursion, so any depth is reported, never a RecursionError)."""
    stack = [(value, 0, None)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth >= MAX_CONFIG_DEPTH:
                where = f"`{field[:60]}`" if isinstance(field, str) else "the config"
                raise AdapterLoadError(f"{where} nests lists or objects more than {MAX_CONFIG_DEPTH} deep; adapter "
                                       "configs nest 3 deep. Write or save it again.")
            children = item.items() if isinstance(item, dict) else ((field, child) for child in item)
            stack.extend((child, depth + 1, key if depth == 0 and isinstance(item, dict) else field)
                         for key, child in children)


def _field_error(name: str, want: str, value: Any) -> AdapterLoadError:
    return AdapterLoadError(f"`{name}` must be {want}, got {shown(value)}. Fix that field of the file, or save the "
                            "adapter again with PEFT or fxpeft.")


def _given(config: dict, name: str, default: Any) -> Any:
    value = config.get(name)
    if value is None and default is _REQUIRED:
        raise AdapterLoadError(f"`{name}` is missing; PEFT writes it in every such config. Save the adapter again.")
    return value


def int_field(config: dict, name: str, default: Any = _REQUIRED, *, minimum: int = 1,
              maximum: int = MAX_SIZE) -> Any:
    """``config[name]`` as an int in ``[minimum, maximum]`` (4.9, "4", true refused); ``default`` when absent or
    null (no default: required)."""
    value = _given(config, name, default)
    if value is None:
        return default
    want = number_problem(value, integer=True, minimum=minimum, maximum=maximum)
    if want is not None:
        raise _field_error(name, want, value)
    return value


def number_field(config: dict, name: str, default: Any = _REQUIRED, **bounds) -> Any:
    """``config[name]`` as a finite number within ``bounds`` (:func:`fxpeft.rules.number_problem`'s)."""
    value = _given(config, name, default)
    if value is None:
        return default
    want = number_problem(value, **bounds)
    if want is not None:
        raise _field_error(name, want, value)
    return value


def bool_field(config: dict, name: str, default: Any = _REQUIRED) -> Any:
    """``config[name]``, which must be true or false; ``default`` when absent or null."""
    value = _given(config, name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(name, "true or false", value)
    return value


def str_field(config: dict, name: str, default: Any = _REQUIRED, choices: Iterable[str] | None = None) -> Any:
    """``config[name]`` as a string (one of ``choices`` when given; PEFT's enums as their values)."""
    value = enum_value(_given(config, name, default))
    if value is None:
        return default
    choices = None if choices is None else list(choices)
    if not isinstance(value, str) or (choices is not None and value not in choices):
        raise _field_error(name, "a string" if choices is None else f"one of {choices}", value)
    return value


def names_field(config: dict, name: str) -> tuple[str, ...] | None:
    """``config[name]`` as a list of strings (at most ``MAX_LIST_ENTRIES``), or None when absent or null. (A set
    or tuple too: PEFT's config objects hold ``target_modules`` as a set.)"""
    value = config.get(name)
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(item, str) for item in value):
        raise _field_error(name, "a list of module names (strings)", value)
    if len(value) > MAX_LIST_ENTRIES:
        raise _field_error(name, f"a list of at most {MAX_LIST_ENTRIES} names", f"{len(value)} entries")
    return tuple(value)


def mapping_field(config: dict, name: str, **bounds) -> dict[str, Any]:
    """``config[name]`` as a mapping from regex strings to numbers within ``bounds`` ({} when absent or null)."""
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LIST_ENTRIES:
        raise _field_error(name, f"an object of at most {MAX_LIST_ENTRIES} entries (module regex -> number)", value)
    for key, number in value.items():
        want = number_problem(number, **bounds)
        if want is not None:
            raise _field_error(f"{name}[{shown(key)}]", want, number)
    return dict(value)


def check_size(name: str, value: int | None, bound: int | None, what: str) -> None:
    """AdapterLoadError when the size ``value`` a config gives exceeds ``bound`` (``what``: the file's tensors'
    size that bounds it), since a size the file's tensors do not bound would be allocated before their shapes are
    compared with the model's."""
    if value is not None and bound is not None and value > bound:
        raise AdapterLoadError(f"`{name}` is {value}, but {what} is {bound}: the config does not fit its own tensors "
                               "(a tampered or mismatched file). Fix the field or save the adapter again.")
