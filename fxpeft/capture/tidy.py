"""Drop the nodes of a captured graph that compute nothing: export's metadata checks and identity casts.

``torch.export`` puts an ``_assert_tensor_metadata`` check beside every cast (dtype, device and layout of a value
it already knows), and models cast values to the dtype they have (``x.to(torch.float32)`` in an fp32 RMSNorm).
Run eagerly, each is one more dispatcher call per forward (17 checks and 13 identity casts in a 2-layer llama:
an eighth of its nodes); compiled, they vanish anyway. Removing them changes no value: a check has no users,
and ``aten.to.dtype(x, x.dtype)`` returns ``x`` itself.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["drop_no_ops"]

aten = torch.ops.aten
_CHECKS = {aten._assert_tensor_metadata.default}


def _identity_cast(node: fx.Node) -> bool:
    if node.target is not aten.to.dtype or node.kwargs.get("copy") or len(node.args) > 3:
        return False
    source, dtype = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == dtype and not node.kwargs.get("memory_format")


def drop_no_ops(module: fx.GraphModule) -> int:
    """Remove metadata checks and identity casts from ``module``'s graph; returns how many nodes went."""
    graph = module.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CHECKS and not node.users:
            graph.erase_node(node)
            dropped += 1
        elif _identity_cast(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    if dropped:
        module.recompile()
    return dropped
