"""The adapted model's adapter files: its adapters' tensors under PEFT's keys, saving them in PEFT's layout and
loading a saved adapter (by fxpeft or PEFT) as a new adapter or into an existing one. A mixin of
:class:`fxpeft.model.AdaptedModel`, which provides ``adapters``, ``add_adapter``, ``delete_adapter`` and the training
state these methods keep in step."""

from __future__ import annotations

from typing import Sequence

import torch

from fxpeft.adapters import Adapter
from fxpeft.errors import AdapterLoadError, NoMatchError
from fxpeft.formats.diffusers import is_diffusers_lora, read_diffusers_lora, save_adapter_as
from fxpeft.formats.files import check_state_fits, read_adapter, save_adapter
from fxpeft.formats.peft import rules_and_state, without_base_layers
from fxpeft.rules import Rule

__all__ = ["AdapterFileMethods"]


class AdapterFileMethods:
    """``adapter_state_dict``, ``save_adapter``, ``load_adapter`` of :class:`fxpeft.model.AdaptedModel`."""

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, keyed exactly as PEFT saves them (``base_model.model.<path>...``)."""
        adapter = self.adapters[adapter_name or self.active_adapter]
        return {key: value.detach() for key, value in adapter.peft_state_dict().items()}

    def save_adapter(self, directory, adapter_name: str | Sequence[str] | None = None, *, format: str = "peft",
                     component: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout), atomically.

        One name (default: the active adapter) is written in ``directory`` itself. A list is written as PEFT's
        ``save_pretrained`` writes several adapters: ``"default"`` in ``directory``, each other adapter in
        ``directory/<name>``; all of them or, on an error, none. Example::

            adapted.save_adapter("out", ["default", "other"])
            theirs = peft.PeftModel.from_pretrained(base, "out")
            theirs.load_adapter("out/other", adapter_name="other")

        ``format="diffusers"`` (or ``"kohya"``): one adapter as the pipeline ``component``'s (``"unet"``,
        ``"text_encoder"``; default from the base model) ``pytorch_lora_weights.safetensors``, which diffusers'
        ``pipeline.load_lora_weights(directory)`` reads (fxpeft/formats/diffusers.py).
        """
        if format != "peft":
            save_adapter_as(self, directory, adapter_name or self.active_adapter, format, component)
            return
        save_adapter(self, directory, adapter_name or self.active_adapter)

    def load_adapter(self, directory, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` (by fxpeft or PEFT; or a diffusers/Kohya LoRA file, as
        :func:`fxpeft.load_adapter` reads it) as ``adapter_name``, inactive until
        :meth:`set_adapter`; or, for an existing adapter of that name and shapes, load the new tensors into it
        in place (a compiled model does not recompile). After :meth:`prepare_hotswap`, a new name takes a free slot and
        an existing one's slot takes the file's tensors of any rank up to ``max_rank`` (nothing recompiles). Keys and
        shapes are checked first: a mismatch is an
        :class:`~fxpeft.errors.AdapterLoadError` naming every mismatched key, and nothing changes."""
        self._check_not_merged("load_adapter")
        if is_diffusers_lora(directory):  # diffusers' or Kohya's LoRA file (fxpeft/formats/diffusers.py)
            rules, state = read_diffusers_lora(directory, self.base_model)
        else:
            config, state = read_adapter(directory)
            rules, state = rules_and_state(config, state, str(directory))
        if self._hotswap is not None:  # into a slot, no graph change (fxpeft/runtime/hotswap.py)
            self._hotswap_put(adapter_name, rules, state, str(directory), is_trainable)
            return
        if adapter_name in self.adapters:
            self._load_in_place(self.adapters[adapter_name], rules, state, str(directory), is_trainable)
            return
        try:
            self.add_adapter(adapter_name, rules)
        except NoMatchError as error:
            raise AdapterLoadError(f"The adapter in {directory} targets modules this base model does not have: "
                                   f"{error}", mismatches=error.candidates) from error
        adapter = self.adapters[adapter_name]
        try:
            state = without_base_layers(state, adapter.peft_keys(), self.base_model, str(directory))
            check_state_fits(adapter.peft_keys(), state, str(directory))
        except AdapterLoadError:
            self.delete_adapter(adapter_name)
            raise
        adapter.load_peft_state_dict(state, str(directory))
        adapter.frozen = not is_trainable
        self._sync_trainable()

    def _load_in_place(self, adapter: Adapter, rules: list[Rule], state, where: str, is_trainable: bool) -> None:
        """New tensors and hyper-parameters into an existing adapter: the graph stays (so a compiled model does
        not recompile) unless a site says its new hyper-parameters change the graph (LoRA's dropout)."""
        state = without_base_layers(state, adapter.peft_keys(), self.base_model, where)
        try:
            check_state_fits(adapter.peft_keys(), state, where)
        except AdapterLoadError as error:
            raise AdapterLoadError(f"{error}\nAn adapter with this name exists in another shape: delete_adapter() "
                                   "it first, or load the folder under another name.",
                                   mismatches=error.mismatches) from None
        rebuild = False
        for site in adapter.site_modules():  # the file's hyper-parameters, in place (LoRA: scaling is a tensor)
            rebuild = site.reload(rules) or rebuild
        adapter.load_peft_state_dict(state, where)
        # The file's rules replace the adapter's (they select the same sites: the keys fit), so that saving writes
        # the file's config back; each new rule takes over the sites its old counterpart of that type selected.
        selected = {}
        for rule in rules:
            old = [r for r in adapter.rules if type(r) is type(rule)]
            selected[rule] = [path for r in old for path in adapter.selected.get(r, [])]
        adapter.rules, adapter.selected = list(rules), selected
        adapter.frozen = not is_trainable
        if adapter.frozen:
            adapter.requires_grad_(False)
        elif self.training:
            self._sync_trainable()
        if rebuild:
            self._rebuild()
