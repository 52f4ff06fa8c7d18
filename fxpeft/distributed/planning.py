"""Memory per rank, on paper: what a data-parallel LoRA run will hold before anything is launched.

:func:`plan_memory` reports, for an adapted model (or a plain base model and LoRA rules counted from its modules),
a number of ranks and a policy, the bytes **each rank** holds of base weights, adapter weights, adapter gradients
and optimizer state, on the device and in CPU memory, and an estimate of the device's peak. Nothing is allocated:
the model may live on the ``meta`` device, so a 70B plan takes seconds on a laptop. Why: whether a run fits is the
first question of every distributed run, and the answer depends on details of FSDP2 that are easy to get wrong
(padding, what stays unsharded, where offloaded gradients live).

The sharding planned is what :func:`fxpeft.distributed.fully_shard` does: ``torch.distributed.fsdp.fully_shard``
(FSDP2) once per numbered layer (``model.layers.N``, ``encoder.block.N``), and once at the root for everything else
(embeddings, final norms, the head) **and every adapter parameter** (fxpeft's adapters live beside the base model,
not inside its layers). For an adapted model the layers are those its graph runs as separable regions, as
``fully_shard`` finds them (:func:`fxpeft.distributed.layer_modules`); for a plain model, the outermost numbered
children of every ``nn.ModuleList`` (:func:`layer_groups`: T5's ``block.N.layer.M`` stays inside ``block.N``);
``layers=`` overrides.

Read from torch 2.13's ``_fully_shard/_fsdp_param.py``, ``_fsdp_collectives.py`` and ``_fsdp_state.py``:

* every parameter is sharded on dim 0 in ``torch.chunk`` pieces of ``ceil(dim0 / N)`` rows, and **every rank
  allocates that padded piece** (``padded_sharded_param_size = chunks[0].size()``, zero-filled), even a rank whose
  rows run out; a 0-dim parameter counts as one row;
* sharded gradients (no offload) are views into one padded reduce-scatter output: padded on every rank;
  with CPU offload they are ``.to("cpu")`` copies of the unpadded view, so rank-dependent;
* AdamW's states are ``zeros_like`` of the sharded parameter's local (unpadded) tensor: rank-dependent, in the
  parameter's dtype; AdamW's ``step`` scalars (4 bytes per parameter tensor) are not counted;
* an unsharded parameter is a view of its all-gather output of ``ceil(dim0 / N) * N`` rows (padded).

Policies (the base weights are frozen: no gradients, no optimizer state; adapters train):

``"ddp"``: everything replicated on the device; gradients all-reduced. DDP's reducer keeps its buckets beside the
    gradients (``gradient_as_bucket_view=False``, torch's default): one more copy of the gradients in the peak.
``"fsdp2"``: parameters, gradients (reduce-scattered to 1/N) and optimizer state sharded on the device.
``"fsdp2-offload"``: ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state in CPU memory; the
    device holds only what is unsharded while computing.

Peak device memory (the estimate; **activations are not planned**): the sharded steady state, plus the root's
unsharded parameters (the root is not resharded after forward, so they live for the whole step, every adapter
among them), plus every adapter gradient at full size (the adapters belong to the root, whose gradients are
reduce-scattered once, when the whole backward is done), plus the larger of two unsharded layers (the current
and the prefetched one) and the reduce-scatter's padded input buffer (a copy of those gradients, made after the
layers are resharded). All-gather staging buffers and the allocator's fragmentation are not planned either.

A model with no numbered layers is planned as root-only (torch's ``fully_shard`` at the root: the whole model is
unsharded for the whole step; ``fxpeft.distributed.fully_shard`` refuses such a model), and its plan says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from torch import nn

from fxpeft.distributed.sharding import layer_modules
from fxpeft.errors import FxpeftError
from fxpeft.model import AdaptedModel

__all__ = ["POLICIES", "ROOT", "GIB", "ParameterSpec", "MemoryBytes", "MemoryPlan", "plan_memory", "plan_parameters",
           "plans_table", "parameter_specs", "layer_groups", "shard_rows"]

POLICIES = ("ddp", "fsdp2", "fsdp2-offload")
ROOT = ""  # the group name of the root's parameters
GIB = 2 ** 30
_ACTIVATIONS = "Activations, all-gather staging buffers and allocator fragmentation are not planned."


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One parameter as the plan sees it: its ``shape``, bytes per element, FSDP2 group (a layer path, or
    :data:`ROOT`), whether it trains and whether it is an adapter's (else the base model's)."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    group: str = ROOT
    trainable: bool = False
    adapter: bool = False

    @property
    def numel(self) -> int:
        """Elements of the whole parameter."""
        return math.prod(self.shape)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(padded, actual)`` dim-0 rows that ``rank`` of ``world_size`` holds of a dim 0 of ``rows``, as FSDP2
    shards it (``torch.chunk``): every rank allocates ``padded = ceil(rows / world_size)`` rows; ``actual`` of them
    are the parameter's (fewer on the last ranks, possibly none)."""
    padded = -(-rows // world_size)
    return padded, max(0, min(padded, rows - rank * padded))


@dataclasses.dataclass(frozen=True)
class MemoryBytes:
    """Bytes of each category in one place (the device, or CPU memory) of one rank."""

    base_weights: int = 0
    adapter_weights: int = 0
    gradients: int = 0  # of the trained parameters: the adapters' (base ones too in a full fine-tuning plan)
    optimizer_states: int = 0

    @property
    def total(self) -> int:
        """The sum of the four categories."""
        return self.base_weights + self.adapter_weights + self.gradients + self.optimizer_states


_CATEGORIES = (("base weights", "base_weights"), ("adapter weights", "adapter_weights"),
               ("gradients", "gradients"), ("optimizer states", "optimizer_states"))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What one rank holds under ``policy``, in bytes: ``device`` and ``cpu`` (:class:`MemoryBytes`, the steady
    state of an optimizer step: parameters, gradients and optimizer state all alive), the transient parts of the
    peak (``root_unsharded``, ``layers_unsharded`` for the two largest layers, ``full_gradients`` and
    ``reduce_buffer``: FSDP2's padded reduce-scatter input, or DDP's buckets), ``peak_device`` (their sum as the
    module docstring says) and ``notes`` (what the plan assumed). ``str(plan)`` and :meth:`table` give a markdown
    table in GiB."""

    policy: str
    world_size: int
    rank: int
    optimizer_states_per_element: int
    device: MemoryBytes
    cpu: MemoryBytes
    root_unsharded: int
    layers_unsharded: int
    full_gradients: int
    reduce_buffer: int
    peak_device: int
    layers: int
    base_parameters: int
    adapter_parameters: int
    trainable_parameters: int
    notes: tuple[str, ...] = ()
    title: str = ""

    def table(self) -> str:
        """A markdown table in GiB: each category on the device and in CPU memory, the transient terms, the peak,
        then the notes."""
        head = f"**{self.title}**\n\n" if self.title else ""
        lines = [f"| {self.policy}, rank {self.rank} of {self.world_size} | device GiB | CPU GiB |",
                 "| --- | ---: | ---: |"]
        for label, field in _CATEGORIES:
            lines.append(f"| {label} | {_gib(getattr(self.device, field))} | {_gib(getattr(self.cpu, field))} |")
        lines.append(f"| steady total | {_gib(self.device.total)} | {_gib(self.cpu.total)} |")
        if self.policy == "ddp":
            lines.append(f"| + DDP buckets | {_gib(self.reduce_buffer)} | |")
        else:
            lines.append(f"| + root unsharded (whole step) | {_gib(self.root_unsharded)} | |")
            lines.append(f"| + gradients, full size | {_gib(self.full_gradients)} | |")
            lines.append(f"| + max(2 layers unsharded, reduce-scatter input) | "
                         f"{_gib(max(self.layers_unsharded, self.reduce_buffer))} | |")
        lines.append(f"| **peak device (estimate)** | **{_gib(self.peak_device)}** | |")
        return head + "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in self.notes)

    def __str__(self) -> str:
        return self.table()


def plans_table(plans: Mapping[str, MemoryPlan]) -> str:
    """Several plans side by side (one column pair per plan, keyed by a label) as a markdown table in GiB."""
    labels = list(plans)
    lines = ["| GiB per rank | " + " | ".join(f"{label}: device | {label}: CPU" for label in labels) + " |",
             "| --- |" + " ---: | ---: |" * len(labels)]
    for label, field in _CATEGORIES:
        lines.append(f"| {label} | " + " | ".join(
            f"{_gib(getattr(p.device, field))} | {_gib(getattr(p.cpu, field))}" for p in plans.values()) + " |")
    lines.append("| steady total | " + " | ".join(f"{_gib(p.device.total)} | {_gib(p.cpu.total)}"
                                                   for p in plans.values()) + " |")
    lines.append("| **peak device (estimate)** | " + " | ".join(f"**{_gib(p.peak_device)}** | "
                                                                 for p in plans.values()) + " |")
    return "\n".join(lines)


# -- which FSDP2 group each parameter belongs to ---------------------------------------------------------------------

def layer_groups(model: nn.Module) -> list[str]:
    """The paths of the modules that get a ``fully_shard`` of their own: the numbered children of every
    ``nn.ModuleList`` that no such module already contains (``model.layers.0``, ``encoder.block.3``), in model
    order. Everything else belongs to the root."""
    layers: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(path == layer or path.startswith(layer + ".") for layer in layers):
            continue
        prefix = f"{path}." if path else ""
        layers += [prefix + name for name, _ in module.named_children() if name.isdigit()]
    return layers


def _group_of(name: str, layers: Sequence[str]) -> str:
    for layer in layers:
        if name.startswith(layer + "."):
            return layer
    return ROOT


def parameter_specs(model: nn.Module, layers: Sequence[str] | None = None) -> list[ParameterSpec]:
    """The specs of a model's parameters: for an :class:`~fxpeft.AdaptedModel`, its base model's (grouped by layer,
    frozen) and its adapters' (root; trainable where they require grad); for any other module, its own parameters
    as base weights (trainable where they require grad: a full fine-tuning plan). Tied tensors count once.
    ``layers``: the paths sharded on their own; default :func:`fxpeft.distributed.layer_modules` for an adapted model
    (what ``fxpeft.distributed.fully_shard`` shards), :func:`layer_groups` for any other module."""
    if isinstance(model, AdaptedModel):
        base, adapters = model.base_model, model.adapters
        layers = list(layer_modules(model)) if layers is None else list(layers)
    else:
        base, adapters = model, None
        layers = layer_groups(model) if layers is None else list(layers)
    specs = [ParameterSpec(name, tuple(p.shape), p.element_size(), _group_of(name, layers),
                           trainable=adapters is None and p.requires_grad)
             for name, p in base.named_parameters()]
    if adapters is not None:
        specs += [ParameterSpec(f"adapters.{name}", tuple(p.shape), p.element_size(), ROOT,
                                trainable=p.requires_grad, adapter=True)
                  for name, p in adapters.named_parameters()]
    return specs


# -- the plan ------------------------------------------------------------------------------------------------------

def plan_parameters(specs: Iterable[ParameterSpec], world_size: int, policy: str = "fsdp2", *,
                    optimizer_states: int = 2, rank: int | None = None, title: str = "") -> MemoryPlan:
    """The plan for parameters given as :class:`ParameterSpec` (what :func:`plan_memory` calls; use it directly
    for what-ifs, e.g. full fine-tuning with every base parameter trainable). ``rank`` None plans rank 0, which
    holds the most (every rank allocates the padded shard; rank 0's optimizer state is never short)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise FxpeftError(f"world_size must be an integer >= 1 (the number of ranks), got {world_size!r}.")
    if policy not in POLICIES:
        raise FxpeftError(f"Unknown policy {policy!r}; use one of {list(POLICIES)}.")
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int) or optimizer_states < 0:
        raise FxpeftError(f"optimizer_states must be an integer >= 0 (states per trained element: 2 for AdamW), "
                          f"got {optimizer_states!r}.")
    rank = 0 if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise FxpeftError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    specs = list(specs)
    shard = policy != "ddp"
    n = world_size if shard else 1
    k = rank if shard else 0
    weights = {True: 0, False: 0}  # adapter -> padded shard bytes
    grads_padded = grads_actual = states = full_grads = rs_input = 0
    root = 0
    per_layer: dict[str, int] = {}
    for spec in specs:
        rows = spec.shape[0] if spec.shape else 1
        rest = spec.numel // rows if rows else 0
        padded, actual = shard_rows(rows, n, k)
        padded_bytes, actual_bytes = padded * rest * spec.itemsize, actual * rest * spec.itemsize
        unsharded = padded * n * rest * spec.itemsize
        weights[spec.adapter] += padded_bytes
        if spec.trainable:
            grads_padded += padded_bytes
            grads_actual += actual_bytes
            states += optimizer_states * actual_bytes
            full_grads += spec.numel * spec.itemsize
            rs_input += unsharded
        if spec.group == ROOT:
            root += unsharded
        else:
            per_layer[spec.group] = per_layer.get(spec.group, 0) + unsharded
    layers_unsharded = sum(sorted(per_layer.values(), reverse=True)[:2])
    notes = [_ACTIVATIONS]
    if policy == "ddp":
        device = MemoryBytes(weights[False], weights[True], grads_padded, states)
        cpu = MemoryBytes()
        rs_input = full_grads
        peak = device.total + rs_input
        root = layers_unsharded = 0
        notes.append("DDP: everything replicated; the peak adds the reducer's buckets, one more copy of the "
                     "gradients (gradient_as_bucket_view=False, torch's default).")
    else:
        sharded = MemoryBytes(weights[False], weights[True], grads_padded, states)
        if policy == "fsdp2":
            device, cpu = sharded, MemoryBytes()
        else:
            device = MemoryBytes()
            cpu = dataclasses.replace(sharded, gradients=grads_actual)
        peak = device.total + root + full_grads + max(layers_unsharded, rs_input)
        notes.append(f"FSDP2 over {world_size} rank(s): dim 0 in ceil(rows / {world_size}) pieces, each rank "
                     "allocating the padded piece; the root (embeddings, final norms, head, every adapter) stays "
                     "unsharded for the whole step.")
        if not per_layer:
            notes.append("No numbered layers: planned as root-only (torch's fully_shard at the root; "
                         "fxpeft.distributed.fully_shard refuses such a model), so the whole model is unsharded "
                         "during the step.")
    if optimizer_states != 2:
        notes.append(f"{optimizer_states} optimizer state(s) per trained element, in the parameter's dtype.")
    else:
        notes.append("AdamW: 2 states per trained element, in the parameter's dtype (float32 adapters).")
    return MemoryPlan(
        policy=policy, world_size=world_size, rank=rank, optimizer_states_per_element=optimizer_states,
        device=device, cpu=cpu, root_unsharded=root, layers_unsharded=layers_unsharded,
        full_gradients=full_grads, reduce_buffer=rs_input, peak_device=peak, layers=len(per_layer),
        base_parameters=sum(s.numel for s in specs if not s.adapter),
        adapter_parameters=sum(s.numel for s in specs if s.adapter),
        trainable_parameters=sum(s.numel for s in specs if s.trainable), notes=tuple(notes), title=title)


def plan_memory(model: nn.Module, world_size: int, policy: str = "fsdp2", *,
                adapters: Sequence[ParameterSpec] | None = None,
                optimizer_states: int = 2, rank: int | None = None, layers: Sequence[str] | None = None,
                title: str = "") -> MemoryPlan:
    """What each of ``world_size`` ranks holds to train ``model`` under ``policy`` (one of :data:`POLICIES`), in
    bytes, as the module docstring says. Nothing is allocated; ``model`` may be on the ``meta`` device.

    ``model``: an :class:`~fxpeft.AdaptedModel` (its adapters are planned as they are), or a plain base model with
    ``adapters``, the specs of the adapter parameters it would get, counted without a capture (a method's own
    counter: ``fxpeft.passes.lora.sizes.lora_parameter_specs(model, rule)``, seconds for a 70B model where a capture
    takes minutes). A plain model without ``adapters`` is planned as it is: parameters that require grad train (full
    fine-tuning).
    ``optimizer_states``: states per trained element (2 for AdamW, 1 for SGD with momentum, 0 for none).
    ``rank``: the rank to plan (default 0, the one that holds the most). ``layers``: the module paths sharded on
    their own (default: :func:`fxpeft.distributed.layer_modules` of an adapted model, what
    ``fxpeft.distributed.fully_shard`` shards; :func:`layer_groups` of a plain model, which a capture may find fewer
    of). Example::

        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        lora = lora_parameter_specs(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=16))
        print(plan_memory(model, 8, "fsdp2-offload", adapters=lora))
    """
    if not isinstance(model, nn.Module):
        raise FxpeftError(f"plan_memory needs an nn.Module (an AdaptedModel or a base model), got {type(model)!r}.")
    if adapters is not None and isinstance(model, AdaptedModel):
        raise FxpeftError("plan_memory: `adapters` is for a plain base model; an AdaptedModel brings its own.")
    if adapters is None:
        specs = parameter_specs(model, layers)
    else:
        layers = layer_groups(model) if layers is None else list(layers)
        specs = [ParameterSpec(name, tuple(p.shape), p.element_size(), _group_of(name, layers))
                 for name, p in model.named_parameters()] + list(adapters)
    return plan_parameters(specs, world_size, policy, optimizer_states=optimizer_states, rank=rank, title=title)
