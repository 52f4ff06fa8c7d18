"""Mutation check: a plausible bug in the core numerics fails at least one test of the suite.

Each mutant below patches one function of fxpeft or of its passes in memory (LoRA's scaling doubled, ``set_alpha``
computing ``alpha * r``, a quantized merge adding 0.8 of the update, ...). For each, a small selection of the
suite's own tests runs with the mutant applied, and at least one of them must fail on an assertion; the union of
the selections must pass unmutated (otherwise a failure would prove nothing). A mutant that survives means the
suite no longer checks that number against an independent reference.

How it runs: one subprocess (``python -m tests.test_mutants``) imports torch, transformers, peft, bitsandbytes and
fxpeft once, before any tensor work, then forks one child per mutant (two at a time, one intra-op thread each).
A child applies its mutant and runs its selection with ``pytest.main`` in process, and writes each test's
outcome to a file; the parent prints them all as JSON. Forking saves the ~6 s of imports per
mutant; each child is a fresh copy of the clean parent, so no mutant and no cached model leaks into another run.
``python -m tests.test_mutants DIR`` prints every run's outcomes (which test caught which mutant), with the pytest
logs in DIR. A new mutant is a function patching one thing and the fast tests that must catch it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
LORA = "tests/passes/test_lora.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A bug (``apply`` patches it in, for the rest of the process) and the tests expected to catch it."""

    what: str
    apply: Callable[[], None]
    tests: tuple[str, ...]


# -- the mutants ------------------------------------------------------------------------------------------------
# Each patch imports what it changes when applied (in the forked child only).
def _scaling_doubled() -> None:
    from fxpeft.rules import LoRA

    original = LoRA.scaling_for
    LoRA.scaling_for = lambda self, path: 2 * original(self, path)


def _rslora_as_plain() -> None:
    from fxpeft.rules import LoRA

    LoRA.scaling_for = lambda self, path: self.alpha_for(path) / self.rank_for(path)


def _set_alpha_times_r() -> None:
    from fxpeft.passes.lora.weights import LoraWeights

    def set_alpha(self, alpha: float) -> None:
        self.alpha = alpha
        self.set_scaling(alpha * math.sqrt(self.r) if self.use_rslora else alpha * self.r)

    LoraWeights.set_alpha = set_alpha


def _b_init_nonzero() -> None:
    import torch

    from fxpeft.passes.lora.weights import LoraWeights

    original = LoraWeights.reset_parameters

    def reset_parameters(self) -> None:
        original(self)
        if self.init in ("default", "gaussian") and self.lora_B.device.type != "meta":
            with torch.no_grad():
                self.lora_B.normal_(std=1e-3)

    LoraWeights.reset_parameters = reset_parameters


def _orthogonal_init_x5() -> None:
    import torch

    from fxpeft.passes.lora.weights import LoraWeights

    original = LoraWeights.reset_parameters

    def reset_parameters(self) -> None:
        original(self)
        if self.init == "orthogonal" and self.lora_A.device.type != "meta":
            with torch.no_grad():
                self.lora_A.mul_(5)
                self.lora_B.mul_(5)

    LoraWeights.reset_parameters = reset_parameters


def _quantized_merge_0_8() -> None:
    from fxpeft.ops import quantized

    original = quantized.merge_delta
    quantized.merge_delta = lambda base_model, path, delta: original(base_model, path, 0.8 * delta)


def _unmerge_keeps_the_update() -> None:
    from fxpeft.ops import quantized
    from fxpeft.passes.lora.weights import LoraWeights

    original = LoraWeights.unmerge_from

    def unmerge_from(self, base_model) -> None:
        if quantized.quantized_kind(base_model.get_submodule(self.path)) is not None:
            original(self, base_model)  # only the full-precision path forgets to subtract

    LoraWeights.unmerge_from = unmerge_from


def _mixed_batch_gate_ignored() -> None:
    from fxpeft.model import AdaptedModel

    original = AdaptedModel._gates
    AdaptedModel._gates = lambda self, kwargs, adapter_names, known=False: original(self, kwargs, None)


def _dropout_in_eval() -> None:
    from fxpeft.ops.dropout import dropout
    from fxpeft.runtime import eval_twin

    eval_twin.ENGINE_EVAL_FORMS[dropout] = lambda node: None  # the eval twin keeps LoRA's dropout nodes


def _dropout_p_halved() -> None:
    from fxpeft.passes.lora.weights import LoraWeights

    original = LoraWeights.__init__

    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.dropout = self.dropout / 2

    LoraWeights.__init__ = __init__


MUTANTS = {
    "scaling_doubled": Mutant("every LoRA scaling is 2 * alpha / r", _scaling_doubled,
                              (f"{LORA}::test_scaling_is_alpha_over_r_or_sqrt_r",)),
    "rslora_as_plain": Mutant("use_rslora scales by alpha / r instead of alpha / sqrt(r)", _rslora_as_plain,
                              (f"{LORA}::test_scaling_is_alpha_over_r_or_sqrt_r[True-4.0]",)),
    "set_alpha_times_r": Mutant("set_alpha makes the scaling alpha * r", _set_alpha_times_r,
                                (f"{LORA}::test_set_alpha_scales_by_alpha_over_r_as_peft",)),
    "b_init_nonzero": Mutant("a fresh adapter's B is not zero", _b_init_nonzero,
                             (f"{LORA}::test_gaussian_init_has_std_one_over_r",)),
    "orthogonal_init_x5": Mutant("the orthogonal init is 5 times PEFT's", _orthogonal_init_x5,
                                 ("tests/test_lifecycle.py::test_initialisations_as_peft[orthogonal]",)),
    "quantized_merge_0_8": Mutant("a merge into a quantized layer adds 0.8 of the update", _quantized_merge_0_8,
                                  (
                                      "tests/test_quantized.py::test_merge_into_quantize_rule_layers_is_the_requantized_exact_sum",)),
    "unmerge_keeps_the_update": Mutant("unmerge() of a full-precision layer subtracts nothing",
                                       _unmerge_keeps_the_update,
                                       (f"{LORA}::test_merge_adds_alpha_over_r_times_b_a_and_unmerge_restores",)),
    "mixed_batch_gate_ignored": Mutant("adapter_names is ignored: every row runs the active adapters",
                                       _mixed_batch_gate_ignored,
                                       (f"{LORA}::test_mixed_batch_rows_against_the_formula",)),
    "dropout_in_eval": Mutant("LoRA's dropout stays in the eval graph", _dropout_in_eval,
                              (f"{LORA}::test_dropout_acts_in_train_mode_only_and_matches_peft",)),
    "dropout_p_halved": Mutant("LoRA's dropout runs with p / 2", _dropout_p_halved,
                               (f"{LORA}::test_dropout_acts_in_train_mode_only_and_matches_peft",)),
}
UNMUTATED = "(none)"


# -- running a selection in a forked child -----------------------------------------------------------------------
class _Outcomes:
    """A pytest plugin recording each test's outcome; a failure counts only when an assertion failed in the test's
    call (an AssertionError, or pytest's own ``Failed`` from ``pytest.raises`` / ``pytest.fail``), so that a mutant
    that merely crashes a test, or a broken patch, is not counted as caught."""

    def __init__(self):
        self.collected: list[str] = []
        self.passed: list[str] = []
        self.failed: dict[str, str] = {}
        self.other: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        self.collected = [item.nodeid for item in items]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if report.when == "call" and report.passed:
            self.passed.append(item.nodeid)
        elif report.failed:
            error = call.excinfo
            text = error.exconly().splitlines()[0][:300] if error is not None else report.when
            asserted = error is not None and report.when == "call" and \
                error.errisinstance((AssertionError, pytest.fail.Exception))
            (self.failed if asserted else self.other)[item.nodeid] = text
        return report


def _run_in_child(name: str, tests: tuple[str, ...], log: Path) -> dict:
    """Apply mutant ``name`` (unless unmutated) and run ``tests``; the outcomes as a dict."""
    import torch

    torch.set_num_threads(1)
    if name != UNMUTATED:
        MUTANTS[name].apply()
    recorder = _Outcomes()
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        # maxfail: one caught failure is enough for a mutant; the unmutated run must pass every test anyway.
        # Plugins these tests do not use are off: hypothesis's would be imported and assertion-rewritten in every
        # child (~3 s), and the unraisable-exception one collects garbage at exit (~1 s).
        code = pytest.main([*tests, "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p",
                            "no:unraisableexception", "-o", "addopts=", "-W", "ignore",
                            f"--maxfail={1 if name != UNMUTATED else 1000}"], plugins=[recorder])
    return {"exit": int(code), "collected": recorder.collected, "passed": recorder.passed, "failed": recorder.failed,
            "other": recorder.other}


def _start(name: str, tests: tuple[str, ...], logs: Path) -> int:
    """Fork a child that runs ``tests`` under mutant ``name``, writes its outcomes to ``logs/<name>.json`` and its
    pytest output to ``logs/<name>.log``; the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        try:
            result = _run_in_child(name, tests, logs / f"{name}.log")
        except BaseException as error:  # noqa: BLE001 - reported to the parent, whatever it is
            result = {"exit": -1, "error": f"{type(error).__name__}: {error}"}
        (logs / f"{name}.json").write_text(json.dumps(result))
        os._exit(0)
    return pid


def run_all(parallel: int = 2, timeout: float = 120.0, logs: Path | None = None) -> dict[str, dict]:
    """Every mutant's selection with the mutant applied, and the union of the selections unmutated."""
    import tempfile

    # What the selected tests import, imported once before forking (no tensor work, so no thread pool to inherit).
    # Test modules themselves are left to each child's pytest, which rewrites their asserts as it imports them.
    for module in ("bitsandbytes", "bitsandbytes.functional", "hypothesis", "peft", "peft.tuners.lora",
                   "safetensors.torch", "transformers", "transformers.pytorch_utils",
                   "transformers.models.opt.modeling_opt", "fxpeft", "tests.models", "tests.passes.peft_reference"):
        importlib.import_module(module)
    from fxpeft.methods import methods

    methods()  # imports fxpeft.passes: every method registered

    logs = logs or Path(tempfile.mkdtemp(prefix="fxpeft-mutants-"))
    union = tuple(dict.fromkeys(test for mutant in MUTANTS.values() for test in mutant.tests))
    jobs = [(UNMUTATED, union)] + [(name, mutant.tests) for name, mutant in MUTANTS.items()]
    results: dict[str, dict] = {}
    running: dict[int, tuple[str, float]] = {}
    while jobs or running:
        while jobs and len(running) < parallel:
            name, tests = jobs.pop(0)
            running[_start(name, tests, logs)] = (name, time.monotonic())
        for pid, (name, started) in list(running.items()):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() - started < timeout:
                continue
            if done == 0:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            out = logs / f"{name}.json"
            results[name] = json.loads(out.read_text()) if out.exists() else \
                {"exit": -1, "error": f"no result (killed after {timeout:.0f} s, or the child died)"}
            results[name]["log"] = str(logs / f"{name}.log")
            results[name]["seconds"] = round(time.monotonic() - started, 1)
            del running[pid]
        time.sleep(0.05)
    return results


# -- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    logs = tmp_path_factory.mktemp("mutants")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run([sys.executable, "-m", "tests.test_mutants", str(logs)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_selections_pass_unmutated(outcomes):
    """Every test the mutants are held to passes on the real code (a failure under a mutant proves nothing
    otherwise), and every selected id names a test that exists."""
    run = outcomes[UNMUTATED]
    assert "error" not in run, run
    assert run["exit"] == 0 and not run["failed"] and not run["other"], f"{run}; see {run['log']}"
    assert run["passed"] == run["collected"] and run["collected"]
    for name, mutant in MUTANTS.items():
        for test in mutant.tests:
            assert any(nodeid == test or nodeid.startswith(test + "[") for nodeid in run["collected"]), (name, test)


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_caught(outcomes, name):
    """With the mutant applied, at least one of its selected tests fails on an assertion."""
    run = outcomes[name]
    assert "error" not in run, run
    assert run["failed"], (f"mutant {name!r} ({MUTANTS[name].what}) survived {MUTANTS[name].tests}: passed "
                           f"{run.get('passed')}, other outcomes {run.get('other')}; see {run.get('log')}")


if __name__ == "__main__":
    print(json.dumps(run_all(logs=Path(sys.argv[1]) if len(sys.argv) > 1 else None)))
