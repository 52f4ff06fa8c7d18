"""The adapted model: an ordinary ``nn.Module`` that runs the rewritten graph of its base model.

It is called with the base model's arguments and returns the base model's output type. Its parameters
are the base model's (frozen) and the adapters' (trainable), so any optimizer works on
``adapted.parameters()``. ``.train()`` / ``.eval()`` choose between the train graph and its eval twin (no
dropout anywhere, including attention's ``dropout_p``). A call with a different *set* of arguments is
captured once more and rewritten with the same adapter tensors; a different *size* never is.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fxpeft.adapters import Adapter, ParameterCopy, SiteModule
from fxpeft.capture.caches import carries_cache
from fxpeft.capture.export import CAPTURE_LOCK, capture, device_of, fixed_kwargs, forward_kwargs
from fxpeft.errors import FxpeftError, RuleError, UnsupportedError
from fxpeft.formats.files import check_same_structure
from fxpeft.graph.program import InputPlan, InputSource, Location, Program, flatten_arguments
from fxpeft.methods import method_for, primary_method
from fxpeft.model_files import AdapterFileMethods
from fxpeft.ops import quantized
from fxpeft.rewrite import apply_rules
from fxpeft.rules import Rule, as_rule_list, check_alpha
from fxpeft.runtime.checkpointing import CheckpointingMethods, base_checkpointing
from fxpeft.runtime.gates import BASE, AdapterFlags, flag_gates, flag_views, row_gates
from fxpeft.runtime.generate import GenerationMethods
from fxpeft.runtime.generation import update_caches_in_place
from fxpeft.runtime.hotswap import HotswapMethods
from fxpeft.runtime.layer_units import LayerWeights
from fxpeft.runtime.peft_surface import PeftSurface
from fxpeft.runtime.recapture import RecaptureMethods
from fxpeft.runtime.regional_compile import RegionalCompileMethods
from fxpeft.runtime.sharding import ShardingMethods
from fxpeft.runtime.signature import adapted_class, reduce
from fxpeft.shared_tensors import check_merge, copy_conflicts, release, track

__all__ = ["AdaptedModel"]

_INT4_CLASSES = ("Params4bit",)
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class AdaptedModel(PeftSurface, AdapterFileMethods, RecaptureMethods, CheckpointingMethods, GenerationMethods,
                   ShardingMethods, RegionalCompileMethods, HotswapMethods, nn.Module):
    """A base model with adapters, run as a rewritten fx graph. Build it with :func:`fxpeft.transform`.

    Attributes:
        base_model: the model that was transformed (its tensors are used, never written).
        adapters: ``nn.ModuleDict`` of adapter name to :class:`fxpeft.adapters.Adapter` (after
            :meth:`prepare_hotswap`, a read-only mapping to the adapters' slots: fxpeft/runtime/hotswap.py).
        compile_layers_once: in calls under ``torch.compile`` without autograd (``torch.no_grad`` or
            ``torch.inference_mode``), run the graph whose repeated layers (``layers.0``, ``layers.1``, ...)
            call one shared region marked with ``torch.compiler.nested_compile_region``, so that a layer is
            traced and compiled once, not once per layer (regional compilation; see fxpeft/runtime/shared_layers.py).
            Default False (opt in, before compiling): torch 2.13's support for such regions is young, and
            fxpeft has met two of its bugs. Calls that record gradients always compile the flat graph: with
            torch 2.13, Inductor's backward of such a region gives wrong gradients once it holds
            ``scaled_dot_product_attention`` and shapes are dynamic. And dynamo fails (``KeyError`` in
            ``invoke_subgraph``) on a plain ``nn.Sequential`` whose width it specializes. Eager calls run the
            flat graph; both graphs give the same numbers.
        fold_gates: in eager calls without ``adapter_names`` (every row uses the active adapters), run the graph
            specialised to the active adapters: no per-row gating ops, inactive adapters' nodes gone, LoRA's branch
            PEFT's ``y + B(A(x)) * scaling`` (fxpeft/runtime/uniform_gates.py). Same values as the gated graph.
            Default True; under ``torch.compile`` the gated graph always runs (switching adapters recompiles
            nothing there). Not with gradient checkpointing, a sharded model, or merged adapters (their graphs run
            as they are).
        gather_mixed_batches: calls with ``adapter_names`` run one gathered product per site for all adapters
            (fxpeft/passes/lora/mixed_batch.py; eval and training). Default True; False runs the gated graph, one
            branch per adapter on every row (same values; for comparison, or to rule the gathered graph out).
    """

    _base_only = False  # inside disable_adapters() with virtual-token adapters: calls run the base model
    fold_gates = True  # see the class docstring
    gather_mixed_batches = True  # see the class docstring

    def __new__(cls, base_model: nn.Module | None = None, *args, **kwargs):
        """An instance of ``Adapted<BaseClass>``, the subclass whose ``forward`` carries the base model's signature
        (fxpeft/runtime/signature.py), for every construction path; subclasses of this class are left as they are."""
        if cls is AdaptedModel and base_model is not None:
            cls = adapted_class(AdaptedModel, type(base_model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        """Pickle ``Adapted<BaseClass>`` by its base class (it is made at run time); see fxpeft/runtime/signature.py."""
        return reduce(self) or super().__reduce_ex__(protocol)

    def __init__(self, base_model: nn.Module, adapters: dict[str, Adapter], example_kwargs: dict[str, Any] | None,
                 dynamic_shapes: dict[str, Any] | None = None):
        super().__init__()
        self.base_model = base_model
        self.adapters = nn.ModuleDict()
        self._flags = AdapterFlags()
        self._base_only = False  # in the instance from the start: disable_adapters() then changes no guarded key
        self._compile_layers_once = False
        self._checkpointing = base_checkpointing(base_model)  # its gradient checkpointing carries over
        device = device_of(base_model)
        if device.type != "meta":  # gates live with the base tensors (on meta: CPU, until real weights come)
            self._flags.to(device)
        for name, adapter in adapters.items():
            self._register_adapter(name, adapter, active=True)
        self._merged: list[str] = []
        self._dynamic_shapes = dynamic_shapes
        self._sharded_layers: dict[str, LayerWeights] | None = None  # layers sharded one by one (FSDP2), once known
        self._programs: dict[tuple, Program] = {}
        program = self._build_program(example_kwargs)
        self._programs[program.key] = program
        self._fixed_kwargs = program.fixed_kwargs  # what the first capture fixed (use_cache=False, ...)
        track(self)  # warns about tensors other uses share (fxpeft/shared_tensors.py)
        self.train(base_model.training)

    # -- graphs -------------------------------------------------------------------------------------
    def _build_program(self, kwargs: dict[str, Any] | None) -> Program:
        # Given dynamic shapes describe the example's arguments; a call with a KV cache gets its own (capture's).
        asks_cache = kwargs is not None and kwargs.get("use_cache") is True
        program = capture(self.base_model, kwargs, dynamic_shapes=None if asks_cache else self._dynamic_shapes)
        program.share_layers = self._compile_layers_once
        program.checkpointing = self._checkpointing
        program.set_regional_compile(self._regional_compile)
        apply_rules(program, self.base_model, self._graph_adapters())
        program.set_sharded_layers(self._sharded_layers or {})
        return program

    @property
    def compile_layers_once(self) -> bool:
        """See the class docstring. Setting it derives (or drops) the shared-layer graphs now, outside tracing."""
        return self._compile_layers_once

    @compile_layers_once.setter
    def compile_layers_once(self, share: bool) -> None:
        self._compile_layers_once = bool(share)
        for program in self._programs.values():
            program.set_share_layers(self._compile_layers_once)

    def programs(self) -> list[Program]:
        """The captured and rewritten programs, one per argument signature seen so far."""
        return list(self._programs.values())

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten train-mode graph of the first captured signature (for inspection)."""
        return next(iter(self._programs.values())).graph_module

    def _resolve(self, source: InputSource, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """One input's value, looked up by name (the reference for :meth:`_resolve_plan`)."""
        if source.kind == "parameter":
            return self.base_model.get_parameter(source.target)
        if source.kind == "buffer":
            return self.base_model.get_buffer(source.target)
        if source.kind == "gate":
            return gates[source.target]
        adapter_name, key, attribute = source.target
        return getattr(self._graph_adapter(adapter_name).sites[key], attribute)

    def _resolve_plan(self, plan: InputPlan, gates: dict[str, torch.Tensor]) -> list:
        """The values of ``plan.resolved``, read where they live now (``ModuleReads``: owners found by paths worked
        out once per plan), so that tensors and modules replaced since (``merge``, ``.to()``, reloaded adapters,
        ``load_base_model``, dequantized layers) are read as they are. Under torch.compile (traced once, free at
        run time) and when a path leads nowhere, each input is looked up by name (``_resolve``)."""
        if not torch.compiler.is_compiling():
            with contextlib.suppress(KeyError, AttributeError):  # a path that leads nowhere now: by name, below
                locate = _location if self._hotswap is None else _slot_location
                return plan.module_reads(locate).read(self, gates)
        return [self._resolve(source, gates) for source in plan.resolved]

    def _gates(self, kwargs: dict[str, Any], adapter_names, known: bool = False) -> dict[str, torch.Tensor]:
        """Per adapter, a [batch] tensor: 1 where a row uses the adapter, 0 where it does not. ``known``: the flags'
        values may be read in Python (an eager call), so the gates are views of the flags, made without a kernel."""
        first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        batch = first.shape[0] if first is not None else 1
        if adapter_names is None:
            flags = {name: self._flags.active(name) for name in self._graph_order()}
            if known:
                return flag_views(flags, self._flags.enabled, self._flags.is_enabled, batch)
            return flag_gates(flags, self._flags.enabled, batch)
        indices = adapter_names if isinstance(adapter_names, torch.Tensor) else self.adapter_indices(adapter_names)
        if indices.shape != (batch,):
            raise FxpeftError(f"adapter_names has {tuple(indices.shape)} entries for a batch of {batch}; "
                              "give one adapter name (or '__base__') per row.")
        return row_gates(self._graph_order(), indices)

    def adapter_indices(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """``adapter_names`` (one per row, ``"__base__"`` for none) as the index tensor ``forward`` takes.

        Under ``torch.compile``, pass this tensor as ``adapter_names=`` instead of a list of strings: a
        list is a constant to dynamo (each new list compiles again), a tensor is data."""
        unknown = sorted({name for name in adapter_names if name != BASE and name not in self.adapters})
        if unknown:
            raise FxpeftError(f"adapter_names names unknown adapters {unknown}; known: {list(self.adapters)} and "
                              f"{BASE!r}.")
        order = self._graph_order()
        device = self._flags.enabled.device
        return torch.tensor([order.index(self._graph_name(n)) if n != BASE else -1 for n in adapter_names],
                            device=device)

    def forward(self, *args, adapter_names: Sequence[str] | torch.Tensor | None = None, **kwargs):
        """Call with the base model's arguments; returns the base model's output type.

        ``adapter_names`` (one name per batch row, ``"__base__"`` for none) applies a different adapter
        to each row, in training and inference alike."""
        if self._base_only:  # disable_adapters() with virtual tokens: the base model itself
            if adapter_names is not None:
                raise FxpeftError("adapter_names cannot be used inside disable_adapters(): every row is the base "
                                  "model's there.")
            return self.base_model(*args, **kwargs)
        if adapter_names is not None:
            self._check_gateable("adapter_names")
        if adapter_names is not None and self._merged:
            raise FxpeftError("adapter_names cannot be used while adapters are merged; call unmerge() first.")
        kwargs = {k: v for k, v in forward_kwargs(self.base_model, args, kwargs).items() if v is not None}
        if self._merged and self.training and torch.is_grad_enabled():
            self._check_merged_training(kwargs)
        if self.training and self._hotswap is not None and self._hotswap.training_refusal is not None:
            raise UnsupportedError(self._hotswap.training_refusal)
        if carries_cache(kwargs) and not self._filling_cache and self._virtual_adapters():
            kwargs = self._with_cached_tokens(kwargs)  # virtual tokens live in the cache: see runtime/virtual_tokens
        # use_cache=False, unless the call asks for a KV cache (generation): then the graph takes and returns one.
        fixed = fixed_kwargs(self._fixed_kwargs, kwargs)
        for name in fixed:
            kwargs.pop(name, None)
        arguments = flatten_arguments({**kwargs, **fixed})  # the signature and the graph's leaves, in one flatten
        program = self._programs.get(arguments.key)
        if program is None:
            if torch.compiler.is_compiling():
                raise FxpeftError(
                    f"The adapted model was called under torch.compile with a new set of arguments "
                    f"({sorted(kwargs)}); capture happens outside compiled code. Call it once eagerly with "
                    "these arguments before compiling, or compile after the first call.")
            self._check_capturable(sorted(kwargs))
            program = self._program_for(arguments.key, {**kwargs, **fixed})
        if adapter_names is not None:
            self._check_whole_call_sites(adapter_names)
        self._sync_sharded_layers()
        # Every row the same adapters, known in Python: an eager call runs the graph without per-row gating.
        uniform = self.fold_gates and adapter_names is None and not torch.compiler.is_compiling()
        active = self._flags.active_set() if uniform else None
        gates = self._gates(kwargs, adapter_names, known=uniform)
        # Inference only: see compile_layers_once (Inductor's backward of a shared region is wrong in torch 2.13).
        share = self.compile_layers_once and torch.compiler.is_compiling() and not torch.is_grad_enabled()
        # One adapter per row: in eval mode and in training one gathered LoRA product per site serves every adapter.
        gather = adapter_names is not None and self.gather_mixed_batches
        output = program.run(self.training, arguments, functools.partial(self._resolve_plan, gates=gates),
                             merged=bool(self._merged), mixed_batch=gather, shared=share, active=active)
        return update_caches_in_place(kwargs, output)

    def _check_whole_call_sites(self, adapter_names: Sequence[str] | torch.Tensor) -> None:
        """Refuse a mixed batch in which an adapter with trained copies (``Trainable``, LoRA's ``bias``: they apply
        to a whole call) shares the call with rows of another adapter or the base model, which would get its copies
        too. PEFT selects such modules per row; fxpeft does not yet, and says so rather than mix them."""
        whole = [name for name, adapter in self.adapters.items()
                 if any(site.serves_whole_call for site in adapter.site_modules())]
        refusals = {name: site.per_row_refusal for name, adapter in self.adapters.items()
                    for site in adapter.site_modules() if site.per_row_refusal}
        if not whole and not refusals:
            return
        indices = adapter_names if isinstance(adapter_names, torch.Tensor) else self.adapter_indices(adapter_names)
        order = list(self.adapters)
        used = {order[index] if index >= 0 else BASE for index in indices.tolist()}
        refused = sorted(used.intersection(refusals))
        if refused:
            raise UnsupportedError(f"adapter_names names {refused}: {refusals[refused[0]]}")
        leaking = sorted(used.intersection(whole))
        if leaking and len(used) > 1:
            raise UnsupportedError(
                f"adapter_names mixes rows of {sorted(used)}, but {leaking} train whole tensors (Trainable, LoRA "
                "bias), which apply to every row of a call: the other rows would get them too. Call each adapter's "
                "rows separately (set_adapter), or keep trained modules out of adapters you mix per row.")

    def _program_for(self, key: tuple, kwargs: dict[str, Any]) -> Program:
        """The program of signature ``key``, captured now if no thread has captured it yet (see ``capture``)."""
        with CAPTURE_LOCK:
            program = self._programs.get(key)
            if program is None:
                program = self._programs[key] = self._build_program(kwargs)
            return program

    # -- several adapters -----------------------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        """RuleError unless ``name`` is a valid name no adapter has."""
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or name == BASE:
            raise RuleError(f"Invalid adapter name {name!r}: use letters, digits, '_' or '-', not {BASE!r}.")
        if name in self.adapters:
            raise RuleError(f"An adapter named {name!r} exists already; delete_adapter({name!r}) first or "
                            "choose another name.")

    def _register_adapter(self, name: str, adapter: Adapter, active: bool) -> None:
        self._check_new_name(name)
        self.adapters[name] = adapter
        self._flags.add(name, active, self._flags.enabled.device)

    def _rebuild(self) -> None:
        with CAPTURE_LOCK:  # not while another thread captures a program of this model
            for program in self._programs.values():
                program.reset()
                apply_rules(program, self.base_model, self._graph_adapters())

    @property
    def active_adapters(self) -> list[str]:
        """Names of the adapters that apply to every row of a call (unless ``adapter_names`` says otherwise)."""
        return [name for name in self.adapters if self._flags.is_active(self._graph_name(name))]

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's single-adapter name)."""
        active = self.active_adapters
        return active[0] if active else next(iter(self.adapters))

    def add_adapter(self, adapter_name: str, rules: Rule | Sequence[Rule]) -> None:
        """Add another adapter (inactive until :meth:`set_adapter`). On a bad rule nothing changes."""
        self._check_not_merged("add_adapter")
        self._check_not_sharded("add_adapter")
        rules = as_rule_list(rules, "add_adapter()")
        if self._hotswap is not None:  # no graph change: a free slot takes it (fxpeft/runtime/hotswap.py)
            self._hotswap_put(adapter_name, rules, None, "add_adapter()", is_trainable=True)
            return
        virtual = self._virtual_adapters() + ([adapter_name] if _is_virtual(rules) else [])
        if virtual:
            raise UnsupportedError(
                f"add_adapter({adapter_name!r}): virtual-token adapters ({virtual}) are part of the graph and apply to "
                "every call, so they cannot sit beside other adapters and be switched on and off. Put the methods "
                "in one adapter (one transform with all the rules), or adapt a separate copy of the base model.")
        self._register_adapter(adapter_name, Adapter(rules), active=False)
        try:
            self._rebuild()
        except Exception:
            del self.adapters[adapter_name]
            self._flags.remove(adapter_name)
            self._rebuild()
            raise
        self._sync_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (and trainable); the others inactive (and frozen). No recompile."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise FxpeftError(f"Unknown adapter(s) {unknown}; known: {list(self.adapters)}.")
        self._check_not_merged("set_adapter")
        left_out = [name for name in self._virtual_adapters() if name not in names]
        if left_out:
            raise UnsupportedError(f"set_adapter({names}) would switch off virtual-token adapters {left_out}, which "
                                   "are part of the graph and always apply.")
        conflicts = copy_conflicts(self, names)
        if conflicts:
            raise UnsupportedError(
                f"set_adapter({names}) refused: these adapters train copies of the same base tensors, and only one "
                f"copy of a tensor can apply at a time (PEFT refuses this too): {'; '.join(conflicts[:4])}. Activate "
                "one of them, or keep such modules (Trainable, LoRA bias) in one adapter only.")
        for name in self.adapters:
            self._flags.set_active(self._graph_name(name), name in names)
        if self._hotswap is not None:
            self._hotswap_refresh()
        if self.training:
            self._sync_trainable()

    def _sync_trainable(self) -> None:
        """Active adapters train, inactive ones are frozen (PEFT's rule). Applied in train mode only:
        ``requires_grad`` is guarded by torch.compile, so switching adapters in eval mode recompiles
        nothing; ``.train()`` applies it. An adapter loaded with ``is_trainable=False`` stays frozen. After
        prepare_hotswap every slot keeps ``requires_grad`` and gradients are dropped instead (runtime/hotswap.py)."""
        if self._hotswap is not None:
            return
        active = set(self.active_adapters)
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in active and not adapter.frozen)

    def train(self, mode: bool = True) -> "AdaptedModel":
        """Switch train/eval graphs (dropout everywhere); in train mode, only active adapters train."""
        super().train(mode)
        if mode and hasattr(self, "_programs"):
            self._sync_trainable()
        if mode and self._hotswap is not None:
            self._hook_slots()  # in case the slot tensors were replaced since (hooks do not travel with tensors)
        return self

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its nodes from every graph."""
        if adapter_name not in self.adapters:
            raise FxpeftError(f"Unknown adapter {adapter_name!r}; known: {list(self.adapters)}.")
        if len(self.adapters) == 1:
            raise FxpeftError("Cannot delete the only adapter; use merge_and_unload() or the base model itself.")
        self._check_not_merged("delete_adapter")
        was_active = self.active_adapters
        if self._hotswap is not None:  # no graph change: the slot is zeroed and freed (fxpeft/runtime/hotswap.py)
            self._hotswap_release(adapter_name)
        else:
            del self.adapters[adapter_name]
            self._flags.remove(adapter_name)
        if was_active and not self.active_adapters:  # PEFT's rule: the first remaining adapter becomes active
            first = next(iter(self.adapters))
            warnings.warn(f"delete_adapter({adapter_name!r}) deleted the only active adapter; {first!r} is active "
                          "now, as in PEFT. Call set_adapter() to choose another.", stacklevel=2)
            self.set_adapter(first)
        if self._hotswap is None:
            self._rebuild()

    @contextlib.contextmanager
    def disable_adapters(self):
        """Inside this block the model gives the base model's outputs bit for bit. No recompile.

        With a virtual-token adapter (prompt, P-tuning, prefix: its tokens are part of every graph), calls and
        ``generate`` inside the block run the base model itself, as PEFT's ``disable_adapter()`` does for them; under
        torch.compile, entering and leaving the block then changes what dynamo guards on (one recompile each way)."""
        previous = self._flags.is_enabled
        self._flags.set_enabled(False)
        base_only, self._base_only = self._base_only, bool(self._virtual_adapters())
        try:
            yield self
        finally:
            self._flags.set_enabled(previous)
            self._base_only = base_only

    def _virtual_adapters(self) -> list[str]:
        """Adapters with a virtual-token rule (prompt, p-tuning, prefix): their tokens are part of the graph."""
        return [name for name, adapter in self.adapters.items() if _is_virtual(adapter.rules)]

    def _check_gateable(self, what: str) -> None:
        """Virtual tokens lengthen the sequence inside the graph, so they cannot be switched off per call
        or per row the way additive adapters are; refuse rather than silently keep them on."""
        virtual = self._virtual_adapters()
        if virtual:
            raise UnsupportedError(f"{what} is not supported with virtual-token adapters ({virtual}): their "
                                   "prompt is part of the graph. Use the base model itself for base outputs.")

    def set_alpha(self, alpha: float, adapter_name: str | None = None) -> None:
        """Change ``alpha`` (so the scaling of methods that have one) in place. No graph changes, so no recompile."""
        alpha = check_alpha(alpha, "AdaptedModel.set_alpha")
        for site in self.site_modules(adapter_name):
            site.set_alpha(alpha)

    # -- merging ----------------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights now (:meth:`merge`), in merge order; empty when none is."""
        return list(self._merged)

    def _check_not_merged(self, what: str) -> None:
        if self._merged:
            raise FxpeftError(f"{what}() is not possible while adapters {self._merged} are merged; call unmerge().")

    def _check_merged_training(self, kwargs: dict[str, Any]) -> None:
        """Training while trainable adapters are merged trains nothing (no adapter nodes, a frozen base): backward
        would fail with torch's "does not require grad", as PEFT's does. Refuse it clearly unless the call records
        gradients for something else (unfrozen base tensors, inputs that require grad)."""
        trainable = any(p.requires_grad for name in self._merged for p in self.adapters[name].parameters())
        if not trainable or torch.compiler.is_compiling() or any(p.requires_grad for p in self.base_model.parameters())\
                or any(isinstance(v, torch.Tensor) and v.requires_grad for v in kwargs.values()):
            return
        raise FxpeftError(f"Adapters {self._merged} are merged into the base weights, so this training call (train "
                          "mode, gradients enabled) runs a graph in which nothing trains and backward() would fail. "
                          "Call unmerge() before training; for inference while merged, use eval() or torch.no_grad().")

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights; the model then runs the graph
        as captured, with no adapter nodes, so nothing trains: a training call (train mode, autograd on) raises
        until :meth:`unmerge` takes them out again."""
        self._check_not_merged("merge")
        self._check_not_sharded("merge")
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        refusals = list(dict.fromkeys(site.merge_refusal for site in self._merge_order(names) if site.merge_refusal))
        if refusals:
            raise UnsupportedError("merge() refused, nothing was merged: " + " ".join(refusals))
        check_merge(self, names)  # before anything is written: tied weights, other adapted models
        for site in self._merge_order(names):
            site.merge_into(self.base_model)
        for program in self._programs.values():
            program.prepare_merged()
        self._merged = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base weights return to their values (LoRA within float rounding)."""
        for site in reversed(self._merge_order(self._merged)):
            site.unmerge_from(self.base_model)
        self._merged = []

    def _merge_order(self, names: Sequence[str]) -> list[SiteModule]:
        """The sites of ``names`` in the order :meth:`merge` writes them: trained copies first (they overwrite their
        tensor), then the sites that add to it (LoRA), each in adapter and site order. The graph reads the copy and
        adds LoRA's branch to what it computes, so the merged tensor is ``copy + delta``, whatever the adapters'
        order; :meth:`unmerge` undoes them in reverse."""
        sites = [site for name in names for site in self.adapters[name].site_modules()]
        return [site for site in sites if isinstance(site, ParameterCopy)] + \
            [site for site in sites if not isinstance(site, ParameterCopy)]

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the base model itself (its own class, so a transformers
        model keeps ``save_pretrained`` and ``generate``). This adapted model must not be used after."""
        if not self._merged:
            self.merge()
        release(self)  # no longer a use of the base tensors
        return self.base_model

    # -- adapter parameters ---------------------------------------------------------------------------
    def site_modules(self, adapter_name: str | None = None) -> Iterator[SiteModule]:
        """Every site module, of one adapter or of all."""
        names = [adapter_name] if adapter_name else list(self.adapters)
        for name in names:
            yield from self.adapters[name].site_modules()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """Add ``adapter_name``, a combination of ``adapters`` with ``weights``, as PEFT's method of that name
        computes it, through the adapters' method (LoRA: ``"svd"``, ``"linear"`` or ``"cat"``; see
        ``fxpeft.passes.lora.combine``). Inactive until :meth:`set_adapter`."""
        if self._hotswap is not None:
            raise UnsupportedError("add_weighted_adapter() is not supported after prepare_hotswap(): combine the "
                                   "adapters before preparing, or save the combination and load_adapter() it.")
        names = [adapters] if isinstance(adapters, str) else list(adapters)
        unknown = [name for name in names if name not in self.adapters]
        if not names or unknown:
            raise FxpeftError(f"add_weighted_adapter: unknown adapter(s) {unknown or names}; "
                              f"known: {list(self.adapters)}.")
        method = primary_method([rule for name in names for rule in self.adapters[name].rules],
                                "add_weighted_adapter")
        method.combine(self, names, weights, adapter_name, combination_type=combination_type, svd_rank=svd_rank)

    # -- parameter counts, as PEFT reports them -------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, computed as PEFT computes them (after prepare_hotswap: each adapter at
        its own rank, as a fresh transform with these adapters counts them)."""
        if self._hotswap is not None:
            return self._hotswap_counts()
        trainable = total = 0
        for parameter in self.parameters():
            count = parameter.numel()
            if type(parameter).__name__ in _INT4_CLASSES:
                count *= 2  # PEFT counts packed 4-bit weights by their unpacked size
            total += count
            if parameter.requires_grad:
                trainable += count
        total -= sum(site.shadowed_base_parameters() for site in self.site_modules())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- the base model -------------------------------------------------------------------------------
    def load_base_model(self, model: nn.Module) -> None:
        """Replace the base model by one of the same structure (e.g. real weights for a model planned on
        ``meta``). Shapes are checked first; graphs retarget to the new device on the next call and
        adapter tensors created on ``meta`` are moved and initialised."""
        check_same_structure(self.base_model, model)
        device = next(model.parameters()).device
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        quantized.rebind(self.base_model, model)
        self.base_model = model
        self._flags.to(device)
        for site in self.site_modules():
            site.retarget(model)
        if self._hotswap is not None:
            self._hook_slots()


def _location(source: InputSource) -> Location:
    """Where an input lives, seen from the adapted model: its owner's module path and its name there (a gate: no
    path, by adapter name)."""
    if source.kind == "gate":
        return None, source.target
    if source.kind == "adapter":
        adapter_name, key, attribute = source.target
        return ("adapters", adapter_name, "sites", key), attribute
    *path, name = source.target.split(".")  # a parameter or buffer of the base model
    return ("base_model", *path), name


def _slot_location(source: InputSource) -> Location:
    """:func:`_location` after ``prepare_hotswap``: adapter tensors live in their slot (named by the graph)."""
    if source.kind == "adapter":
        slot, key, attribute = source.target
        return ("_hotswap_slots", slot, "sites", key), attribute
    return _location(source)


def _is_virtual(rules) -> bool:
    """Whether some rule's method cannot be gated per call or row (virtual tokens are part of the graph)."""
    return any(not method_for(rule).gateable for rule in rules)
