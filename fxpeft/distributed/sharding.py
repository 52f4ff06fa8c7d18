"""Shard an adapted model per transformer layer with FSDP2, and load its base weights shard by shard.

:func:`fully_shard` applies ``torch.distributed.fsdp.fully_shard`` to every numbered layer of the base model that its
graph runs as one region (``model.layers.3``, ``encoder.block.0``: found in the graph, no table of class names), then
to the adapted model itself (the root: embeddings, final norms, the LM head, and every adapter tensor). Each rank then
holds about 1/N of the base weights; a layer's weights are all-gathered only while its region of the graph runs, in
forward and again in backward (fxpeft/runtime/layer_units.py), as FSDP2 does for eager modules.

Adapters are sharded with the root, not replicated: FSDP2 then reduce-scatters their gradients (each rank receives
the 1/N it updates) and the optimizer's state is 1/N per rank too; a rank gathers them whole only with the root's other
tensors, for the step (the root is not resharded after forward) and for saving (fxpeft/distributed/checkpoints.py).

Mixed precision: a captured graph is specialised to its dtypes, so the base is computed in the dtype it was captured
in (load it in bfloat16 for bf16 training: a frozen base needs no float32 master copy) and the adapters in theirs
(fxpeft keeps them float32 over a half-precision base, as PEFT does). A ``MixedPrecisionPolicy`` applies to the layers
(its ``param_dtype`` must be the base's dtype or None) and its ``reduce_dtype`` to the adapters' gradients.

:func:`load_sharded_weights` fills a model built on the meta device (``accelerate.init_empty_weights()``) and sharded,
from safetensors files: each rank reads only its own rows of each tensor, so no rank ever holds the whole base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
from torch.distributed.fsdp import fully_shard as fsdp_fully_shard
from torch.distributed.tensor import DTensor

from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.runtime.layer_units import FsdpLayer
from fxpeft.runtime.shared_layers import layer_regions

__all__ = ["fully_shard", "layer_modules", "load_sharded_weights", "local_shard", "read_local_rows"]


def _adapted(model: nn.Module, what: str):
    from fxpeft.model import AdaptedModel

    if not isinstance(model, AdaptedModel):
        raise FxpeftError(f"{what} takes the model fxpeft.transform returned, not a {type(model).__name__}.")
    return model


def layer_modules(adapted: nn.Module) -> dict[str, nn.Module]:
    """The base model's layers that :func:`fully_shard` shards on their own: every layer region of the adapted model's
    graphs (numbered children of a module list whose operations form one separable part of the graph) that holds
    parameters, by path (``model.layers.3``), in graph order."""
    adapted = _adapted(adapted, "layer_modules")
    keys: dict[str, None] = {}
    for program in adapted.programs():
        for region in layer_regions(program.graph_module.graph, local_writes=True):
            keys.setdefault(region.key, None)
    layers = {key: adapted.base_model.get_submodule(key) for key in keys}
    return {key: layer for key, layer in layers.items() if any(True for _ in layer.parameters())}


def _check_shardable(adapted, mp_policy: MixedPrecisionPolicy, layers: dict[str, nn.Module]) -> None:
    if not torch.distributed.is_initialized():
        raise FxpeftError("fxpeft.distributed.fully_shard needs a process group: call "
                          "torch.distributed.init_process_group() first (torchrun sets its environment).")
    if adapted.is_sharded:
        raise FxpeftError("This adapted model is sharded already.")
    if adapted.merged_adapters:
        raise FxpeftError(f"Adapters {adapted.merged_adapters} are merged: unmerge() before sharding.")
    if adapted.is_gradient_checkpointing:
        raise UnsupportedError("Gradient checkpointing and sharding per layer do not combine yet: call "
                               "gradient_checkpointing_disable() before fully_shard.")
    if not layers:
        raise UnsupportedError("The captured graph has no numbered layers to shard (no module list whose children it "
                               "runs one after another). Shard at the root with torch.distributed.fsdp.fully_shard("
                               "adapted), or wrap it in DistributedDataParallel.")
    if mp_policy.param_dtype is not None:
        dtypes = {p.dtype for layer in layers.values() for p in layer.parameters() if p.is_floating_point()}
        if dtypes != {mp_policy.param_dtype}:
            raise UnsupportedError(
                f"MixedPrecisionPolicy(param_dtype={mp_policy.param_dtype}) over a base captured in "
                f"{sorted(map(str, dtypes))}: the graph is specialised to the dtypes it was captured in. Load the base "
                f"model in {mp_policy.param_dtype} before transform (adapters stay float32), or leave param_dtype "
                "None.")


def fully_shard(adapted: nn.Module, *, mesh=None, reshard_after_forward: bool = True,
                mp_policy: MixedPrecisionPolicy | None = None,
                offload_policy: OffloadPolicy | None = None) -> nn.Module:
    """Shard ``adapted`` (from :func:`fxpeft.transform`) per layer with ``torch.distributed.fsdp.fully_shard``.

    Every layer of :func:`layer_modules` becomes one FSDP2 unit; the adapted model is the root unit (everything else,
    adapters included). The keywords are FSDP2's (``reshard_after_forward`` applies to the layers; the root keeps its
    tensors until backward, FSDP2's default for a root): ``offload_policy=CPUOffloadPolicy()`` keeps the shards (and the
    optimizer's state of the adapters) in CPU memory (pinned only where there is an accelerator); ``mp_policy``: see
    the module docstring. Returns ``adapted`` (now an ``FSDPModule`` too). Capture every argument signature the run
    will use before sharding (a later capture would read shards). Example (under ``torchrun``)::

        adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8))
        fxpeft.distributed.fully_shard(adapted, offload_policy=CPUOffloadPolicy())
        optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    """
    adapted = _adapted(adapted, "fxpeft.distributed.fully_shard")
    mp_policy = mp_policy or MixedPrecisionPolicy()
    offload_policy = offload_policy or OffloadPolicy()
    if isinstance(offload_policy, CPUOffloadPolicy) and offload_policy.pin_memory and not _has_accelerator():
        offload_policy = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator; FSDP2 fails without one
    layers = layer_modules(adapted)
    _check_shardable(adapted, mp_policy, layers)
    _materialize_adapters(adapted)
    for layer in layers.values():
        fsdp_fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                         offload_policy=offload_policy)
    # The root keeps its tensors from forward to backward (FSDP2's default for a root: they are needed again at once).
    root_policy = MixedPrecisionPolicy(reduce_dtype=mp_policy.reduce_dtype, cast_forward_inputs=False)
    fsdp_fully_shard(adapted, mesh=mesh, reshard_after_forward=None, mp_policy=root_policy,
                     offload_policy=offload_policy)
    adapted.use_sharded_layers({key: FsdpLayer(layer) for key, layer in layers.items()})
    return adapted


def _has_accelerator() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


@torch.no_grad()
def _materialize_adapters(adapted) -> None:
    """Adapter tensors made on the meta device (a base planned on meta) get their initial values on the CPU now,
    before sharding, so that every rank starts from what a single process would (call ``torch.manual_seed`` alike on
    every rank first); adapter tensors given real values already keep them."""
    for site in adapted.site_modules():
        tensors = dict(site.named_parameters())
        tensors.update(site.named_buffers())
        if not any(tensor.device.type == "meta" for tensor in tensors.values()):
            continue
        real = {name: tensor.detach().clone() for name, tensor in tensors.items() if tensor.device.type != "meta"}
        site.to_empty(device="cpu")
        site.reset_parameters()
        for name, value in real.items():
            (site.get_parameter(name) if name in dict(site.named_parameters()) else site.get_buffer(name)).copy_(value)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FxpeftError(f"No safetensors weights in {path} (model.safetensors, or shards with an index).")
    return files


def local_shard(parameter: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank holds of ``parameter`` (all of it, unless it is a ``DTensor`` shard), and the row of the
    whole tensor it starts at (FSDP2 shards dim 0 in ``torch.chunk``'s chunks)."""
    if not isinstance(parameter, DTensor):
        return parameter, 0
    local = parameter.to_local()
    mesh = parameter.device_mesh
    chunk = -(-parameter.shape[0] // mesh.size()) if parameter.dim() else 0
    return local, chunk * mesh.get_local_rank()


@torch.no_grad()
def read_local_rows(files: list[Path], wanted: dict[str, torch.Tensor]) -> None:
    """Copy into each tensor of ``wanted`` (by the files' key; a shard or a whole tensor) its rows from the safetensors
    ``files``, reading only those rows; each tensor found is removed from ``wanted``."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                tensor = wanted.pop(name, None)
                if tensor is None:
                    continue
                local, start = local_shard(tensor)
                rows = reader.get_slice(name)
                local.copy_(rows[start:start + local.shape[0]] if local.dim() else rows[:])


@torch.no_grad()
def load_sharded_weights(adapted: nn.Module, path, device: torch.device | str = "cpu") -> None:
    """Fill the base weights of a sharded ``adapted`` (built on the meta device, then :func:`fully_shard`) from the
    safetensors file or folder ``path`` (a ``save_pretrained`` folder), each rank reading only its rows.

    Buffers that are not meta (``accelerate.init_empty_weights()`` keeps them real) keep their values; meta buffers
    must be in the files. A parameter missing from the files is an error naming it (tied weights are read under the
    name the model reports first)."""
    adapted = _adapted(adapted, "fxpeft.distributed.load_sharded_weights")
    base = adapted.base_model
    if not any(tensor.device.type == "meta" for tensor in base.parameters()):
        raise FxpeftError("load_sharded_weights fills a base built on the meta device; this one has real weights.")
    files = _safetensors_files(Path(path))
    # to_empty() gives every tensor new, uninitialised storage: what is real already (adapters, gates, buffers that
    # init_empty_weights kept) is put back after it.
    kept = {name: buffer.clone() for name, buffer in adapted.named_buffers() if buffer.device.type != "meta"}
    adapters = {name: tensor.detach().clone() for name, tensor in adapted.adapters.state_dict().items()}
    adapted.to_empty(device=device)
    adapted.adapters.load_state_dict(adapters)
    for name, buffer in kept.items():
        adapted.get_buffer(name).copy_(buffer)
    wanted = dict(base.named_parameters())
    wanted.update({name: buffer for name, buffer in base.named_buffers() if f"base_model.{name}" not in kept})
    read_local_rows(files, wanted)
    if wanted:
        raise FxpeftError(f"The weights in {path} lack {sorted(wanted)[:6]}{' ...' if len(wanted) > 6 else ''}: "
                          "they stay uninitialised. Save the base model with save_pretrained(safe_serialization=True).")
