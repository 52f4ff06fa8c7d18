"""The method registry: everything the engine knows about an adaptation method, found by its rule type.

A method is one plugin under ``passes/`` (a module, or a package when it is large). It subclasses
:class:`Method`, fills in what it supports, and registers one instance::

    class Scale(Method):
        rule_type = ScaleRule                 # the frozen dataclass users write
        tag = "scale"                         # node.meta["fxpeft"]["method"] of the nodes it inserts

        def rewrite(self, rule, ctx): ...     # insert nodes around the sites ``ctx`` selects

    register_method(Scale())

The engine never names a method. It asks this registry, and every capability has a default that says
"not supported" or "nothing to do", so the engine never needs ``hasattr`` or ``isinstance`` on a rule:

=====================  ===============================================================  ======================
capability             what the engine calls it for                                     default
=====================  ===============================================================  ======================
``rewrite``            the rewrite step (:func:`fxpeft.rewrite.apply_rules`)            required
``codec``              PEFT's ``adapter_config.json`` both ways (:class:`PeftCodec`)     None: not saved alone
``gateable``           switched per call (and per row) through the adapter's gate        True
``eval_forms``         op target -> function giving a node its eval-mode form           {}
``mixed_batch``        the graph for calls with ``adapter_names`` (one adapter per row)  0 sites changed
``combine``            ``AdaptedModel.add_weighted_adapter``                              UnsupportedError
``key_part``           verify: what an adapter-file key of this method names             None
``key_form``           verify: this method's file keys, for messages                     "": none
``describe_site``      verify: whether (and as what) the method can adapt a module       None: it cannot
``site_kind``          verify: what a site of this method is, for messages               "a module"
``allowed_sites``      verify ``--rules``: the sites a declared rule allows              {}: cannot be checked
``policy_findings``    verify ``--rules``: what a site holds beyond the rule allowing it  []
``hotswap_refusal``    ``prepare_hotswap``: why a rule's adapter cannot sit in a slot    "not supported"
``hotswap_sites``      hot swap: the sites a rule selects, within a rank                 UnsupportedError
``hotswap_stand_in``   hot swap: the rule a slot's graph is rewritten with               UnsupportedError
``graph_settings``     hot swap: what of a rule the train graph bakes in (dropout)       {}
=====================  ===============================================================  ======================

Per-site capabilities (merge, ``set_alpha``, in-place reload of hyper-parameters, retargeting to a new
base model) live on the method's :class:`fxpeft.adapters.SiteModule` subclass, with no-op defaults there.

Built-in methods are found by importing ``fxpeft.passes`` on the first lookup (each module there registers
itself on import); a method defined anywhere else is registered by calling :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Iterable, Mapping

from fxpeft.errors import UnsupportedError
from fxpeft.peft_types import unsupported_type_message

__all__ = ["Method", "PeftCodec", "KeyPart", "register_method", "unregister_method", "method_for", "methods",
           "codec_for_peft_type", "codec_for_rules", "primary_method", "saved_rules"]

_METHODS: dict[type, "Method"] = {}
_BUILTINS_LOADED = False


@dataclasses.dataclass(frozen=True)
class KeyPart:
    """What one adapter-file key of a method names: the site's module path, the part (``lora_A``), and the axis
    of the tensor that has the site's rank (None when the part has no rank)."""

    path: str
    part: str
    rank_axis: int | None = None


class PeftCodec:
    """A method's adapter files in PEFT's format: ``adapter_config.json`` fields and state-dict keys.

    ``peft_types`` are the ``peft_type`` values it reads. The codec of an adapter's *primary* method writes the
    whole config; :class:`~fxpeft.rules.Trainable` rules go in as ``modules_to_save`` and rules that describe
    the base model (``describes_base``, e.g. Quantize) are not saved at all (:func:`saved_rules`)."""

    peft_types: ClassVar[tuple[str, ...]] = ()

    def to_config(self, model, rules: list, selected: dict, adapter) -> dict[str, Any]:
        """The ``adapter_config.json`` fields of one adapter: its (saved) ``rules``, the module paths each rule
        ``selected`` in the graph, and the ``adapter`` itself (its site modules), on ``model``."""
        raise NotImplementedError

    def to_rules(self, config: dict[str, Any], saved_keys: set[str] | None) -> list:
        """The rules a config of one of ``peft_types`` describes. ``saved_keys``: the keys of the file that came
        with it, or None (a config alone, as ``get_peft_model`` takes it)."""
        raise NotImplementedError

    def state_to_file(self, state: dict) -> dict:
        """fxpeft's adapter state (``Adapter.peft_state_dict``) keyed as the file holds it."""
        return state

    def state_from_file(self, state: dict) -> dict:
        """A file's tensors keyed as fxpeft's adapter expects them (the inverse of :meth:`state_to_file`)."""
        return state

    def rule_to_peft_config(self, rule, modules_to_save: list[str] | None = None):
        """One rule as PEFT's config object, without a model (``Rule.to_peft_config``); needs ``peft``."""
        raise UnsupportedError(f"{type(rule).__name__} has no PEFT config object.")


class Method:
    """One adaptation method: its rule type, its rewrite and its optional capabilities (see the module docstring)."""

    rule_type: ClassVar[type]
    tag: ClassVar[str] = ""
    codec: ClassVar[PeftCodec | None] = None
    gateable: ClassVar[bool] = True
    eval_forms: ClassVar[Mapping[Any, Callable[[Any], None]]] = {}
    key_form: ClassVar[str] = ""
    site_kind: ClassVar[str] = "a module"

    @property
    def name(self) -> str:
        """The rule type's name, for messages."""
        return self.rule_type.__name__

    def rewrite(self, rule, ctx) -> None:
        """Insert this method's nodes for ``rule`` into ``ctx.program`` (a :class:`fxpeft.rewrite.RewriteContext`)."""
        raise NotImplementedError

    def mixed_batch(self, graph, sources: dict) -> int:
        """Rewrite this method's nodes in ``graph`` (a copy of an eval graph; ``sources`` maps its placeholders to
        their :class:`~fxpeft.graph.program.InputSource`) for calls that give each batch row one adapter; returns
        how many sites it changed. Called only when some site holds nodes of two or more adapters of this
        method; the gated nodes are already right for such calls, only slower."""
        return 0

    def combine(self, adapted, adapters: list[str], weights: list[float], adapter_name: str, **options) -> None:
        """Add ``adapter_name`` to ``adapted``, a weighted combination of ``adapters`` (PEFT's
        ``add_weighted_adapter``)."""
        raise UnsupportedError(f"{self.name} adapters cannot be combined with add_weighted_adapter.")

    def key_part(self, key: str) -> KeyPart | None:
        """What an adapter-file key names if this method writes such keys, else None (verify reads it). Keys of one
        site whose parts have a ``rank_axis`` must agree on the size of that axis. ``key_form`` shows the keys in
        messages (LoRA: ``"<module>.lora_A.weight / lora_B.weight"``, after ``base_model.model.``)."""
        return None

    def describe_site(self, path: str, ctx) -> str | None:
        """verify: a few words on module ``path`` as a site this method can adapt in ``ctx``'s graph (a
        :class:`fxpeft.rewrite.RewriteContext`; LoRA: ``"a linear 32 -> 16"``), or None when it cannot adapt it
        there. A key of this method for a module it cannot adapt means the file was made for another base model;
        the message says the module is not :attr:`site_kind` (IA3: ``"a linear module"``) of this base model."""
        return None

    def allowed_sites(self, rule, ctx) -> dict[str, Any]:
        """verify ``--rules``: the paths of the site modules (``SiteModule.path``, parameter paths for copies) a
        declared policy ``rule`` of this method allows, each mapped to what verify hands back to
        :meth:`policy_findings` as ``allowed`` (not None). A method that keeps this default cannot be checked
        against declared rules: verify refuses such rules with a RuleError."""
        return {}

    def policy_findings(self, site, allowed, given: set[str], declared, state: dict) -> list:
        """verify ``--rules``: what ``site`` (a site module of the checked adapter, made by the adapter's rule
        ``declared`` of this method) holds beyond the policy. ``allowed`` is what :meth:`allowed_sites` gave for
        ``site.path`` under the first policy rule of this method that allows it, or None when none does; ``given``
        the fields that policy rule stated; ``state`` the adapter's file state. Each finding is a sentence, or a
        ``(sentence, details)`` pair whose dict of numbers goes into the report."""
        return []

    # -- hot swap (fxpeft/runtime/hotswap.py; per-site parts on the SiteModule: pad_to, spare, take, hotswap_keys) --
    def hotswap_refusal(self, rule) -> str | None:
        """Why an adapter made of ``rule`` cannot be put in a hot-swap slot, or None where it can."""
        return f"{self.name} adapters cannot be hot-swapped (LoRA on linear layers can)."

    def hotswap_sites(self, rule, ctx, capacity: int) -> list[str]:
        """The module paths of the sites ``rule`` selects in ``ctx``'s captured graph (a
        :class:`fxpeft.rewrite.RewriteContext` over the graph before any rewrite); NoMatchError when none,
        RuleError where ``rule`` asks for more than ``capacity`` (a rank)."""
        raise UnsupportedError(self.hotswap_refusal(rule) or f"{self.name} has no hot swap.")

    def hotswap_stand_in(self, paths: list[str], capacity: int, settings: dict[str, Any]):
        """The rule every slot's graph is rewritten with: a site at each of ``paths`` of size ``capacity``, with
        the train graph's ``settings`` (:meth:`graph_settings`)."""
        raise UnsupportedError(f"{self.name} has no hot swap.")

    def graph_settings(self, rule) -> dict[str, Any]:
        """What of ``rule`` the train graph bakes in (LoRA: its dropout); an adapter whose settings differ from its
        slot's graph cannot train there."""
        return {}


def register_method(method: Method) -> Method:
    """Register ``method`` for its ``rule_type`` (a later registration for the same type replaces the earlier)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method instance, got {method!r}.")
    if not getattr(method, "tag", ""):
        raise TypeError(f"{type(method).__name__} needs a `tag`: the method name its graph nodes carry.")
    _METHODS[method.rule_type] = method
    return method


def unregister_method(rule_type: type) -> None:
    """Remove the method registered for ``rule_type`` (a test's own method, say)."""
    _METHODS.pop(rule_type, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("fxpeft.passes")  # each module there registers its method on import


def methods() -> list[Method]:
    """Every registered method."""
    _load_builtins()
    return list(_METHODS.values())


def method_for(rule_or_type) -> Method:
    """The method registered for a rule (or rule type), through its base classes; UnsupportedError if none."""
    _load_builtins()
    cls = rule_or_type if isinstance(rule_or_type, type) else type(rule_or_type)
    for base in cls.__mro__:
        if base in _METHODS:
            return _METHODS[base]
    raise UnsupportedError(f"No method is registered for {cls.__name__}: define a fxpeft.methods.Method for it and "
                           "call fxpeft.methods.register_method.")


def codec_for_peft_type(peft_type: str) -> PeftCodec:
    """The codec that reads PEFT configs of ``peft_type``; UnsupportedError naming the known types if none."""
    known = {}
    for method in methods():
        if method.codec is not None:
            for name in method.codec.peft_types:
                known.setdefault(name, method.codec)
    if peft_type not in known:
        raise UnsupportedError(unsupported_type_message(peft_type, sorted(known)))
    return known[peft_type]


def saved_rules(rules: Iterable) -> list:
    """The rules an adapter file records: all but those that describe the base model (``describes_base``)."""
    return [rule for rule in rules if not getattr(rule, "describes_base", False)]


def _with_a_format() -> list[str]:
    """The rule types of the registered methods that have a PEFT format, by name."""
    return sorted(method.rule_type.__name__ for method in methods() if method.codec is not None)


def primary_method(rules: Iterable, what: str = "Saving in PEFT's format") -> Method:
    """The one method of an adapter made of ``rules`` that has a PEFT format (the others ride along in its file,
    as ``modules_to_save``); UnsupportedError, saying ``what`` needs it, when there is not exactly one."""
    found = list(dict.fromkeys(method_for(rule) for rule in saved_rules(rules)))
    primary = [method for method in found if method.codec is not None]
    if not primary:
        raise UnsupportedError(
            f"{what} needs a method with a PEFT format ({', '.join(_with_a_format())}) in the adapter; "
            f"this adapter has only {sorted(method.name for method in found)}, for which PEFT has no adapter format "
            "(PEFT saves trained modules as modules_to_save beside such a method). Add the rules to an adapter with "
            "one of those methods.")
    if len(primary) > 1:
        raise UnsupportedError(
            f"{what} works on adapters of one method with a PEFT format (plus Trainable rules); this adapter has "
            f"{sorted(method.name for method in primary)}. Use it on adapters made of one of them.")
    return primary[0]


def codec_for_rules(rules: Iterable) -> PeftCodec:
    """The codec that writes an adapter made of ``rules``: its primary method's (:func:`primary_method`)."""
    return primary_method(rules).codec
