"""Smoke test of fxpeft on a GPU, held against the ``peft`` package on identical weights.

    python3 benchmarks/device_smoke.py [--device cuda|cpu]

A tiny llama (hidden 64, 2 layers), LoRA r=8 on q/v: logits and gradients vs PEFT in fp32 and bf16, one AdamW
step, ``torch.compile(fullgraph=True, dynamic=True)`` vs eager, save/load, and (when bitsandbytes imports)
int8 and nf4 bases made by ``fxpeft.Quantize`` vs PEFT on a model loaded with ``BitsAndBytesConfig``. One
line per check (``PASS name detail`` / ``FAIL name detail`` / ``SKIP name why``), a summary at the end, and
exit status 0 whatever failed: on a rented machine one broken check must not cost the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.* helpers; an installed fxpeft stays first

import peft  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fxpeft  # noqa: E402
from tests.passes.peft_reference import fxpeft_grads, peft_grads, randomize_peft  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every int8 call
tf.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft 0.21
TARGETS, R, ALPHA = ["q_proj", "v_proj"], 8, 16
RULE = fxpeft.LoRA(targets=TARGETS, r=R, alpha=ALPHA)
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128)
DEVICE, TMP, PAIRS = "cuda", Path(), {}  # set by main(); PAIRS: the fxpeft model of each parity check
results: dict[str, int] = {"PASS": 0, "FAIL": 0, "SKIP": 0}


def check(name: str, fn) -> None:
    """Run one check; ``fn`` returns a detail string. An exception is a FAIL: its message on one line, then
    the traceback's last lines, indented."""
    began, trace = time.perf_counter(), ""
    try:
        verdict, detail = "PASS", fn() or ""
    except Exception as error:
        verdict, detail = "FAIL", f"{type(error).__name__}: {' '.join(str(error).split())[:800]}"
        trace = "".join(f"    {line}\n" for line in traceback.format_exc().strip().splitlines()[-16:])
    results[verdict] += 1
    print(f"{verdict} {name} {detail} [{time.perf_counter() - began:.1f} s]\n{trace}", end="", flush=True)


def llama(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**CONFIG)).to(DEVICE, dtype)


def inputs(batch: int = 2, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def compare(ours, theirs, rtol: float, atol: float, grad_norm: float | None = None) -> str:
    """Logits (train-mode forward, then eval) and LoRA gradients of fxpeft vs PEFT; asserts, returns the max
    gaps. Gradients: elementwise to (rtol, atol / 10), or with ``grad_norm`` to |ours - theirs| / |theirs| (norms
    of each tensor) at most that: bf16 activations round the backward at 2**-8, elementwise noise."""
    data = inputs()
    for model in (ours, theirs):
        model.train()
        model.zero_grad(set_to_none=True)
    mine, want = ours(**data), theirs(**data)
    detail = f"max|dlogits|={(mine.logits.float() - want.logits.float()).abs().max().item():.1e}"
    torch.testing.assert_close(mine.logits, want.logits, rtol=rtol, atol=atol, msg=lambda m: f"{detail}: {m}")
    mine.loss.backward()
    want.loss.backward()
    theirs_grads, gaps, norms = peft_grads(theirs), [], []
    for key, grad in fxpeft_grads(ours).items():
        gaps.append((grad.float() - theirs_grads[key].float()).abs().max().item())
        norms.append(((grad.float() - theirs_grads[key].float()).norm() / theirs_grads[key].float().norm()).item())
        if grad_norm is None:
            torch.testing.assert_close(grad, theirs_grads[key], rtol=rtol, atol=atol / 10,
                                       msg=lambda m, k=key: f"{detail}; grad {k}: {m}")
        else:
            assert norms[-1] <= grad_norm, f"{detail}; grad {key}: relative error {norms[-1]:.1e} > {grad_norm}"
    detail += f" max|dgrad|={max(gaps):.1e} max|dgrad|/|grad|={max(norms):.1e}"
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**data).logits, theirs(**data).logits, rtol=rtol, atol=atol)
    return detail


def lora_pair(dtype):
    theirs = peft.get_peft_model(llama(dtype), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                lora_dropout=0.0))
    ours = fxpeft.transform(llama(dtype), [RULE], example_kwargs=inputs())
    ours.adapters["default"].load_peft_state_dict(randomize_peft(theirs))
    return ours, theirs


def parity(dtype, rtol, atol, grad_norm=None) -> str:
    ours, theirs = lora_pair(dtype)
    PAIRS[dtype] = ours
    return compare(ours, theirs, rtol, atol, grad_norm)


def fp32_adapted() -> fxpeft.AdaptedModel:
    """The fp32 parity check's fxpeft model (with PEFT's random LoRA weights), or a new one if it failed early."""
    return PAIRS[torch.float32] if torch.float32 in PAIRS else lora_pair(torch.float32)[0]


def train_step() -> str:
    ours = fp32_adapted().train()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    frozen = {name: p.detach().clone() for name, p in ours.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss = ours(**inputs()).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss), loss
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before)), "an adapter tensor did not move"
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen), "a base weight moved"
    return f"loss={loss.item():.4f} trainable={sum(p.numel() for p in trainable)}"


def compiled() -> str:
    ours = fp32_adapted().train()
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(ours, fullgraph=True, dynamic=True)
    trainable = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    gap = 0.0
    for batch, seq in [(2, 9), (3, 12)]:  # a second shape: dynamic=True must not recompile
        data = inputs(batch, seq, seed=batch + seq)
        ours.zero_grad(set_to_none=True)
        eager = ours(**data)
        eager.loss.backward()
        expected = {name: p.grad.clone() for name, p in trainable.items()}
        ours.zero_grad(set_to_none=True)
        got = fast(**data)
        got.loss.backward()
        torch.testing.assert_close(got.logits, eager.logits, rtol=1e-4, atol=1e-4)
        gap = max(gap, (got.logits - eager.logits).abs().max().item())
        for name, p in trainable.items():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-4)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert graphs == 1 and breaks == 0, f"unique graphs {graphs}, graph breaks {breaks}"
    return f"max|dlogits|={gap:.1e} unique_graphs={graphs} graph_breaks={breaks}"


def save_load() -> str:
    ours = fp32_adapted().eval()
    folder = TMP / "adapter"
    ours.save_adapter(folder)
    again = fxpeft.load_adapter(llama(), folder, example_kwargs=inputs()).eval()
    theirs = peft.PeftModel.from_pretrained(llama(), folder).eval()
    data = inputs()
    with torch.no_grad():
        want = ours(**data).logits
        assert torch.equal(again(**data).logits, want), "fxpeft.load_adapter gives other logits"
        torch.testing.assert_close(theirs(**data).logits, want, rtol=1e-4, atol=1e-5)
    return f"{sorted(p.name for p in folder.iterdir())} reloaded by fxpeft (equal) and peft (close)"


def quantized(rule: fxpeft.Quantize, bnb_config: dict) -> str:
    folder = TMP / "llama"
    if not folder.exists():
        llama().save_pretrained(folder)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": DEVICE},
                                                     quantization_config=tf.BitsAndBytesConfig(**bnb_config))
    theirs = peft.prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         lora_dropout=0.0))
    state = randomize_peft(theirs)
    base = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
    ours = fxpeft.transform(base, [rule, RULE], example_kwargs=inputs())
    ours.adapters["default"].load_peft_state_dict(state)
    layer = base.model.layers[0].self_attn.q_proj
    described = f"q_proj: {type(layer).__name__}, weight {layer.weight.dtype} on {layer.weight.device}"
    try:
        detail = compare(ours, theirs, rtol=1e-4, atol=1e-5)
    except Exception as error:
        raise AssertionError(f"{described}; {error}") from error
    assert layer.weight.dtype in (torch.int8, torch.uint8), f"not quantized: {described}; {detail}"
    return f"{described}; {detail}"


def prefix_parity() -> str:
    """Prefix tuning (the key/value heads of this grouped-query llama) vs PEFT's PrefixTuningConfig."""
    reference = peft.get_peft_model(llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ours = fxpeft.transform(llama(), fxpeft.PrefixTuning(4), example_kwargs=inputs())
    ours.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(reference))
    data = inputs(batch=3, seq=7, seed=4)
    data["attention_mask"][0, :2] = 0
    with torch.no_grad():
        mine, want = ours(**data).logits, reference(**data).logits
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)
    return f"max|dlogits|={(mine - want).abs().max().item():.1e}"


def main() -> int:
    global DEVICE, TMP
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    DEVICE = parser.parse_args().device
    began = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" and torch.cuda.is_available() else "cpu"
    print(f"device {DEVICE} ({name}); torch {torch.__version__}, transformers {tf.__version__}, peft "
          f"{peft.__version__}, fxpeft {fxpeft.__version__} from {Path(fxpeft.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fxpeft-smoke-") as tmp:
        TMP = Path(tmp)
        check("lora-parity-fp32", lambda: parity(torch.float32, rtol=1e-4, atol=1e-5))
        check("lora-parity-bf16", lambda: parity(torch.bfloat16, rtol=1e-4, atol=1e-4, grad_norm=2e-2))
        check("train-step-adamw", train_step)
        check("compile-fullgraph-dynamic", compiled)
        check("save-load-adapter", save_load)
        check("prefix-tuning-parity", prefix_parity)
        try:
            import bitsandbytes
        except Exception as error:  # ImportError, or a native library that does not load
            for kind in ("int8", "nf4"):
                results["SKIP"] += 1
                print(f"SKIP bnb-{kind} bitsandbytes does not import: {error!r}")
        else:
            print(f"bitsandbytes {bitsandbytes.__version__} from {Path(bitsandbytes.__file__).parent}", flush=True)
            check("bnb-int8-quantize-lora", lambda: quantized(fxpeft.Quantize(bits=8), dict(load_in_8bit=True)))
            check("bnb-nf4-quantize-lora", lambda: quantized(
                fxpeft.Quantize(bits=4, quant_type="nf4"),
                dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)))
    print(f"SUMMARY {results['PASS']} passed, {results['FAIL']} failed, {results['SKIP']} skipped "
          f"in {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
