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
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["KEY", "JOIN", "OUTPUT", "tag", "tag_of", "role_of", "is_adapter_node"]

KEY = "fxpeft"
JOIN = "join"
OUTPUT = "output"


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
