"""LoRA files of the diffusion world, both ways: diffusers' ``pytorch_lora_weights.safetensors`` and Kohya's (A1111's).

**diffusers** (what ``StableDiffusionPipeline.save_lora_weights`` writes and ``load_lora_weights`` reads): one
safetensors file whose keys are PEFT's, prefixed by the pipeline component, ``unet.<module>.lora_A.weight`` /
``lora_B.weight`` and ``text_encoder.<module>.lora_A.weight``; ranks are the tensors' shapes, and the ``LoraConfig``
of each component (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ...) is the JSON
header entry ``lora_adapter_metadata`` with keys ``unet.r``, ``unet.lora_alpha``, ... A file without that entry
means ``alpha = r`` (scale 1) everywhere, as diffusers reads it.

**Kohya / A1111** (what sd-scripts trains and the web UIs trade): ``lora_unet_<module path, dots as underscores>``
and ``lora_te_<...>`` (``lora_te1_`` too; SDXL's second encoder ``lora_te2_``) with ``.lora_down.weight`` (A),
``.lora_up.weight`` (B) and ``.alpha`` (a scalar; scale ``alpha / r``; ``alpha = r`` where missing). A module name is
found by flattening the base model's own module names, so no block-name table is needed; the text encoder's names
are written as ``text_model_encoder_...`` (the names of transformers' ``CLIPTextModel`` before it was flattened,
which every reader expects) and read with or without that prefix; a diffusers file's ``text_encoder.text_model.*``
keys likewise load into a flattened model. Kohya's SDXL files name the UNet's blocks as the original LDM code does
(``input_blocks_4_1``): such a file is refused with the way to convert it. Linear and conv LoRA both: a conv's A is
``[r, in, kh, kw]`` and its B ``[out, r, 1, 1]`` in both formats.

diffusers 0.42 itself reads a Kohya file's per-module alphas wrongly on attention layers (it keys them as
``...processor.to_k_lora.down.weight``, which names no module, so they take the most common alpha); fxpeft reads
them as written.

Files from strangers are data: safetensors only (never unpickled); every key is parsed and every module it names is
looked up in the base model, and every shape checked against that module before a rule is made
(:func:`read_diffusers_lora`); anything else is an :class:`~fxpeft.errors.AdapterLoadError` naming the key and the
fix. ``fxpeft.load_adapter(model, path)`` reads a folder holding ``pytorch_lora_weights.safetensors`` (and no
``adapter_config.json``) or a ``.safetensors`` file this way; ``adapted.save_adapter(folder, format="diffusers")``
(or ``"kohya"``) writes :func:`save_diffusers_lora`'s file for one component. diffusers itself is not needed.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fxpeft.errors import AdapterLoadError, AdapterSaveError, RuleError, UnsupportedError
from fxpeft.formats.peft import MAX_CONFIG_BYTES, check_config, shown
from fxpeft.rules import LoRA, Trainable

__all__ = ["WEIGHTS_NAME", "METADATA_KEY", "FORMATS", "COMPONENTS", "component_of", "is_diffusers_lora",
           "diffusers_state_dict", "save_diffusers_lora", "save_adapter_as", "read_diffusers_lora"]

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FORMATS = ("diffusers", "kohya")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL's second text encoder: pass component= for it
_KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"),
                   "text_encoder_2": ("lora_te2_",)}
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_PEFT_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "alpha": "alpha"}
_CLIP_ROOT = "text_model"  # transformers 5 flattened CLIPTextModel; files keep the old names
_LDM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_MAX_KEYS = 1 << 16


def _named(key: str) -> str:
    return shown(key, 240)  # a file's key, whole unless absurdly long (a stranger's key may be a megabyte)


def component_of(model: torch.nn.Module) -> str:
    """The pipeline component a base model is by default: ``"unet"`` for a diffusers model, ``"text_encoder"``
    for a transformers one (pass ``component=`` for anything else, e.g. SDXL's second text encoder)."""
    module = type(model).__module__
    if module.startswith("diffusers"):
        return "unet"
    if module.startswith("transformers"):
        return "text_encoder"
    raise UnsupportedError(f"Cannot tell which pipeline component a {type(model).__name__} is; pass "
                           f"component= (one of {list(COMPONENTS)}).")


def is_diffusers_lora(path) -> bool:
    """Whether ``path`` is a diffusers/Kohya LoRA: a ``.safetensors`` file, or a folder with ``WEIGHTS_NAME`` and no
    PEFT ``adapter_config.json``."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".safetensors"
    return (path / WEIGHTS_NAME).is_file() and not (path / "adapter_config.json").exists()


# -- saving ---------------------------------------------------------------------------------------------------------
def _lora_sites(adapted, adapter_name: str) -> list:
    """The adapter's LoRA sites on linears and convs; what these formats cannot hold is an UnsupportedError."""
    adapter = adapted.adapters[adapter_name]
    others = sorted({type(rule).__name__ for rule in adapter.rules if not isinstance(rule, LoRA)})
    if others:
        hint = " (modules_to_save: diffusers' files hold LoRA tensors only)" if Trainable.__name__ in others else ""
        raise UnsupportedError(f"The adapter {adapter_name!r} has {others} rules{hint}; diffusers' and Kohya's LoRA "
                               "files hold plain LoRA only. Save it in PEFT's format (the default).")
    sites = [site for site in adapter.site_modules() if getattr(site, "r", None) != 0]  # 0: a hot-swap slot's spare
    for site in sites:
        form = getattr(site, "site_form", None)
        if form not in ("linear", "conv") or getattr(site, "use_dora", False):
            what = "a DoRA site" if getattr(site, "use_dora", False) else f"a LoRA on a {form or 'parameter'}"
            raise UnsupportedError(f"The adapter {adapter_name!r} has {what} at {site.path}; diffusers' and Kohya's "
                                   "LoRA files hold LoRA on linears and convs. Save it in PEFT's format.")
    if not sites:
        raise UnsupportedError(f"The adapter {adapter_name!r} has no LoRA sites to save.")
    return sites


def _most_common(values: dict[str, Any]) -> Any:
    return collections.Counter(values.values()).most_common(1)[0][0]


def _alpha(site, rslora: bool) -> float:
    """The alpha that gives ``site`` its scaling as ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``): the site's
    own alpha where that holds (its scaling may have been set directly)."""
    r = math.sqrt(site.r) if rslora else site.r
    alpha = float(site.alpha)
    return alpha if math.isclose(alpha / r, float(site.scaling_value), rel_tol=1e-6) else float(site.scaling_value) * r


def _config_of(sites: list) -> dict[str, Any]:
    """The ``LoraConfig`` fields diffusers' metadata holds for these sites: the most common rank and alpha, the
    others per module (patterns anchored at the module's full path), the modules as ``target_modules``."""
    ranks = {site.path: int(site.r) for site in sites}
    alphas = {site.path: _alpha(site, rslora=site.use_rslora) for site in sites}
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {f"^{re.escape(path)}": v for path, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {f"^{re.escape(path)}": v for path, v in sorted(alphas.items()) if v != alpha},
            "use_rslora": bool(sites[0].use_rslora), "lora_dropout": float(sites[0].dropout),
            "init_lora_weights": True, "bias": "none", "use_dora": False}


def _kohya_name(path: str, component: str, model: torch.nn.Module) -> str:
    if component.startswith("text_encoder") and not hasattr(model, _CLIP_ROOT):
        path = f"{_CLIP_ROOT}.{path}"
    return _KOHYA_PREFIXES[component][0] + path.replace(".", "_")


def diffusers_state_dict(adapted, component: str | None = None, adapter_name: str | None = None,
                         format: str = "diffusers") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One adapter of ``adapted`` as the CPU tensors of a diffusers (or ``format="kohya"``) LoRA file for the pipeline
    ``component`` (default :func:`component_of` the base model), and its ``LoraConfig`` fields (diffusers' metadata,
    unprefixed). Kohya's ``alpha`` makes ``alpha / r`` the site's scaling (rsLoRA's ``alpha / sqrt(r)`` included)."""
    if format not in FORMATS:
        raise UnsupportedError(f"Unknown LoRA file format {format!r}; use one of {list(FORMATS)} (or 'peft').")
    component = component or component_of(adapted.base_model)
    if component not in COMPONENTS:
        raise UnsupportedError(f"Unknown pipeline component {component!r}; use one of {list(COMPONENTS)}.")
    sites = _lora_sites(adapted, adapter_name or adapted.active_adapter)
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        if site.lora_A.device.type == "meta":
            raise AdapterSaveError(f"The LoRA at {site.path} is on the meta device: give the model real weights "
                                   "first (AdaptedModel.load_base_model), then save.")
        a, b = (t.detach().contiguous().cpu() for t in site.factors())
        if format == "diffusers":
            tensors[f"{component}.{site.path}.lora_A.weight"] = a
            tensors[f"{component}.{site.path}.lora_B.weight"] = b
        else:
            name = _kohya_name(site.path, component, adapted.base_model)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = torch.tensor(_alpha(site, rslora=False), dtype=torch.float32)
    return tensors, _config_of(sites)


def save_diffusers_lora(directory, components: dict[str, Any], *, format: str = "diffusers",
                        adapter_name: str | None = None, weight_name: str = WEIGHTS_NAME) -> Path:
    """Write one LoRA file for several pipeline components, ``{"unet": adapted_unet, "text_encoder": adapted_te}``,
    as ``directory/weight_name`` (replaced atomically); returns its path. ``pipeline.load_lora_weights(directory)``
    reads either format. Example::

        save_diffusers_lora("out", {"unet": adapted_unet, "text_encoder": adapted_text_encoder})
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, adapted in components.items():
        state, config = diffusers_state_dict(adapted, component, adapter_name, format)
        tensors.update(state)
        metadata.update({f"{component}.{field}": value for field, value in config.items()})
    header = {"format": "pt"}
    if format == "diffusers":
        header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / weight_name
    fd, staging = tempfile.mkstemp(prefix=f".{weight_name}.", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, staging, metadata=header)
        with open(staging, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, target)
    except OSError as error:
        Path(staging).unlink(missing_ok=True)
        raise AdapterSaveError(f"Could not write {target}: {error}") from error
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_adapter_as(adapted, directory, adapter_name: str, format: str, component: str | None = None) -> None:
    """``AdaptedModel.save_adapter(directory, format=...)`` for ``"diffusers"`` and ``"kohya"``: one component's file
    (default :func:`component_of` the base model) as ``directory/pytorch_lora_weights.safetensors``."""
    if not isinstance(adapter_name, str):
        raise UnsupportedError(f"format={format!r} saves one adapter per file; got {shown(adapter_name)}. Save each "
                               "adapter in a folder of its own.")
    component = component or component_of(adapted.base_model)
    save_diffusers_lora(directory, {component: adapted}, format=format, adapter_name=adapter_name)


# -- loading --------------------------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise AdapterLoadError(f"{file}: fxpeft reads LoRA files in safetensors only (a pickle can run code). Convert "
                               "it with safetensors.torch.save_file from a trusted process.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) > _MAX_KEYS:
                raise AdapterLoadError(f"{file} holds {len(keys)} tensors; a LoRA file holds a few thousand.")
            return {key: handle.get_tensor(key) for key in keys}, dict(handle.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise AdapterLoadError(f"Could not read {file} as safetensors: {str(error)[:200]}") from None


def _metadata(header: dict[str, str], component: str, where: str) -> dict[str, Any] | None:
    raw = header.get(METADATA_KEY)
    if raw is None:
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{where}: the `{METADATA_KEY}` header is over {MAX_CONFIG_BYTES:,} bytes; save the "
                               "file again.")
    try:
        value = json.loads(raw)
        check_config(value)
    except AdapterLoadError as error:  # nested too deep
        raise AdapterLoadError(f"{where}: the `{METADATA_KEY}` header: {error}") from None
    except (ValueError, RecursionError) as error:
        raise AdapterLoadError(f"{where}: the `{METADATA_KEY}` header is not valid JSON ({str(error)[:100]}); "
                               "save the file again with diffusers or fxpeft.") from None
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{where}: the `{METADATA_KEY}` header is not a JSON object; save the file again.")
    fields = {k.removeprefix(f"{component}."): v for k, v in value.items() if k.startswith(f"{component}.")}
    return fields or None


def _parts(state: dict[str, torch.Tensor], component: str, model: torch.nn.Module, where: str):
    """``{module path: {"A"|"B"|"alpha": tensor}}`` for ``component`` from a diffusers or Kohya state dict."""
    kohya = all(key.startswith("lora_") and not key.startswith(("lora_A", "lora_B")) for key in state)
    names = {name: module for name, module in model.named_modules()}
    flat: dict[str, list[str]] = collections.defaultdict(list)
    if kohya:
        for name in names:
            flat[name.replace(".", "_")].append(name)
    found: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in state.items():
        if kohya:
            head, _, tail = key.partition(".")
            prefix = next((p for p in _KOHYA_PREFIXES[component] if head.startswith(p)), None)
            if prefix is None:
                continue
            part, module = _KOHYA_PARTS.get(tail), head[len(prefix):]
            candidates = flat.get(module) or (flat.get(module.removeprefix(_CLIP_ROOT + "_"))
                                              if module.startswith(_CLIP_ROOT + "_") else None)
            if candidates is not None and len(candidates) > 1:
                raise AdapterLoadError(f"{where}: the Kohya key {_named(key)} names more than one module of this "
                                       f"model ({candidates[:3]}); load it with diffusers and save it in diffusers' "
                                       "format.", mismatches=[key])
            path = candidates[0] if candidates else None
            if path is None and any(block in module for block in _LDM_BLOCKS):
                raise AdapterLoadError(
                    f"{where}: {_named(key)} names an LDM (original Stable Diffusion/SDXL) block, not a module of this "
                    "diffusers model. Load the file with diffusers' pipeline.load_lora_weights (which renames SDXL "
                    "blocks), then save_lora_weights, and load that file.", mismatches=[key])
        else:
            if not key.startswith(f"{component}."):
                continue
            rest = key[len(component) + 1:]
            suffix = next((suffix for suffix in _PEFT_PARTS if rest.endswith("." + suffix)), None)
            part, path = (_PEFT_PARTS[suffix], rest[: -len(suffix) - 1]) if suffix else (None, rest)
            if path not in names and path.startswith(_CLIP_ROOT + ".") and not hasattr(model, _CLIP_ROOT):
                path = path.removeprefix(_CLIP_ROOT + ".")
        if part is None:
            raise AdapterLoadError(f"{where}: {_named(key)} is not a LoRA tensor this format has (lora_A/lora_B "
                                   "weights, lora_down/lora_up weights, alpha). DoRA, LoHa, LoKr and old diffusers "
                                   "attention-processor files are not read: save the adapter again with diffusers' "
                                   "save_lora_weights.", mismatches=[key])
        if path is None or path not in names:
            raise AdapterLoadError(f"{where}: {_named(key)} names a module this {type(model).__name__} does not have. "
                                   "Load the file into the model it was trained on.", mismatches=[key])
        found[path][part] = value
    return found, names


def _check_module(path: str, module: torch.nn.Module, parts: dict[str, torch.Tensor], where: str) -> int:
    """The rank of the LoRA at ``path``, its tensors' shapes checked against the module (AdapterLoadError else)."""
    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        raise AdapterLoadError(f"{where}: the LoRA of {path} lacks its {' and '.join(missing)} tensor; the file is "
                               "incomplete. Save it again.", mismatches=[path])
    a, b = parts["A"], parts["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterLoadError(f"{where}: the LoRA tensors of {path} are {a.dtype}/{b.dtype}, not floating point.",
                               mismatches=[path])
    r = a.shape[0] if a.dim() else 0
    if isinstance(module, torch.nn.Linear):
        want_a, want_b = (r, module.in_features), (module.out_features, r)
    elif isinstance(module, torch.nn.Conv2d):
        want_a = (r, module.in_channels // module.groups, *module.kernel_size)
        want_b = (module.out_channels, r, 1, 1)
    else:
        raise AdapterLoadError(f"{where}: {path} is a {type(module).__name__}; these LoRA files adapt Linear and "
                               "Conv2d modules. Load the file into the model it was trained on.", mismatches=[path])
    if r < 1 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise AdapterLoadError(f"{where}: the LoRA of {path} has A {list(a.shape)} and B {list(b.shape)}, but this "
                               f"model's {type(module).__name__} needs [r, ...] = {list(want_a)} and {list(want_b)}. "
                               "Load the file into the model it was trained on.", mismatches=[path])
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1 or not math.isfinite(float(alpha.float().reshape(()))) or float(alpha) <= 0:
            raise AdapterLoadError(f"{where}: the alpha of {path} must be one finite number > 0, got "
                                   f"{shown(alpha.flatten()[:4].tolist())}. Fix or remove it.", mismatches=[path])
    return r


def _pattern_rule(config: dict[str, Any], r: int, where: str) -> LoRA:
    """diffusers' metadata fields as a rule that answers ``alpha_for``/``use_rslora`` (targets are set later)."""
    unsupported = sorted(k for k in ("use_dora", "lora_bias") if config.get(k))
    if unsupported:
        raise AdapterLoadError(f"{where}: the metadata sets {unsupported}; fxpeft reads plain LoRA from these files. "
                               "Save the adapter in PEFT's format instead.")
    try:
        return LoRA(targets=("_",), r=r, alpha=config.get("lora_alpha", r),
                    alpha_pattern=config.get("alpha_pattern") or {},
                    use_rslora=bool(config.get("use_rslora", False)))
    except (RuleError, AttributeError, TypeError) as error:
        raise AdapterLoadError(f"{where}: the `{METADATA_KEY}` header does not describe a LoRA ({error}). Fix it or "
                               "save the file again.") from None


def read_diffusers_lora(path, model: torch.nn.Module, component: str | None = None) -> tuple[list, dict]:
    """The rules and the PEFT-keyed state (``base_model.model.<module>.lora_A.weight``) that a diffusers or Kohya
    LoRA file at ``path`` (a file, or a folder holding ``WEIGHTS_NAME``) gives ``model`` as the pipeline
    ``component`` (default :func:`component_of`), every key and shape checked against ``model`` first (nothing is
    changed). One LoRA rule whose ``targets`` are the file's modules, with per-module ranks and alphas."""
    path = Path(path)
    where = str(path)
    component = component or component_of(model)
    if component not in COMPONENTS:
        raise UnsupportedError(f"Unknown pipeline component {component!r}; use one of {list(COMPONENTS)}.")
    state, header = _open(path)
    found, names = _parts(state, component, model, where)
    if not found:
        raise AdapterLoadError(f"{where} holds no LoRA tensors for the {component} (keys '{component}.*' or Kohya's "
                               f"{list(_KOHYA_PREFIXES[component])}); pass component= if it is another part of the "
                               "pipeline.")
    ranks = {p: _check_module(p, names[p], parts, where) for p, parts in found.items()}
    metadata = _metadata(header, component, where) if not any("alpha" in parts for parts in found.values()) else None
    defaults = _pattern_rule(metadata, _most_common(ranks), where) if metadata else None
    alphas = {}
    for p, parts in found.items():  # the file's alpha, else the metadata's, else alpha = r (scale 1)
        alphas[p] = float(parts["alpha"].float().reshape(())) if "alpha" in parts else \
            float(defaults.alpha_for(p)) if defaults else float(ranks[p])
    r, alpha = _most_common(ranks), _most_common(alphas)
    try:
        rule = LoRA(targets=tuple(sorted(found)), r=r, alpha=alpha,
                    use_rslora=bool(defaults.use_rslora) if defaults else False,
                    rank_pattern={f"^{re.escape(p)}": v for p, v in sorted(ranks.items()) if v != r},
                    alpha_pattern={f"^{re.escape(p)}": v for p, v in sorted(alphas.items()) if v != alpha})
    except RuleError as error:
        raise AdapterLoadError(f"{where}: {error}") from None
    peft_state = {f"base_model.model.{p}.lora_{'A' if part == 'A' else 'B'}.weight": value
                  for p, parts in found.items() for part, value in parts.items() if part != "alpha"}
    return [rule], peft_state
