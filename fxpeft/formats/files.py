"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Several adapters are saved as PEFT's ``save_pretrained`` saves them: the one named ``default`` in the folder
itself, every other one in a sub-folder named after it (``out/other/adapter_config.json``). An adapter of LoRA and a
virtual-token method is two PEFT adapters, the second in a sub-folder of the first named after its method
(``out/prefix_tuning/``), listed in the first's weights metadata (:mod:`fxpeft.formats.composed`);
:func:`read_adapter` reads both back as one adapter. Head tensors a virtual-token folder holds only for PEFT's task
class (:func:`fxpeft.formats.prompt_learning.head_copies`, named in its metadata) are left out when it is read.

Reads validate every key and shape before any tensor is touched. Nothing is ever unpickled: a legacy
``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.

Crash-safe saving
-----------------
A save replaces the whole folder at once, so that a process killed at any instant (or a failed write: a full
disk, a read-only folder) leaves the folder as the whole old adapter(s) or the whole new one(s), never a mix
and never nothing. For a save to ``out`` (staging names carry 8 random characters ``X``):

1. **Recover** (the rule below), then create ``.out.fxpeft-save-X`` beside ``out`` and hold an exclusive
   ``flock`` on it while the save runs (that lock is how later saves tell a live save from a killed one).
2. **Write** the complete new folder there: each adapter's config and weights (sub-folders for several
   adapters and for the parts of a composed adapter), plus every entry of the old ``out`` that the save does not
   replace (a README, adapters in other sub-folders; not the parts of a composed adapter it replaces), as hard
   links (copies where a link is impossible), in folders with the old folders' modes. A new ``out`` gets the mode
   a plain ``mkdir`` gives. ``fsync`` every new file and every folder.
3. **Commit** with one atomic step: ``renameat2(RENAME_EXCHANGE)`` on Linux (``renamex_np(RENAME_SWAP)`` on
   macOS) swaps the two folders; a new ``out`` is a plain ``rename``. ``fsync`` the parent folder. Before this
   step every path under ``out`` is the old adapter, after it the new one.
4. **Delete** the old folder, which the swap left at the staging name.

Where the filesystem cannot exchange (NFS, FAT, some FUSE filesystems), step 3 is two renames: ``out`` to
``.out.fxpeft-old-X`` (locked by the save), then the staging folder to ``out``; the old folder is then renamed
to the staging name before it is deleted, so a ``fxpeft-old`` folder is always a whole old adapter.

**Recovery rule** (run at the start of every save, and by :func:`read_adapter` when a folder has no config):
if ``out`` does not exist and a ``.out.fxpeft-old-X`` that no live save holds does, a two-step commit was
interrupted between its renames: rename it back to ``out`` (roll back). Every other ``.out.fxpeft-save-X`` or
``.out.fxpeft-old-X`` that no live save holds is left over from a killed save and is deleted.

**What PEFT sees** (it runs none of this): the folder is always plain PEFT files. With the atomic exchange
there is no window at all: at every instant ``out`` is the whole old or the whole new folder. With the
two-step commit, a process killed exactly between the two renames leaves no ``out`` (PEFT's load fails: the
path does not exist, so it takes it for a Hub id; it never loads a mix) until the next fxpeft save or load of
that folder rolls it back. A reader
that runs *while* a save commits may open the config of one version and the weights of the other (PEFT opens
them by path, one after the other): do not load a folder while it is being saved to. :func:`read_adapter`
checks that the folder is the same before and after reading, and reads again if it is not.

Other effects of replacing the folder: a folder this user may not write is refused (as writing files into it
would be); the new folder belongs to the user who saves; a process whose current
directory is inside the old folder (other than this one, which is moved along) is left in a deleted folder;
files added to the old folder while a save runs are not carried over; a folder that is a mount point cannot
be replaced (save into a folder inside it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fxpeft.errors import AdapterLoadError, AdapterSaveError, FxpeftError
from fxpeft.formats.composed import planned_folders, read_parts, replaced_parts, without_head_copies
from fxpeft.formats.peft import read_config, rules_and_state

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): every leftover counts as one of a killed save
    fcntl = None

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "DEFAULT_ADAPTER", "save_adapter", "read_adapter",
           "check_state_fits", "check_same_structure"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"  # PEFT saves this adapter in the folder itself, the others in sub-folders

_SAVE, _OLD = "fxpeft-save", "fxpeft-old"  # staging names: .<name>.fxpeft-save-XXXXXXXX, .<name>.fxpeft-old-XXXXXXXX
_CANNOT_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276}  # syscall numbers, for a libc without the wrapper
_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2
_RECOVERY_WAIT_S = 10.0  # how long recovery waits for a live save that is between the two renames of a commit


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


# -- primitives: the atomic exchange, locks, fsync ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _swap_function() -> Callable[[bytes, bytes], int] | None:
    """The C library's atomic exchange of two paths (returns 0, or -1 with errno set), or None where none exists."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        swap = libc.renamex_np
        swap.argtypes, swap.restype = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int
        return lambda a, b: swap(a, b, _RENAME_SWAP)
    if not sys.platform.startswith("linux"):
        return None
    if hasattr(libc, "renameat2"):
        exchange = libc.renameat2
        exchange.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        exchange.restype = ctypes.c_int
        return lambda a, b: exchange(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    number = _RENAMEAT2.get(os.uname().machine)
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b: syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                                ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(_RENAME_EXCHANGE))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at ``a`` and ``b`` in one atomic step; False where this system or filesystem cannot."""
    swap = _swap_function()
    if swap is None:
        return False
    if swap(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; None if a live save holds it, or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # a filesystem without locks: live and killed saves cannot be told apart
            pass
    return fd


def _fsync(path: Path, folder: bool = False) -> None:
    """Flush ``path`` to disk. For a folder (its entries), filesystems that cannot are skipped, as SQLite does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if not folder or error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


# -- recovery and leftovers of killed saves ----------------------------------------------------------------------
def _leftovers(target: Path) -> dict[str, list[Path]]:
    """The staging folders beside ``target``, by kind (``_SAVE``, ``_OLD``)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({_SAVE}|{_OLD})-[a-z0-9_]{{8}}")
    found: dict[str, list[Path]] = {_SAVE: [], _OLD: []}
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return found
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found[match[1]].append(target.parent / name)
    return found


def _recover(target: Path) -> Path:
    """The recovery rule's first half: where ``target`` is missing and a killed two-step commit left the old
    folder, rename it back. Returns the folder to read: ``target``, or the old folder where it cannot be renamed.
    Waits (up to ``_RECOVERY_WAIT_S``) for a live save that is between its two renames."""
    deadline = time.monotonic() + _RECOVERY_WAIT_S
    while not os.path.lexists(target):
        olds = _leftovers(target)[_OLD]
        for old in olds:
            fd = _try_lock(old)
            if fd is None:
                continue  # a live save holds it (it will rename a new folder into place), or it is gone
            try:
                if os.path.lexists(target):
                    break
                try:
                    os.rename(old, target)
                except OSError:
                    return old  # no right to rename it here: read it where it is
                _fsync(target.parent, folder=True)
                return target
            finally:
                os.close(fd)
        if not olds or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return target


def _clean(target: Path) -> None:
    """The recovery rule: roll back an interrupted commit, then delete every leftover no live save holds."""
    _recover(target)
    found = _leftovers(target)
    for leftover in found[_SAVE] + (found[_OLD] if os.path.lexists(target) else []):
        fd = _try_lock(leftover)
        if fd is not None:
            try:
                shutil.rmtree(leftover, ignore_errors=True)
            finally:
                os.close(fd)


def _new_staging(target: Path) -> tuple[Path, int]:
    """A fresh staging folder beside ``target`` and the descriptor holding its lock."""
    for _ in range(5):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_SAVE}-", dir=target.parent))
        fd = _try_lock(staging)
        if fd is not None and os.fstat(fd).st_nlink > 0:
            return staging, fd
        if fd is not None:  # another save's clean-up took it between mkdtemp and the lock
            os.close(fd)
    raise AdapterSaveError(f"Could not create a staging folder beside {target}: other saves keep removing it; "
                           "save once no other process is saving to that folder.")


# -- building the new folder and committing it -------------------------------------------------------------------
def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _blocked(new: Path, old: Path, root: Path) -> list[str]:
    """Entries of ``new`` whose place in ``old`` holds the other kind (a folder for a file, or back)."""
    found = []
    for item in sorted(new.iterdir()):
        there = old / item.name
        if not os.path.lexists(there):
            continue
        if _is_folder(item) and _is_folder(there):
            found += _blocked(item, there, root)
        elif _is_folder(item) != _is_folder(there):
            found.append(str(there.relative_to(root)))
    return found


def _link_or_copy(source, destination, copied: list[Path]):
    """Hard-link ``source`` at ``destination`` (a copy where links are impossible, noted in ``copied``)."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except (OSError, NotImplementedError):
        shutil.copy2(source, destination, follow_symlinks=False)
        copied.append(Path(destination))
    return destination


def _carry_over(old: Path, new: Path, copied: list[Path], dropped: frozenset[Path] = frozenset(),
                root: Path | None = None) -> None:
    """Give ``new`` every entry of ``old`` it lacks (folders whole), except those at ``dropped`` (paths relative to
    the top folder ``root``); folders both have get the same, and the old folder's mode. A folder this user may not
    write stays as it is (as it would if files were written into it)."""
    root = old if root is None else root
    if not os.access(old, os.W_OK | os.X_OK):
        raise AdapterSaveError(f"Cannot save the adapter to {old}: the folder is read-only for this user; make it "
                               "writable (chmod u+w) or save to another folder.")
    os.chmod(new, stat.S_IMODE(os.stat(old).st_mode))
    for item in sorted(old.iterdir()):
        there = new / item.name
        if item.relative_to(root) in dropped:
            continue
        if not os.path.lexists(there):
            if _is_folder(item):
                shutil.copytree(item, there, symlinks=True,
                                copy_function=functools.partial(_link_or_copy, copied=copied))
            else:
                _link_or_copy(item, there, copied)
        elif _is_folder(item) and _is_folder(there):
            _carry_over(item, there, copied, dropped, root)


def _sync_tree(folder: Path, files: list[Path]) -> None:
    """fsync ``files`` (the regular ones), then every folder of ``folder``, deepest first."""
    for path in files:
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda entry: -len(Path(entry[0]).parts)):
        _fsync(Path(dirpath), folder=True)


def _commit(staging: Path, target: Path) -> int | None:
    """Put the whole new folder ``staging`` in ``target``'s place; the old folder ends up at ``staging``. Returns
    the descriptor locking the old folder (two-step commit), to close once it is deleted."""
    if _exchange(staging, target):
        _fsync(target.parent, folder=True)
        return None
    old = target.parent / f".{target.name}.{_OLD}-{staging.name[-8:]}"
    lock = _try_lock(target)  # recovery waits for a live save instead of rolling it back
    try:
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(old, target)  # if this fails too, the recovery rule puts the old folder back
            raise
        _fsync(target.parent, folder=True)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    try:
        os.rename(old, staging)  # deleted under the staging name: a fxpeft-old folder is always whole
    except OSError:
        pass  # committed; the next save deletes it (the target exists, so it is not put back)
    return lock


def _cwd_inside(folder: Path) -> Path | None:
    """This process's current directory relative to ``folder``, if it is inside it."""
    try:
        cwd = Path(os.getcwd())
    except OSError:
        return None
    return cwd.relative_to(folder) if cwd == folder or folder in cwd.parents else None


def _write_atomically(target: Path, write: Callable[[Path], None],
                      dropped: Callable[[Path], frozenset[Path]] = lambda target: frozenset()) -> None:
    """Run ``write(tmp)`` on a fresh folder beside ``target``, then make it ``target`` atomically (the protocol of
    the module docstring). Unrelated entries of an existing ``target`` are kept, but for those ``dropped(target)``
    names (paths relative to it). Any failure is an :class:`AdapterSaveError` and leaves ``target`` as it was and no
    staging folder behind."""
    target = Path(os.path.realpath(target))  # a link to the folder: the folder it points to is replaced
    if not target.name:
        raise AdapterSaveError(f"Cannot save the adapter to {target}: pass a folder inside it.")
    if target.exists() and not target.is_dir():
        raise AdapterSaveError(f"Cannot save the adapter to {target}: it is a file; pass a folder path.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean(target)
        staging, lock = _new_staging(target)
    except AdapterSaveError:
        raise
    except OSError as error:
        raise AdapterSaveError(f"Could not create the adapter folder {target}: {error}") from error
    old_lock = None
    try:
        write(staging)
        files = [Path(dirpath) / name for dirpath, _, names in os.walk(staging) for name in names]
        existed = _is_folder(target)
        if existed:
            blocked = _blocked(staging, target, target)
            if blocked:
                raise AdapterSaveError(f"Cannot save the adapter to {target}: it has folders named {blocked} where "
                                       "files go (or files or links where folders go); move them away first.")
            _carry_over(target, staging, files, dropped(target))
        else:
            os.chmod(staging, 0o777 & ~_umask())
        _sync_tree(staging, files)
        cwd = _cwd_inside(target)
        if existed:
            old_lock = _commit(staging, target)
        else:
            os.rename(staging, target)
            _fsync(target.parent, folder=True)
        if cwd is not None:  # this process's current directory moves along to the new folder
            with contextlib.suppress(OSError):
                os.chdir(target / cwd if (target / cwd).is_dir() else target)
    except AdapterSaveError:
        raise
    except (OSError, SafetensorError) as error:  # safetensors reports I/O failures as SafetensorError
        hint = (" The folder is a mount point (or on another filesystem than its parent); save into a folder "
                "inside it." if isinstance(error, OSError) and error.errno in (errno.EXDEV, errno.EBUSY) else "")
        raise AdapterSaveError(f"Could not write the adapter to {target}: {error}.{hint}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the unfinished new folder, or the old one after the commit
        for fd in (old_lock, lock):
            if fd is not None:
                os.close(fd)


def save_adapter(adapted, directory, adapter_name: str | Sequence[str]) -> None:
    """Write adapters of ``adapted`` in PEFT's layout, atomically (see the module docstring).

    ``adapter_name`` a string: that adapter, in ``directory`` itself. A list: PEFT's ``save_pretrained``
    layout, ``"default"`` in ``directory`` and every other adapter in ``directory/<name>``; all of them are
    written, or none. An adapter of LoRA and a virtual-token method is two PEFT folders, the second in a sub-folder
    of the first named after its method (:mod:`fxpeft.formats.composed`)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(dict.fromkeys(adapter_name))
    unknown = [name for name in names if name not in adapted.adapters]
    if unknown or not names:
        raise FxpeftError(f"Cannot save adapter(s) {unknown or names}: known adapters are {list(adapted.adapters)}.")
    single = isinstance(adapter_name, str)
    places = {name: "" if single or name == DEFAULT_ADAPTER else name for name in names}
    files = planned_folders(adapted, places, Path(directory))

    def write(folder: Path) -> None:
        for sub, (_, part) in sorted(files.items(), key=lambda item: len(item[0])):
            place = folder / sub if sub else folder
            place.mkdir(exist_ok=True)
            save_file(part.tensors, str(place / WEIGHTS_NAME), metadata={"format": "pt", **part.metadata})
            # Top-level keys sorted as PEFT writes them; but not inside rank_pattern / alpha_pattern, where the
            # first matching key wins (PEFT's sort_keys=True would change which one that is).
            (place / CONFIG_NAME).write_text(json.dumps(dict(sorted(part.config.items())), indent=2) + "\n")

    _write_atomically(Path(directory), write, lambda target: replaced_parts(target, places, files, WEIGHTS_NAME))


def read_adapter(directory) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an adapter folder; clear errors for missing, truncated or corrupt files.

    A folder missing after a save was killed mid-commit is recovered first (the module docstring's rule), and a
    folder replaced by a save while it is read is read again, so that config and tensors are of one version. A
    composed adapter's parts (:mod:`fxpeft.formats.composed`) are read with it, as one adapter.

    The config is input from strangers: it is read within :func:`fxpeft.formats.peft.read_config`'s bounds (size
    and nesting) before it is parsed, and every field is checked, with the tensors' shapes, by
    :func:`~fxpeft.formats.peft.rules_and_state` before anything is built from it; any problem is an
    :class:`AdapterLoadError` naming the file and the field."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        directory = _recovered(directory)
    for _ in range(3):
        before = _identity(directory)
        try:
            found = read_parts(directory, _read_checked, str(directory / WEIGHTS_NAME))
        except AdapterLoadError:
            if _identity(directory) == before:
                raise
            continue
        if _identity(directory) == before:
            rules_and_state(*found, where=str(directory / CONFIG_NAME))  # every field, before any parameter exists
            return found
    raise AdapterLoadError(f"{directory} was replaced while it was read, three times in a row (is a process saving "
                           "to it?); load it again once that save is done.")


def _read_checked(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str] | None]:
    """One folder's config (read within bounds first), tensors (less the head copies its metadata names) and
    weights metadata."""
    if (directory / CONFIG_NAME).is_file():
        read_config(directory / CONFIG_NAME)  # bounded, before _read_files parses it
    config, state, metadata = _read_files(directory)
    return config, without_head_copies(state, metadata, str(directory / WEIGHTS_NAME)), metadata


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _recovered(directory: Path) -> Path:
    """``directory``, after the recovery rule for it or the folder holding it (adapters in sub-folders move with
    it); where the rule cannot rename, the same place in the old folder."""
    for folder in (directory, directory.parent):
        if folder.name and not os.path.lexists(folder):
            found = _recover(folder)
            if os.path.lexists(found):
                return found / directory.relative_to(folder)
    return directory


def _read_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str] | None]:
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
    metadata = None
    try:
        if weights.is_file():
            state = load_file(str(weights))
            with safe_open(str(weights), "pt") as file:
                metadata = file.metadata()
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
    return config, state, metadata


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
