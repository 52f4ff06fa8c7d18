"""Shared test fixtures: captures are the slow part (t5 takes ~15 s), so each family is captured once."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("FXPEFT_CACHE", "off")  # the suite never writes to the user's capture cache

import pytest
from hypothesis import HealthCheck, Phase, settings

from fxpeft.capture.export import capture
from tests.models import hf_model

# Hypothesis profiles. Tests that set their own ``max_examples`` (test_rules, test_patterns, test_untrusted) keep
# it; the profile gives the rest of their settings where they set none. ``ci`` (the default): the same examples on
# every run (derandomize, no example database), few of them, no deadline (a capture takes seconds). ``long``
# (``HYPOTHESIS_PROFILE=long``): random examples, 20x as many, with the example database so that a failure is replayed
# first on the next run; for hunting bugs locally (tests/test_fuzz.py says how).
# ``ci`` does not shrink a failing example (it is derandomized, so the failure replays as it is; shrinking examples
# that capture models takes minutes); ``long`` shrinks.
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
settings.register_profile("long", max_examples=200, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: the workers share the cores
    import torch

    torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _fresh_capture(family: str):
    model = hf_model(family)
    return model, capture(model)


@pytest.fixture(scope="session")
def fresh_capture():
    """``fresh_capture(family) -> (model, program)``: a tiny model and its capture, never rewritten.

    Shared across test modules; tests must not run passes on the program or change the model.
    """
    return _fresh_capture


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    models gain nothing from threads, and on a machine whose cores are busy each decode step's thread hand-offs cost
    more than its work (tests/test_generate.py ran 7x slower with 2 threads beside another job)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
