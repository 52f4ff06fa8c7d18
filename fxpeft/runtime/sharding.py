"""The adapted model sharded over ranks: what :class:`fxpeft.model.AdaptedModel` does differently once FSDP2 shards
it (by :func:`fxpeft.distributed.fully_shard`, or by someone else: Accelerate's FSDP2 plugin) or DeepSpeed ZeRO-3
partitions it. A mixin.

Its layers then run as gathered regions (fxpeft/runtime/layer_units.py); what needs whole tensors is refused with
what to do instead: capturing a new argument signature, adding an adapter, merging.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.fsdp import FSDPModule

from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.runtime.layer_units import LayerWeights, sharded_modules

__all__ = ["ShardingMethods"]


class ShardingMethods:
    """``use_sharded_layers`` and the checks of a sharded :class:`fxpeft.model.AdaptedModel`, which provides
    ``base_model``, ``_programs`` and ``_sharded_layers`` (None until the model is known to be sharded)."""

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The base model's layer classes that must stay whole (transformers' attribute): Accelerate's FSDP2 plugin
        shards each module of these classes on its own (transformer-based auto wrap)."""
        return getattr(self.base_model, "_no_split_modules", None)

    @property
    def is_sharded(self) -> bool:
        """Whether FSDP2 (``fully_shard`` at its root) or DeepSpeed ZeRO-3 shards this model."""
        return self._sharded_layers is not None or isinstance(self, FSDPModule) or self._partitioned_by_zero3()

    def _partitioned_by_zero3(self) -> bool:
        if "deepspeed" not in sys.modules:  # nothing can have partitioned it (every eager call asks)
            return False
        first = next(self.base_model.parameters(), None)
        return first is not None and hasattr(first, "ds_status")

    def use_sharded_layers(self, layers: dict[str, LayerWeights]) -> None:
        """Run the graphs so that these base layers (by path, ``model.layers.3``; see
        :class:`fxpeft.runtime.layer_units.LayerWeights`) gather their weights while their part of the graph runs.
        Called by :func:`fxpeft.distributed.fully_shard`, and on the first call after someone else (Accelerate's FSDP2
        plugin) sharded this model and its layers with ``torch.distributed.fsdp.fully_shard``."""
        self._sharded_layers = dict(layers)
        for program in self._programs.values():
            program.set_sharded_layers(self._sharded_layers)

    def _sync_sharded_layers(self) -> None:
        """On the first call after FSDP2 sharded this model, find the layers it sharded on their own; after DeepSpeed
        ZeRO-3 partitioned it (``deepspeed.initialize``, Accelerate's or the Trainer's DeepSpeed plugin), gather its
        layers one at a time (fxpeft/distributed/zero3.py) and its other tensors for this call."""
        if self._sharded_layers is not None or torch.compiler.is_compiling():  # sharded models run eagerly
            return
        if isinstance(self, FSDPModule):
            self.use_sharded_layers(sharded_modules(self.base_model))
        elif self._partitioned_by_zero3():
            from fxpeft.distributed.zero3 import prepare_zero3

            prepare_zero3(self).gather_root()

    def _check_capturable(self, names: list[str]) -> None:
        """A new argument signature is captured from whole weights, which a sharded model does not have."""
        if self.is_sharded:
            raise FxpeftError(
                f"The adapted model is sharded (FSDP2 or ZeRO-3) and was called with a new set of arguments ({names}): "
                "capture needs whole weights. Call it once with these arguments before sharding, or give them to "
                "transform(..., example_kwargs=...).")

    def _check_not_sharded(self, what: str) -> None:
        """Sharded, the model's tensors are split over the ranks: new adapter tensors would be no rank's shard
        (their gradients never averaged) and a merge would add whole deltas to shards."""
        if self.is_sharded:
            raise UnsupportedError(
                f"{what}() on a model sharded with FSDP2 or ZeRO-3 is not supported: add every adapter before "
                "sharding; to merge, save the adapter (fxpeft.distributed.save_adapter) and merge it into the base "
                "model in one process.")
