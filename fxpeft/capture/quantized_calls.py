"""While capturing, every bitsandbytes layer of a model is called as one ``fxpeft::quantized_linear`` op node.

See :mod:`fxpeft.ops.quantized` for why (export cannot trace bitsandbytes' parameters) and how the op finds the
layer at call time. This module holds the capture side: a stand-in module in each layer's slot for the duration
of the export, put back however the export ends.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn

from fxpeft.ops.quantized import check_quantized_layer, model_token

__all__ = ["quantized_layers_as_ops"]


class _QuantizedCall(nn.Module):
    """Stands in a quantized layer's slot during capture: one op node instead of the layer's kernels."""

    def __init__(self, layer: nn.Module, model: str, path: str):
        super().__init__()
        # A plain parameter aliasing the packed weight: export lifts it as ``<path>.weight`` (it cannot lift
        # the bitsandbytes parameter class), and at call time the adapted model feeds the real one.
        self.weight = nn.Parameter(layer.weight.data, requires_grad=False)
        self.register_parameter("bias", layer.bias)
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self._target = (model, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, path = self._target
        return torch.ops.fxpeft.quantized_linear(x, self.weight, self.bias, model, path, self.in_features,
                                                 self.out_features)


@contextlib.contextmanager
def quantized_layers_as_ops(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """While capturing: every quantized layer of ``model`` is called as one ``quantized_linear`` op.

    Yields ``{path: layer}`` (empty, and nothing changed, for a model without quantized layers). The layers
    are back in their slots when the block exits, however it exits. Raises :class:`UnsupportedError` for a
    quantized layer type fxpeft does not know, naming it."""
    layers: dict[str, nn.Module] = {}
    if "bitsandbytes" in sys.modules:
        for path, module in model.named_modules(remove_duplicate=False):
            if check_quantized_layer(path, module) is not None:
                layers[path] = module
    if not layers:
        yield layers
        return
    token = model_token(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, layer in layers.items():
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, name, _QuantizedCall(layer, token, path))
            swapped.append((owner, name, layer))
        yield layers
    finally:
        for owner, name, layer in reversed(swapped):
            setattr(owner, name, layer)
