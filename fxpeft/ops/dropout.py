"""The LoRA input's dropout, drawn as eager PyTorch draws it on the CPU, also under torch.compile.

PEFT's LoRA dropout (``nn.Dropout``) runs ATen's ``dropout``. On the CPU that is
``empty_like(x).bernoulli_(1 - p)``, divided by ``1 - p``, times ``x``; on other devices it is the fused
``native_dropout``. Traced by torch.compile, ``dropout`` becomes ``native_dropout`` on every device, and
Inductor lowers that to one Philox draw per element inside its C++ kernels. With dropout on every linear of
a llama-like model (9 M draws per step) the compiled training step took about 5 % longer that way than with
ATen's ``bernoulli_`` (``python -m benchmarks.breakdown step --workload b``, ``fallback_random``).

:func:`dropout` spells the CPU path out, with the draw in an operator of its own
(``fxpeft::dropout_noise``) that Inductor calls as it is. A plain ``empty_like(x).bernoulli_(q)`` in the
graph is not safe: torch 2.13's Inductor fuses the reads of the noise into the kernel that allocates it,
ahead of the in-place draw, and multiplies by uninitialised memory. Each dropout node of a graph passes its
own ``draw`` number, because AOT autograd's common-subexpression pass knows random ops only from a fixed list
of ATen ops: two calls with equal arguments (LoRA on ``q_proj`` and ``v_proj`` drops the same input) would be
merged into one draw, one mask for both. Eager calls stay PEFT's bit for bit.
"""

from __future__ import annotations

import inspect
import itertools

import torch

__all__ = ["dropout", "next_draw"]

_draws = itertools.count()


def next_draw() -> int:
    """A number no other dropout node of this process has: the ``draw`` argument of :func:`dropout`."""
    return next(_draws)


# The tag keeps AOT autograd's partitioner from recomputing the draw in backward (a second, different mask).
# A torch whose custom_op takes no tags gets aten.dropout on every device instead.
_TAGGED = "tags" in inspect.signature(torch.library.custom_op).parameters


@torch.library.custom_op("fxpeft::dropout_noise", mutates_args=(),
                         **({"tags": (torch.Tag.nondeterministic_seeded,)} if _TAGGED else {}))
def _dropout_noise(x: torch.Tensor, keep: float, draw: int) -> torch.Tensor:
    """Ones with probability ``keep``, else zeros, shaped like ``x``: ATen's ``bernoulli_``, as eager dropout draws.
    ``draw`` only tells calls apart (see the module's docstring)."""
    return torch.empty_like(x).bernoulli_(keep)


@_dropout_noise.register_fake
def _(x: torch.Tensor, keep: float, draw: int) -> torch.Tensor:
    return torch.empty_like(x)


def dropout(x: torch.Tensor, p: float, train: bool, draw: int = -1) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, train)``, with the CPU's random draws left to ATen under torch.compile.

    The first three arguments are ``aten.dropout``'s; ``draw`` is the node's own number (:func:`next_draw`)."""
    if not train or p == 0.0:
        return x
    if x.device.type != "cpu" or not _TAGGED:
        return torch.ops.aten.dropout.default(x, p, True)
    noise = _dropout_noise(x.detach(), 1.0 - p, draw)
    return x * noise.div_(1.0 - p)
