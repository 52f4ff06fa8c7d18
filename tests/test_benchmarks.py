"""The benchmark command keeps working: ``python -m benchmarks --quick`` (the issue's one-repetition smoke mode).

Its timings on tiny models are not results and are not asserted; what is asserted is that every comparison
runs, measures every contender, and writes its JSON, Markdown and PNG files.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run_measures_every_contender_and_writes_its_files(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stem = tmp_path / next(tmp_path.glob("*-quick.json")).stem
    report = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = stem.with_suffix(".md").read_text()
    assert "### Targets" in markdown

    sections = {section["key"]: section for section in report["sections"]}
    assert {"train-a", "train-b", "train-c", "inference", "mixed", "generate", "fresh"} <= set(sections)
    for key in ("train-a", "train-b", "train-c"):
        measured = {figure["contender"] for figure in sections[key]["figures"]}
        assert measured == {"base eager", "PEFT eager", "fxpeft eager"}, key
    for section in sections.values():
        for figure in section["figures"]:
            assert math.isfinite(figure["median"]) and figure["min"] <= figure["median"] <= figure["max"], figure
            # (a per-token decode time is a difference of two calls, which one noisy repetition can turn negative)
            if figure["unit"] in ("ms", "s") and figure["metric"] != "per token":
                assert figure["median"] > 0, figure
    mixed = {figure["metric"] for figure in sections["mixed"]["figures"] if figure["contender"] == "fxpeft eager"}
    assert mixed == {"1 adapter(s)", "4 adapter(s)", "16 adapter(s)"}
    generate = {(figure["contender"], figure["metric"]) for figure in sections["generate"]["figures"]}
    for contender in ("base eager", "PEFT eager", "fxpeft eager"):
        assert {(contender, "first token"), (contender, "per token")} <= generate
    for contender in ("PEFT eager", "fxpeft eager"):
        assert {(contender, f"mixed batch, {count} adapter(s)") for count in (1, 4, 16)} <= generate
    fresh = {(figure["contender"], figure["metric"]) for figure in sections["fresh"]["figures"]}
    assert ("fxpeft eager", "time to first step") in fresh and ("PEFT eager", "time to first step") in fresh
    # Without compiled contenders the compiled targets are reported as not measured, never as passed.
    assert all(target["passed"] is None for target in report["targets"] if "compiled" in target["name"])


def test_quick_generate_with_compiled_contenders(tmp_path):
    """``--quick --compile --only generate``: the compiled contenders decode with a static cache and a compiled step
    (``compile_config``), are measured beside the eager ones, and generate the eager tokens; PEFT compiled is measured
    on the one prompt only (a failure would be a note saying so, never a crash)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--compile", "--only", "generate",
                           "--threads", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*-quick-generate.json")).read_text())
    (section,) = report["sections"]
    measured = {(figure["contender"], figure["metric"]) for figure in section["figures"]}
    for contender in ("base compiled", "PEFT compiled", "fxpeft compiled"):
        if (contender, "per token") not in measured:
            assert any(note.startswith(f"{contender}: generate failed") for note in section["notes"]), contender
            continue
        assert {(contender, "first token"), (contender, "per token")} <= measured
    assert {("fxpeft compiled", f"mixed batch, {count} adapter(s)") for count in (1, 4, 16)} <= measured
    assert ("base compiled", "mixed batch, base") in measured
    same = [note for note in section["notes"] if "compiled's" in note]
    assert same and all(note.endswith("True") for note in same), same


def test_mixed_training_smoke_run_times_every_shape(tmp_path):
    """``python -m benchmarks.mixed_training --quick``: one adapter, 16 gathered and 16 gated, with equal first losses
    for the two 16-adapter shapes (the same seeded weights; the gathered graph computes what the gated one does)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.mixed_training", "--quick", "--reps", "1", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*-mixed-training.json")).read_text())
    (section,) = report["sections"]
    assert {figure["contender"] for figure in section["figures"]} == {
        "fxpeft eager, 1 adapter", "fxpeft eager, 16 adapters", "fxpeft eager, 16 adapters gated"}
    losses = {line.split(":")[0]: float(line.split("first loss ")[1].split(";")[0])
              for line in section["notes"] if "first loss " in line}
    assert abs(losses["fxpeft eager, 16 adapters"] - losses["fxpeft eager, 16 adapters gated"]) < 1e-4, losses


def test_hotswap_smoke_run_recompiles_nothing_for_fxpeft(tmp_path):
    """``python -m benchmarks.hotswap --quick --backend eager``: every fxpeft operation after the first call compiles
    nothing and gives its eager reference's logits; PEFT's rows are measured too (its adding an adapter recompiles)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.hotswap", "--quick", "--backend", "eager", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*-hotswap-quick.json")).read_text())
    (section,) = report["sections"]
    targets = {target["name"]: target for target in section["targets"]}
    assert len(targets) == 2 and all(target["passed"] for target in targets.values()), targets
    peft_adds = [figure for figure in section["figures"] if figure["contender"] == "PEFT compiled"
                 and figure["metric"] == "add adapter + switch to it"]
    assert peft_adds and peft_adds[0]["median"] >= 1, peft_adds
