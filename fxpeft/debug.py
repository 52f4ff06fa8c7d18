"""Why fxpeft matched what it matched: the ``"fxpeft"`` logger and match counters.

At DEBUG level the logger reports every candidate a graph pattern looked at (what it matched, or why it was
rejected) and, per rule, what its targets selected and excluded::

    import logging
    logging.basicConfig()
    logging.getLogger("fxpeft").setLevel(logging.DEBUG)
    # linear form matmul: aten.matmul at node matmul_2 (in model.attn): no: second operand is not a transposed
    #   2-D parameter (it is transpose_1 = aten.transpose(...))
    # selector LoRA: targets ['q_proj'] selected 2 of 14 linear: model.layers.0.self_attn.q_proj, ...

The counters give the same numbers to tests and tools. Keys are tuples of strings::

    ("linear_form", form, "matched")        a node computes a linear site in ``form`` (a row of
    ("linear_form", form, "rejected")         fxpeft.graph.patterns.LINEAR_FORMS: linear, addmm, matmul,
                                              quantized); one count per candidate node (a node calling the
                                              form's op), per search
    ("attention_form", form, "matched")     an attention op in ``form`` ("sdpa" or "eager"); one count per
    ("attention_form", form, "rejected")      candidate (an SDPA node, a softmax), per search
    ("selector", rule, "selected")          paths a rule's targets selected, after exclude (``rule`` is the
                                              rule's type name, as in its error messages)
    ("selector", rule, "excluded")          paths the rule's ``exclude`` removed from its selection
    ("selector", rule, "failed")            selections that matched nothing (and raised NoMatchError)
    ("mixed_batch", method, "gathered")     a site whose adapters' nodes the method put in its mixed-batch form
    ("mixed_batch", method, "kept")           a shared site left with one gated branch per adapter (logged at
                                              WARNING with the reason)
    ("capture_cache", outcome)              a capture looked up in the disk cache (fxpeft/capture/disk_cache.py):
                                              hit, miss, stored, rejected (an entry ignored, with the reason at
                                              DEBUG), uncacheable (a program the codec cannot write), unkeyable (a
                                              model that cannot be keyed safely)

A search counts each time it runs (a re-capture for a new signature searches again). Read them with
:func:`counters`, or count one block::

    with fxpeft.debug.counting() as counts:
        fxpeft.transform(model, rules)
    assert counts["linear_form", "addmm", "matched"] == 8
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Iterator

__all__ = ["logger", "count", "counters", "reset_counters", "counting"]

logger = logging.getLogger("fxpeft")
"""The package's logger: matches and selections at DEBUG, degraded fast paths at WARNING."""

_lock = threading.Lock()
_totals: collections.Counter = collections.Counter()
_blocks: list[collections.Counter] = []  # the counters of the open ``counting()`` blocks


def count(*key: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``key`` (a tuple of strings, see the module docstring)."""
    with _lock:
        _totals[key] += n
        for block in _blocks:
            block[key] += n


def counters() -> dict[tuple[str, ...], int]:
    """A copy of every counter since the process started (or since :func:`reset_counters`)."""
    with _lock:
        return dict(_totals)


def reset_counters() -> None:
    """Set every counter back to zero (open :func:`counting` blocks keep theirs)."""
    with _lock:
        _totals.clear()


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter]:
    """The counts made inside the block, as a :class:`collections.Counter` (missing keys read 0).

    Blocks nest and leave the process-wide counters alone; the counter stays readable after the block."""
    block: collections.Counter = collections.Counter()
    with _lock:
        _blocks.append(block)
    try:
        yield block
    finally:
        with _lock:  # by identity: two blocks with equal counts compare equal
            del _blocks[next(i for i, open_block in enumerate(_blocks) if open_block is block)]
