"""A streamer for generate tests: what transformers' ``generate`` hands a streamer, collected."""

from __future__ import annotations

from transformers.generation.streamers import BaseStreamer

__all__ = ["CollectingStreamer"]


class CollectingStreamer(BaseStreamer):
    """Keeps every chunk ``generate`` puts (the prompt first, then each new token), in order."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        pass
