"""Train an adapted model under DeepSpeed ZeRO-3, its base weights gathered one layer at a time.

ZeRO-3 partitions every parameter (each rank keeps 1/N of it in ``param.ds_tensor``, on the CPU with ``offload_param``;
``param.data`` is an empty tensor) and gathers a module's parameters in forward and backward hooks of the module that
owns them. fxpeft's captured graph reads the base model's parameters by name and never calls those modules, so none of
those hooks fire and the graph would read empty tensors (``'weight' must be 2-D`` at the embedding).

:func:`prepare_zero3` makes the graph gather what it reads, through DeepSpeed's partitioned-parameter API
(``param.all_gather()``, ``param.partition()``), as FSDP2 is driven in fxpeft/distributed/sharding.py:

* Every numbered layer of the base model (:func:`fxpeft.distributed.layer_modules`) becomes a :class:`Zero3Layer`,
  a :class:`fxpeft.runtime.layer_units.LayerWeights`: its part of the graph runs as one ``GatheredLayer`` call that
  gathers the layer's weights, runs, and partitions them again; autograd hooks gather them again before the part's
  backward and partition them after it.
* Everything else (embeddings, final norm, LM head, every adapter tensor: the *root*) is gathered in a forward
  pre-hook of the adapted model and stays whole until the end of the backward that follows (a callback queued on
  autograd's engine), or until the end of the forward when nothing records a backward. DeepSpeed's own gradient hooks
  (``register_post_accumulate_grad_hook`` on each trainable parameter) then see whole adapter gradients and
  reduce-scatter them into their partitions, as for an eager model; its optimizer updates the partitions and the next
  forward gathers the updated adapters.

Why the weights are copied into storage of our own: autograd saves *views* of the weights the graph reads (the
transposed weight of a linear layer), and DeepSpeed frees a parameter by pointing ``param.data`` at an empty tensor,
which leaves the old storage alive as long as a saved view refers to it: every layer's weights would stay whole from
its forward until its backward, the whole base at once. So each partitioned parameter of a layer has a storage of its
own: a gather copies DeepSpeed's gathered tensor into it and points ``param.data`` at it (DeepSpeed's buffer is dropped
at once), a release partitions the parameter and resizes that storage to zero bytes (the saved views then hold
nothing), and the gather before a backward refills the same storage, so the views autograd saved read the weights
again, as FSDP2 does with its unsharded storage. Parameters are gathered one at a time, so DeepSpeed's transient buffer
is one parameter, not a layer. The root needs no copy: it is released when its backward is over, when autograd has
freed what it saved. Peak per rank (:class:`GatherLedger` counts it): the root, one layer and one parameter in flight;
for now two layers for a moment in backward (the hook that gathers a layer for its backward runs before the one that
releases the layer after it: see ``_gather_around_backward`` in fxpeft/runtime/layer_units.py).

Parameters ZeRO-3 keeps whole (``ds_persist``, below ``stage3_param_persistence_threshold``) and parameters someone else
gathered (a ``GatheredParameters`` block, DeepSpeed's own hooks) are left as they are. Call :func:`prepare_zero3` before
or after ``deepspeed.initialize``, on the adapted model or on the engine; capture every argument signature first (one
call per signature, or ``transform(..., example_kwargs=...)``): capture reads whole weights. DeepSpeed is imported only
when a parameter it partitioned is met; it is not a dependency of fxpeft. Example::

    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8), example_kwargs=batch)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=adapted, optimizer=optimizer, config=zero3_config)
    fxpeft.distributed.zero3.prepare_zero3(engine)
    loss = engine(**batch).loss; engine.backward(loss); engine.step()
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fxpeft.errors import FxpeftError, UnsupportedError

__all__ = ["GatherLedger", "Zero3Layer", "Zero3Units", "is_zero3_partitioned", "prepare_zero3"]

_PREPARED = "_fxpeft_zero3_units"


def is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``parameter`` (it carries ``ds_status``) and does not keep it whole on
    every rank (``ds_persist``)."""
    return hasattr(parameter, "ds_status") and not getattr(parameter, "ds_persist", False)


@functools.lru_cache(maxsize=None)
def _status():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


class GatherLedger:
    """Bytes of gathered base and adapter weights that fxpeft holds whole on this rank: ``held_bytes`` now,
    ``peak_bytes`` the most at once since the last :meth:`reset_peak` (DeepSpeed's buffer of the parameter being
    gathered included), and ``gathers``, how many parameter gathers were made."""

    def __init__(self):
        self.held_bytes = 0
        self.peak_bytes = 0
        self.gathers = 0

    def reset_peak(self) -> None:
        """Start measuring the peak again from what is held now."""
        self.peak_bytes = self.held_bytes

    def _grow(self, nbytes: int, transient: int = 0) -> None:
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes + transient)

    def _shrink(self, nbytes: int) -> None:
        self.held_bytes -= nbytes


class _WholeParameters:
    """Partitioned parameters gathered and partitioned again (see the module docstring). ``parameters`` gives the list
    at each gather (the root's changes when adapters are added). ``own_storage``: copy each gathered parameter into a
    storage of this holder's, freed (resized to 0 bytes) on release and refilled by the next gather, for parameters
    gathered again for a backward (the layers'); else (the root's, whole from the forward to the end of its backward,
    when autograd has freed what it saved) DeepSpeed's gathered tensor is used as it is, with no copy."""

    def __init__(self, parameters: Callable[[], Iterable[nn.Parameter]], ledger: GatherLedger,
                 own_storage: bool = True):
        self._parameters = parameters
        self._ledger = ledger
        self._own_storage = own_storage
        self._storage: dict[int, torch.UntypedStorage] = {}  # by id(parameter): its storage, kept across steps
        self._held: dict[int, tuple[nn.Parameter, int]] = {}  # gathered here, not released: (parameter, bytes held)

    @property
    def held(self) -> list[nn.Parameter]:
        """The parameters this holder gathered and holds whole now."""
        return [parameter for parameter, _ in self._held.values()]

    @torch.no_grad()
    def gather(self) -> None:
        status = None
        for parameter in self._parameters():
            if not is_zero3_partitioned(parameter):
                continue
            status = status or _status()
            key = id(parameter)
            if key in self._held:
                if parameter.ds_status == status.AVAILABLE:
                    continue
                self._drop(key)  # DeepSpeed partitioned it meanwhile (its optimizer step does): free ours too
            if parameter.ds_status != status.NOT_AVAILABLE:
                continue  # whole already: someone else gathered it, and will partition it
            self._gather_one(key, parameter)

    def _gather_one(self, key: int, parameter: nn.Parameter) -> None:
        parameter.all_gather()
        gathered = parameter.data
        self._ledger.gathers += 1
        if not self._own_storage:
            nbytes = gathered.untyped_storage().nbytes()
            self._ledger._grow(nbytes)
            self._held[key] = (parameter, nbytes)
            return
        nbytes = gathered.numel() * gathered.element_size()
        storage = self._storage.get(key)
        if storage is None or storage.device != gathered.device:
            storage = torch.empty(nbytes, dtype=torch.uint8, device=gathered.device).untyped_storage()
            self._storage[key] = storage
        else:
            storage.resize_(nbytes)
        self._ledger._grow(nbytes, transient=gathered.untyped_storage().nbytes())
        whole = torch.empty(0, dtype=gathered.dtype, device=gathered.device).set_(storage, 0, gathered.shape)
        whole.copy_(gathered)
        parameter.data = whole  # DeepSpeed's buffer has no other reference now: it is freed here
        self._held[key] = (parameter, nbytes)

    @torch.no_grad()
    def release(self) -> None:
        if not self._held:
            return
        status = _status()
        held = [parameter for parameter, _ in self._held.values()]
        partition = [p for p in held if p.ds_status == status.AVAILABLE and not p.ds_active_sub_modules]
        busy = {id(p) for p in held if p.ds_active_sub_modules}  # a DeepSpeed hook computes with it: keep it
        if partition:
            partition[0].partition(param_list=partition)
        for key in [key for key in self._held if key not in busy]:
            self._drop(key)

    def _drop(self, key: int) -> None:
        _, nbytes = self._held.pop(key)
        self._ledger._shrink(nbytes)
        if self._own_storage:
            self._storage[key].resize_(0)  # the views autograd saved now hold nothing; the next gather refills it


class Zero3Layer:
    """A base layer whose parameters ZeRO-3 partitions, as :class:`fxpeft.runtime.layer_units.GatheredLayer` uses it:
    :meth:`gather` makes them whole (into storages of its own, see the module docstring), :meth:`release` partitions
    them again and frees those storages."""

    def __init__(self, module: nn.Module, ledger: GatherLedger | None = None):
        self.module = module
        self._whole = _WholeParameters(lambda: module.parameters(), ledger or GatherLedger())

    def gather(self) -> None:
        """Gather every partitioned parameter of the layer that is not whole yet (a collective: every rank)."""
        self._whole.gather()

    def release(self) -> None:
        """Partition the parameters this layer gathered and free their storage (no communication)."""
        self._whole.release()


class Zero3Units:
    """What :func:`prepare_zero3` set up on an adapted model: ``layers`` (:class:`Zero3Layer` by path), the root's
    gather (everything outside the layers), and ``ledger``, the bytes of gathered weights held at once."""

    def __init__(self, adapted: nn.Module, layers: dict[str, nn.Module]):
        self.ledger = GatherLedger()
        self.layers = {key: Zero3Layer(layer, self.ledger) for key, layer in layers.items()}
        in_layers = {id(p) for layer in layers.values() for p in layer.parameters()}
        self._root = _WholeParameters(lambda: (p for p in adapted.parameters() if id(p) not in in_layers),
                                      self.ledger, own_storage=False)
        self._hooks = [adapted.register_forward_pre_hook(self._before_forward),
                       adapted.register_forward_hook(self._after_forward)]

    @property
    def root_held(self) -> list[nn.Parameter]:
        """The root's parameters gathered by fxpeft and whole now."""
        return self._root.held

    def gather_root(self) -> None:
        """Gather the root's partitioned parameters (a collective: every rank)."""
        self._root.gather()

    def release_all(self) -> None:
        """Partition whatever fxpeft holds gathered: the root and every layer."""
        self._root.release()
        for layer in self.layers.values():
            layer.release()

    def _before_forward(self, module, args) -> None:
        self._root.gather()

    def _after_forward(self, module, args, output) -> None:
        recorded = [value for value in _tensors(output) if value.requires_grad]
        if torch.is_grad_enabled() and recorded:
            torch.autograd.graph.register_multi_grad_hook(recorded, self._before_backward, mode="any")
        else:
            self.release_all()

    def _before_backward(self, grads) -> None:
        # Whole for the backward (a backward of an earlier forward may have released it), partitioned at its end.
        self._root.gather()
        torch.autograd.Variable._execution_engine.queue_callback(self.release_all)


def _tensors(output: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if isinstance(output, dict) and not isinstance(output, torch.Tensor):
        output = list(output.values())  # a ModelOutput, whether or not it is a registered pytree node
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def prepare_zero3(model: nn.Module) -> Zero3Units:
    """Make an adapted model (from :func:`fxpeft.transform`, or the ``DeepSpeedEngine`` wrapping it) train under
    DeepSpeed ZeRO-3 with its base weights gathered one layer at a time (see the module docstring). Call it on every
    rank, before or after ``deepspeed.initialize``; a second call returns what the first set up. Returns the
    :class:`Zero3Units` (its ``ledger`` measures what is gathered)."""
    from fxpeft.distributed.sharding import layer_modules
    from fxpeft.model import AdaptedModel

    adapted = getattr(model, "module", model)
    if not isinstance(adapted, AdaptedModel):
        raise FxpeftError("prepare_zero3 takes the model fxpeft.transform returned (or the DeepSpeed engine that "
                          f"wraps it), not a {type(adapted).__name__}.")
    prepared = adapted.__dict__.get(_PREPARED)
    if prepared is not None:
        return prepared
    if adapted.merged_adapters:
        raise FxpeftError(f"Adapters {adapted.merged_adapters} are merged: unmerge() before prepare_zero3.")
    if adapted.is_gradient_checkpointing:
        raise UnsupportedError("Gradient checkpointing and ZeRO-3 per layer do not combine yet: call "
                               "gradient_checkpointing_disable() before prepare_zero3.")
    layers = layer_modules(adapted)
    if not layers:
        raise UnsupportedError(
            "The captured graph has no numbered layers to gather one at a time (no module list whose children it runs "
            "one after another). Under ZeRO-3, mark the adapted model's whole forward a leaf module instead "
            "(deepspeed.utils.set_z3_leaf_modules on a module that returns the loss): it gathers the whole base.")
    units = Zero3Units(adapted, layers)
    adapted.use_sharded_layers(dict(units.layers))
    adapted.__dict__[_PREPARED] = units
    return units
