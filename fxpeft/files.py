"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes go to a temporary folder that is renamed into place, so a failure never leaves a half-written
adapter. Reads validate every key and shape before any tensor is touched. Nothing is ever unpickled: a
legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdapterLoadError, AdapterSaveError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "save_adapter", "read_adapter",
           "check_state_fits", "check_same_structure"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh folder beside ``target``, then put its files in place.

    A new ``target`` appears whole (one rename) or not at all. Into an existing folder the files are moved
    one by one, weights before config, and a failure puts the previous files back; unrelated files (a
    README) are kept. Any failure is an :class:`AdapterSaveError` and leaves no staging folder behind.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterSaveError(f"Cannot save the adapter to {target}: it is a file; pass a folder path.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        raise AdapterSaveError(f"Could not create the adapter folder {target}: {error}") from error
    try:
        write(staging)
        if target.exists():
            _replace_files(staging, target)
        else:
            os.replace(staging, target)
    except AdapterSaveError:
        raise
    except (OSError, SafetensorError) as error:  # safetensors reports I/O failures as SafetensorError
        raise AdapterSaveError(f"Could not write the adapter to {target}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_files(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into the existing folder ``target``; undo all of it on failure."""
    names = sorted((item.name for item in staging.iterdir()), key=lambda name: name == CONFIG_NAME)
    blocked = [name for name in names if (target / name).exists() and not (target / name).is_file()]
    if blocked:
        raise AdapterSaveError(f"Cannot save the adapter to {target}: it has folders named {blocked}.")
    backup = Path(tempfile.mkdtemp(prefix=".previous-", dir=staging))
    started: list[str] = []
    try:
        for name in names:
            if (target / name).exists():
                os.replace(target / name, backup / name)
            started.append(name)  # from here on target/name is absent or the new file
            os.replace(staging / name, target / name)
    except OSError:
        for name in reversed(started):
            if not (staging / name).exists():  # it was moved in: take it out again
                os.remove(target / name)
            if (backup / name).exists():
                os.replace(backup / name, target / name)
        raise


def save_adapter(adapted, directory, adapter_name: str) -> None:
    """Write one adapter of ``adapted`` in PEFT's layout (see the module docstring)."""
    from .peft_config import to_peft_config

    adapter = adapted.adapters[adapter_name]
    conv1d = any(getattr(site, "fan_in_fan_out", False) for site in adapter.site_modules())
    config = to_peft_config(adapted.base_model, adapter.rules, adapter.selected, conv1d)
    tensors = adapted.adapter_state_dict(adapter_name)
    on_meta = sorted(key for key, value in tensors.items() if value.device.type == "meta")
    if on_meta:
        raise AdapterSaveError(f"The adapter {adapter_name!r} has tensors on the meta device ({on_meta[:3]}...): "
                               "give the model real weights first (AdaptedModel.load_base_model), then save.")
    state = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    _write_atomically(Path(directory), write)


def read_adapter(directory) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an adapter folder; clear errors for missing, truncated or corrupt files."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterLoadError(f"{directory} has no {CONFIG_NAME}; is it an adapter folder saved by fxpeft or PEFT?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_path} holds a JSON {type(config).__name__}, not an adapter config object.")
    weights = directory / WEIGHTS_NAME
    legacy = directory / LEGACY_WEIGHTS_NAME
    try:
        if weights.is_file():
            state = load_file(str(weights))
        elif legacy.is_file():
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        else:
            raise AdapterLoadError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")
    except pickle.UnpicklingError as error:
        raise AdapterLoadError(f"{legacy} holds more than tensors (objects that would run code when unpickled); "
                               "fxpeft reads it with torch.load(weights_only=True) and refused it. Convert it to "
                               f"{WEIGHTS_NAME} where it was made, if you trust it.") from error
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        if isinstance(error, AdapterLoadError):
            raise
        raise AdapterLoadError(f"Could not read the adapter weights in {directory}: the file is truncated or "
                               f"corrupt ({type(error).__name__}: {error}). Save the adapter again.") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterLoadError(f"The adapter weights in {directory} are not a flat mapping of names to tensors.")
    return config, state


def check_state_fits(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`AdapterLoadError` naming every missing, unexpected or mis-shaped key."""
    problems = []
    for key in sorted(set(expected) - set(state)):
        problems.append(f"missing {key} (expected shape {list(expected[key])})")
    for key in sorted(set(state) - set(expected)):
        problems.append(f"unexpected {key} (shape {list(state[key].shape)})")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key]):
            problems.append(f"shape mismatch at {key}: file has {list(state[key].shape)}, "
                            f"the model needs {list(expected[key])}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterLoadError(f"The adapter in {where} does not fit this base model:\n  {shown}\n"
                               "Load it into the base model it was trained on.", mismatches=problems)


def check_same_structure(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Raise :class:`AdapterLoadError` if ``new`` lacks a parameter of ``old`` or has it in another shape."""
    expected = {name: tuple(p.shape) for name, p in old.named_parameters()}
    check_state_fits(expected, dict(new.named_parameters()), f"the replacement {type(new).__name__}")
