"""fxpeft past one machine: shard an adapted model per layer with FSDP2, save its adapters once, plan memory per rank.

DistributedDataParallel needs nothing from here (wrap the adapted model; only adapter gradients are communicated).
For FSDP2, :func:`fully_shard` shards the frozen base per transformer layer and the adapters with the root;
:func:`load_sharded_weights` fills a base built on the meta device rank by rank; :func:`save_adapter` writes the
gathered adapter once in PEFT's layout; :func:`save_training_state` / :func:`load_training_state` resume a sharded run.
:func:`prepare_zero3` does the same under DeepSpeed ZeRO-3 (the model calls it itself once DeepSpeed partitioned
it). :func:`plan_memory` says, before anything runs, what each rank will hold.
"""

from fxpeft.distributed.checkpoints import gathered_adapters, load_training_state, save_adapter, save_training_state
from fxpeft.distributed.planning import POLICIES, MemoryBytes, MemoryPlan, plan_memory, plans_table
from fxpeft.distributed.sharding import fully_shard, layer_modules, load_sharded_weights, local_shard
from fxpeft.distributed.zero3 import prepare_zero3

__all__ = ["POLICIES", "MemoryBytes", "MemoryPlan", "fully_shard", "gathered_adapters", "layer_modules",
           "load_sharded_weights", "load_training_state", "local_shard", "plan_memory", "plans_table", "prepare_zero3",
           "save_adapter", "save_training_state"]
