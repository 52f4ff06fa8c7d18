"""Adapter files and resumable training state of a model sharded with :func:`fxpeft.distributed.fully_shard`.

Every rank holds 1/N of each adapter tensor (FSDP2 ``DTensor`` shards), so a file written from one rank's tensors would
be partial, and one written by every rank would be N files racing for one name (PEFT users under DeepSpeed ZeRO-3 meet
the first as an empty ``adapter_model.safetensors``). Here every rank takes part in gathering the adapters whole (the
root's ``unshard()``), rank 0 alone writes them with fxpeft's atomic writer in PEFT's layout, and every rank learns
whether it succeeded before any returns, so a failure on rank 0 is an error on every rank, never a hang at the next
collective nor a half-written folder.

:func:`save_training_state` adds the optimizer's state, gathered whole (``torch.distributed.checkpoint.state_dict``),
as ``optimizer.safetensors`` (tensors by parameter name) and ``optimizer.json`` (hyper-parameters): no pickle.
:func:`load_training_state` reads both back on every rank and gives each rank its shard of adapters and optimizer.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule

from fxpeft.distributed.sharding import local_shard
from fxpeft.errors import FxpeftError
from fxpeft.formats.files import read_adapter

__all__ = ["gathered_adapters", "load_training_state", "save_adapter", "save_training_state"]

_OPTIMIZER_TENSORS = "optimizer.safetensors"
_OPTIMIZER_CONFIG = "optimizer.json"


@contextlib.contextmanager
def gathered_adapters(adapted: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``adapted``'s adapters are whole on every rank: sharded with FSDP2, its root's tensors (the
    adapters among them) are gathered; partitioned by DeepSpeed ZeRO-3, the adapters are (``GatheredParameters``).
    Every rank must enter it (the gather is a collective). A model that is not sharded is yielded as it is."""
    adapted = getattr(adapted, "module", adapted)  # a DeepSpeed engine: the model it wraps
    partitioned = [p for p in adapted.adapters.parameters() if hasattr(p, "ds_status")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield adapted
        return
    sharded = isinstance(adapted, FSDPModule)
    if sharded:
        adapted.unshard()
    try:
        yield adapted
    finally:
        if sharded:
            adapted.reshard()


def _on_rank_zero(action: Callable[[], None], what: str) -> None:
    """Run ``action`` on rank 0 only; every rank returns when it has finished, and raises if it failed."""
    if not dist.is_initialized():
        action()
        return
    raised: Exception | None = None
    if dist.get_rank() == 0:
        try:
            action()
        except Exception as error:  # reported to every rank below, then raised again here
            raised = error
    failure: list[Any] = [None if raised is None else f"{type(raised).__name__}: {raised}"]
    dist.broadcast_object_list(failure, src=0)
    if raised is not None:
        raise raised
    if failure[0] is not None:
        raise FxpeftError(f"{what} failed on rank 0 ({failure[0]}); nothing was written.")


def save_adapter(adapted: nn.Module, directory, adapter_name: str | None = None) -> None:
    """Write the adapter of a sharded ``adapted`` once, whole, in PEFT's layout (``adapter_config.json``,
    ``adapter_model.safetensors``), as ``AdaptedModel.save_adapter`` does. Every rank calls it; rank 0 writes."""
    with gathered_adapters(adapted) as whole:
        _on_rank_zero(lambda: whole.save_adapter(directory, adapter_name), f"save_adapter({str(directory)!r})")


def save_training_state(adapted: nn.Module, optimizer: torch.optim.Optimizer, directory,
                        adapter_name: str | None = None) -> None:
    """Save what resuming needs: the adapter (as :func:`save_adapter`) and the optimizer's state, gathered whole, in
    ``directory``. Every rank calls it; rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(adapted, optimizer, options=options)  # a collective: every rank
    directory = Path(directory)
    with gathered_adapters(adapted):
        _on_rank_zero(lambda: _write_state(adapted, state, directory, adapter_name),
                      f"save_training_state({str(directory)!r})")


def _write_state(adapted, state: dict[str, Any], directory: Path, adapter_name: str | None) -> None:
    adapted.save_adapter(directory, adapter_name)
    tensors, other = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                other.setdefault(name, {})[key] = value
    config = {"param_groups": state["param_groups"], "state": other}
    _atomic(directory / _OPTIMIZER_TENSORS, lambda path: save_file(tensors, str(path)))
    _atomic(directory / _OPTIMIZER_CONFIG, lambda path: path.write_text(json.dumps(config)))


def _atomic(target: Path, write: Callable[[Path], None]) -> None:
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@torch.no_grad()
def load_training_state(adapted: nn.Module, optimizer: torch.optim.Optimizer, directory,
                        adapter_name: str | None = None) -> None:
    """Resume from :func:`save_training_state`: the adapter's tensors and the optimizer's state, each rank taking its
    shard. Every rank calls it; the folder must be readable from every rank. The adapter must have the saved shapes."""
    directory = Path(directory)
    _, saved = read_adapter(directory)
    adapter = adapted.adapters[adapter_name or adapted.active_adapter]
    names = {id(parameter): name for name, parameter in adapted.named_parameters()}
    for key, parameter in adapter.peft_state_dict().items():
        if key not in saved:
            raise FxpeftError(f"The adapter saved in {directory} lacks {key}: it is not this model's adapter.")
        _copy_whole_into(parameter, saved[key], names.get(id(parameter), key))
    config = json.loads((directory / _OPTIMIZER_CONFIG).read_text())
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in config["state"].items()}
    for key, value in load_file(str(directory / _OPTIMIZER_TENSORS)).items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(adapted, optimizer, {"state": state, "param_groups": config["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def _copy_whole_into(parameter: torch.Tensor, whole: torch.Tensor, name: str) -> None:
    """``whole`` into ``parameter``, or into this rank's rows of it when it is a shard (FSDP2: ``torch.chunk``'s
    chunks of dim 0)."""
    if tuple(whole.shape) != tuple(parameter.shape):
        raise FxpeftError(f"{name}: saved as {tuple(whole.shape)}, the model's is {tuple(parameter.shape)}.")
    local, start = local_shard(parameter)
    local.copy_(whole[start:start + local.shape[0]] if local.dim() else whole)
