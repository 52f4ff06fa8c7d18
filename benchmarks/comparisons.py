"""The comparisons. Each builds its contenders on one model, weights and data, measures them side by side and
returns a :class:`~benchmarks.report.Section` with its figures and the targets it decides.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from typing import Callable

import torch
from torch._dynamo.utils import counters

from . import contenders as C
from .isolated import run_child
from .report import Section, Target
from .timing import figure, interleaved, single, synchronizer
from .workloads import WORKLOADS, sizes_for

__all__ = ["Options", "COMPARISONS"]


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    reps: int
    warmup: int
    device: str
    compile: bool  # False under --quick: one cold torch.compile takes longer than the whole smoke run
    threads: int  # torch CPU threads, here and in the fresh processes

    @property
    def contenders(self) -> tuple[str, ...]:
        return C.EAGER + (C.COMPILED if self.compile else ())


def _fresh_dynamo() -> None:
    """Forget earlier comparisons' compiled code: every comparison compiles its own models."""
    torch._dynamo.reset()
    counters.clear()


def _timed_section(section: Section, opts: Options, calls: dict[str, Callable[[], object]], metric: str) -> None:
    """Time ``calls`` interleaved and add one figure per contender, paired with its same-mode base."""
    times = interleaved(calls, opts.reps, opts.warmup, synchronizer(opts.device))
    for name, samples in times.items():
        reference = C.reference_of(name)
        section.figures.append(figure(name, metric, "ms", samples, reference, times.get(reference), scale=1e3))


def _ratio(section: Section, contender: str, metric: str | None = None) -> float | None:
    found = section.find(contender, metric)
    return None if found is None else found.ratio


def _ratio_between(section: Section, mine: str, theirs: str, metric: str | None = None) -> float | None:
    """Ratio of two contenders' medians (a cross-mode comparison, e.g. compiled fxpeft vs eager PEFT)."""
    a, b = section.find(mine, metric), section.find(theirs, metric)
    return None if a is None or b is None else a.median / b.median


def _not_compiled_note(opts: Options) -> list[str]:
    return [] if opts.compile else [
        "compiled contenders skipped (--quick or --eager-only): their targets are not measured"]


# -- (a), (b), (c): one training step ------------------------------------------------------------------
def train(opts: Options, key: str) -> Section:
    _fresh_dynamo()
    workload, sizes = WORKLOADS[key], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    batch = workload.batch(sizes, device=opts.device)
    section = Section(f"train-{key}", f"Training step ({key}): {workload.title}, batch {sizes.batch} x "
                      f"{sizes.seq}, forward + loss + backward + AdamW")
    built = C.build(opts.contenders, model, workload, batch, training=True)
    _timed_section(section, opts, {c.name: functools.partial(c.train_step, batch) for c in built}, "step")
    section.notes += _not_compiled_note(opts)
    if key in ("a", "b"):
        section.targets += [
            Target.at_most(f"({key}) fxpeft compiled step / compiled frozen base", _ratio(section, "fxpeft compiled"),
                           1.02),
            Target.below(f"({key}) fxpeft compiled step / PEFT eager step",
                         _ratio_between(section, "fxpeft compiled", "PEFT eager"), 1.0, note="ratio of medians"),
        ]
    return section


# -- inference, unmerged and merged ---------------------------------------------------------------------
def inference(opts: Options) -> Section:
    _fresh_dynamo()
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    batch = workload.batch(sizes, labels=False, device=opts.device)
    modes = ("eager",) + (("compiled",) if opts.compile else ())
    names = [f"{kind} {mode}" for mode in modes for kind in ("base", "PEFT", "fxpeft", "fxpeft merged")]
    section = Section("inference", f"Inference latency (a): {workload.title}, batch {sizes.batch} x {sizes.seq}, "
                      "eval, no_grad")
    built = C.build(names, model, workload, batch, training=False)
    section.notes.append(_agreement({c.name: c.infer(batch).logits for c in built if not c.compiled}))
    _timed_section(section, opts, {c.name: functools.partial(c.infer, batch) for c in built}, "forward")
    section.notes += _not_compiled_note(opts)
    for mode in ("eager", "compiled"):
        section.targets += [
            Target.at_most(f"inference {mode}: fxpeft unmerged / base", _ratio(section, f"fxpeft {mode}"), 1.02),
            Target.at_most(f"inference {mode}: fxpeft merged / base", _ratio(section, f"fxpeft merged {mode}"), 1.02,
                           note="~ base"),
        ]
    return section


def _agreement(logits: dict[str, torch.Tensor]) -> str:
    """Same weights, same outputs? Max |difference| of each eager contender's logits from PEFT's."""
    peft = logits["PEFT eager"]
    gaps = [f"{name} {(out - peft).abs().max().item():.1e}" for name, out in logits.items() if name != "PEFT eager"]
    return "max |logits - PEFT eager logits|: " + ", ".join(gaps) + " (base shows the adapters' effect)"


# -- (e) mixed-adapter batches --------------------------------------------------------------------------
def mixed(opts: Options) -> Section:
    _fresh_dynamo()
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    batch = workload.batch(sizes, sizes.mixed_batch, sizes.mixed_seq, labels=False, device=opts.device)
    section = Section("mixed", f"Mixed-adapter batch inference (e): {workload.title}, batch {sizes.mixed_batch} x "
                      f"{sizes.mixed_seq}, one adapter name per row (adapter_names=)")
    # PEFT's mixed batches split the batch per adapter in Python, so it is measured eager only.
    names = list(C.EAGER) + (["base compiled", "fxpeft compiled"] if opts.compile else [])
    for count in (1, 4, 16):
        built = C.build(names, model, workload, batch, training=False)
        adapters = ["default"] + [f"a{i}" for i in range(1, count)]
        for contender in (c for c in built if c.kind != "base"):
            for adapter in adapters[1:]:
                C.add_adapter(contender, adapter, workload)
        fx = next(c for c in built if c.kind == "fxpeft")
        for index, adapter in enumerate(adapters):
            state = C.random_lora_state(fx.module, adapter, seed=10 + index)
            for contender in built:
                C.load_lora_state(contender.module, contender.kind, state, adapter)
        rows = [adapters[i % count] for i in range(sizes.mixed_batch)]
        extra = {c.name: C.mixed_batch_kwargs(c, rows) for c in built}
        logits = {c.name: c.infer(batch, **extra[c.name]).logits for c in built if not c.compiled}
        section.notes.append(f"{count} adapter(s): {_agreement(logits)}")
        _timed_section(section, opts, {c.name: functools.partial(c.infer, batch, **extra[c.name]) for c in built},
                       f"{count} adapter(s)")
        _fresh_dynamo()
    section.notes += _not_compiled_note(opts)
    for mode in ("eager", "compiled"):
        section.targets += [
            Target.at_most(f"16 adapters, {mode}: fxpeft / base", _ratio(section, f"fxpeft {mode}", "16 adapter(s)"),
                           1.10),
            Target.below(f"16 adapters, {mode}: fxpeft / PEFT eager",
                         _ratio_between(section, f"fxpeft {mode}", "PEFT eager", "16 adapter(s)"), 1.0,
                         note="ratio of medians"),
        ]
    return section


# -- recompiles over a scripted sequence of events ------------------------------------------------------
_SIZE_ONE_EVENTS = ("batch size 1", "sequence length 1")


def recompiles(opts: Options) -> Section:
    section = Section("recompiles", "Recompiles: unique graphs over a scripted sequence of events, eval mode, "
                      "counted by torch._dynamo's counters['stats']['unique_graphs']")
    if not opts.compile:
        section.notes += _not_compiled_note(opts)
        section.targets.append(Target.at_most("fxpeft compiled recompiles over the script", None, 2,
                                              unit="graphs", note="one each for batch 1 and sequence length 1"))
        return section
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    b, s = sizes.batch, sizes.seq
    make = functools.partial(workload.batch, sizes, labels=False, device=opts.device)
    counts: dict[str, dict[str, int]] = {}
    for name in ("PEFT compiled", "fxpeft compiled"):
        _fresh_dynamo()
        (contender,) = C.build([name], model, workload, make(b, s), training=False)
        C.add_adapter(contender, "other", workload)
        contender.module.eval()
        state = {key: value + 0.01 for key, value in C.adapter_state(contender, "other").items()}
        script = [
            ("first call", lambda: contender.infer(make(b, s))),
            ("new sequence length", lambda: contender.infer(make(b, s - s // 4))),
            ("batch size 1", lambda: contender.infer(make(1, s))),
            ("sequence length 1", lambda: contender.infer(make(b, 1))),
            ("adapter switch", lambda: (C.set_adapter(contender, "other"), contender.infer(make(b, s)))),
            ("disable adapters", lambda: _in(C.disabled(contender), lambda: contender.infer(make(b, s)))),
            ("reload adapter weights", lambda: (C.load_lora_state(contender.module, contender.kind, state, "other"),
                                                contender.infer(make(b, s)))),
        ]
        counts[name] = {}
        for event, action in script:
            before = counters["stats"]["unique_graphs"]
            action()
            counts[name][event] = counters["stats"]["unique_graphs"] - before
            section.figures.append(single(name, event, "graphs", counts[name][event]))
    _fresh_dynamo()
    later = {name: {e: n for e, n in events.items() if e != "first call"} for name, events in counts.items()}
    fx = later["fxpeft compiled"]
    excess = sum(max(0, n - (1 if event in _SIZE_ONE_EVENTS else 0)) for event, n in fx.items())
    section.targets.append(Target("fxpeft compiled recompiles over the script", float(sum(fx.values())),
                                  "<= 1 each for batch 1 / seq 1, 0 otherwise", excess == 0,
                                  f"PEFT compiled: {sum(later['PEFT compiled'].values())}"))
    section.notes.append("'first call' is the initial compile, not a recompile; PEFT's counts include the "
                         "fragments of any graph break")
    return section


def _in(context, action):
    with context:
        return action()


# -- fresh processes: time to the first step, peak memory -----------------------------------------------
def fresh(opts: Options) -> Section:
    workload = WORKLOADS["a"]
    section = Section("fresh", "Fresh process per measurement (a): time to the first training step (adapt + "
                      "capture + compile + step, cold Inductor cache) and peak memory of training")
    reps = 1 if opts.quick else min(opts.reps, 3)
    # A child is a fresh interpreter (imports alone take seconds): --quick measures only the two libraries.
    names = [n for n in opts.contenders if not (opts.quick and n.startswith("base"))]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(reps):  # interleaved, one child per contender per round
        for name in names:
            args = ["first-step", "--workload", workload.key, "--contender", name, "--device", opts.device,
                    "--threads", str(opts.threads)]
            results[name].append(run_child(*args, *(["--quick"] if opts.quick else [])))
    firsts = {name: [r["first_step_s"] for r in rs] for name, rs in results.items()}
    for name in results:
        reference = C.reference_of(name)
        section.figures.append(figure(name, "time to first step", "s", firsts[name], reference, firsts.get(reference)))
    memory = [("step peak RSS", "step_peak_rss_mib"), ("process peak RSS", "peak_rss_mib")]
    memory += [("step peak CUDA memory", "step_peak_cuda_mib")] if opts.device == "cuda" else []
    for metric, field in memory:
        for name, rs in results.items():
            if all(r.get(field) is not None for r in rs):
                section.figures.append(figure(name, metric, "MiB", [r[field] for r in rs]))
    section.notes += _not_compiled_note(opts)
    section.notes.append(f"step peak RSS: the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) "
                         f"over 3 training steps after the first; process peak RSS: over the whole child, "
                         f"capture and compilation included. RSS with the base model built, before adapting: "
                         f"{statistics.median(r['baseline_rss_mib'] for rs in results.values() for r in rs):.0f} MiB")
    key = "step peak CUDA memory" if opts.device == "cuda" else "step peak RSS"
    section.targets += [
        Target.at_most(f"training {key}: fxpeft eager / PEFT eager",
                       _ratio_between(section, "fxpeft eager", "PEFT eager", key), 1.0),
        Target.at_most(f"training {key}: fxpeft compiled / PEFT eager",
                       _ratio_between(section, "fxpeft compiled", "PEFT eager", key), 1.0),
        Target.at_most("time to first step: fxpeft compiled / PEFT compiled",
                       _ratio_between(section, "fxpeft compiled", "PEFT compiled", "time to first step"), 0.5),
    ]
    return section


# -- the 7B llama planned on the meta device -------------------------------------------------------------
def meta_7b(opts: Options) -> Section:
    section = Section("meta-7b", "7B llama on the meta device: fxpeft.transform with LoRA q/v, "
                      "in a fresh process")
    result = run_child("meta-7b", "--threads", str(opts.threads))
    section.figures += [single("fxpeft", "transform", "s", result["transform_s"]),
                        single("fxpeft", "peak RSS", "MiB", result["peak_rss_mib"]),
                        single("fxpeft", "peak RSS growth", "MiB",
                               result["peak_rss_mib"] - result["baseline_rss_mib"])]
    section.notes.append(f"{result['parameters'] / 1e9:.2f}B parameters, {result['lora_sites']} LoRA sites; "
                         "peak RSS is the whole process's (torch, transformers, peft and fxpeft imported); "
                         "peak RSS growth is the peak minus the RSS before transform")
    section.targets += [Target.below("7B meta transform time", result["transform_s"], 20, unit="s"),
                        Target.below("7B meta transform peak RSS", result["peak_rss_mib"], 1024, unit="MiB")]
    return section


COMPARISONS: dict[str, Callable[[Options], Section]] = {
    "train-a": functools.partial(train, key="a"),
    "train-b": functools.partial(train, key="b"),
    "train-c": functools.partial(train, key="c"),
    "train-d": functools.partial(train, key="d"),
    "inference": inference,
    "mixed": mixed,
    "recompiles": recompiles,
    "fresh": fresh,
    "meta-7b": meta_7b,
}
SLOW = {"meta-7b": "the 7B plan is not tiny (20-30 s of export)"}  # left out of --quick unless named
PENDING: list[str] = []
