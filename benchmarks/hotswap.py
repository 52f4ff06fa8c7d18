"""Hot-swapping adapters on a ``torch.compile``'d model: fxpeft against PEFT, side by side in one run.

    python -m benchmarks.hotswap --quick                 # tiny sizes, backend aot_eager (a smoke run, ~15 s)
    python -m benchmarks.hotswap --threads 1 --rounds 3  # hidden 256, 4 layers, Inductor (2 CPU cores: ~3 min)
    python -m benchmarks.hotswap --backend aot_eager

On a machine shared with other work give torch one thread (``--threads 1``): with two OpenMP threads on two busy cores,
eager and compiled calls of this model took 1 s instead of 20 ms.

A llama-like model built from a config (hidden 256, 4 layers, vocabulary 1000; ``--quick``: hidden 64, 2 layers),
eval mode, every call under ``torch.no_grad``, with LoRA on q/v. Six adapters are saved first (PEFT's
``save_pretrained``, seeded non-zero weights) and both libraries load the same folders:

    A  r=8, alpha 16      B  r=8, alpha 16 (other weights)     C  r=4, alpha 8
    D  r=8, alpha 32      E  r=8, alpha 16 (the added adapter)  F  r=8, alpha 16, LoRA dropout 0.1

Each contender starts from A as ``"default"``, is prepared for hot-swapping before compiling (fxpeft:
``adapted.prepare_hotswap(max_rank=8, slots=1)``, one free slot besides A's; PEFT:
``prepare_model_for_compiled_hotswap(model, target_rank=8)``, which pads the ranks and turns the scalings into
tensors), is compiled (``torch.compile(model, backend=...)``; fxpeft's with ``fullgraph=True``) and then runs one
script of operations, each followed by one call:

- hotswap B, C, D into ``"default"`` (same rank, smaller rank, other alpha): ``adapted.hotswap_adapter(dir,
  "default")``, ``peft.utils.hotswap.hotswap_adapter(model, dir, adapter_name="default")``;
- add E as ``"other"`` and switch to it (``load_adapter(dir, adapter_name="other")`` + ``set_adapter("other")``:
  PEFT has no way to add an adapter to a compiled model without recompiling, so this measures what it costs);
- switch back to ``"default"``; delete ``"other"``; add C as ``"third"`` (the freed slot) and switch to it;
- ``load_adapter(B's folder, adapter_name="third")``: new weights of another rank under an existing name;
- hotswap F into ``"third"``, the active adapter (another LoRA dropout: in eval mode it changes no output).

Per operation: the recompiles it causes (``torch._dynamo``'s ``counters["stats"]["unique_graphs"]`` before the
operation and after the call that follows it; dynamo is reset once, before each contender's script), the wall time of
the operation and of the first call after it (a recompile makes that call take seconds), and the largest absolute
difference of the logits from an eager reference: a fresh model of the same library holding only the adapter that
should now be active (``PeftModel.from_pretrained`` / ``fxpeft.load_adapter`` of that folder). An operation a
library refuses is recorded with its error, never skipped, and the call after it is compared with the outputs before
it (a refusal should change nothing). Targets: fxpeft recompiles nothing after its first call, and its logits stay
within 1e-4 of the eager reference. Each contender compiles with cold caches (a fresh Inductor cache folder).
``--rounds N`` runs every script N times (alternating which contender goes first) and gives median times. Writes
``results/<date>-hotswap[-quick][<suffix>].{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

from .report import Report, Section, Target, run_meta, write_atomically
from .timing import single

__all__ = ["hotswap", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "v_proj"]
MAX_RANK = 8
SLOTS = 1  # free slots besides "default"'s: "other", later "third" in the slot it freed
TOLERANCE = 1e-4  # largest |logits - eager reference| still counted as equal (Inductor reorders float sums)

# name: (rank, alpha, LoRA dropout, seed) of each saved adapter
ADAPTERS = {"A": (8, 16, 0.0, 1), "B": (8, 16, 0.0, 2), "C": (4, 8, 0.0, 3), "D": (8, 32, 0.0, 4), "E": (8, 16, 0.0, 5),
            "F": (8, 16, 0.1, 6)}


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation of the script: its label, the adapter folder whose outputs the call after it should give, and
    what each library does (``model``: the uncompiled adapted model; ``folders``: adapter name -> folder)."""

    label: str
    expect: str
    fxpeft: Callable[[Any, dict[str, str]], None]
    peft: Callable[[Any, dict[str, str]], None]


def _peft_swap(model, folder: str, name: str = "default") -> None:
    from peft.utils.hotswap import hotswap_adapter

    hotswap_adapter(model, folder, adapter_name=name)


def _both(action: Callable[[Any], None]) -> tuple[Callable, Callable]:
    return (lambda m, f: action(m)), (lambda m, f: action(m))


STEPS = [
    Step("hotswap: same rank (r=8)", "B",
         lambda m, f: m.hotswap_adapter(f["B"], "default"), lambda m, f: _peft_swap(m, f["B"])),
    Step("hotswap: smaller rank (r=4)", "C",
         lambda m, f: m.hotswap_adapter(f["C"], "default"), lambda m, f: _peft_swap(m, f["C"])),
    Step("hotswap: other alpha (32)", "D",
         lambda m, f: m.hotswap_adapter(f["D"], "default"), lambda m, f: _peft_swap(m, f["D"])),
    Step("add adapter + switch to it", "E",
         lambda m, f: (m.load_adapter(f["E"], adapter_name="other"), m.set_adapter("other")),
         lambda m, f: (m.load_adapter(f["E"], adapter_name="other"), m.set_adapter("other"))),
    Step("switch back", "D", *_both(lambda m: m.set_adapter("default"))),
    Step("delete the added adapter", "D", *_both(lambda m: m.delete_adapter("other"))),
    Step("add r=4 adapter in the freed slot + switch", "C",
         lambda m, f: (m.load_adapter(f["C"], adapter_name="third"), m.set_adapter("third")),
         lambda m, f: (m.load_adapter(f["C"], adapter_name="third"), m.set_adapter("third"))),
    Step("load_adapter over an existing name (r=8 into r=4)", "B",
         lambda m, f: m.load_adapter(f["B"], adapter_name="third"),
         lambda m, f: m.load_adapter(f["B"], adapter_name="third")),
    Step("hotswap: other LoRA dropout (0.1; no effect in eval)", "F",
         lambda m, f: m.hotswap_adapter(f["F"], "third"), lambda m, f: _peft_swap(m, f["F"], "third")),
]
CONTENDERS = ("fxpeft compiled", "PEFT compiled")


# -- the model, the adapters and the references ---------------------------------------------------------------
def build_base(quick: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    hidden, layers, intermediate = (64, 2, 172) if quick else (256, 4, 688)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    return tf.LlamaForCausalLM(config).eval().requires_grad_(False)


def make_batch(quick: bool) -> dict[str, torch.Tensor]:
    batch, seq = (2, 16) if quick else (4, 64)
    ids = torch.randint(1, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save_adapters(base: torch.nn.Module, root: Path) -> dict[str, str]:
    """Each adapter of :data:`ADAPTERS` saved by PEFT in ``root/<name>``, with seeded non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for name, (rank, alpha, dropout, seed) in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS)
        model = get_peft_model(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in sorted(model.named_parameters()):
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.1)
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
    return folders


def _logits(call: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return call(**batch).logits.detach().clone()


def references(base: torch.nn.Module, folders: dict[str, str], batch: dict[str, torch.Tensor]) -> dict:
    """Eager logits of a fresh model holding one adapter alone, per library and folder."""
    from peft import PeftModel

    import fxpeft

    out: dict[str, dict[str, torch.Tensor]] = {"PEFT compiled": {}, "fxpeft compiled": {}}
    for name, folder in folders.items():
        out["PEFT compiled"][name] = _logits(PeftModel.from_pretrained(copy.deepcopy(base), folder).eval(), batch)
        fx = fxpeft.load_adapter(copy.deepcopy(base), folder, example_kwargs=batch).eval()
        out["fxpeft compiled"][name] = _logits(fx, batch)
    return out


# -- one contender's script ----------------------------------------------------------------------------------
def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:240]}"


def _prepare(contender: str, base: torch.nn.Module, folders: dict[str, str], batch: dict[str, torch.Tensor]):
    """The adapted model holding A as "default", prepared for hot-swapping (not compiled yet)."""
    if contender.startswith("fxpeft"):
        import fxpeft

        model = fxpeft.load_adapter(copy.deepcopy(base), folders["A"], example_kwargs=batch).eval()
        model.prepare_hotswap(max_rank=MAX_RANK, slots=SLOTS)
        return model
    from peft import PeftModel
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = PeftModel.from_pretrained(copy.deepcopy(base), folders["A"]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=MAX_RANK)
    return model


def _new_guard_failures(seen: int) -> tuple[list[str], int]:
    """Guard failures dynamo recorded since ``seen`` of them (why it recompiled)."""
    from torch._dynamo.utils import guard_failures

    reasons = [str(reason) for failures in guard_failures.values() for reason in failures]
    return reasons[seen:], len(reasons)


def run_script(contender: str, base: torch.nn.Module, folders: dict[str, str], batch: dict[str, torch.Tensor],
               refs: dict[str, torch.Tensor], backend: str, log: Callable[[str], None]) -> list[dict]:
    """One contender from preparing and compiling to the last step; one row per operation."""
    from torch._dynamo.utils import guard_failures

    torch._dynamo.reset()  # once, at the start: every count below is this contender's
    counters.clear()
    guard_failures.clear()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fxpeft-hotswap-inductor-") as cache, _cold_inductor_cache(cache):
        began = time.perf_counter()
        try:
            model = _prepare(contender, base, folders, batch)
        except Exception as error:  # e.g. prepare_hotswap not there yet: every step is unmeasured
            log(f"{contender}: preparing failed: {_error(error)}")
            return [_row(contender, "prepare + compile + first call", "A", error=_error(error))] + \
                [_row(contender, step.label, step.expect, error="not run: preparing failed") for step in STEPS]
        prepared = time.perf_counter() - began
        compiled = torch.compile(model, backend=backend, fullgraph=contender.startswith("fxpeft"))
        first = _measure(contender, "prepare + compile + first call", "A", lambda: None, compiled, batch, refs, 0)
        first["op_ms"] = prepared * 1e3
        seen = first.pop("_seen")
        rows.append(first)
        log(_line(first))
        steady = []
        for _ in range(5):
            t0 = time.perf_counter()
            _logits(compiled, batch)
            steady.append(time.perf_counter() - t0)
        first["steady_call_ms"] = statistics.median(steady) * 1e3
        action_of = "fxpeft" if contender.startswith("fxpeft") else "peft"
        state = "A"  # the adapter whose outputs the model gives now
        for step in STEPS:
            action = getattr(step, action_of)
            row = _measure(contender, step.label, step.expect, lambda: action(model, folders), compiled, batch,
                           refs, seen, state=state)
            seen = row.pop("_seen")
            state = row["expect"]
            rows.append(row)
            log(_line(row))
    torch._dynamo.reset()
    return rows


def _warm_up(backend: str) -> None:
    """Compile a small function once, so that the backend's one-time costs (imports, Inductor's compile workers) fall
    on no contender."""
    with tempfile.TemporaryDirectory(prefix="fxpeft-hotswap-warmup-") as cache, _cold_inductor_cache(cache):
        torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(), backend=backend)(torch.randn(8, 8))
    torch._dynamo.reset()


@contextlib.contextmanager
def _cold_inductor_cache(folder: str):
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(folder):
        yield


def _row(contender: str, label: str, expect: str, **fields) -> dict:
    row = {"contender": contender, "operation": label, "expect": expect, "recompiles": None, "op_ms": None,
           "first_call_ms": None, "max_abs_diff": None, "equal": None, "error": None, "call_error": None,
           "guard_failures": []}
    row.update(fields)
    return row


def _measure(contender: str, label: str, expect: str, action: Callable[[], object], compiled, batch, refs,
             seen: int, state: str | None = None) -> dict:
    """Run ``action`` then one call of ``compiled``: recompiles, times, the call's logits against the reference of
    ``expect``; where ``action`` raised, against ``state``'s (a refused operation should leave the model as it
    was)."""
    row = _row(contender, label, expect)
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    try:
        action()
    except Exception as error:  # what a library refuses is a result
        row["error"] = _error(error)
        row["expect"] = expect = state or expect
    t1 = time.perf_counter()
    try:
        logits = _logits(compiled, batch)
        t2 = time.perf_counter()
        row["first_call_ms"] = (t2 - t1) * 1e3
        diff = (logits - refs[expect]).abs().max().item()
        row["max_abs_diff"], row["equal"] = diff, diff <= TOLERANCE
    except Exception as error:
        row["call_error"] = _error(error)
    row["op_ms"] = (t1 - t0) * 1e3
    row["recompiles"] = counters["stats"]["unique_graphs"] - graphs
    row["guard_failures"], row["_seen"] = _new_guard_failures(seen)
    return row


def _line(row: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"

    return (f"{row['contender']}: {row['operation']}: {row['recompiles']} graph(s), op {ms(row['op_ms'])}, first "
            f"call {ms(row['first_call_ms'])}, max|diff| {row['max_abs_diff']}"
            + (f", ERROR {row['error']}" if row["error"] else "")
            + (f", CALL ERROR {row['call_error']}" if row["call_error"] else ""))


# -- the section ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HotswapSection(Section):
    """A :class:`Section` whose Markdown is one table: a row per contender per operation."""

    rows: list[dict] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "",
                 "| operation | contender | recompiles | operation time | + first call | max \\|logits - eager\\| | "
                 "equal | error / note |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for row in self.rows:
            lines.append(f"| {row['operation']} | {row['contender'].split()[0]} | {_cell(row['recompiles'], '{}')} | "
                         f"{_cell(row['op_ms'], '{:.1f} ms')} | {_cell(row['total_ms'], '{:.0f} ms')} | "
                         f"{_cell(row['max_abs_diff'], '{:.1e}')} | {_yes(row['equal'], row['error'])} | "
                         f"{_note(row)} |")
        lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _yes(value, refused) -> str:
    if value is None:
        return "-"
    if refused:
        return "yes (unchanged)" if value else "**no** (a refusal changed the outputs)"
    return "yes" if value else "**no**"


def _note(row: dict) -> str:
    parts = []
    if row.get("error"):
        parts.append(f"refused: {row['error'][:160]} (so compared with the outputs before it)")
    if row.get("call_error"):
        parts.append(f"call error: {row['call_error']}")
    if row.get("guard_failures"):
        parts.append("guard failed: " + "; ".join(dict.fromkeys(_guard(r) for r in _latest(row["guard_failures"]))))
    if row.get("steady_call_ms") is not None:
        parts.append(f"a warm call: {row['steady_call_ms']:.1f} ms")
    return " ".join(parts).replace("|", "\\|")


def _latest(reasons: list[str]) -> list[str]:
    """Of the guard failures of one recompile (one per cached graph, ``"0/<entry>: ..."``), those of the graph cached
    last: the one the call ran before the operation."""
    def entry(reason: str) -> int:
        found = re.match(r"\d+/(\d+):", reason)
        return int(found.group(1)) if found else -1

    last = max((entry(r) for r in reasons), default=-1)
    return [r for r in reasons if entry(r) == last]


def _guard(reason: str) -> str:
    """A guard failure's first line, its attribute path written as a dotted module path, without dynamo's hints."""
    text = re.sub(r"^\d+/\d+: ", "", reason.splitlines()[0]).split("  #")[0].strip()
    text = text.replace(".__dict__['_modules']", "").replace("._modules", "").replace("._parameters", "")
    text = re.sub(r"\['([^']*)'\]", r".\1", text).split(" Guard failed")[0]
    return text[:200]


def _merged(rounds: list[list[dict]]) -> list[dict]:
    """One row per contender and operation: median times over rounds, the worst recompile count and difference,
    every error seen."""
    merged = []
    for rows in zip(*rounds):
        row = dict(rows[0])
        for key in ("op_ms", "first_call_ms", "steady_call_ms"):
            values = [r[key] for r in rows if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[key + "_samples"] = values
        counts = [r["recompiles"] for r in rows if r["recompiles"] is not None]
        row["recompiles"] = max(counts) if counts else None
        diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
        row["max_abs_diff"] = max(diffs) if diffs else None
        equal = [r["equal"] for r in rows if r["equal"] is not None]
        row["equal"] = all(equal) if equal else None
        for key in ("error", "call_error"):
            row[key] = " / ".join(dict.fromkeys(r[key] for r in rows if r[key])) or None
        row["guard_failures"] = list(dict.fromkeys(g for r in rows for g in r["guard_failures"]))
        row["total_ms"] = None if row["first_call_ms"] is None else (row["op_ms"] or 0.0) + row["first_call_ms"]
        merged.append(row)
    order = {step: i for i, step in enumerate(["prepare + compile + first call"] + [s.label for s in STEPS])}
    return sorted(merged, key=lambda r: (order[r["operation"]], CONTENDERS.index(r["contender"])))


def hotswap(quick: bool, backend: str, rounds: int = 1, log: Callable[[str], None] = print) -> HotswapSection:
    """Every contender's script, ``rounds`` times; the section with one row per contender per operation."""
    base = build_base(quick)
    batch = make_batch(quick)
    config = base.config
    section = HotswapSection(
        "hotswap", f"Hot-swapping adapters on a compiled model: llama-like (hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}), LoRA on q/v, eval, no_grad, batch "
        f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}, torch.compile backend {backend!r}")
    runs: dict[str, list[list[dict]]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="fxpeft-hotswap-adapters-") as root:
        folders = save_adapters(base, Path(root))
        refs = references(base, folders, batch)
        _warm_up(backend)
        for turn in range(rounds):
            order = CONTENDERS if turn % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                log(f"round {turn + 1}/{rounds}: {name}")
                runs[name].append(run_script(name, base, folders, batch, refs[name], backend, log))
    section.rows = _merged([sum((runs[name][turn] for name in CONTENDERS), []) for turn in range(rounds)])
    for row in section.rows:
        if row["recompiles"] is not None:
            section.figures.append(single(row["contender"], row["operation"], "graphs", row["recompiles"]))
    _targets_and_notes(section, refs, rounds)
    return section


def _targets_and_notes(section: HotswapSection, refs: dict, rounds: int) -> None:
    fx_all = [r for r in section.rows
              if r["contender"].startswith("fxpeft") and not r["operation"].startswith("prepare")]
    measured = all(r["recompiles"] is not None and not r["error"] for r in fx_all)
    total = sum(r["recompiles"] or 0 for r in fx_all) if measured else None
    section.targets.append(Target.at_most("fxpeft compiled: recompiles over every operation after the first call",
                                          total, 0, unit="graphs", note="swap, add, switch, delete: no graph change"))
    diffs = [r["max_abs_diff"] for r in fx_all if r["max_abs_diff"] is not None]
    worst = max(diffs) if diffs and measured and len(diffs) == len(fx_all) else None
    section.targets.append(Target.at_most("fxpeft compiled: largest logits difference from the eager reference",
                                          worst, TOLERANCE, unit="", note="a fresh fxpeft model with that adapter"))
    peft = [r for r in section.rows if r["contender"].startswith("PEFT") and not r["operation"].startswith("prepare")]
    section.notes.append(f"PEFT compiled: {sum(r['recompiles'] or 0 for r in peft)} recompile(s) over the same "
                         f"operations; {sum(bool(r['error']) for r in peft)} operation(s) refused")
    cross = max((refs["fxpeft compiled"][k] - refs["PEFT compiled"][k]).abs().max().item()
                for k in ADAPTERS)
    apart = min((refs["PEFT compiled"][a] - refs["PEFT compiled"][b]).abs().max().item()
                for a in ADAPTERS for b in ADAPTERS if a < b)
    section.notes.append(f"the eager references: fxpeft's and PEFT's agree within {cross:.1e} on every adapter; "
                         f"any two adapters' logits differ by at least {apart:.1e} (so a swap that did not take "
                         f"effect shows)")
    section.notes.append("recompiles: dynamo's unique graphs from before the operation to after the call that "
                         "follows it; 'operation time' is the swap/load/switch/delete alone, '+ first call' adds "
                         "the call after it (a recompile lands there); in the first row the operation is loading A and "
                         "preparing, and the first call compiles")
    section.notes.append(f"max_rank {MAX_RANK}, {SLOTS} free slot(s) (fxpeft); PEFT padded to target_rank {MAX_RANK}; "
                         f"equal: within {TOLERANCE:g} of the eager logits; "
                         + (f"times: medians of {rounds} rounds (each a fresh script, cold Inductor cache)"
                            if rounds > 1 else "one round, cold Inductor cache per contender"))


# -- the command ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotswap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (hidden 64, 2 layers); backend aot_eager "
                        "unless --backend says otherwise")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --quick: aot_eager)")
    parser.add_argument("--rounds", type=int, default=1, help="scripts per contender (times: medians)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--suffix", default="", help="added to the result files' names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the folder for the result files")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # PEFT's and transformers' notes would bury the log
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    command = "python -m benchmarks.hotswap " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = run_meta(command, "cpu", args.rounds, 0, args.quick, "wall", ["hotswap"])
    meta["backend"] = backend
    section = hotswap(args.quick, backend, args.rounds, log=_log)
    report = Report(meta, [section], [], [])
    text = report.markdown()
    print(section.markdown())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-hotswap{'-quick' if args.quick else ''}{args.suffix}"
    write_atomically(stem.with_suffix(".md"), lambda path: path.write_text(text))
    write_atomically(stem.with_suffix(".json"), lambda path: path.write_text(_json(report)))
    print(f"wrote {stem}.md, {stem}.json")
    return 0


def _json(report: Report) -> str:
    import json

    return json.dumps(report.to_json(), indent=1, default=str) + "\n"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
