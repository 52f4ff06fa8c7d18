"""The adapted model: an ordinary ``nn.Module`` that runs the rewritten graph of its base model.

It is called with the base model's arguments and returns the base model's output type. Its parameters
are the base model's (frozen) and the adapters' (trainable), so any optimizer works on
``adapted.parameters()``. ``.train()`` / ``.eval()`` choose between the train graph and its eval twin (no
dropout anywhere, including attention's ``dropout_p``). A call with a different *set* of arguments is
captured once more and rewritten with the same adapter tensors; a different *size* never is.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from .adapters import Adapter, SiteModule
from .capture import capture, forward_kwargs
from .errors import FxpeftError
from .program import InputSource, Program
from .rewrite import apply_rules

__all__ = ["AdaptedModel"]

_INT4_CLASSES = ("Params4bit",)


def _signature_key(kwargs: dict[str, Any]) -> tuple:
    key = []
    for name in sorted(kwargs):
        value = kwargs[name]
        key.append((name, "tensor") if isinstance(value, torch.Tensor) else (name, repr(value)))
    return tuple(key)


class AdaptedModel(nn.Module):
    """A base model with adapters, run as a rewritten fx graph. Build it with :func:`fxpeft.transform`.

    Attributes:
        base_model: the model that was transformed (its tensors are used, never written).
        adapters: ``nn.ModuleDict`` of adapter name to :class:`fxpeft.adapters.Adapter`.
    """

    def __init__(self, base_model: nn.Module, adapters: dict[str, Adapter], example_kwargs: dict[str, Any] | None,
                 dynamic_shapes: dict[str, Any] | None = None):
        super().__init__()
        self.base_model = base_model
        self.adapters = nn.ModuleDict(adapters)
        self.active_adapter = next(iter(adapters))
        self._dynamic_shapes = dynamic_shapes
        self._programs: dict[tuple, Program] = {}
        program = self._build_program(example_kwargs)
        self._programs[_signature_key({**{k: v for k, v in (example_kwargs or {}).items() if v is not None},
                                       **program.fixed_kwargs})] = program
        self.training = base_model.training

    # -- graphs -------------------------------------------------------------------------------------
    def _build_program(self, kwargs: dict[str, Any] | None) -> Program:
        program = capture(self.base_model, kwargs, dynamic_shapes=self._dynamic_shapes)
        apply_rules(program, self.base_model, dict(self.adapters.items()))
        return program

    def programs(self) -> list[Program]:
        """The captured and rewritten programs, one per argument signature seen so far."""
        return list(self._programs.values())

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten train-mode graph of the first captured signature (for inspection)."""
        return next(iter(self._programs.values())).graph_module

    def _resolve(self, source: InputSource) -> torch.Tensor:
        if source.kind == "parameter":
            return self.base_model.get_parameter(source.target)
        if source.kind == "buffer":
            return self.base_model.get_buffer(source.target)
        adapter_name, key, attribute = source.target
        return getattr(self.adapters[adapter_name].sites[key], attribute)

    def forward(self, *args, **kwargs):
        """Call with the base model's arguments; returns the base model's output type."""
        kwargs = {k: v for k, v in forward_kwargs(self.base_model, args, kwargs).items() if v is not None}
        program = next(iter(self._programs.values()))
        for name in program.fixed_kwargs:
            kwargs.pop(name, None)
        key = _signature_key({**kwargs, **program.fixed_kwargs})
        program = self._programs.get(key)
        if program is None:
            if torch.compiler.is_compiling():
                raise FxpeftError(
                    f"The adapted model was called under torch.compile with a new set of arguments "
                    f"({sorted(kwargs)}); capture happens outside compiled code. Call it once eagerly with "
                    "these arguments before compiling, or compile after the first call.")
            program = self._programs[key] = self._build_program(kwargs)
        return program.run(self.training, kwargs, self._resolve)

    # -- adapter parameters ---------------------------------------------------------------------------
    def site_modules(self, adapter_name: str | None = None) -> Iterator[SiteModule]:
        """Every site module, of one adapter or of all."""
        names = [adapter_name] if adapter_name else list(self.adapters)
        for name in names:
            yield from self.adapters[name].site_modules()

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, keyed exactly as PEFT saves them (``base_model.model.<path>...``)."""
        adapter = self.adapters[adapter_name or self.active_adapter]
        return {key: value.detach() for key, value in adapter.peft_state_dict().items()}

    def save_adapter(self, directory, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout), atomically."""
        from .files import save_adapter

        save_adapter(self, directory, adapter_name or self.active_adapter)

    # -- parameter counts, as PEFT reports them -------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, computed as PEFT computes them."""
        trainable = total = 0
        for parameter in self.parameters():
            count = parameter.numel()
            if type(parameter).__name__ in _INT4_CLASSES:
                count *= 2  # PEFT counts packed 4-bit weights by their unpacked size
            total += count
            if parameter.requires_grad:
                trainable += count
        total -= sum(site.shadowed_base_parameters() for site in self.site_modules())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- the base model -------------------------------------------------------------------------------
    def load_base_model(self, model: nn.Module) -> None:
        """Replace the base model by one of the same structure (e.g. real weights for a model planned on
        ``meta``). Shapes are checked first; graphs retarget to the new device on the next call and
        adapter tensors created on ``meta`` are moved and initialised."""
        from .files import check_same_structure

        check_same_structure(self.base_model, model)
        device = next(model.parameters()).device
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.base_model = model
        for site in self.site_modules():
            if hasattr(site, "retarget"):
                site.retarget(model.get_parameter(site.path))
            elif any(t.device.type == "meta" for t in site.parameters()):
                site.to_empty(device=device)
                site.reset_parameters()
