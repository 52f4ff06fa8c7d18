"""Every method side by side, as PEFT's own method comparison: one training step of the llama-like workload (a).

    python -m benchmarks.methods --quick          # tiny sizes, eager only (a smoke run, ~1 min)
    python -m benchmarks.methods --reps 5         # full sizes, compiled too (~25 min on 2 cores)

Per method (LoRA, DoRA, IA3, LoHa, LoKr, VeRA, prompt tuning, and fxpeft's bottleneck adapters, which PEFT lacks),
four contenders on their own copies of one seeded base model, with the same adapter weights: PEFT eager, PEFT
compiled (``torch.compile(dynamic=True)``, graph breaks allowed, as PEFT's users compile), fxpeft eager and fxpeft
compiled (``fullgraph=True, dynamic=True``). All of them are timed round-robin in one run (forward, loss, backward,
AdamW), so every ratio is per repetition. Per contender also:

- ``peak``: the most memory one training step holds above what it held when it started (activations, gradients,
  temporaries), from the profiler's CPU memory events summed in time order (op by op);
- the first step's loss next to PEFT eager's (the same weights, so they must agree: a check that the contenders
  compute the same method, not a speed figure).

The method settings are PEFT's usual ones on q/v (IA3: PEFT's llama defaults k/v/down_proj, down_proj feed-forward;
VeRA r=256, its default; prompt tuning 16 virtual tokens; bottleneck reduction 16 after o_proj and down_proj).
Targets (issue 17): every fxpeft compiled method faster than PEFT eager and no slower than PEFT compiled;
fxpeft DoRA compiled at most 1.10x fxpeft LoRA compiled. A method whose fxpeft rule is not there is left out with a
note. Writes ``results/<date>-<device>-methods<suffix>.{json,md,png}``.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from . import contenders as C
from .comparisons import Options
from .report import Section, Target
from .standalone import run_script
from .timing import figure, single
from .workloads import WORKLOADS, sizes_for

__all__ = ["METHODS", "Method", "methods", "main"]

QV = ("q_proj", "v_proj")
MODES = (("PEFT", False), ("PEFT", True), ("fxpeft", False), ("fxpeft", True))


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: its fxpeft rule and its PEFT config (None where PEFT has no such method), built on demand so that
    a method whose rule type is missing is left out instead of failing the run."""

    name: str
    rule: Callable[[], Any]
    peft_config: Callable[[], Any] | None


def _rule(name: str, **fields) -> Callable[[], Any]:
    def build():
        import fxpeft

        return getattr(fxpeft, name)(**fields)

    return build


def _config(name: str, **fields) -> Callable[[], Any]:
    def build():
        import peft

        return getattr(peft, name)(task_type="CAUSAL_LM", **fields)

    return build


METHODS = [
    Method("LoRA", _rule("LoRA", targets=QV, r=8, alpha=16), _config("LoraConfig", target_modules=list(QV), r=8,
                                                                       lora_alpha=16, lora_dropout=0.0)),
    Method("DoRA", _rule("LoRA", targets=QV, r=8, alpha=16, use_dora=True),
           _config("LoraConfig", target_modules=list(QV), r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True)),
    Method("IA3", _rule("IA3", targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",)),
           _config("IA3Config", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    Method("LoHa", _rule("LoHa", targets=QV, r=8, alpha=16), _config("LoHaConfig", target_modules=list(QV), r=8,
                                                                       alpha=16)),
    Method("LoKr", _rule("LoKr", targets=QV, r=8, alpha=16), _config("LoKrConfig", target_modules=list(QV), r=8,
                                                                       alpha=16)),
    Method("VeRA", _rule("VeRA", targets=QV, r=256), _config("VeraConfig", target_modules=list(QV), r=256)),
    Method("prompt tuning", _rule("PromptTuning", num_virtual_tokens=16),
           _config("PromptTuningConfig", num_virtual_tokens=16)),
    Method("bottleneck", _rule("Bottleneck", reduction_factor=16), None),
]


def _adapt(kind: str, method: Method, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Module:
    if kind == "PEFT":
        from peft import get_peft_model

        return get_peft_model(model, method.peft_config())
    import fxpeft

    return fxpeft.transform(model, [method.rule()], example_kwargs=batch)


def _same_weights(built: dict[str, C.Contender], seed: int = 2) -> None:
    """Every contender of one method gets the same non-zero adapter weights (keyed as PEFT saves them)."""
    fx = next(c.module for c in built.values() if c.kind == "fxpeft")
    state = C.random_lora_state(fx, seed=seed)
    for contender in built.values():
        if contender.kind == "fxpeft":
            contender.module.adapters["default"].load_peft_state_dict(state)
            continue
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(contender.module, state)
        # PEFT loads a prompt-learning state into its prompt encoder and still lists the key as unexpected.
        left = [key for key in result.unexpected_keys if key != "prompt_embeddings"]
        if left:
            raise RuntimeError(f"PEFT did not take {len(left)} keys, e.g. {left[:3]}")


def peak_bytes(step: Callable[[], object]) -> int:
    """The most memory ``step()`` holds above what it held when it started: the profiler's per-op CPU memory
    (allocations less frees, each op's own) summed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((event for event in profiler.events() if event.self_cpu_memory_usage),
                    key=lambda event: event.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def _build(method: Method, model, batch, compile_: bool, first: dict[str, float],
           log) -> tuple[dict[str, C.Contender], list[str]]:
    """The method's contenders, built and stepped once (its loss goes into ``first``), and the reasons those that
    could not be were not."""
    built: dict[str, C.Contender] = {}
    notes: list[str] = []
    for kind, compiled in MODES:
        if compiled and not compile_ or kind == "PEFT" and method.peft_config is None:
            continue
        name = f"{kind} {method.name} {'compiled' if compiled else 'eager'}"
        try:
            module = _adapt(kind, method, copy.deepcopy(model), batch)
        except Exception as error:  # a method fxpeft or PEFT does not have here: say so, time the rest
            notes.append(f"{name}: not built ({type(error).__name__}: {str(error)[:160]})")
            continue
        built[name] = C.Contender(name, kind, False, compiled, module)
    if not any(c.kind == "fxpeft" for c in built.values()):
        return {}, notes
    _same_weights(built)
    for name, contender in list(built.items()):
        C.finish(contender, training=True)
        try:
            first[name] = float(contender.train_step(batch))
        except Exception as error:
            notes.append(f"{name}: first step failed ({type(error).__name__}: {str(error)[:160]})")
            del built[name]
        log(f"built {name}")
    return built, notes


def methods(opts: Options, log: Callable[[str], None] = print) -> Section:
    """Step time and peak memory of every method, PEFT and fxpeft, eager and compiled (the module docstring)."""
    torch._dynamo.reset()
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    batch = workload.batch(sizes, device=opts.device)
    quick = f"--quick sizes (hidden {sizes.hidden}, {sizes.layers} layers), " if opts.quick else ""
    section = Section("methods", f"Training step per method: llama-like (workload a's model), {quick}batch "
                      f"{sizes.batch} x {sizes.seq}, forward + loss + backward + AdamW")
    everyone: dict[str, C.Contender] = {}
    first: dict[str, float] = {}  # contender -> the loss of its first step
    for method in METHODS:
        built, notes = _build(method, model, batch, opts.compile, first, log)
        section.notes += notes
        everyone.update(built)
        theirs = first.get(f"PEFT {method.name} eager")
        for name in built:
            if theirs is not None and not name.startswith(f"PEFT {method.name} eager"):
                section.notes.append(f"{name}: first loss {first[name]:.6f}, PEFT eager's {theirs:.6f} "
                                     f"(difference {abs(first[name] - theirs):.1e})")
    times = opts.timed({name: (lambda c=c: c.train_step(batch)) for name, c in everyone.items()})
    for name, samples in times.items():
        method = name.split(" ", 1)[1].rsplit(" ", 1)[0]
        reference = f"PEFT {method} eager"
        section.figures.append(figure(name, "step", "ms", samples, reference, times.get(reference), scale=1e3))
    for name, contender in everyone.items():
        section.figures.append(single(name, "peak", "MB", peak_bytes(lambda c=contender: c.train_step(batch)) / 1e6))
    _targets(section, [method.name for method in METHODS])
    if not opts.compile:
        section.notes.append("compiled contenders skipped (--eager-only or --quick)")
    return section


def _targets(section: Section, names: list[str]) -> None:
    def median(contender: str) -> float | None:
        found = section.find(contender, "step")
        return None if found is None else found.median

    def between(mine: str, theirs: str) -> float | None:
        a, b = median(mine), median(theirs)
        return None if a is None or b is None else a / b

    for name in names:
        if section.find(f"fxpeft {name} compiled", "step") is None or section.find(f"PEFT {name} eager") is None:
            continue
        section.targets.append(Target.below(f"fxpeft {name} compiled / PEFT {name} eager",
                                            section.find(f"fxpeft {name} compiled", "step").ratio, 1.0))
        section.targets.append(Target.at_most(f"fxpeft {name} compiled / PEFT {name} compiled",
                                              between(f"fxpeft {name} compiled", f"PEFT {name} compiled"), 1.0,
                                              note="ratio of medians"))
    section.targets.append(Target.at_most("fxpeft DoRA compiled / fxpeft LoRA compiled",
                                          between("fxpeft DoRA compiled", "fxpeft LoRA compiled"), 1.10,
                                          note="ratio of medians"))


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")  # PEFT's and transformers' notes on every step would bury the log
    return run_script("benchmarks.methods", __doc__, lambda opts: methods(opts, log=_log), "{device}-methods", argv)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

if __name__ == "__main__":
    raise SystemExit(main())
