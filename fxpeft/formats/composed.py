"""The files of one adapter, as PEFT folders: one folder per method, for an adapter that composes two.

PEFT keeps one method per adapter folder (``adapter_config.json`` has one ``peft_type``), and no PEFT model runs a
prompt-learning adapter beside LoRA (``PeftMixedModel`` mixes LoRA-like tuners only). So an fxpeft adapter that
holds LoRA and a virtual-token method (PromptTuning, PTuning or PrefixTuning) is saved as two PEFT adapters, the
way PEFT's ``save_pretrained`` writes several (:func:`saved_parts`)::

    out/adapter_config.json, adapter_model.safetensors          the main part: LoRA (and modules_to_save)
    out/<tag>/adapter_config.json, adapter_model.safetensors    the virtual tokens; <tag> is the method's tag:
                                                                prompt_tuning, p_tuning or prefix_tuning

PEFT loads either folder as the plain adapter it is (``PeftModel.from_pretrained(model, "out")`` for LoRA,
``"out/prefix_tuning"`` for the prefix), not both in one model. The main part's weights file names its parts in its
safetensors metadata (``PARTS``: a JSON list of sub-folder names), which PEFT does not read;
:func:`fxpeft.formats.files.read_adapter` reads them back into one adapter (:func:`join_parts`).

Which part is which: the main part is the method that is not a virtual-token one (its codec is not a
:class:`~fxpeft.formats.prompt_learning.VirtualTokenCodec`), with every rule that has no PEFT format of its own
(Trainable: ``modules_to_save``); the virtual-token method's part holds its own rules. A site module belongs to the
method whose module (or package) defines its class; the others (trained copies) to the main part. Any other mix (two
virtual-token methods, two methods that are not) cannot be written as PEFT folders that fxpeft reads back as one
adapter, and is an :class:`~fxpeft.errors.UnsupportedError` before anything is written.

Every adapter, composed or not, also gets what a virtual-token folder needs for PEFT's task class: the task head's
tensors (:func:`fxpeft.formats.prompt_learning.head_copies`), named in its metadata under ``HEAD_COPIES``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from fxpeft.errors import AdapterLoadError, AdapterSaveError, FxpeftError, UnsupportedError
from fxpeft.formats.peft import MAX_LIST_ENTRIES, adapter_files, rules_and_state, str_field
from fxpeft.formats.prompt_learning import COMPOSED_RULES, HEAD_COPIES, PROMPT_KEY, VirtualTokenCodec, head_copies
from fxpeft.methods import Method, codec_for_peft_type, method_for, saved_rules

__all__ = ["PARTS", "SavedPart", "saved_parts", "planned_folders", "replaced_parts", "part_folders", "listed_keys",
           "without_head_copies", "join_parts", "read_parts"]

PARTS = "fxpeft_parts"  # safetensors metadata of the main part: the sub-folders of the adapter's other parts
_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a part's folder: one plain name, never a path


@dataclasses.dataclass
class SavedPart:
    """One PEFT folder of an adapter: ``folder`` relative to the adapter's own ("" for the adapter's folder itself),
    its config, its tensors (CPU, keyed as the file holds them) and the safetensors metadata fxpeft adds."""

    folder: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _is_virtual(method: Method) -> bool:
    return isinstance(method.codec, VirtualTokenCodec)


def _owner(site, methods: list[Method]) -> Method | None:
    """The method whose module (or package) defines ``site``'s class, if one of ``methods``."""
    module = type(site).__module__
    for method in methods:
        home = type(method).__module__
        if module == home or module.startswith(home + "."):
            return method
    return None


def _with_heads(model: torch.nn.Module, part: SavedPart, state: dict[str, torch.Tensor]) -> SavedPart:
    """``part`` plus the task-head tensors PEFT's class needs in a virtual-token folder (none for other folders)."""
    if not isinstance(codec_for_peft_type(part.config.get("peft_type") or "LORA"), VirtualTokenCodec):
        return part
    copies = {key: value for key, value in head_copies(model, part.config, state).items() if key not in part.tensors}
    if copies:
        part.tensors.update(copies)
        part.metadata[HEAD_COPIES] = json.dumps(sorted(copies))
    return part


def _cpu(tensors: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    on_meta = sorted(key for key, value in tensors.items() if value.device.type == "meta")
    if on_meta:
        raise AdapterSaveError(f"The adapter {adapter_name!r} has tensors on the meta device ({on_meta[:3]}...): "
                               "give the model real weights first (AdaptedModel.load_base_model), then save.")
    return {key: value.detach().contiguous().cpu() for key, value in tensors.items()}


def saved_parts(adapted, adapter_name: str) -> list[SavedPart]:
    """The PEFT folders adapter ``adapter_name`` of ``adapted`` is saved as: one, or two for LoRA beside a
    virtual-token method (the module docstring). Everything is checked before anything is written."""
    adapter = adapted.adapters[adapter_name]
    rules = saved_rules(adapter.rules)
    state = adapted.adapter_state_dict(adapter_name)
    methods = list(dict.fromkeys(method for method in map(method_for, rules) if method.codec is not None))
    if len(methods) <= 1:
        config, tensors = adapter_files(adapted, adapter_name)
        return [_with_heads(adapted.base_model, SavedPart("", config, tensors, {}), state)]
    virtual = [method for method in methods if _is_virtual(method)]
    if len(methods) != 2 or len(virtual) != 1:
        raise UnsupportedError(
            f"The adapter {adapter_name!r} holds {sorted(method.name for method in methods)}. An adapter saves in "
            "PEFT's format with one method, or with LoRA (or another method that is not a virtual-token one) beside "
            "one virtual-token method (PromptTuning, PTuning or PrefixTuning), each in its own PEFT folder. Keep one "
            "virtual-token rule in this adapter; for another, transform a separate copy of the base model.")
    extra, main = virtual[0], next(method for method in methods if method is not virtual[0])
    parts = []
    for method, folder in ((main, ""), (extra, extra.tag)):
        own = [rule for rule in rules if (method_for(rule) is extra) == (method is extra)]
        keys = {key for site in adapter.site_modules() if (_owner(site, methods) is extra) == (method is extra)
                for key in site.peft_keys()}
        config = method.codec.to_config(adapted.base_model, own, adapter.selected, adapter)
        tensors = method.codec.state_to_file({key: value for key, value in state.items() if key in keys})
        parts.append(_with_heads(adapted.base_model, SavedPart(folder, config, _cpu(tensors, adapter_name), {}),
                                 state))
    if PROMPT_KEY not in parts[1].tensors or PROMPT_KEY in parts[0].tensors:
        raise UnsupportedError(f"The adapter {adapter_name!r}: the site modules of {extra.name} are not defined in "
                               f"the module of its method ({type(extra).__module__}), so fxpeft cannot tell its "
                               "tensors from the other method's; define them there to save this adapter.")
    parts[0].metadata[PARTS] = json.dumps([extra.tag])
    return parts


def planned_folders(adapted, places: dict[str, str], directory: Path) -> dict[str, tuple[str, SavedPart]]:
    """Every folder a save of the adapters ``places`` names (adapter name -> its folder under ``directory``, ""
    for ``directory`` itself) writes: folder -> (adapter name, part). AdapterSaveError when two would share one."""
    files: dict[str, tuple[str, SavedPart]] = {}
    for name, place in places.items():
        for part in saved_parts(adapted, name):
            sub = "/".join(item for item in (place, part.folder) if item)
            if sub in files:
                raise AdapterSaveError(
                    f"Cannot save adapters {files[sub][0]!r} and {name!r} together: both would be written to "
                    f"{directory / sub} (a composed adapter keeps its second method in a sub-folder named after the "
                    "method's tag). Rename the adapter, or save them to separate folders.")
            files[sub] = name, part
    return files


def replaced_parts(target: Path, places: dict[str, str], files: dict[str, tuple[str, SavedPart]],
                   weights_name: str) -> frozenset[Path]:
    """The part folders (relative to ``target``) of the composed adapters a save of ``files`` replaces, which the
    save must not carry over; AdapterSaveError when a new part's folder holds something else (another adapter)."""
    old = {Path(place) / folder for place in set(places.values())
           for folder in _old_parts(target / place / weights_name)}
    for sub, (name, part) in files.items():
        if part.folder and Path(sub) not in old and os.path.lexists(target / sub):
            raise AdapterSaveError(
                f"Cannot save the adapter {name!r} to {target}: its {part.config.get('peft_type')} part goes in "
                f"{target / sub}, which holds something else (another adapter saved there?). Move it away, or save "
                "to another folder.")
    return frozenset(old)


def _old_parts(weights: Path) -> list[str]:
    """The part folders an existing weights file names (none when it cannot be read: nothing is dropped then)."""
    try:
        with safe_open(str(weights), "pt") as file:
            return part_folders(file.metadata(), str(weights))
    except (OSError, SafetensorError, FxpeftError):
        return []


def listed_keys(metadata: dict[str, str] | None, name: str, where: str, limit: int = MAX_LIST_ENTRIES) -> list[str]:
    """The JSON list of strings under ``name`` in a weights file's metadata (``where`` names the file), at most
    ``limit`` of them; [] when absent; AdapterLoadError when it is something else (a file from a stranger)."""
    text = (metadata or {}).get(name)
    if text is None:
        return []
    try:
        value = json.loads(text) if len(text) <= 1 << 20 else None
    except ValueError:
        value = None
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(item, str) for item in value):
        raise AdapterLoadError(f"{where}: the metadata entry {name!r} must be a JSON list of at most {limit} "
                               "strings; the file was not written by fxpeft or was changed since. Save the adapter "
                               "again.")
    return value


def part_folders(metadata: dict[str, str] | None, where: str) -> list[str]:
    """The sub-folders of a composed adapter's other parts, named in the main part's weights metadata (``PARTS``),
    each a plain folder name (never a path)."""
    folders = listed_keys(metadata, PARTS, where, limit=8)
    bad = [folder for folder in folders if not _FOLDER.fullmatch(folder)]
    if bad:
        raise AdapterLoadError(f"{where}: the metadata entry {PARTS!r} names {bad}, which are not plain folder names "
                               "(letters, digits, '_' and '-'); the file was changed since fxpeft wrote it. Save the "
                               "adapter again.")
    return folders


def without_head_copies(state: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                        where: str) -> dict[str, torch.Tensor]:
    """``state`` without the head tensors its weights file wrote only for PEFT's task class (``HEAD_COPIES``)."""
    copies = listed_keys(metadata, HEAD_COPIES, where)
    missing = sorted(set(copies) - set(state))
    if missing:
        raise AdapterLoadError(f"{where}: its metadata names head tensors {missing[:5]} that the file does not hold; "
                               "the file was changed since it was saved. Save the adapter again.")
    return {key: value for key, value in state.items() if key not in copies}


def read_parts(directory: Path, read_one: Callable[[Path], tuple[dict, dict, dict | None]], where: str
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of the adapter in ``directory``, with the parts its weights metadata names joined in
    (:func:`join_parts`); ``read_one(folder)`` reads one folder's (config, tensors, metadata), ``where`` names the
    weights file."""
    config, state, metadata = read_one(directory)
    folders = part_folders(metadata, where)
    if not folders:
        return config, state
    parts = [(config, state, where)]
    for folder in folders:
        try:
            part_config, part_state, part_metadata = read_one(directory / folder)
        except AdapterLoadError as error:
            raise AdapterLoadError(f"{where} names {folder!r}, a part of this adapter kept in that sub-folder, which "
                                   f"cannot be read: {error} Copy the whole adapter folder, sub-folders included, or "
                                   "save the adapter again.") from error
        if part_folders(part_metadata, str(directory / folder)):
            raise AdapterLoadError(f"{directory / folder} names parts of its own; an adapter's parts are one level "
                                   "deep. Save the adapter again.")
        parts.append((part_config, part_state, str(directory / folder)))
    return join_parts(parts)


def join_parts(parts: list[tuple[dict[str, Any], dict[str, torch.Tensor], str]]) -> tuple[dict, dict]:
    """The config and tensors of one adapter read from its PEFT folders (``(config, tensors, where)`` each, as the
    files hold them), as :func:`fxpeft.formats.peft.rules_and_state` reads one adapter: the virtual-token part's
    config, carrying the other part's rules (``COMPOSED_RULES``), and every part's tensors keyed for its codec.
    Each part is checked on its own first, by its own codec; AdapterLoadError names the file at fault."""
    if len(parts) != 2:
        raise AdapterLoadError(f"{parts[0][2]}: a composed adapter has two parts, its weights metadata names "
                               f"{len(parts) - 1} more; save the adapter again.")
    decoded = []
    for config, tensors, where in parts:
        rules, state = rules_and_state(config, tensors, where)
        decoded.append((config, rules, state, where,
                        codec_for_peft_type(str_field(config, "peft_type", "LORA") or "LORA")))
    carriers = [item for item in decoded if isinstance(item[4], VirtualTokenCodec)]
    if len(carriers) != 1:
        kinds = [item[4].peft_types[0] for item in decoded]
        raise AdapterLoadError(f"{parts[0][2]} and its part {parts[1][2]}: a composed adapter is one virtual-token "
                               f"adapter and one of another method, these are {kinds}; save the adapter again.")
    carrier = carriers[0]
    other = next(item for item in decoded if item is not carrier)
    shared = sorted(set(carrier[2]) & set(other[2]))
    if shared:
        raise AdapterLoadError(f"{carrier[3]} and {other[3]} both hold {shared[:5]}: the parts of one adapter hold "
                               "different tensors; save the adapter again.")
    config = {**carrier[0], COMPOSED_RULES: tuple(other[1])}
    return config, carrier[4].state_to_file({**other[2], **carrier[2]})
