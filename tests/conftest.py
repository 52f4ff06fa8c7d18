"""Shared test fixtures: captures are the slow part (t5 takes ~15 s), so each family is captured once."""

from __future__ import annotations

import functools

import pytest

from fxpeft.capture.export import capture
from tests.models import hf_model


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
