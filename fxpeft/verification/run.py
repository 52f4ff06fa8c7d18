""":func:`verify`: the entry point, and the order the checks run in for an adapter folder or a model in memory."""

from __future__ import annotations

import collections
import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from fxpeft.adapters import Adapter
from fxpeft.api import call_kwargs, transform
from fxpeft.capture.export import device_of
from fxpeft.errors import FxpeftError, UnsupportedError
from fxpeft.formats.files import read_adapter
from fxpeft.formats.peft import rules_and_state
from fxpeft.model import AdaptedModel
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Rule
from fxpeft.verification.behaviour import check_behaviour
from fxpeft.verification.declared import Declared, build_references, declared_in_model, join_targets
from fxpeft.verification.policy import Policy, allowed_by, check_policy, stated_rules
from fxpeft.verification.probes import FreshCaptures, default_kwargs, kwargs_like, probe_kwargs
from fxpeft.verification.report import ERROR, Check, Findings, Report
from fxpeft.verification.structure import check_graphs
from fxpeft.verification.tensors import check_tensors
from fxpeft.verification.virtual import NOT_COMPARED, check_virtual_behaviour, virtual_adapter
from fxpeft.verification.weights import check_weights

__all__ = ["verify"]

# Kinds that mean the adapter's tensors cannot be put on this base at all: nothing further to compare.
_DOES_NOT_FIT = ("adapter-shape-mismatch", "unknown-site", "targets-unmatched", "config-mismatch")


class _Run:
    """One run of :func:`verify`: its inputs, the findings and checks so far, and the fresh captures."""

    def __init__(self, base_model: torch.nn.Module, example_kwargs: dict[str, Any] | None, policy: Policy | None):
        self.base_model = base_model
        self.example_kwargs = example_kwargs
        self.policy = policy
        self.found = Findings()
        self.checks: list[Check] = []
        self.captures = FreshCaptures(base_model)
        self.context: RewriteContext | None = None
        self.allowed: dict = {}
        self.joins: dict[str, set] | None = None

    @contextlib.contextmanager
    def check(self, name: str):
        """Run one check. The block sets ``state["compared"]`` (what it compared) and ``state["holds"]`` (what
        holds when no finding is added); the findings added inside the block count for this check."""
        start, before = time.perf_counter(), len(self.found)
        state = {"compared": "", "holds": "", "skipped": False}
        yield state
        failed = collections.Counter(f.kind for f in self.found[before:] if f.severity == ERROR)
        outcome = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items())) if failed else state["holds"]
        status = "fail" if failed else "skipped" if state["skipped"] else "ok"
        self.checks.append(Check(name, status, f"{state['compared']}: {outcome}", time.perf_counter() - start))

    def skip(self, name: str, why: str) -> None:
        self.found.note(name, why)
        self.checks.append(Check(name, "skipped", why))

    def references(self, kwargs: dict[str, Any], declared: dict[str, Declared]) -> None:
        """Resolve the policy, then build each declared adapter's reference, on the fresh capture for ``kwargs``."""
        program, _ = self.captures.get(kwargs)
        self.context = RewriteContext(program, self.base_model, "__rules__", Adapter([]))
        if self.policy is not None:  # on the graph as captured, before the declared rules insert nodes
            self.allowed = allowed_by(self.policy, self.context)
        build_references(self.found, self.context, declared)
        self.joins = join_targets(program.graph)


def verify(base_model: torch.nn.Module, adapted_or_adapter_dir: AdaptedModel | str | Path,
           example_inputs: Any = None, *, rules: Sequence[Rule | dict] | None = None) -> Report:
    """Check that an adapted model is ``base_model`` plus its declared adapters, and nothing else.

    ``adapted_or_adapter_dir`` is an :class:`~fxpeft.AdaptedModel` (say, right after training) or an adapter
    folder in PEFT's layout (it is put on a copy of ``base_model``; ``base_model`` itself is never changed).
    ``example_inputs`` (positional inputs, or a dict of keyword inputs) are the probe inputs; transformers
    models get them from their config. ``rules`` (fxpeft rules or their dicts) declare what the adapter may
    contain. Raises :class:`fxpeft.errors.AdapterLoadError` for a folder that cannot be read, and the other
    :mod:`fxpeft.errors` when the check cannot run; everything that does not hold is a finding.

    Example::

        report = fxpeft.verify(AutoModelForCausalLM.from_pretrained("base/"), "out/adapter")
        print(report.summary())          # what was compared, what holds, what differs
        if not report.ok:
            raise SystemExit(report.to_json())
    """
    if isinstance(example_inputs, dict):
        example_kwargs = call_kwargs(base_model, None, example_inputs)
    else:
        example_kwargs = call_kwargs(base_model, example_inputs, None)
    run = _Run(base_model, example_kwargs, stated_rules(rules))
    device = device_of(base_model)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        if isinstance(adapted_or_adapter_dir, AdaptedModel):
            description = f"AdaptedModel with adapter(s) {list(adapted_or_adapter_dir.adapters)} on " \
                          f"{_describe_model(adapted_or_adapter_dir.base_model)}"
            _verify_model(run, adapted_or_adapter_dir)
        elif isinstance(adapted_or_adapter_dir, (str, Path)):
            description = f"adapter folder {adapted_or_adapter_dir}"
            _verify_folder(run, Path(adapted_or_adapter_dir))
        else:
            raise TypeError(f"verify() takes an AdaptedModel or an adapter folder, got "
                            f"{type(adapted_or_adapter_dir).__name__}.")
    if len(run.captures):
        run.checks.insert(0, Check("fresh capture", "ok", f"{len(run.captures)} signature(s) of the base model "
                                   "captured anew with torch.export", run.captures.seconds))
    return Report(_describe_model(base_model), description, run.found, run.checks)


def _describe_model(model: torch.nn.Module) -> str:
    where = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{type(model).__name__}" + (f" ({where})" if where else "")


def _check_declared_tensors(run: _Run, declared: dict[str, Declared]) -> bool:
    """The adapter tensors and the declared rules; returns whether the adapter fits the base model."""
    with run.check("adapter tensors") as state:
        for name, item in declared.items():
            check_tensors(run.found, name, item, run.context)
        keys = sum(len(item.state) for item in declared.values())
        sites = sum(len(item.reference.sites) for item in declared.values() if item.reference is not None)
        state["compared"] = f"{keys} tensors against the config and the base model"
        on_meta = any(t.device.type == "meta" for item in declared.values() for t in item.state.values())
        state["holds"] = f"only adapter keys, at the {sites} declared site(s); shapes fit the base and the config; " + \
            ("values not checked (meta device)" if on_meta else "all finite")
    if run.policy is not None:
        with run.check("rules") as state:
            check_policy(run.found, run.allowed, declared)
            state["compared"] = f"the adapter's sites and ranks against {len(run.policy)} declared rule(s)"
            state["holds"] = "everything the adapter holds is allowed"
    return not run.found.has(*_DOES_NOT_FIT)


def _common_checks(run: _Run, adapted: AdaptedModel, declared: dict[str, Declared], behaviour: str | None) -> None:
    """Graph structure, base weights and (unless ``behaviour`` says why not) behaviour."""
    with run.check("graph structure") as state:
        state["compared"], state["holds"] = check_graphs(run.found, adapted, declared, run.captures, run.joins)
    with run.check("base weights") as state:
        state["compared"], state["holds"] = check_weights(run.found, adapted, run.captures)
        state["skipped"] = state["holds"] == "nothing to compare"
    if device_of(run.base_model).type == "meta" or device_of(adapted.base_model).type == "meta":
        run.skip("behaviour", "the model is on the meta device (no values to run)")
    elif behaviour is not None:
        run.skip("behaviour", behaviour)
    else:
        with run.check("behaviour") as state:
            probes = probe_kwargs(adapted, run.base_model, run.example_kwargs)
            virtual = virtual_adapter(adapted)
            if virtual is None:
                state["compared"], state["holds"] = check_behaviour(run.found, adapted, run.base_model, probes)
            else:  # virtual tokens cannot be disabled: the base model called as PEFT calls it is the reference
                item = declared[virtual]
                state["compared"], state["holds"] = check_virtual_behaviour(run.found, adapted, run.base_model,
                                                                            probes, item.rules, item.state)
                state["skipped"] = state["holds"] == NOT_COMPARED


def _verify_folder(run: _Run, directory: Path) -> None:
    config, state = read_adapter(directory)
    rules, state = rules_and_state(config, state)
    declared = {"default": Declared(config, rules, state)}
    kwargs = default_kwargs(run.base_model, run.example_kwargs)
    run.references(kwargs, declared)
    if not _check_declared_tensors(run, declared):
        for name in ("graph structure", "base weights", "behaviour"):
            run.skip(name, "the adapter does not fit this base model")
        return
    adapted = transform(copy.deepcopy(run.base_model), declared["default"].rules, example_kwargs=kwargs)
    adapter = adapted.adapters["default"]
    expected = adapter.peft_keys()
    fitting = {key: value for key, value in state.items()
               if key in expected and tuple(value.shape) == tuple(expected[key])}
    for site in adapter.site_modules():
        site.load_peft_state_dict(fitting)
    _common_checks(run, adapted, declared,
                   "the adapter failed the checks above; outputs were not compared" if run.found.has() else None)


def _verify_model(run: _Run, adapted: AdaptedModel) -> None:
    if adapted.hotswap_max_rank is not None:  # its graph holds every slot's branch, declared by no adapter's config
        raise UnsupportedError(
            "The adapted model was prepared for hot swap (prepare_hotswap), so its graph holds a branch for every slot "
            "at every hot-swap site, which no adapter's config declares. Check each adapter from its saved folder: "
            "adapted.save_adapter(folder, name), then fxpeft.verify(base_model, folder) (or `fxpeft check`).")
    merged = adapted.merged_adapters
    if merged:
        raise FxpeftError(f"The adapted model has adapters {merged} merged into its base weights, so they are not "
                          "the base model's; call adapted.unmerge() before checking it.")
    declared = declared_in_model(adapted)
    kwargs = kwargs_like(adapted.programs()[0], run.base_model)
    if kwargs is None:
        kwargs = default_kwargs(run.base_model, run.example_kwargs)
    run.captures.get(kwargs)
    for other in adapted.programs()[1:]:  # every signature the model was captured with, captured afresh
        run.captures.get_like(other)
    run.references(kwargs, declared)
    _check_declared_tensors(run, declared)
    _common_checks(run, adapted, declared, "the adapter has NaN or Inf values; outputs were not compared"
                   if run.found.has("adapter-nonfinite") else None)
