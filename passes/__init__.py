"""Rewrite passes, one file per method. Importing this package registers them with the engine."""

from . import lora, trainable  # noqa: F401  (imported for their registrations)

__all__ = ["lora", "trainable"]
