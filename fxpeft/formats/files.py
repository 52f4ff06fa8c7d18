"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Several adapters are saved as PEFT's ``save_pretrained`` saves them: the one named ``default`` in the folder
itself, every other one in a sub-folder named after it (``out/other/adapter_config.json``).

Writes go to a temporary folder that is renamed into place, so a failure never leaves a half-written
adapter. Reads validate every key and shape before any tensor is touched. Nothing is ever unpickled: a
legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fxpeft.errors import AdapterLoadError, AdapterSaveError, FxpeftError
from fxpeft.formats.peft import adapter_files

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "DEFAULT_ADAPTER", "save_adapter", "read_adapter",
           "check_state_fits", "check_same_structure"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"  # PEFT saves this adapter in the folder itself, the others in sub-folders


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh folder beside ``target``, then put its files in place.

    A new ``target`` appears whole (one rename) or not at all, with the mode a plain ``mkdir`` gives (the
    staging folder is made private by ``mkdtemp``; PEFT's folders are ``0777 & ~umask``). Into an existing
    folder the files are moved one by one, sub-folders first and each folder's config last, and a failure
    puts the previous files back; unrelated files (a README) are kept. Any failure is an
    :class:`AdapterSaveError` and leaves no staging folder behind.
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
        os.chmod(staging, 0o777 & ~_umask())
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


def _entries(folder: Path) -> list[Path]:
    """A folder's entries in the order they are moved: sub-folders, then files, the config last."""
    return sorted(folder.iterdir(), key=lambda item: (item.is_file(), item.name == CONFIG_NAME, item.name))


def _blocked(staging: Path, target: Path, root: Path) -> list[str]:
    """Entries of ``staging`` whose place in ``target`` holds the other kind (a folder for a file, or back)."""
    found = []
    for item in _entries(staging):
        there = target / item.name
        if item.is_dir() and there.is_dir():
            found += _blocked(item, there, root)
        elif there.exists() and item.is_dir() != there.is_dir():
            found.append(str(there.relative_to(root)))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.remove(path)


def _move_into(staging: Path, target: Path, backup: Path, undo: list[Callable[[], None]]) -> None:
    for item in _entries(staging):
        if item == backup:
            continue
        there = target / item.name
        if item.is_dir() and there.is_dir():
            _move_into(item, there, backup, undo)
            continue
        if there.exists() or there.is_symlink():
            kept = backup / str(len(undo))
            os.replace(there, kept)
            undo.append(functools.partial(os.replace, kept, there))
        os.replace(item, there)
        undo.append(functools.partial(_remove, there))


def _replace_files(staging: Path, target: Path) -> None:
    """Move every entry of ``staging`` into the existing folder ``target`` (sub-folders merged the same way);
    undo all of it on failure."""
    blocked = _blocked(staging, target, target)
    if blocked:
        raise AdapterSaveError(f"Cannot save the adapter to {target}: it has folders named {blocked} where files "
                               "go (or files where folders go); move them away first.")
    backup = Path(tempfile.mkdtemp(prefix=".previous-", dir=staging))
    undo: list[Callable[[], None]] = []
    try:
        _move_into(staging, target, backup, undo)
    except OSError:
        for step in reversed(undo):
            step()
        raise


def save_adapter(adapted, directory, adapter_name: str | Sequence[str]) -> None:
    """Write adapters of ``adapted`` in PEFT's layout, atomically (see the module docstring).

    ``adapter_name`` a string: that adapter, in ``directory`` itself. A list: PEFT's ``save_pretrained``
    layout, ``"default"`` in ``directory`` and every other adapter in ``directory/<name>``; all of them are
    written, or none."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(dict.fromkeys(adapter_name))
    unknown = [name for name in names if name not in adapted.adapters]
    if unknown or not names:
        raise FxpeftError(f"Cannot save adapter(s) {unknown or names}: known adapters are {list(adapted.adapters)}.")
    single = isinstance(adapter_name, str)
    files = {("" if single or name == DEFAULT_ADAPTER else name): adapter_files(adapted, name) for name in names}

    def write(folder: Path) -> None:
        for sub, (config, state) in files.items():
            place = folder / sub if sub else folder
            place.mkdir(exist_ok=True)
            save_file(state, str(place / WEIGHTS_NAME), metadata={"format": "pt"})
            # Top-level keys sorted as PEFT writes them; but not inside rank_pattern / alpha_pattern, where the
            # first matching key wins (PEFT's sort_keys=True would change which one that is).
            (place / CONFIG_NAME).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")

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
