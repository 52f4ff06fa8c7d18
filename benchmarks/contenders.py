"""The contenders: one base model, adapted (or not) the way each library's users adapt it.

A contender's name says what it is: ``"<kind> [merged] [regional] [gated] eager|compiled"`` with kind ``base`` (no
adapter), ``PEFT`` (``peft.get_peft_model``) or ``fxpeft`` (``fxpeft.transform``); ``fxpeft regional compiled`` is
compiled in place by ``adapted.compile()`` (each repeated layer compiled once, fxpeft/runtime/regional_compile.py).
Other compiled contenders are ``torch.compile(module, dynamic=True)``; fxpeft's adds ``fullgraph=True`` (its graph
has no breaks), while the Hugging Face modules keep the default, as their users do. ``fxpeft gated eager`` runs
fxpeft's eager calls on the per-row gated graph (``fold_gates=False``), not the one folded for the active adapters.

The training lower bound is the base model with every weight frozen, run through the same forward, loss,
backward and AdamW step: a trainable scalar multiplies the input embeddings, so backward goes through every
activation (as LoRA's does) but computes no weight gradient.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

import fxpeft

from .workloads import Workload

__all__ = ["Contender", "FrozenBase", "build", "random_lora_state", "EAGER", "COMPILED"]

EAGER = ("base eager", "PEFT eager", "fxpeft eager")
COMPILED = ("base compiled", "PEFT compiled", "fxpeft compiled")


class FrozenBase(nn.Module):
    """The base model, frozen, with a trainable scalar on its input embeddings so that backward runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones((), device=model.get_input_embeddings().weight.device))

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        embeddings = self.model.get_input_embeddings()(input_ids) * self.scale
        return self.model(inputs_embeds=embeddings, **kwargs)


def reference_of(name: str) -> str:
    """The base contender a figure is compared with: the one in the same mode (eager or compiled)."""
    return "base compiled" if name.endswith("compiled") else "base eager"


@dataclasses.dataclass
class Contender:
    name: str
    kind: str  # "base", "PEFT" or "fxpeft"
    merged: bool
    compiled: bool
    module: nn.Module  # what the library returned; the public API is called on this one
    call: Callable[..., Any] = None  # ``module`` or its compiled form
    optimizer: torch.optim.Optimizer | None = None

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, loss, backward, AdamW step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.call(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss

    def infer(self, batch: dict[str, torch.Tensor], **extra: Any):
        with torch.no_grad():
            return self.call(**batch, **extra)

    def generate(self, batch: dict[str, torch.Tensor], new_tokens: int, **extra: Any) -> torch.Tensor:
        """Greedy ``generate`` of exactly ``new_tokens`` tokens per prompt (``min_new_tokens`` keeps EOS from
        stopping it early), through the library's own ``generate``; ``extra``: e.g. ``adapter_names``."""
        with torch.no_grad():
            return self.module.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=0, **extra)


def adapt(kind: str, model: nn.Module, workload: Workload, example: dict[str, torch.Tensor], training: bool):
    """``model`` adapted by one library (``base``: no adapter). PEFT edits ``model`` in place; pass a copy."""
    if kind == "base":
        return FrozenBase(model) if training else model.requires_grad_(False)
    if kind == "PEFT":
        from peft import get_peft_model

        return get_peft_model(workload.prepare_for_peft(model), workload.peft_config())
    # The example is the call the model will get, so the first call captures nothing more. The .to() is
    # what a user writes anyway; it also moves fxpeft's adapter flags, which start on the CPU.
    device = next(model.parameters()).device
    return fxpeft.transform(model, [workload.rule()], example_kwargs=example).to(device)


def finish(contender: Contender, training: bool) -> Contender:
    """Mode, merge, compile and optimizer: what a user does after adapting (after the weights are set)."""
    module = contender.module
    module.train(training)
    if contender.merged:
        module.merge() if contender.kind == "fxpeft" else module.merge_adapter()
    contender.call = module
    if "gated" in contender.name.split():  # "fxpeft gated eager": the per-row gated graph compiled models run
        module.fold_gates = False
    if contender.compiled and "regional" in contender.name.split():  # "fxpeft regional compiled"
        module.compile(fullgraph=True, dynamic=True)  # in place: each repeated layer compiled once, the rest eager
    elif contender.compiled:
        contender.call = torch.compile(module, fullgraph=contender.kind == "fxpeft", dynamic=True)
    if training:
        trainable = [p for p in module.parameters() if p.requires_grad]
        contender.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    return contender


def start(name: str, model: nn.Module, workload: Workload, example: dict[str, torch.Tensor],
          training: bool) -> Contender:
    """Adapt ``model`` (a copy is the caller's business) as contender ``name`` says; not compiled yet."""
    kind, *rest = name.split()
    return Contender(name, kind, "merged" in rest, rest[-1] == "compiled",
                     adapt(kind, model, workload, example, training))


def build(names, model: nn.Module, workload: Workload, example: dict[str, torch.Tensor],
          training: bool) -> list[Contender]:
    """Every contender on its own copy of ``model`` (same base weights) with the same LoRA weights."""
    contenders = [start(name, copy.deepcopy(model), workload, example, training) for name in names]
    same_adapter_weights(contenders)
    return [finish(contender, training) for contender in contenders]


def random_lora_state(adapted: fxpeft.AdaptedModel, adapter_name: str = "default",
                      seed: int = 2) -> dict[str, torch.Tensor]:
    """Non-zero LoRA weights (B starts at zero) keyed as PEFT saves them, shaped by fxpeft's adapter."""
    g = torch.Generator().manual_seed(seed)
    device = next(adapted.parameters()).device
    return {key: (torch.randn(shape, generator=g) * 0.02).to(device)
            for key, shape in sorted(adapted.adapters[adapter_name].peft_keys().items())}


def load_lora_state(contender_module: nn.Module, kind: str, state: dict[str, torch.Tensor],
                    adapter_name: str = "default") -> None:
    """Load PEFT-keyed LoRA weights into a PEFT or an fxpeft model, each through its own public API."""
    if kind == "fxpeft":
        contender_module.adapters[adapter_name].load_peft_state_dict(state)
    elif kind == "PEFT":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(contender_module, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise RuntimeError(f"PEFT did not take {len(result.unexpected_keys)} keys, e.g. "
                               f"{result.unexpected_keys[:3]}")


def same_adapter_weights(contenders: list[Contender], adapter_name: str = "default", seed: int = 2) -> None:
    fx = next((c.module for c in contenders if c.kind == "fxpeft"), None)
    if fx is None:
        return  # nothing to read the adapter's shapes from; B stays zero (the timings do not depend on it)
    state = random_lora_state(fx, adapter_name, seed)
    for contender in contenders:
        load_lora_state(contender.module, contender.kind, state, adapter_name)


# The few verbs the scripted comparisons need, each spelled as the library's users spell it.
def add_adapter(contender: Contender, name: str, workload: Workload) -> None:
    if contender.kind == "fxpeft":
        contender.module.add_adapter(name, [workload.rule()])
    else:
        contender.module.add_adapter(name, workload.peft_config())


def set_adapter(contender: Contender, name: str) -> None:
    contender.module.set_adapter(name)


def disabled(contender: Contender):
    """Context manager: adapters off."""
    return contender.module.disable_adapters() if contender.kind == "fxpeft" else contender.module.disable_adapter()


def mixed_batch_kwargs(contender: Contender, names: list[str]) -> dict[str, Any]:
    """``adapter_names`` for a mixed batch: PEFT and eager fxpeft take the list of names; compiled fxpeft
    takes its index tensor (a list of strings would be a constant to dynamo)."""
    if contender.kind == "fxpeft" and contender.compiled:
        return {"adapter_names": contender.module.adapter_indices(names)}
    return {"adapter_names": names} if contender.kind != "base" else {}


def adapter_state(contender: Contender, name: str) -> dict[str, torch.Tensor]:
    """A copy of one adapter's weights, keyed as PEFT saves them."""
    if contender.kind == "fxpeft":
        state = contender.module.adapter_state_dict(name)
    else:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(contender.module, adapter_name=name)
    return {key: value.detach().clone() for key, value in state.items()}
