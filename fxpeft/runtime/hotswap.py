"""Hot swap on a compiled model: adapters added, loaded (of another rank up to a maximum, another alpha), replaced,
deleted and switched without changing the graph, so that ``torch.compile(adapted)`` never compiles again.

PEFT's ``prepare_model_for_compiled_hotswap(model, target_rank)`` pads one adapter's LoRA weights to a rank and makes
its scaling a tensor, so that ``hotswap_adapter`` can copy another file's weights into them; adding or deleting an
adapter still changes the model. fxpeft does more with the same idea, because its graph reads adapters by *slot*:

- :meth:`HotswapMethods.prepare_hotswap` ``(max_rank, slots)`` gives every existing LoRA adapter a slot and adds
  ``slots`` free ones. A slot is an :class:`~fxpeft.adapters.Adapter` with a LoRA site at every linear that some
  adapter targeted then (the *hot-swap sites*), each ``lora_A`` ``[max_rank, in]`` and ``lora_B`` ``[out,
  max_rank]``: an adapter's factors of rank ``r`` are the first ``r`` rows / columns, the rest zeros (which change
  no output and get exactly zero gradients), and a site the adapter does not target has rank 0. The graphs are
  rewritten once, over the slots; their inputs, gates and flags are named by slot, never by adapter.
- After that, ``add_adapter`` / ``load_adapter`` of a new name claim a free slot and write its tensors in place;
  ``load_adapter`` of an existing name and :meth:`HotswapMethods.hotswap_adapter` replace that slot's tensors;
  ``delete_adapter`` zeroes the slot and frees it; ``set_adapter``, ``set_alpha`` and ``disable_adapters`` write
  flags and scalings. Tensors change, the graph does not: nothing recompiles, in eval and in train mode.
- ``adapted.adapters`` maps names to slots (:class:`AdapterNames`); saving, ``peft_config`` and parameter counts show
  each adapter at its own rank, as a fresh transform with it shows it.
- What is the method's own (which rules fit a slot, the sites a rule selects, the stand-in rule a slot's graph is
  rewritten with, padding a site) is asked of the method registry and of the site modules (LoRA's:
  ``passes/lora/hotswap.py`` and ``LoraWeights``): this module names no method.

Training: every slot tensor keeps ``requires_grad=True`` (torch.compile guards on it, so flipping it at
``set_adapter`` would compile again). Instead, after backward the gradients of slots whose adapter is not active, is
frozen (loaded with ``is_trainable=False``) or is free are dropped (set to None, :class:`_GradFilter`), so an optimizer
moves the active adapters only, as PEFT's frozen ones. The compiled backward still computes those zeros.

Limits, each refused with a clear error: LoRA on linear layers only (no DoRA, conv, embedding, ``target_parameters``,
trained biases or ``modules_to_save``, other methods); targets within the hot-swap sites; rank at most ``max_rank``;
at most the prepared number of slots; the graph's LoRA dropout is the slots' (``dropout=``; an active adapter with
another dropout cannot be trained, its eval calls are exact); across processes (DDP), a gradient that must be dropped
is refused in backward (DDP would write its average back after the drop; eager calls, whose folded graph gives
inactive slots no gradient at all, train with ``find_unused_parameters=True``); no sharded model, no
``add_weighted_adapter``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fxpeft.adapters import Adapter, SiteModule
from fxpeft.errors import FxpeftError, RuleError, UnsupportedError
from fxpeft.formats.files import check_state_fits
from fxpeft.formats.peft import without_base_layers
from fxpeft.methods import Method, method_for
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule

__all__ = ["AdapterNames", "HotswapTable", "HotswapMethods", "SLOT_PREFIX"]

SLOT_PREFIX = "hotswap_slot_"


@dataclasses.dataclass(eq=False)
class HotswapTable:
    """Which adapter holds which slot (Python values, read outside compiled code; see the module docstring).

    ``slot_of``: adapter name -> slot name, in the order the adapters were added. ``sites``: the hot-swap sites'
    module paths. ``method`` and ``settings``: the slots' method and what its train graph bakes in
    (``Method.graph_settings``: LoRA's dropout). ``training_refusal``: why a train-mode call must be refused now (an
    active adapter with other settings), or None; the one value compiled code reads, kept up to date by
    :class:`HotswapMethods`."""

    max_rank: int
    slot_names: tuple[str, ...]
    sites: tuple[str, ...]
    method: Method
    settings: dict[str, Any]
    slot_of: dict[str, str] = dataclasses.field(default_factory=dict)
    training_refusal: str | None = None

    def free(self) -> list[str]:
        """The slots no adapter holds, in slot order."""
        taken = set(self.slot_of.values())
        return [slot for slot in self.slot_names if slot not in taken]


class AdapterNames(Mapping[str, Adapter]):
    """``adapted.adapters`` after :meth:`HotswapMethods.prepare_hotswap`: adapter name -> its slot's
    :class:`~fxpeft.adapters.Adapter`, in the order the adapters were added; read-only (add, load and delete adapters
    through the model's methods)."""

    def __init__(self, table: HotswapTable, slots: nn.ModuleDict):
        self._table = table
        self._slots = slots

    def __getitem__(self, name: str) -> Adapter:
        return self._slots[self._table.slot_of[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._table.slot_of))

    def __len__(self) -> int:
        return len(self._table.slot_of)

    def __repr__(self) -> str:
        return f"AdapterNames({dict(self._table.slot_of)})"


class _GradFilter:
    """A post-accumulate-grad hook on a slot tensor: drops its gradient unless the slot's adapter trains now (active,
    adapters enabled, not frozen). torch copies no hooks with a tensor (``deepcopy``, pickling), so the model puts
    them back where they are missing (``HotswapMethods._hook_slots``)."""

    def __init__(self, model: nn.Module, slot: str):
        self.model, self.slot = model, slot

    def __call__(self, tensor: torch.Tensor) -> None:
        if self.model.hotswap_trains(self.slot):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise UnsupportedError(
                "Training a model prepared for hot swap across processes (DDP, Accelerate) is not supported: the "
                "gradients of inactive, frozen and free slots are dropped after backward, and DDP writes its averaged "
                "gradients back after that, so an optimizer with weight decay would move adapters that do not train. "
                "Train without prepare_hotswap (or with one adapter and slots=0), then prepare the model for serving.")
        tensor.grad = None


def _single_rule(rules: list[Rule], what: str) -> tuple[Rule, Method]:
    """The one rule of ``rules`` and its method, if a hot-swap slot can take it; UnsupportedError saying why not."""
    if len(rules) != 1:
        raise UnsupportedError(f"{what}: hot swap takes adapters of one LoRA rule, not {len(rules)} rules "
                               f"({[type(rule).__name__ for rule in rules]}). Use add_adapter/load_adapter on a model "
                               "without prepare_hotswap() for others.")
    method = method_for(rules[0])
    refusal = method.hotswap_refusal(rules[0])
    if refusal:
        raise UnsupportedError(f"{what}: {refusal}")
    return rules[0], method


class HotswapMethods:
    """``prepare_hotswap``, ``hotswap_adapter`` and the hot-swap forms of adding, loading and deleting adapters, a
    mixin of :class:`fxpeft.model.AdaptedModel` (the module docstring)."""

    _hotswap: HotswapTable | None = None

    # -- preparing -------------------------------------------------------------------------------------------------
    def prepare_hotswap(self, max_rank: int, slots: int = 1, dropout: float | None = None) -> None:
        """Make adding, loading, replacing, deleting and switching LoRA adapters change no graph, so that a compiled
        model never compiles again (the module docstring). Call it before ``torch.compile`` and before creating the
        optimizer (the adapters' tensors are replaced by padded ones).

        ``max_rank``: the largest rank (per site) an adapter may have. ``slots``: how many adapters may be added
        beside the present ones. ``dropout``: the LoRA dropout of the train graph (default: the first adapter's).
        Refused (:class:`~fxpeft.errors.UnsupportedError` or :class:`~fxpeft.errors.RuleError`, nothing changed) for
        adapters other than LoRA on linears, ranks over ``max_rank``, merged or sharded models, and a second call.
        Example::

            adapted.prepare_hotswap(max_rank=16, slots=2)
            compiled = torch.compile(adapted)
            adapted.load_adapter("other_adapter", adapter_name="other")   # rank 4 or 16, any alpha
            adapted.set_adapter("other")
            compiled(**batch)                                             # compiles nothing
        """
        self._check_not_merged("prepare_hotswap")
        self._check_not_sharded("prepare_hotswap")
        if self._hotswap is not None:
            raise FxpeftError("prepare_hotswap() was called already; it is called once, before compiling.")
        for name, value, least in (("max_rank", max_rank, 1), ("slots", slots, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise RuleError(f"prepare_hotswap: {name} must be an int >= {least}, got {value!r}.")
        adapters = dict(self.adapters.items())
        chosen = {name: _single_rule(adapter.rules, f"prepare_hotswap (adapter {name!r})")
                  for name, adapter in adapters.items()}
        methods = {method.name for _, method in chosen.values()}
        if len(methods) > 1:
            raise UnsupportedError(f"prepare_hotswap: the adapters use {sorted(methods)}; slots hold one method.")
        models: dict[str, SiteModule] = {}  # site key -> a site there, the model of the slots' spare sites
        for name, adapter in adapters.items():
            for key, site in adapter.sites.items():
                refusal = site.hotswap_refusal(max_rank)
                if refusal:
                    raise UnsupportedError(f"prepare_hotswap (adapter {name!r}): {refusal}")
                models.setdefault(key, site)
        first_rule, method = next(iter(chosen.values()))
        settings = method.graph_settings(first_rule)
        if dropout is not None:
            settings = {**settings, "dropout": dropout}
        method.hotswap_stand_in([site.path for site in models.values()], max_rank, settings)  # checks the settings
        slot_names = tuple(f"{SLOT_PREFIX}{index}" for index in range(len(adapters) + slots))
        table = HotswapTable(max_rank=max_rank, slot_names=slot_names, sites=tuple(s.path for s in models.values()),
                             method=method, settings=settings)
        # Nothing was changed up to here; from here on nothing depends on the caller's input.
        slot_modules = nn.ModuleDict()
        for slot, (name, adapter) in zip(slot_names, adapters.items()):
            for site in adapter.site_modules():
                site.pad_to(max_rank)
            slot_modules[slot] = adapter
            table.slot_of[name] = slot
        for slot in slot_names[len(adapters):]:
            slot_modules[slot] = Adapter([])
            slot_modules[slot].frozen = True
        for adapter in slot_modules.values():
            for key, model in models.items():
                if key not in adapter.sites:
                    adapter.sites[key] = model.spare(max_rank)
            for site in adapter.site_modules():
                site.hold_graph_settings(settings)
        for slot, name in zip(slot_names, adapters):
            on = self._flags.is_active(name)
            self._flags.remove(name)
            self._flags.add(slot, on, self._flags.enabled.device)
        for slot in slot_names[len(adapters):]:
            self._flags.add(slot, False, self._flags.enabled.device)
        del self._modules["adapters"]
        self._hotswap_slots = slot_modules
        self.adapters = AdapterNames(table, slot_modules)
        for tensor in slot_modules.parameters():
            tensor.requires_grad_(True)
        self._hotswap = table
        self._hook_slots()
        self._rebuild()
        self._hotswap_refresh()

    def _hook_slots(self) -> None:
        """Put a :class:`_GradFilter` on every slot tensor that lacks one of this model's: after prepare_hotswap, and
        again where tensors come back without their hooks (a copy, an unpickled model, ``load_base_model``)."""
        for slot, adapter in self._hotswap_slots.items():
            for tensor in adapter.parameters():
                hooks = getattr(tensor, "_post_accumulate_grad_hooks", None) or {}
                if not any(isinstance(hook, _GradFilter) and hook.model is self for hook in hooks.values()):
                    tensor.register_post_accumulate_grad_hook(_GradFilter(self, slot))

    def __setstate__(self, state: dict) -> None:
        """An unpickled or deep-copied model: its slot tensors are new, without hooks (torch copies none)."""
        super().__setstate__(state)
        if self.__dict__.get("_hotswap") is not None:
            self._hook_slots()

    # -- what the model asks --------------------------------------------------------------------------------------
    @property
    def hotswap_max_rank(self) -> int | None:
        """The ``max_rank`` given to :meth:`prepare_hotswap`, or None before it."""
        return None if self._hotswap is None else self._hotswap.max_rank

    @property
    def hotswap_free_slots(self) -> int:
        """How many more adapters may be added without compiling again (0 before :meth:`prepare_hotswap`)."""
        return 0 if self._hotswap is None else len(self._hotswap.free())

    def hotswap_trains(self, slot: str) -> bool:
        """Whether the adapter in ``slot`` trains now: held, active, adapters enabled, not frozen."""
        if slot not in self._hotswap.slot_of.values() or not self._flags.is_enabled:
            return False
        return self._flags.is_active(slot) and not self._hotswap_slots[slot].frozen

    def _graph_name(self, name: str) -> str:
        """The name the graphs and flags know adapter ``name`` by: its slot after prepare_hotswap, else itself."""
        return name if self._hotswap is None else self._hotswap.slot_of[name]

    def _graph_order(self) -> list[str]:
        """The graphs' adapter names in order (their gates' order): every slot after prepare_hotswap."""
        return list(self.adapters) if self._hotswap is None else list(self._hotswap.slot_names)

    def _graph_adapters(self) -> dict[str, Adapter]:
        """What the graphs are rewritten from: the adapters, or after prepare_hotswap one stand-in per slot whose
        rule (``Method.hotswap_stand_in``) puts a site of ``max_rank`` at every hot-swap site, holding the slot's
        own site modules (so the graph reads them by slot name)."""
        if self._hotswap is None:
            return dict(self.adapters.items())
        table = self._hotswap
        rule = table.method.hotswap_stand_in(list(table.sites), table.max_rank, table.settings)
        stand_ins = {}
        for slot in table.slot_names:
            stand_in = Adapter([rule])
            stand_in._modules["sites"] = self._hotswap_slots[slot].sites
            stand_ins[slot] = stand_in
        return stand_ins

    def _graph_adapter(self, graph_name: str) -> Adapter:
        """The adapter a graph input named by ``graph_name`` reads."""
        return self.adapters[graph_name] if self._hotswap is None else self._hotswap_slots[graph_name]

    def _hotswap_refresh(self) -> None:
        """Recompute :attr:`HotswapTable.training_refusal` after the adapters or the active set changed."""
        table = self._hotswap
        odd = {name: table.method.graph_settings(self.adapters[name].rules[0]) for name in self.active_adapters}
        odd = {name: settings for name, settings in odd.items() if settings != table.settings}
        table.training_refusal = None if not odd else (
            f"Training is refused: the active adapters {odd} differ from the hot-swap graph's {table.settings} "
            "(prepare_hotswap(dropout=...)), so a train-mode call would not train them as their rules say. Eval mode "
            "is exact; to train them, prepare_hotswap with their settings.")

    # -- adding, loading, deleting ---------------------------------------------------------------------------------
    def _hotswap_fit(self, rules: list[Rule], what: str) -> tuple[Rule, list[str]]:
        """The rule of ``rules`` and the hot-swap sites it selects; a clear error (nothing changed) when it is not
        the slots' method, selects other sites or asks for more than ``max_rank``."""
        table = self._hotswap
        rule, method = _single_rule(rules, what)
        if method is not table.method:
            raise UnsupportedError(f"{what}: the hot-swap slots hold {table.method.name} adapters, not {method.name}.")
        captured = next(iter(self._programs.values())).as_captured()  # sites as captured, before any rewrite
        probe = RewriteContext(captured, self.base_model, "hotswap_probe", Adapter([rule]))
        try:
            paths = method.hotswap_sites(rule, probe, table.max_rank)
        except RuleError as error:
            raise type(error)(f"{what}: {error}") from None
        outside = [path for path in paths if path not in table.sites]
        if outside:
            raise UnsupportedError(
                f"{what}: the adapter targets {outside[:4]}, which are not hot-swap sites (the sites the adapters "
                f"had at prepare_hotswap(): {list(table.sites)[:6]}...). A compiled model cannot gain sites without "
                "compiling again: prepare_hotswap on a model whose adapters cover every site you will need.")
        return rule, paths

    def _hotswap_claim(self, name: str, what: str) -> str:
        """The slot ``name`` holds, or a free one for it; FxpeftError when none is free."""
        table = self._hotswap
        if name in table.slot_of:
            return table.slot_of[name]
        free = table.free()
        if not free:
            raise FxpeftError(
                f"{what}: all {len(table.slot_names)} hot-swap slots hold adapters ({list(table.slot_of)}). "
                "delete_adapter() one first, or call prepare_hotswap(slots=...) with more slots (before compiling).")
        return free[0]

    @torch.no_grad()
    def _hotswap_put(self, name: str, rules: list[Rule], state: dict[str, torch.Tensor] | None, where: str,
                     is_trainable: bool) -> None:
        """Put the adapter ``rules`` (and the file tensors ``state``; None: fresh ones) in ``name``'s slot, claimed
        now if ``name`` is new. Everything is checked first: on an error nothing changed."""
        what = f"hot swap of adapter {name!r}"
        if name not in self.adapters:
            self._check_new_name(name)
        rule, paths = self._hotswap_fit(rules, what)
        slot = self._hotswap_claim(name, what)
        adapter = self._hotswap_slots[slot]
        chosen = [site for site in adapter.site_modules() if site.path in set(paths)]
        if state is not None:
            expected = {key: shape for site in chosen for key, shape in site.hotswap_keys(rule).items()}
            state = without_base_layers(state, expected, self.base_model, where)
            check_state_fits(expected, state, where)
        for site in adapter.site_modules():
            site.take(rule if site in chosen else None)
        adapter.rules, adapter.selected = [rule], {rule: paths}
        adapter.frozen = not is_trainable
        if state is not None:
            adapter.load_peft_state_dict(state, where)
        if name not in self._hotswap.slot_of:
            self._hotswap.slot_of[name] = slot
            self._flags.set_active(slot, False)
        self._hotswap_refresh()

    @torch.no_grad()
    def _hotswap_release(self, name: str) -> None:
        """Zero ``name``'s slot and free it."""
        slot = self._hotswap.slot_of.pop(name)
        adapter = self._hotswap_slots[slot]
        for site in adapter.site_modules():
            site.take(None)
        adapter.rules, adapter.selected, adapter.frozen = [], {}, True
        self._flags.set_active(slot, False)
        self._hotswap_refresh()

    def hotswap_adapter(self, directory, adapter_name: str = "default") -> None:
        """PEFT's ``hotswap_adapter(model, directory, adapter_name)``: the adapter saved in ``directory`` replaces the
        tensors of ``adapter_name`` in place (another rank up to ``max_rank``, another alpha, other sites among the
        hot-swap sites), which stays active or not as it was and trainable or not as it was. Needs
        :meth:`prepare_hotswap`; nothing recompiles."""
        if self._hotswap is None:
            raise FxpeftError("hotswap_adapter() needs prepare_hotswap(max_rank=...) first (before compiling); "
                              "without it, load_adapter() loads a new adapter or same-shaped tensors in place.")
        if adapter_name not in self.adapters:
            raise FxpeftError(f"hotswap_adapter: no adapter {adapter_name!r} to replace; known: {list(self.adapters)}."
                              " Use load_adapter() to add one.")
        self.load_adapter(directory, adapter_name, is_trainable=not self.adapters[adapter_name].frozen)

    def _hotswap_counts(self) -> tuple[int, int]:
        """PEFT's (trainable, all) counts as a fresh transform with these adapters gives them: each adapter at its own
        rank (padding and free slots left out); trainable: the adapters that train now."""
        base = sum(parameter.numel() for parameter in self.base_model.parameters())
        sizes = {name: sum(value.numel() for value in adapter.peft_state_dict().values())
                 for name, adapter in self.adapters.items()}
        trainable = sum(size for name, size in sizes.items() if self.hotswap_trains(self._hotswap.slot_of[name]))
        return trainable, base + sum(sizes.values())
