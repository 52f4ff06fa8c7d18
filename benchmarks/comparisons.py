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
from transformers import CompileConfig

from . import contenders as C
from .isolated import run_child
from .report import Section, Target
from .timing import CLOCKS, figure, interleaved, single, synchronizer
from .workloads import WORKLOADS, Workload, sizes_for

__all__ = ["Options", "COMPARISONS", "hold_adapters"]


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    reps: int
    warmup: int
    device: str
    compile: bool  # False under --quick: one cold torch.compile takes longer than the whole smoke run
    threads: int  # torch CPU threads, here and in the fresh processes
    clock: str = "wall"  # a key of timing.CLOCKS: what the in-process comparisons time

    @property
    def contenders(self) -> tuple[str, ...]:
        return C.EAGER + (C.COMPILED if self.compile else ())

    def timed(self, calls: dict) -> dict[object, list[float]]:
        """``calls`` timed round-robin with these options (repetitions, warm-up, device, clock)."""
        return interleaved(calls, self.reps, self.warmup, synchronizer(self.device), CLOCKS[self.clock])


def _fresh_dynamo() -> None:
    """Forget earlier comparisons' compiled code: every comparison compiles its own models."""
    torch._dynamo.reset()
    counters.clear()


def _timed_section(section: Section, opts: Options, calls: dict[str, Callable[[], object]], metric: str) -> None:
    """Time ``calls`` interleaved and add one figure per contender, paired with its same-mode base."""
    times = opts.timed(calls)
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
    names.insert(names.index("fxpeft merged eager"), "fxpeft gated eager")  # the gain of folding the gates
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
            Target.at_most(f"inference {mode}: fxpeft unmerged / PEFT",
                           _ratio_between(section, f"fxpeft {mode}", f"PEFT {mode}"), 1.0),
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
        adapters = hold_adapters([c for c in built if c.kind != "base"], workload, count)
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


# -- generation: time to the first token, per-token decode, mixed-adapter batches -------------------------------
_COMPILED_MIXED = ("base compiled", "fxpeft compiled")  # PEFT splits a mixed batch per adapter in Python: eager only


def generate(opts: Options) -> Section:
    """``generate`` side by side: one prompt's time to the first token and per-token decode latency, then batches of
    prompts that use 1, 4 and 16 adapters (``generate(adapter_names=...)``) on models holding 16 adapters. Compiled
    contenders (not under ``--quick``) decode as transformers compiles decoding: a static cache and the decode step
    under ``torch.compile`` (``compile_config``), the prefill eager."""
    _fresh_dynamo()
    workload, sizes = WORKLOADS["a"], sizes_for(opts.quick)
    model = workload.build(sizes, opts.device)
    prompt = workload.batch(sizes, 1, sizes.seq, labels=False, device=opts.device)
    batch = workload.batch(sizes, sizes.mixed_batch, sizes.mixed_seq, labels=False, device=opts.device)
    section = Section("generate", f"Generation (greedy, eval): {workload.title}; one prompt of {sizes.seq} tokens, "
                      f"and a mixed-adapter batch of {sizes.mixed_batch} x {sizes.mixed_seq}; {sizes.new_tokens} new "
                      "tokens each; eager contenders with a DynamicCache, compiled ones with a static cache")
    built = C.build(opts.contenders, model, workload, prompt, training=False)
    built = _working_generate(section, built, prompt)
    _first_and_per_token(section, opts, built, prompt, sizes.new_tokens)
    _mixed_generate(section, opts, [c for c in built if not c.compiled or c.name in _COMPILED_MIXED], workload,
                    batch, sizes.new_tokens)
    section.notes += [
        f"first token: a generate call of 1 new token (prefill); per token: (time of {sizes.new_tokens} new tokens "
        f"- time of 1) / {sizes.new_tokens - 1}, both measured in the same round",
        "mixed batch: one generate call of the whole batch; every adapted model holds 16 adapters, the rows "
        "use 1, 4 or 16 of them (row i: adapter i mod k); base: the same batch without adapters",
        "compiled: generate(cache_implementation='static', compile_config=CompileConfig(fullgraph=True, "
        "mode='default'), with _compile_all_devices on the CPU): the decode steps run torch.compile (Inductor) of the "
        "model call, the prefill runs eagerly; compiled figures are against base compiled. PEFT compiled is measured "
        "on the one prompt only (its mixed batches split the batch per adapter in Python)"]
    section.notes += _not_compiled_note(opts)
    fx_16_over_1 = _paired_ratio(section, "fxpeft eager", "mixed batch, 16 adapter(s)", "mixed batch, 1 adapter(s)")
    section.targets += [
        Target.at_most("generate eager: fxpeft per-token decode / base", _ratio(section, "fxpeft eager", "per token"),
                       1.05),
        Target.at_most("mixed generate eager: fxpeft 16 adapters / fxpeft 1 adapter", fx_16_over_1, 1.15,
                       note="same batch size"),
        Target.below("mixed generate eager, 16 adapters: fxpeft / PEFT",
                     _ratio_between(section, "fxpeft eager", "PEFT eager", "mixed batch, 16 adapter(s)"), 1.0,
                     note="ratio of medians"),
    ]
    return section


def _compile_config() -> CompileConfig:
    """transformers' compile configuration for the compiled contenders: full graph, Inductor's default mode (no CUDA
    graphs), allowed on the CPU (transformers compiles decoding only on accelerators unless told otherwise)."""
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    return config


def _generate_options(contender: C.Contender) -> dict:
    """What a contender's ``generate`` calls add: compiled contenders decode with a static cache, compiled."""
    if not contender.compiled:
        return {}
    return {"cache_implementation": "static", "compile_config": _compile_config()}


def _working_generate(section: Section, built: list[C.Contender], prompt: dict[str, torch.Tensor]) -> list[C.Contender]:
    """The contenders whose ``generate`` runs; one that raises (a compiled one, on its first compile) is left out of
    the measurements with a note saying why. The first call of a compiled contender compiles it."""
    working = []
    for contender in built:
        try:
            contender.generate(prompt, 3, **_generate_options(contender))
        except Exception as error:  # noqa: BLE001 - any failure is recorded, not fatal to the run
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            section.notes.append(f"{contender.name}: generate failed, not measured: {type(error).__name__}: {reason}")
            continue
        working.append(contender)
    return working


def _first_and_per_token(section: Section, opts: Options, built: list[C.Contender], prompt: dict[str, torch.Tensor],
                         new_tokens: int) -> None:
    """Per contender and round: ``generate`` of 1 token and of ``new_tokens``, round-robin; figures for the first
    token and the per-token decode derived from the two."""
    calls = {}
    for contender in built:
        options = _generate_options(contender)
        calls[(contender.name, 1)] = functools.partial(contender.generate, prompt, 1, **options)
        calls[(contender.name, new_tokens)] = functools.partial(contender.generate, prompt, new_tokens, **options)
    times = opts.timed(calls)
    first = {c.name: times[(c.name, 1)] for c in built}
    per_token = {c.name: [(many - one) / (new_tokens - 1) for one, many in zip(first[c.name],
                                                                               times[(c.name, new_tokens)])]
                 for c in built}
    for metric, samples in (("first token", first), ("per token", per_token)):
        for name, values in samples.items():
            reference = C.reference_of(name)
            section.figures.append(figure(name, metric, "ms", values, reference, samples.get(reference), scale=1e3))
    tokens = {c.name: c.generate(prompt, new_tokens, **_generate_options(c)) for c in built}
    section.notes.append(f"one prompt: fxpeft's tokens equal PEFT's: {_same(tokens, 'fxpeft eager', 'PEFT eager')}")
    for kind in ("base", "PEFT", "fxpeft"):
        if f"{kind} compiled" in tokens:
            section.notes.append(f"one prompt: {kind} compiled's tokens equal {kind} eager's: "
                                 f"{_same(tokens, f'{kind} compiled', f'{kind} eager')}")


def _same(tokens: dict[str, torch.Tensor], mine: str, theirs: str) -> bool | None:
    """Whether two contenders generated the same tokens (None when one of them was not measured)."""
    if mine not in tokens or theirs not in tokens:
        return None
    return torch.equal(tokens[mine], tokens[theirs])


def hold_adapters(adapted: list[C.Contender], workload: Workload, count: int) -> list[str]:
    """``count`` adapters (``default`` and more), the same seeded weights in every adapted contender; their names."""
    adapters = ["default"] + [f"a{i}" for i in range(1, count)]
    for contender in adapted:
        for adapter in adapters[1:]:
            C.add_adapter(contender, adapter, workload)
    fx = next(c for c in adapted if c.kind == "fxpeft")
    for index, adapter in enumerate(adapters):
        state = C.random_lora_state(fx.module, adapter, seed=10 + index)
        for contender in adapted:
            C.load_lora_state(contender.module, contender.kind, state, adapter)
    return adapters


def _mixed_generate(section: Section, opts: Options, built: list[C.Contender], workload: Workload,
                    batch: dict[str, torch.Tensor], new_tokens: int) -> None:
    """16 adapters in each adapted contender; one ``generate`` of ``batch`` whose rows use 1, 4 or 16 of them."""
    adapted = [c for c in built if c.kind != "base"]
    adapters = hold_adapters(adapted, workload, 16)
    rows = batch["input_ids"].shape[0]
    names = {count: [adapters[i % count] for i in range(rows)] for count in (1, 4, 16)}
    bases = [c for c in built if c.kind == "base"]
    calls = {(base.name, 0): functools.partial(base.generate, batch, new_tokens, **_generate_options(base))
             for base in bases}
    for count, row_names in names.items():
        for contender in adapted:
            calls[(contender.name, count)] = functools.partial(
                contender.generate, batch, new_tokens, **_generate_options(contender),
                **C.mixed_batch_kwargs(contender, row_names))
    times = opts.timed(calls)
    for base in bases:
        section.figures.append(figure(base.name, "mixed batch, base", "ms", times[(base.name, 0)], scale=1e3))
    for count in names:
        for contender in adapted:
            reference = C.reference_of(contender.name)
            section.figures.append(figure(contender.name, f"mixed batch, {count} adapter(s)", "ms",
                                          times[(contender.name, count)], reference, times.get((reference, 0)),
                                          scale=1e3))
        tokens = {c.name: calls[(c.name, count)]() for c in adapted}
        section.notes.append(f"mixed batch, {count} adapter(s): fxpeft's tokens equal PEFT's: "
                             f"{_same(tokens, 'fxpeft eager', 'PEFT eager')}"
                             + (f"; fxpeft compiled's equal fxpeft eager's: "
                                f"{_same(tokens, 'fxpeft compiled', 'fxpeft eager')}"
                                if "fxpeft compiled" in tokens else ""))


def _paired_ratio(section: Section, contender: str, metric: str, reference_metric: str) -> float | None:
    """Median over rounds of one contender's ``metric`` / its ``reference_metric`` in the same round."""
    mine, theirs = section.find(contender, metric), section.find(contender, reference_metric)
    if mine is None or theirs is None:
        return None
    return statistics.median(a / b for a, b in zip(mine.samples, theirs.samples))


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
    "generate": generate,
    "recompiles": recompiles,
    "fresh": fresh,
    "meta-7b": meta_7b,
}
SLOW = {"meta-7b": "the 7B plan is not tiny (20-30 s of export)"}  # left out of --quick unless named
PENDING: list[str] = []
