"""The errors fxpeft raises for user mistakes.

Every error says what is wrong, where, and how to fix it. All derive from :class:`FxpeftError`, and the
ones about bad values also derive from :class:`ValueError` so ordinary ``except ValueError`` code keeps
working.
"""

from __future__ import annotations

__all__ = [
    "FxpeftError",
    "RuleError",
    "CaptureError",
    "ArgumentError",
    "NoMatchError",
    "AdapterLoadError",
    "AdapterSaveError",
    "UnsupportedError",
    "GenerationError",
    "SharedTensorWarning",
]


class FxpeftError(Exception):
    """Base class of every error fxpeft raises on purpose."""


class RuleError(FxpeftError, ValueError):
    """A rule was built with an invalid hyper-parameter or an unknown field."""


class CaptureError(FxpeftError, RuntimeError):
    """The model could not be captured as a graph."""


class ArgumentError(FxpeftError, TypeError):
    """A call passed a keyword argument that the model's ``forward`` does not take."""


class NoMatchError(FxpeftError, ValueError):
    """A rule's targets selected nothing in the captured graph."""

    def __init__(self, message: str, candidates: list[str] | None = None):
        super().__init__(message)
        self.candidates = list(candidates or [])


class AdapterLoadError(FxpeftError, ValueError):
    """An adapter file or directory does not fit the base model, or is not a valid adapter."""

    def __init__(self, message: str, mismatches: list[str] | None = None):
        super().__init__(message)
        self.mismatches = list(mismatches or [])


class AdapterSaveError(FxpeftError, OSError):
    """An adapter could not be written."""


class UnsupportedError(FxpeftError, NotImplementedError):
    """A feature, configuration field or layer type that fxpeft does not support (yet)."""


class GenerationError(FxpeftError, ValueError):
    """A ``generate`` request that the model's positions or KV cache cannot hold (raised before any token)."""


class SharedTensorWarning(UserWarning):
    """An adapter on a tensor that another use shares (tied weights, another adapted model): a merge would change
    that use too, so :meth:`~fxpeft.AdaptedModel.merge` will refuse it; unmerged outputs are right."""
