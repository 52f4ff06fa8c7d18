"""Captures cached on disk, across processes: a model seen before is not exported again.

A capture costs seconds per argument signature (tiny models 1-6 s, T5 ~15 s, a 7B llama on the meta device ~14 s),
and every process used to pay it again. :func:`fxpeft.capture.capture` now looks for its result in a cache folder
first, and writes it there after a capture. The entry is the captured program *before any rewrite*
(:mod:`fxpeft.capture.graph_codec`); rules are applied after loading (a rewrite takes milliseconds), so the rules
are no part of the key and models transformed with different rules share one entry.

Where: ``$FXPEFT_CACHE`` if it names a folder; ``0``/``off``/``false``/``no`` turn the cache off; unset (or
``1``/``on``) means ``$XDG_CACHE_HOME/fxpeft/captures`` (``~/.cache/fxpeft/captures``). In code,
:func:`set_capture_cache` overrides the variable for this process (``set_capture_cache(False)`` turns it off).

The key (stored inside each entry, and hashed for its file name) is everything that decides the capture, never a
tensor's value (weights change, the graph does not):

- the model's class (module and qualified name), its transformers config (``to_dict()`` plus the private fields that
  choose implementations, ``_attn_implementation_internal`` and the like; not ``_name_or_path``);
- its structure: every module's path, class and plain attributes (numbers, strings, flags: a dropout's ``p``, an
  attention's ``scaling``), every parameter's and buffer's name, shape, dtype, device and ``requires_grad``;
- a hash of the source file of every module class outside torch (so an edited model file is captured again);
- the call: :func:`fxpeft.graph.program.signature_key` plus every tensor argument's shape, dtype and device, the
  dynamic shapes, grad mode, autocast and the default dtype;
- the versions of python, torch, transformers and fxpeft, a hash of fxpeft's capture code and the entry format.

Capture always runs the model in train mode (fxpeft/capture/export.py), so the model's mode is not in the key.
Models that cannot be keyed safely are captured as before and not cached: a module class without a source file
(defined in a notebook cell or ``python -c``, or made at run time: ``torch.nn.utils.parametrize``), a module with
forward hooks or pre-hooks, or with its own ``forward`` set on the instance. A model whose forward calls code in
other files than its classes' (other than torch's and transformers', which their versions cover) is keyed by the
files of its classes only: after editing such a helper, clear the cache or set ``FXPEFT_CACHE=off``.

An entry is never trusted blindly. It is ignored, captured again and overwritten when it fails to load or decode,
when the key inside differs from the one asked for (a hash collision, or a file copied over another), or when its
parameter and buffer placeholders do not match the model's current names, shapes and dtypes. Entries are written
atomically (a temporary file beside it, then ``os.replace``); a folder that cannot be written (read-only, full)
never fails a capture: it warns once and captures as before. Files are data: a ``safetensors`` file whose metadata
holds the key and the program as JSON; loading one runs no code from it (no pickle, no ``eval``; see the codec).
Hits, misses and rejections are counted in :mod:`fxpeft.debug` (``("capture_cache", "hit")``, ...) and logged at
DEBUG on the ``"fxpeft"`` logger.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fxpeft.capture.graph_codec import FORMAT, decode_program, encode_program
from fxpeft.debug import count, logger
from fxpeft.graph.program import Program, flatten_arguments

__all__ = ["CacheEntry", "cache_folder", "set_capture_cache", "entry_for"]

_OFF = {"0", "off", "false", "no", "none", "disable", "disabled"}
_ON = {"", "1", "on", "true", "yes"}
_SUFFIX = ".fxcapture"
_SIMPLE = (bool, int, float, str, type(None))

_lock = threading.Lock()
_setting: Any = None  # None: follow $FXPEFT_CACHE; False: off; a Path: that folder
_warned = False
_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size): sha256
_code_hash: str | None = None


def set_capture_cache(setting: bool | str | os.PathLike | None = None) -> None:
    """Choose the capture cache of this process: ``False`` turns it off, a path uses that folder, ``True`` or
    ``None`` go back to what ``$FXPEFT_CACHE`` says (the default folder when it is unset).

    Example::

        fxpeft.capture.disk_cache.set_capture_cache(False)   # capture every time, write nothing
    """
    global _setting
    if setting is True or setting is None:
        _setting = None
    elif setting is False:
        _setting = False
    else:
        _setting = Path(setting).expanduser()


def cache_folder() -> Path | None:
    """The folder captures are cached in, or None when the cache is off (see the module docstring)."""
    if _setting is False:
        return None
    if isinstance(_setting, Path):
        return _setting
    value = os.environ.get("FXPEFT_CACHE", "").strip()
    if value.lower() in _OFF:
        return None
    if value.lower() not in _ON:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxpeft" / "captures"


# -- the key ---------------------------------------------------------------------------------------------------------
class _Unkeyable(Exception):
    """The model cannot be keyed safely; its captures are not cached."""


def _file_hash(path: str) -> str:
    stat = os.stat(path)
    handle = (path, stat.st_mtime_ns, stat.st_size)
    digest = _file_hashes.get(handle)
    if digest is None:
        with open(path, "rb") as file:
            digest = _file_hashes[handle] = hashlib.sha256(file.read()).hexdigest()
    return digest


def _capture_code_hash() -> str:
    """A hash of fxpeft's capture code and custom ops: what turns a model into the cached program."""
    global _code_hash
    if _code_hash is None:
        root = Path(__file__).resolve().parent.parent
        files = sorted([*root.joinpath("capture").glob("*.py"), *root.joinpath("ops").glob("*.py")])
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + _file_hash(str(path)).encode())
        _code_hash = digest.hexdigest()
    return _code_hash


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_source(cls: type) -> str | None:
    """The hash of the file defining ``cls`` (None for torch's own classes: torch's version covers them)."""
    if cls.__module__.split(".")[0] == "torch":
        return None
    try:
        path = inspect.getsourcefile(cls)
        if path is None or not os.path.isfile(path):
            raise TypeError("no source file")
        return _file_hash(path)
    except (TypeError, OSError) as error:
        raise _Unkeyable(f"its module class {_class_name(cls)} has no source file to key it by ({error})") from None


def _plain(value: Any, depth: int = 0) -> Any:
    """A module attribute as key data: plain values as they are, functions by name, other objects by type. A tensor
    that is not a parameter or buffer is baked into the graph as a constant, so its values are part of the key."""
    if type(value) in _SIMPLE:
        return value
    if isinstance(value, torch.Tensor):
        data = None if value.device.type == "meta" or value.is_nested else \
            hashlib.sha256(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        return ["tensor", list(value.shape), str(value.dtype), str(value.device), data]
    if depth < 3 and isinstance(value, (tuple, list)):
        return [_plain(item, depth + 1) for item in value]
    if depth < 3 and isinstance(value, dict):
        return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"function {getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"object {_class_name(type(value))}"


def _structure(model: torch.nn.Module) -> dict[str, Any]:
    modules, sources = [], {}
    for path, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        if module._forward_hooks or module._forward_pre_hooks:
            raise _Unkeyable(f"module '{path}' has forward hooks, whose code a key cannot describe")
        if "forward" in module.__dict__:
            raise _Unkeyable(f"module '{path}' has its own forward set on the instance")
        for klass in cls.__mro__:
            if klass is torch.nn.Module:
                break
            if _class_name(klass) not in sources:
                sources[_class_name(klass)] = _class_source(klass)
        attributes = {name: _plain(value) for name, value in sorted(vars(module).items())
                      if not name.startswith("_") and name != "training"}
        modules.append([path, _class_name(cls), attributes])
    tensors = [[name, "parameter", list(tensor.shape), str(tensor.dtype), str(tensor.device), tensor.requires_grad]
               for name, tensor in model.named_parameters(remove_duplicate=False)]
    tensors += [[name, "buffer", list(tensor.shape), str(tensor.dtype), str(tensor.device)]
                for name, tensor in model.named_buffers(remove_duplicate=False)]
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        raise _Unkeyable("global module forward hooks are registered")
    return {"modules": modules, "tensors": tensors, "sources": sources}


def _config(config: Any) -> dict[str, Any]:
    """A transformers config as key data: ``to_dict()`` and the private fields that pick implementations."""
    data = config.to_dict()
    data.pop("_name_or_path", None)
    for name, value in vars(config).items():
        if name.startswith("_") and name not in ("_name_or_path", "_commit_hash"):
            data[f"private{name}"] = _config(value) if hasattr(value, "to_dict") else _plain(value)
    return data


def _shapes(value: Any) -> Any:
    """Dynamic shapes as key data (``Dim`` objects by name and range)."""
    if isinstance(value, dict):
        return {str(key): _shapes(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes(item) for item in value]
    if type(value) in _SIMPLE:
        return value
    name = getattr(value, "__name__", None)
    if name is not None and hasattr(value, "min"):
        return f"Dim({name}, {getattr(value, 'min', None)}, {getattr(value, 'max', None)})"
    return repr(value)


def _call(kwargs: dict[str, Any]) -> dict[str, Any]:
    arguments = flatten_arguments(kwargs)
    leaves = {name: [[list(leaf.shape), str(leaf.dtype), str(leaf.device)] if isinstance(leaf, torch.Tensor)
                     else repr(leaf) for leaf in values] for name, values in sorted(arguments.leaves.items())}
    return {"signature": repr(arguments.key), "leaves": leaves}


def _versions() -> dict[str, Any]:
    import fxpeft

    transformers = sys.modules.get("transformers")
    return {"python": f"{sys.implementation.name} {sys.version_info[:3]}", "torch": torch.__version__,
            "transformers": getattr(transformers, "__version__", None), "fxpeft": fxpeft.__version__,
            "capture_code": _capture_code_hash(), "format": FORMAT}


def _key(model: torch.nn.Module, call_kwargs: dict[str, Any], dynamic_shapes: Any, is_hf: bool) -> str:
    config = getattr(model, "config", None)
    key = {
        "versions": _versions(),
        "model": _class_name(type(model)),
        "config": _config(config) if is_hf and config is not None else None,
        "structure": _structure(model),
        "call": _call(call_kwargs),
        "dynamic_shapes": _shapes(dynamic_shapes),
        "state": {"grad": torch.is_grad_enabled(), "default_dtype": str(torch.get_default_dtype()),
                  "autocast": [torch.is_autocast_enabled(device) for device in ("cpu", "cuda")]},
    }
    return json.dumps(key, sort_keys=True, default=repr, separators=(",", ":"))


# -- entries ---------------------------------------------------------------------------------------------------------
class CacheEntry:
    """Where one capture is cached: its folder, key and file. :meth:`load` returns a validated program or None;
    :meth:`store` writes one (both swallow every cache failure: a cache never fails a capture)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key
        self.path = folder / (hashlib.sha256(key.encode()).hexdigest()[:40] + _SUFFIX)

    def load(self, model: torch.nn.Module, kwarg_names: tuple[str, ...], fixed_kwargs: dict[str, Any],
             device: torch.device) -> Program | None:
        """The cached program, or None (a miss, or an entry that fails validation: counted and logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            count("capture_cache", "miss")
            logger.debug("capture cache: miss %s", self.path)
            return None
        except OSError as error:
            return self._rejected(f"cannot be read: {error}")
        try:
            metadata = _metadata(raw)
            if metadata.get("key") != self.key:
                return self._rejected("its key differs from the model's")
            program = decode_program(json.loads(metadata["program"]), load_tensors(raw), kwarg_names=kwarg_names,
                                     fixed_kwargs=fixed_kwargs, device=device)
            mismatch = _placeholder_mismatch(program, model)
        except Exception as error:  # a corrupt entry fails in json, safetensors, sympy or torch, with any error type
            return self._rejected(f"does not load: {type(error).__name__}: {error}")
        if mismatch:
            return self._rejected(mismatch)
        count("capture_cache", "hit")
        logger.debug("capture cache: hit %s", self.path)
        return program

    def _rejected(self, reason: str) -> None:
        count("capture_cache", "rejected")
        logger.debug("capture cache: ignored %s (%s); capturing again", self.path, reason)
        return None

    def store(self, program: Program) -> None:
        """Write ``program`` (as capture returns it, before any rewrite) atomically; a failure warns once."""
        try:
            data, constants = encode_program(program)
            payload = save_tensors(constants, metadata={"key": self.key, "program": json.dumps(data)})
        except Exception as reason:  # Unsupported, or a value the encoder did not foresee: the capture stands
            count("capture_cache", "uncacheable")
            logger.debug("capture cache: not cached (%s: %s)", type(reason).__name__, reason)
            return
        try:
            _write_atomically(self.path, payload)
        except OSError as error:
            _warn_once(f"fxpeft could not write its capture cache in {self.folder} ({error}); captures are not "
                       "cached. Set FXPEFT_CACHE to a writable folder, or to 'off'.")
            return
        count("capture_cache", "stored")
        logger.debug("capture cache: stored %s", self.path)


def entry_for(model: torch.nn.Module, call_kwargs: dict[str, Any], dynamic_shapes: Any,
              is_hf: bool) -> CacheEntry | None:
    """The cache entry of capturing ``model`` with ``call_kwargs`` and ``dynamic_shapes``, or None when the cache is
    off or the model cannot be keyed safely (logged at DEBUG with the reason)."""
    folder = cache_folder()
    if folder is None:
        return None
    try:
        key = _key(model, call_kwargs, dynamic_shapes, is_hf)
    except Exception as reason:  # _Unkeyable, or anything a model's config or files raise: never fail a capture
        count("capture_cache", "unkeyable")
        logger.debug("capture cache: %s is not cached: %s", type(model).__name__, reason)
        return None
    return CacheEntry(folder, key)


def _metadata(raw: bytes) -> dict[str, str]:
    """A safetensors file's metadata, read from its header (8 bytes of length, then JSON)."""
    if len(raw) < 8:
        raise ValueError("truncated header")
    length = int.from_bytes(raw[:8], "little")
    if length > len(raw) - 8:
        raise ValueError("truncated header")
    return json.loads(raw[8:8 + length]).get("__metadata__") or {}


def _placeholder_mismatch(program: Program, model: torch.nn.Module) -> str | None:
    """Why the program's parameter and buffer placeholders do not fit ``model`` now, or None when they do: each must
    name a tensor of the model with its shape and dtype, and together they must feed every parameter (tied ones
    count once: export names one of their names)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    fed = set()
    for node, source in zip(program.placeholders(), program.sources):
        if source.kind not in ("parameter", "buffer"):
            continue
        tensor = tensors.get(source.target)
        if tensor is None:
            return f"the model has no {source.kind} {source.target}"
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(tensor.shape) \
                or value.dtype != tensor.dtype:
            return f"{source.kind} {source.target} is {tuple(tensor.shape)} {tensor.dtype} in the model"
        fed.add(id(tensor))
    missing = [name for name, parameter in model.named_parameters() if id(parameter) not in fed]
    if missing:
        return f"no placeholder feeds the model's parameters {missing[:3]}"
    return None


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, flush it, then move it over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _warn_once(message: str) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    warnings.warn(message, RuntimeWarning, stacklevel=4)
