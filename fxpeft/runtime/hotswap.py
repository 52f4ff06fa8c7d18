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

Training: every slot tensor keeps ``requires_grad=True`` (torch.compile guards on it, so flipping it at
``set_adapter`` would compile again). Instead, after backward the gradients of slots whose adapter is not active, is
frozen (loaded with ``is_trainable=False``) or is free are dropped (set to None, :class:`_GradFilter`), so an optimizer
moves the active adapters only, as PEFT's frozen ones. The compiled backward still computes those zeros.

Limits, each refused with a clear error: LoRA on linear layers only (no DoRA, conv, embedding, ``target_parameters``,
trained biases or ``modules_to_save``, other methods); targets within the hot-swap sites; rank at most ``max_rank``;
at most the prepared number of slots; the graph's LoRA dropout is the slots' (``dropout=``; an active adapter with
another dropout cannot be trained, its eval calls are exact); no sharded model, no ``add_weighted_adapter``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
from torch import nn

from fxpeft.adapters import Adapter, site_key
from fxpeft.errors import FxpeftError, NoMatchError, RuleError, UnsupportedError
from fxpeft.formats.files import check_state_fits
from fxpeft.formats.peft import without_base_layers
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import LoRA, Rule

__all__ = ["AdapterNames", "HotswapTable", "HotswapMethods", "SLOT_PREFIX"]

SLOT_PREFIX = "hotswap_slot_"


@dataclasses.dataclass(eq=False)
class HotswapTable:
    """Which adapter holds which slot (Python values, read outside compiled code; see the module docstring).

    ``slot_of``: adapter name -> slot name, in the order the adapters were added. ``sites``: the hot-swap sites'
    module paths. ``training_refusal``: why a train-mode call must be refused now (an active adapter whose dropout is
    not the slots'), or None; the one value compiled code reads, kept up to date by :meth:`HotswapMethods`."""

    max_rank: int
    slot_names: tuple[str, ...]
    sites: tuple[str, ...]
    dropout: float
    slot_of: dict[str, str] = dataclasses.field(default_factory=dict)
    training_refusal: str | None = None

    def free(self) -> list[str]:
        """The slots no adapter holds, in slot order."""
        taken = set(self.slot_of.values())
        return [slot for slot in self.slot_names if slot not in taken]


class AdapterNames:
    """``adapted.adapters`` after :meth:`HotswapMethods.prepare_hotswap`: adapter name -> its slot's
    :class:`~fxpeft.adapters.Adapter`, read-only (add, load and delete adapters through the model's methods)."""

    def __init__(self, table: HotswapTable, slots: nn.ModuleDict):
        self._table = table
        self._slots = slots

    def __getitem__(self, name: str) -> Adapter:
        return self._slots[self._table.slot_of[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._table.slot_of

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._table.slot_of))

    def __len__(self) -> int:
        return len(self._table.slot_of)

    def keys(self) -> list[str]:
        return list(self._table.slot_of)

    def values(self) -> list[Adapter]:
        return [self[name] for name in self._table.slot_of]

    def items(self) -> list[tuple[str, Adapter]]:
        return [(name, self[name]) for name in self._table.slot_of]

    def __repr__(self) -> str:
        return f"AdapterNames({ {name: slot for name, slot in self._table.slot_of.items()} })"


class _GradFilter:
    """A post-accumulate-grad hook on a slot tensor: drops its gradient unless the slot's adapter trains now (active,
    adapters enabled, not frozen). Module-level so that a model with it pickles."""

    def __init__(self, model: nn.Module, slot: str):
        self.model, self.slot = model, slot

    def __call__(self, tensor: torch.Tensor) -> None:
        if not self.model.hotswap_trains(self.slot):
            tensor.grad = None


def _only_lora(rules: list[Rule], what: str) -> LoRA:
    """The one LoRA rule of ``rules``, if hot swap can take it; UnsupportedError naming what it cannot."""
    loras = [rule for rule in rules if isinstance(rule, LoRA)]
    others = sorted({type(rule).__name__ for rule in rules if not isinstance(rule, LoRA)})
    if others or len(loras) != 1:
        raise UnsupportedError(f"{what}: hot swap takes adapters of one LoRA rule, not {others or len(loras)} rules. "
                               "Use add_adapter/load_adapter on a model without prepare_hotswap() for other methods.")
    rule = loras[0]
    problems = [name for name, bad in (("use_dora=True", rule.use_dora), (f"bias={rule.bias!r}", rule.bias != "none"),
                                       ("target_parameters", bool(rule.target_parameters))) if bad]
    if problems:
        raise UnsupportedError(f"{what}: hot swap takes LoRA on linear layers with bias='none', not {problems}.")
    return rule


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
        Refused (:class:`~fxpeft.errors.UnsupportedError`, nothing changed) for adapters other than LoRA on linears,
        ranks over ``max_rank``, merged or sharded models, and a second call. Example::

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
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
            raise RuleError(f"prepare_hotswap: max_rank must be a positive int, got {max_rank!r}.")
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
            raise RuleError(f"prepare_hotswap: slots must be an int >= 0, got {slots!r}.")
        adapters = dict(self.adapters.items())
        rules = {name: _only_lora(adapter.rules, f"prepare_hotswap (adapter {name!r})")
                 for name, adapter in adapters.items()}
        spares: dict[str, Any] = {}  # hot-swap site path -> a site module there (the model of a spare)
        for name, adapter in adapters.items():
            for site in adapter.site_modules():
                if getattr(site, "site_form", None) != "linear" or not hasattr(site, "pad_to"):
                    raise UnsupportedError(f"prepare_hotswap: adapter {name!r} has a LoRA at {site.path} that is not "
                                           "on a linear layer; hot swap takes LoRA on linears only.")
                if site.r > max_rank:
                    raise RuleError(f"prepare_hotswap: adapter {name!r} has rank {site.r} at {site.path}, over "
                                    f"max_rank={max_rank}. Give a max_rank of at least the largest rank.")
                spares.setdefault(site.path, site)
        if dropout is None:
            dropout = next(iter(rules.values())).dropout
        LoRA(targets=["x"], dropout=dropout)  # the same check of the value as a rule's
        device_names = [f"{SLOT_PREFIX}{index}" for index in range(len(adapters) + slots)]
        table = HotswapTable(max_rank=max_rank, slot_names=tuple(device_names), sites=tuple(spares), dropout=dropout)
        # Nothing was changed up to here; from here on nothing can fail on the caller's input.
        slot_modules = nn.ModuleDict()
        for slot, (name, adapter) in zip(device_names, adapters.items()):
            for site in adapter.site_modules():
                site.pad_to(max_rank)
            self._fill_spares(adapter, spares, table)
            slot_modules[slot] = adapter
            table.slot_of[name] = slot
        for slot in device_names[len(adapters):]:
            free = Adapter([])
            free.frozen = True
            self._fill_spares(free, spares, table)
            slot_modules[slot] = free
        flags = self._flags
        for slot, name in zip(device_names, adapters):
            on = flags.is_active(name)
            flags.remove(name)
            flags.add(slot, on, flags.enabled.device)
        for slot in device_names[len(adapters):]:
            flags.add(slot, False, flags.enabled.device)
        del self._modules["adapters"]
        self._hotswap_slots = slot_modules
        self.adapters = AdapterNames(table, slot_modules)
        for slot in device_names:
            for tensor in slot_modules[slot].parameters():
                tensor.requires_grad_(True)
                tensor.register_post_accumulate_grad_hook(_GradFilter(self, slot))
        self._hotswap = table
        self._rebuild()
        self._hotswap_refresh()

    @staticmethod
    def _fill_spares(adapter: Adapter, spares: dict[str, Any], table: HotswapTable) -> None:
        """Give ``adapter`` a rank-0 site at each hot-swap site it lacks, and the slots' dropout at every site."""
        for path, model in spares.items():
            key = site_key(path, "lora")
            if key not in adapter.sites:
                a, b = model.lora_A, model.lora_B
                spare = type(model)(path, a.shape[1], b.shape[0], LoRA(targets=[path], r=table.max_rank),
                                    a.device, a.dtype, fan_in_fan_out=model.fan_in_fan_out)
                spare.weight_fqn = model.weight_fqn
                spare.capacity = table.max_rank
                spare.take(None)
                adapter.sites[key] = spare
            adapter.sites[key].dropout = table.dropout

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
        table = self._hotswap
        owner = next((name for name, held in table.slot_of.items() if held == slot), None)
        if owner is None or not self._flags.is_enabled or not self._flags.is_active(slot):
            return False
        return not self._hotswap_slots[slot].frozen

    def _graph_name(self, name: str) -> str:
        """The name the graphs and flags know adapter ``name`` by: its slot after prepare_hotswap, else itself."""
        return name if self._hotswap is None else self._hotswap.slot_of[name]

    def _graph_order(self) -> list[str]:
        """The graphs' adapter names in order (their gates' order): every slot after prepare_hotswap."""
        return list(self.adapters) if self._hotswap is None else list(self._hotswap.slot_names)

    def _graph_adapters(self) -> dict[str, Adapter]:
        """What the graphs are rewritten from: the adapters, or after prepare_hotswap one stand-in per slot whose
        rule targets every hot-swap site at ``max_rank`` (the slot's own sites, read by slot name)."""
        if self._hotswap is None:
            return dict(self.adapters.items())
        table = self._hotswap
        rule = LoRA(targets=list(table.sites), r=table.max_rank, alpha=table.max_rank, dropout=table.dropout)
        stand_ins = {}
        for slot in table.slot_names:
            stand_in = Adapter([rule])
            stand_in._modules["sites"] = self._hotswap_slots[slot].sites  # the slot's own site modules
            stand_ins[slot] = stand_in
        return stand_ins

    def _graph_adapter(self, graph_name: str) -> Adapter:
        """The adapter a graph input named by ``graph_name`` reads."""
        return self.adapters[graph_name] if self._hotswap is None else self._hotswap_slots[graph_name]

    def _hotswap_refresh(self) -> None:
        """Recompute :attr:`HotswapTable.training_refusal` after the adapters or the active set changed."""
        table = self._hotswap
        odd = [f"{name} (dropout {self.adapters[name].rules[0].dropout})" for name in self.active_adapters
               if self.adapters[name].rules and self.adapters[name].rules[0].dropout != table.dropout]
        table.training_refusal = None if not odd else (
            f"Training is refused: the active adapters {odd} have another LoRA dropout than the hot-swap graph's "
            f"({table.dropout}, prepare_hotswap(dropout=...)), so a train-mode call would drop their inputs at the "
            "wrong rate. Evaluation (eval mode) is exact; to train them, prepare_hotswap with their dropout.")

    # -- adding, loading, deleting ---------------------------------------------------------------------------------
    def _hotswap_fit(self, rules: list[Rule], what: str) -> tuple[LoRA, list[str]]:
        """The LoRA rule of ``rules`` and the hot-swap sites it selects; a clear error (nothing changed) when it
        selects others or asks for more than ``max_rank``."""
        table = self._hotswap
        rule = _only_lora(rules, what)
        program = next(iter(self._programs.values()))
        pristine = object.__new__(type(program))  # selection reads the captured graph, before any rewrite
        pristine.__dict__.update(program.__dict__, graph_module=program.pristine,
                                 sources=list(program.pristine_sources))
        probe = RewriteContext(pristine, self.base_model, "hotswap_probe", Adapter([rule]))
        paths = [site.path for site in probe.select_sites(rule)]
        literal = set(rule.targets) if isinstance(rule.targets, (list, tuple)) else set()
        paths = [path for path in paths if path in literal or rule.selects_layer(path)]
        if not paths:
            raise NoMatchError(f"{what}: LoRA targets {rule.targets!r} select no site after layers="
                               f"{rule.layers!r}.", candidates=list(table.sites)[:8])
        outside = [path for path in paths if path not in table.sites]
        if outside:
            raise UnsupportedError(
                f"{what}: the adapter targets {outside[:4]}, which are not hot-swap sites (the linears the adapters "
                f"had at prepare_hotswap(): {list(table.sites)[:6]}...). A compiled model cannot gain sites without "
                "compiling again: prepare_hotswap on a model whose adapters cover every site you will need.")
        over = {path: rule.rank_for(path) for path in paths if rule.rank_for(path) > table.max_rank}
        if over:
            raise RuleError(f"{what}: ranks {dict(list(over.items())[:4])} exceed the hot-swap max_rank="
                            f"{table.max_rank} given to prepare_hotswap().")
        return rule, paths

    def _expected_keys(self, rule: LoRA, paths: list[str]) -> dict[str, tuple[int, ...]]:
        """The keys and shapes an adapter of ``rule`` at ``paths`` saves (what a file must hold to load into it)."""
        slot = self._hotswap.slot_names[0]
        sites = self._hotswap_slots[slot].sites
        expected = {}
        for path in paths:
            model = sites[site_key(path, "lora")]
            r = rule.rank_for(path)
            prefix = f"base_model.model.{path}"
            expected[f"{prefix}.lora_A.weight"] = (r, model.lora_A.shape[1])
            expected[f"{prefix}.lora_B.weight"] = (model.lora_B.shape[0], r)
        return expected

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
        if state is not None:
            expected = self._expected_keys(rule, paths)
            state = without_base_layers(state, expected, self.base_model, where)
            check_state_fits(expected, state, where)
        slot = self._hotswap_claim(name, what)
        adapter = self._hotswap_slots[slot]
        chosen = set(paths)
        for site in adapter.site_modules():
            site.take(rule if site.path in chosen else None)
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

