"""``fxpeft.AutoAdapterModel.from_pretrained(adapter_dir)``: PEFT's ``AutoPeftModel*`` for fxpeft. It loads the base
model that the adapter's ``adapter_config.json`` names (``base_model_name_or_path``, a local folder), with the
transformers class PEFT would use, then the adapter into it (:func:`fxpeft.load_adapter`)::

    adapted = fxpeft.AutoAdapterModel.from_pretrained("out/adapter", dtype=torch.bfloat16)

The class: the transformers Auto class of the config's ``task_type`` (``CAUSAL_LM`` -> ``AutoModelForCausalLM``,
...); without one, the class PEFT records in ``auto_mapping`` (transformers classes only: nothing else is imported),
else the class the base model's own ``config.json`` names (``architectures``). A tokenizer saved beside the adapter
with more tokens than the base model's embeddings resizes them first, as PEFT does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers

from fxpeft.api import load_adapter
from fxpeft.errors import AdapterLoadError, FxpeftError
from fxpeft.formats.files import CONFIG_NAME
from fxpeft.formats.peft import enum_value, read_config, shown
from fxpeft.model import AdaptedModel

__all__ = ["AutoAdapterModel", "TASK_CLASSES", "base_model_class"]

# PEFT's task types -> the transformers Auto class its AutoPeftModelFor<Task> loads the base model with.
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
_TOKENIZER_CONFIG = "tokenizer_config.json"


def _transformers_class(name: Any, where: str) -> type:
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise AdapterLoadError(f"{where} names the model class {shown(name)}, which transformers does not have; load "
                               "the base model yourself and call fxpeft.load_adapter(model, adapter_dir).")
    return cls


def base_model_class(config: dict[str, Any], base_path: str) -> type:
    """The transformers class that loads the base model of an adapter with ``config`` (``adapter_config.json``'s
    fields), whose base model is saved in ``base_path`` (the module docstring says how it is chosen)."""
    task = enum_value(config.get("task_type"))
    if task is not None:
        if task not in TASK_CLASSES:
            raise AdapterLoadError(f"adapter_config.json has task_type {shown(task)}; known: {sorted(TASK_CLASSES)}.")
        return getattr(transformers, TASK_CLASSES[task])
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict) and mapping.get("base_model_class"):
        library = str(mapping.get("parent_library", ""))
        if library != "transformers" and not library.startswith("transformers."):
            raise AdapterLoadError(f"adapter_config.json's auto_mapping names a class of {shown(library)}; fxpeft "
                                   "imports nothing but transformers for it. Load the base model yourself and call "
                                   "fxpeft.load_adapter(model, adapter_dir).")
        return _transformers_class(mapping["base_model_class"], "adapter_config.json's auto_mapping")
    architectures = getattr(transformers.AutoConfig.from_pretrained(base_path), "architectures", None) or [None]
    return _transformers_class(architectures[0], f"{base_path}/config.json's architectures")


def _resize_for_tokenizer(model, directory: Path) -> None:
    """As PEFT's AutoPeftModel: a tokenizer saved with the adapter that has more tokens than the model's embeddings
    rows resizes them (new tokens the adapter was trained with)."""
    if not (directory / _TOKENIZER_CONFIG).is_file() or not hasattr(model, "get_input_embeddings"):
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class AutoAdapterModel:
    """Loads an adapter folder with its base model: :meth:`from_pretrained` (the module docstring)."""

    def __init__(self, *args, **kwargs):
        raise FxpeftError("AutoAdapterModel is not built: call AutoAdapterModel.from_pretrained(adapter_dir).")

    @classmethod
    def from_pretrained(cls, adapter_dir, adapter_name: str = "default", is_trainable: bool = False, *,
                        base_model_name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> AdaptedModel:
        """The adapted model: the base model named by ``adapter_dir/adapter_config.json``'s ``base_model_name_or_path``
        (or by ``base_model_name_or_path`` here, which replaces it), loaded by the transformers class of the config's
        task with ``kwargs`` (``dtype=``, ``attn_implementation=``, ...: transformers' ``from_pretrained``'s), then
        the adapter as ``adapter_name``, frozen unless ``is_trainable`` (:func:`fxpeft.load_adapter`).

        The base model must be a local folder (a relative path is read from the working directory, as transformers
        reads it): fxpeft does not download from the Hugging Face Hub, and a Hub name is an
        :class:`~fxpeft.errors.AdapterLoadError` saying so."""
        directory = Path(adapter_dir)
        if not (directory / CONFIG_NAME).is_file():
            raise AdapterLoadError(f"{directory} has no {CONFIG_NAME}: it is not an adapter folder (save one with "
                                   "save_pretrained or save_adapter).")
        config = read_config(directory / CONFIG_NAME)
        base = base_model_name_or_path if base_model_name_or_path is not None else \
            config.get("base_model_name_or_path")
        if not isinstance(base, (str, os.PathLike)) or not str(base):
            raise AdapterLoadError(f"{directory / CONFIG_NAME} does not name its base model (base_model_name_or_path "
                                   "is empty): pass base_model_name_or_path='/path/to/model' to from_pretrained, or "
                                   "load the base model yourself and call fxpeft.load_adapter(model, adapter_dir).")
        if not os.path.isdir(base):
            raise AdapterLoadError(
                f"{directory / CONFIG_NAME} names the base model {shown(str(base))}, which is not a local folder; "
                "fxpeft does not download from the Hugging Face Hub. Put the model in a folder and pass "
                "base_model_name_or_path='/path/to/model' to from_pretrained (or load it yourself and call "
                "fxpeft.load_adapter(model, adapter_dir)).")
        model = base_model_class(config, str(base)).from_pretrained(base, **kwargs)
        _resize_for_tokenizer(model, directory)
        return load_adapter(model, directory, adapter_name=adapter_name, is_trainable=is_trainable)
