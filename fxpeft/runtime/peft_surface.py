"""The surface of a transformers ``PreTrainedModel`` and of PEFT's ``PeftModel`` on the adapted model, with their
meanings, so that code written for those (Trainer, TRL, evaluation harnesses, a user's PEFT habits) works unchanged.

:class:`PeftSurface` is a mixin of :class:`fxpeft.AdaptedModel` (it reads the model's adapters, flags and programs).
What libraries read: ``config``, ``device``, ``dtype`` (the base model's, as transformers' ``ModuleUtilsMixin``
computes them) and ``peft_config`` (each adapter's config as PEFT holds it). PEFT's names for what fxpeft does under
its own: ``disable_adapter`` (``disable_adapters``), ``merge_adapter``/``unmerge_adapter`` (``merge``/``unmerge``),
``save_pretrained`` (``save_adapter``), ``from_pretrained`` (:func:`fxpeft.load_adapter`), ``unload``,
``enable_adapter_layers``/``disable_adapter_layers``. And transformers' ``get_input_embeddings``,
``get_output_embeddings``, ``enable_input_require_grads`` and ``resize_token_embeddings``, on the base model.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import torch
from torch import nn

import fxpeft  # from_pretrained calls the package's fxpeft.load_adapter (looked up when called)
from fxpeft.capture.export import device_of
from fxpeft.errors import AdapterLoadError, AdapterSaveError, FxpeftError, UnsupportedError
from fxpeft.formats.peft_configs import config_object
from fxpeft.methods import codec_for_rules, saved_rules
from fxpeft.shared_tensors import merge_writes, release

__all__ = ["PeftSurface"]

# PeftModel.from_pretrained's keywords that fxpeft takes at one value only (the one that is PEFT's default here).
_FROM_PRETRAINED_FIXED = {"autocast_adapter_dtype": True, "ephemeral_gpu_offload": False, "low_cpu_mem_usage": None,
                          "key_mapping": None, "revision": None, "token": None, "cache_dir": None, "torch_device": None}


def _make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


class PeftSurface:
    """``PreTrainedModel``'s and ``PeftModel``'s attributes and methods on the adapted model (module docstring)."""

    # -- what libraries read ------------------------------------------------------------------------------------------
    @property
    def config(self):
        """The base model's config (a transformers ``PretrainedConfig``), as ``PeftModel.config`` shows it. A base
        model without one has none here either: ``getattr(adapted, "config", None)`` is None."""
        config = getattr(self.base_model, "config", None)
        if config is None:
            raise AttributeError(f"{type(self).__name__} has no config: its base model "
                                 f"({type(self.base_model).__name__}) has none.")
        return config

    @property
    def device(self) -> torch.device:
        """transformers' ``model.device``: the device of the base model's parameters (its first one's)."""
        return device_of(self.base_model)

    @property
    def dtype(self) -> torch.dtype:
        """transformers' ``model.dtype``: the dtype of the base model's first floating-point parameter (quantized
        weights are not floating point; float32 for a model with no floating parameter). Adapter tensors may differ
        (float32 over a half-precision base, as PEFT keeps them)."""
        return next((parameter.dtype for parameter in self.base_model.parameters() if parameter.is_floating_point()),
                    torch.float32)

    @property
    def peft_config(self) -> dict[str, Any]:
        """Adapter name -> its config as PEFT holds it: a ``peft.LoraConfig`` (``PromptTuningConfig``, ...) equal to
        what ``PeftModel.from_pretrained`` holds for the folder :meth:`save_pretrained` writes, with
        ``inference_mode`` True for a frozen adapter (loaded with ``is_trainable=False``). Without the ``peft``
        package, the same fields as a plain dict (``adapter_config.json``'s). Built on each access from the adapters
        as they are: changing it changes nothing (use fxpeft's methods: ``set_alpha``, ``load_adapter``, ...)."""
        return {name: self._peft_config_of(name) for name in self.adapters}

    @property
    def active_peft_config(self) -> Any:
        """PEFT's ``active_peft_config``: :attr:`peft_config` of the active adapter."""
        return self._peft_config_of(self.active_adapter)

    def _peft_config_of(self, name: str) -> Any:
        adapter = self.adapters[name]
        rules = saved_rules(adapter.rules)
        fields = codec_for_rules(rules).to_config(self.base_model, rules, adapter.selected, adapter)
        return config_object({**fields, "inference_mode": bool(adapter.frozen)})

    def get_base_model(self) -> nn.Module:
        """The base model (PEFT's ``get_base_model``): its tensors, never written by fxpeft (unless merged)."""
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        """The base model's token embeddings (transformers' ``get_input_embeddings``)."""
        return self._base_method("get_input_embeddings")()

    def get_output_embeddings(self) -> nn.Module | None:
        """The base model's output head, or None for a model without one (transformers' ``get_output_embeddings``)."""
        return self._base_method("get_output_embeddings")()

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add Hub model-card tags to the base model (transformers' ``add_model_tags``, which TRL's trainers call);
        the base model's own method where it has one, else kept in ``model_tags`` here."""
        method = getattr(self.base_model, "add_model_tags", None)
        if callable(method):
            method(tags)
            return
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.model_tags = list(dict.fromkeys([*(getattr(self, "model_tags", None) or []), *tags]))

    def _base_method(self, name: str):
        method = getattr(self.base_model, name, None)
        if not callable(method):
            raise UnsupportedError(f"{name}(): the base model ({type(self.base_model).__name__}) has no {name} (a "
                                   "transformers model has).")
        return method

    # -- input gradients and the vocabulary ---------------------------------------------------------------------------
    def enable_input_require_grads(self) -> None:
        """transformers' ``enable_input_require_grads``, on the base model: a forward hook makes the output of the
        input embeddings require grad wherever the embedding module is called (``adapted.get_input_embeddings()(ids)``,
        the base model run alone), as PEFT's ``prepare_model_for_kbit_training`` and Trainer's gradient checkpointing
        expect. :meth:`disable_input_require_grads` removes it.

        Inside the adapted model's graphs the embedding is an ``aten.embedding`` node, not a call of the module, so
        no module hook runs there (``torch.export`` drops it at capture). The graphs need none: fxpeft's gradient
        checkpointing is non-reentrant, so a checkpointed layer needs no input that requires grad, and gradients reach
        every trainable adapter tensor as they are."""
        enable = getattr(self.base_model, "enable_input_require_grads", None)
        if callable(enable):
            enable()
            return
        self.disable_input_require_grads()
        self._input_grad_hook = self.get_input_embeddings().register_forward_hook(_make_output_require_grad)

    def disable_input_require_grads(self) -> None:
        """Remove what :meth:`enable_input_require_grads` added (transformers' ``disable_input_require_grads``)."""
        hook = self.__dict__.pop("_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            return
        disable = getattr(self.base_model, "disable_input_require_grads", None)
        if callable(disable):
            disable()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """transformers' ``resize_token_embeddings`` on the base model (new rows initialised as transformers does;
        tied output heads resized with them), then every captured signature is captured again for the new
        vocabulary and rewritten with the adapters as they are (their tensors kept). Returns the new embeddings.

        Refused (:class:`~fxpeft.errors.UnsupportedError`, before anything changes) while adapters are merged, and
        for an adapter with tensors shaped by the vocabulary (LoRA on the output head, a trained copy of the
        embeddings or head): resize the base model first, then ``transform`` it, as PEFT advises too."""
        resize = self._base_method("resize_token_embeddings")
        self._check_not_merged("resize_token_embeddings")
        self._check_vocabulary_sites()
        before = {id(parameter) for parameter in self.base_model.parameters()}
        embeddings = resize(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for parameter in self.base_model.parameters():
            if id(parameter) not in before:
                parameter.requires_grad_(False)  # the new tables are base tensors: frozen, as transform left the rest
        self._capture_again(self._signature_examples({}))
        return embeddings

    def _check_vocabulary_sites(self) -> None:
        """UnsupportedError naming the sites whose merge writes the embeddings or the output head (their tensors are
        shaped by the vocabulary, which a resize changes)."""
        resized = {id(module) for module in (self.get_input_embeddings(), self.get_output_embeddings())
                   if module is not None}
        tables = {f"{path}.{name}" for path, module in self.base_model.named_modules(remove_duplicate=False)
                  if id(module) in resized for name, _ in module.named_parameters(recurse=False)}
        found = sorted({f"{name}: {site.path}" for name, adapter in self.adapters.items()
                        for site in adapter.site_modules() if tables.intersection(merge_writes(site, self.base_model))})
        if found:
            raise UnsupportedError(
                f"resize_token_embeddings(): adapters have tensors shaped by the vocabulary ({found}), which a resize "
                "would not fit. Resize the base model first, then transform it (or load the adapter into it), as PEFT "
                "advises too.")

    # -- PEFT's names ---------------------------------------------------------------------------------------------
    def disable_adapter(self):
        """PEFT's context manager: inside it the model gives the base model's outputs (:meth:`disable_adapters`)."""
        return self.disable_adapters()

    def disable_adapter_layers(self) -> None:
        """PEFT's in-place switch: adapters off (the base model's outputs, bit for bit) until
        :meth:`enable_adapter_layers`. No recompile. Not for virtual-token adapters (part of the graph)."""
        self._check_gateable("disable_adapter_layers()")
        self._flags.set_enabled(False)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers` (PEFT's name)."""
        self._flags.set_enabled(True)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``: :meth:`merge` the adapters (default: the active ones) into the base weights.
        ``safe_merge``: check the merged weights for NaN and inf, and if any, put every weight back as it was and raise
        :class:`~fxpeft.errors.FxpeftError` (PEFT's ValueError), having merged nothing."""
        names = list(adapter_names) if adapter_names is not None else None
        if not safe_merge:
            self.merge(names)
            return
        sites = [site for name in (names if names is not None else self.active_adapters)
                 for site in self.adapters[name].site_modules()]
        written = sorted({path for site in sites for path in merge_writes(site, self.base_model)})
        before = {path: self.base_model.get_parameter(path).detach().clone() for path in written}
        self.merge(names)
        broken = [path for path in written if not torch.isfinite(self.base_model.get_parameter(path)).all()]
        if broken:
            self.unmerge()
            with torch.no_grad():
                for path, value in before.items():
                    self.base_model.get_parameter(path).copy_(value)
            raise FxpeftError(f"merge_adapter(safe_merge=True): merging would make {broken[:4]} NaN or inf, so nothing "
                              "was merged. The adapter's tensors are broken: check them (or its training) first.")

    def unmerge_adapter(self) -> None:
        """PEFT's ``unmerge_adapter``: :meth:`unmerge`."""
        self.unmerge()

    def unload(self) -> nn.Module:
        """PEFT's ``unload``: the base model itself, without the adapters and *without* merging them (merged adapters
        are unmerged first: PEFT would leave them merged in the weights). Its parameters stay frozen, as PEFT leaves
        them. This adapted model must not be used after."""
        if self.merged_adapters:
            self.unmerge()
        release(self)
        return self.base_model

    def save_pretrained(self, save_directory, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion=None,
                        **kwargs: Any) -> None:
        """PEFT's ``save_pretrained``: every adapter (or ``selected_adapters``) in PEFT's layout, ``"default"`` in
        ``save_directory`` and each other adapter in ``save_directory/<name>``, loadable by
        ``PeftModel.from_pretrained`` and :func:`fxpeft.load_adapter`; written by :meth:`save_adapter` (atomically:
        all or none). Nothing is written when ``is_main_process`` is False.

        Always safetensors (``safe_serialization=False`` warns: PEFT's and fxpeft's loaders read those first). The
        adapter's tensors are read from the model: a ``state_dict`` keyword (Trainer passes the whole model's) is not
        used. Base weights beside the adapter (``save_embedding_layers=True``) and PiSSA-style conversion are not
        supported."""
        if os.path.isfile(save_directory):
            raise AdapterSaveError(f"save_pretrained: {save_directory} is a file; give a folder (created if missing).")
        unknown = sorted(set(kwargs) - {"state_dict"})
        if unknown:
            raise UnsupportedError(f"save_pretrained() got {unknown}, which fxpeft does not take (it takes PEFT's "
                                   "safe_serialization, selected_adapters, save_embedding_layers, is_main_process).")
        if save_embedding_layers is True or path_initial_model_for_weight_conversion is not None:
            raise UnsupportedError("save_pretrained(): save_embedding_layers=True and "
                                   "path_initial_model_for_weight_conversion are not supported: fxpeft saves the "
                                   "adapter's own tensors only (resize the base model before loading into it).")
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        if not is_main_process:
            return
        if not safe_serialization:
            warnings.warn("save_pretrained(safe_serialization=False): fxpeft writes adapter_model.safetensors, which "
                          "PEFT's and fxpeft's loaders read first.", stacklevel=2)
        self.save_adapter(save_directory, names)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config: Any = None, subfolder: str | None = None, **kwargs: Any):
        """PEFT's ``PeftModel.from_pretrained(model, model_id)``: the adapter saved in the folder ``model_id`` (by
        fxpeft or PEFT; ``subfolder`` inside it) loaded into ``model`` (:func:`fxpeft.load_adapter`), frozen unless
        ``is_trainable``. ``example_inputs`` / ``example_kwargs`` go to ``load_adapter`` (models other than
        transformers'). There is no Hub here: ``model_id`` is a local folder.

        PEFT's other keywords are taken at their defaults only (``autocast_adapter_dtype=True``: fxpeft's adapter
        dtype is PEFT's autocast one); ``config`` (a config object instead of the folder's) is not supported."""
        if config is not None:
            raise UnsupportedError("from_pretrained(config=...): fxpeft reads the config from the adapter folder; "
                                   "leave config out.")
        passed = {key: kwargs.pop(key) for key in list(kwargs) if key in _FROM_PRETRAINED_FIXED}
        odd = sorted(key for key, value in passed.items() if value not in (_FROM_PRETRAINED_FIXED[key], None, {}))
        unknown = sorted(set(kwargs) - {"example_inputs", "example_kwargs"})
        if odd or unknown:
            raise UnsupportedError(
                f"from_pretrained(): {odd + unknown} not supported; fxpeft takes adapter_name, is_trainable, "
                f"subfolder, example_inputs and example_kwargs, and PEFT's {sorted(_FROM_PRETRAINED_FIXED)} at their "
                "defaults.")
        directory = os.path.join(model_id, subfolder) if subfolder else model_id
        if not os.path.isdir(directory):
            raise AdapterLoadError(f"from_pretrained: {directory} is not a folder. fxpeft loads adapters from local "
                                   "folders (it does not download from the Hugging Face Hub).")
        return fxpeft.load_adapter(model, directory, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
