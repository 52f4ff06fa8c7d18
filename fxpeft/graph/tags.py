"""The tags that passes put on the nodes they insert, read by every consumer of a rewritten graph.

Every node a pass inserts carries ``node.meta["fxpeft"] = {"adapter", "site", "method", "role"}``: which
adapter inserted it, at which site (a module path), for which method (the method's ``tag``), and what the node
is within the method's pattern. The consumers (the eval twin, the mixed-batch form, verification, counters)
read these tags instead of re-parsing the nodes. Two roles mean the same to every consumer::

    join     the node where an adapter's result rejoins the base data flow (LoRA's ``y + delta``, a trained
             copy's ``where(on, copy, base)``, a scale's ``y * s``): it stands for its one operand that is a
             base value (or stands for one); every other operand is computed from adapter inputs only
    output   a node after a join (a cast back to the base dtype): it stands for what its input stands for

Other roles are the method's own (LoRA: ``input``, ``lora_A``, ``lora_B``, ``scale``), read by its own code.

A node that gates per row may also say what it equals when its adapter applies to *every* row of a call
(``node.meta["fxpeft_when_on"]``, set by :func:`mark_when_on`), so that a graph specialised to one set of active
adapters (fxpeft/runtime/uniform_gates.py) drops the gating. A form names nodes by name (names survive copies of
the graph; node objects do not)::

    ("arg", i)                 the node's argument ``i`` (a row select whose rows are all kept)
    ("scaled", x, s)           ``x * s`` with ``s`` (one element) taken as a 1-element tensor, so that dtypes
                               promote as they do against the gate's ``[batch]`` (``delta * scaling``)
    ("product", x, y)          ``x * y`` (broadcast)
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["KEY", "JOIN", "OUTPUT", "WHEN_ON", "tag", "tag_of", "role_of", "is_adapter_node", "mark_when_on",
           "when_on"]

KEY = "fxpeft"
JOIN = "join"
OUTPUT = "output"
WHEN_ON = "fxpeft_when_on"


def tag(node: fx.Node, adapter: str, site: str, method: str, role: str | None = None) -> fx.Node:
    """Mark ``node`` as inserted by ``method`` of ``adapter`` at ``site`` in ``role``; returns ``node``."""
    node.meta[KEY] = {"adapter": adapter, "site": site, "method": method, "role": role}
    return node


def tag_of(node: Any) -> dict | None:
    """The tag of an inserted node, or None for a base node (or a non-node)."""
    return node.meta.get(KEY) if isinstance(node, fx.Node) else None


def role_of(node: Any) -> str | None:
    """The role an inserted node plays in its method's pattern, or None."""
    found = tag_of(node)
    return found.get("role") if found else None


def is_adapter_node(node: Any) -> bool:
    """Whether ``node`` was inserted by a pass."""
    return tag_of(node) is not None


def mark_when_on(node: fx.Node, form: str, *operands: int | fx.Node) -> fx.Node:
    """Record what ``node`` equals when its adapter applies to every row (see the module docstring); operands are
    argument indices (``"arg"``) or nodes (kept by name); returns ``node``."""
    node.meta[WHEN_ON] = (form, *(operand.name if isinstance(operand, fx.Node) else operand for operand in operands))
    return node


def when_on(node: Any) -> tuple | None:
    """The form :func:`mark_when_on` recorded on ``node``, or None."""
    return node.meta.get(WHEN_ON) if isinstance(node, fx.Node) else None
