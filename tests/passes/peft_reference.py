"""Shared pieces for tests that hold fxpeft against the ``peft`` package on identical weights.

Models here are the tiny families of :mod:`tests.models` with every dropout probability set to 0, so that
train mode is deterministic and a difference can only come from the adapter (the base dropout under SDPA
differs between eager and exported graphs at the 1e-6 level, which would blur a 1e-5 comparison).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from torch import nn

import fxpeft
from tests.models import AUTO_CLASS, CONFIGS


def build_without_dropout(family: str) -> nn.Module:
    """``tests.models.hf_model(family)``'s weights (same seed), every dropout probability 0, eval mode."""
    config = CONFIGS[family]()
    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    model = AUTO_CLASS[family].from_config(config).eval()
    left = [name for name, module in model.named_modules() if isinstance(module, nn.Dropout) and module.p]
    assert not left, f"{family}: dropout left in {left}"
    return model


def output_tensor(output):
    """The tensor to compare: ``.logits`` of a transformers output, else the output itself."""
    return output.logits if hasattr(output, "logits") else output


def call(model: nn.Module, inputs):
    return output_tensor(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def randomize_peft(peft_model: nn.Module, seed: int = 5, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Give every trainable PEFT tensor seeded random values; return PEFT's saved state dict."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(peft_model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return {key: value.clone() for key, value in peft.get_peft_model_state_dict(peft_model).items()}


def peft_grads(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Gradients of PEFT's trainable tensors, keyed as PEFT saves them (the adapter name dropped)."""
    grads = {}
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad:
            key = name.replace(f".{adapter_name}.", ".").replace(".modules_to_save.", ".")
            grads[key] = parameter.grad
    return grads


def fxpeft_grads(adapted: fxpeft.AdaptedModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {key: value.grad for key, value in adapted.adapters[adapter_name].peft_state_dict().items()}


def printed(fn) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    return buffer.getvalue()


def lora_twins(family: str, targets: list[str], r: int, alpha: float, seed: int = 5,
               scale: float = 0.3) -> tuple[nn.Module, fxpeft.AdaptedModel]:
    """One family twice from one seed, in eval mode: PEFT-wrapped and fxpeft-adapted, with PEFT's random LoRA weights
    (``randomize_peft``) loaded into both."""
    peft_model = peft.get_peft_model(build_without_dropout(family), peft.LoraConfig(
        target_modules=targets, r=r, lora_alpha=alpha, lora_dropout=0.0)).eval()
    state = randomize_peft(peft_model, seed=seed, scale=scale)
    adapted = fxpeft.transform(build_without_dropout(family), [fxpeft.LoRA(targets=targets, r=r, alpha=alpha)])
    adapted.adapters["default"].load_peft_state_dict(state)
    return peft_model, adapted.eval()


def assert_merge_is_peft_merge(peft_model: nn.Module, adapted: fxpeft.AdaptedModel, inputs: dict,
                               changed: int) -> None:
    """``adapted.merge()`` keeps the logits, writes exactly PEFT's ``merge_adapter`` weights (bit for bit), changes
    ``changed`` base tensors, and ``unmerge()`` (with PEFT's ``unmerge_adapter``) restores the weights within
    rounding and the logits."""
    def logits():
        with torch.no_grad():
            return call(adapted, inputs)

    unmerged = logits()
    before = {name: p.detach().clone() for name, p in adapted.base_model.named_parameters()}
    adapted.merge()
    try:
        torch.testing.assert_close(logits(), unmerged, rtol=1e-5, atol=1e-5)
        peft_model.merge_adapter()
        theirs = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for name, p in peft_model.named_parameters()}
        written = 0
        for name, tensor in adapted.base_model.named_parameters():
            assert torch.equal(tensor, theirs[name]), name
            written += not torch.equal(tensor, before[name])
        assert written == changed, (written, changed)
    finally:
        peft_model.unmerge_adapter()
        adapted.unmerge()
    for name, tensor in adapted.base_model.named_parameters():
        torch.testing.assert_close(tensor, before[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(), unmerged, rtol=1e-5, atol=1e-5)


def gradients_of_both(peft_model: nn.Module, adapted: fxpeft.AdaptedModel,
                      inputs: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One backward of ``logits.square().mean()`` through each model in train mode (eval mode after); fxpeft's
    gradients and PEFT's, both keyed as PEFT saves the tensors (PEFT's ``.default`` suffix of a ParameterDict
    entry dropped)."""
    for model in (peft_model, adapted):
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.square().mean().backward()
        model.eval()
    want = {key.removesuffix(".default"): grad for key, grad in peft_grads(peft_model).items()}
    return fxpeft_grads(adapted), want


def assert_gradients_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same tensors have gradients, each within float32 rounding of PEFT's."""
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def saved_both_ways(peft_model: nn.Module, adapted: fxpeft.AdaptedModel, folder: Path,
                    config_fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Save the adapter with fxpeft (``folder/fxpeft``) and with PEFT (``folder/peft``); assert the files hold the same
    keys and tensors, and each of ``config_fields`` the same value in ``adapter_config.json`` (lists in any order).
    Returns PEFT's tensors."""
    adapted.save_adapter(folder / "fxpeft")
    peft_model.save_pretrained(folder / "peft")
    files = {name: load_file(str(folder / name / "adapter_model.safetensors")) for name in ("fxpeft", "peft")}
    assert sorted(files["fxpeft"]) == sorted(files["peft"])
    for key, tensor in files["peft"].items():
        assert torch.equal(files["fxpeft"][key], tensor), key
    configs = {name: json.loads((folder / name / "adapter_config.json").read_text()) for name in ("fxpeft", "peft")}
    for field in config_fields:
        mine, other = configs["fxpeft"][field], configs["peft"][field]
        assert (sorted(mine) if isinstance(mine, list) else mine) == \
            (sorted(other) if isinstance(other, list) else other), field
    return files["peft"]
