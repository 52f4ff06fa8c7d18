"""The results: sections of figures, targets with pass/fail, written as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .timing import Figure

__all__ = ["Section", "Target", "Report", "write_atomically", "run_meta"]


@dataclasses.dataclass
class Target:
    """A goal stated as a limit on a measured value. ``passed`` is None when it was not measured."""

    name: str
    value: float | None
    limit: str
    passed: bool | None
    note: str = ""

    @classmethod
    def at_most(cls, name: str, value: float | None, limit: float, unit: str = "x", note: str = "") -> "Target":
        shown = f"<= {limit:g}{unit}" if unit == "x" else f"<= {limit:g} {unit}"
        return cls(name, value, shown, None if value is None else value <= limit, note)

    @classmethod
    def below(cls, name: str, value: float | None, limit: float, unit: str = "x", note: str = "") -> "Target":
        shown = f"< {limit:g}{unit}" if unit == "x" else f"< {limit:g} {unit}"
        return cls(name, value, shown, None if value is None else value < limit, note)


@dataclasses.dataclass
class Section:
    """One comparison: its figures (contenders side by side), the targets it decides, notes."""

    key: str
    title: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def find(self, contender: str, metric: str | None = None) -> Figure | None:
        return next((f for f in self.figures if f.contender == contender and metric in (None, f.metric)), None)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.figures:
            lines += ["| contender | metric | median | min | max | ratio (median, min-max) |",
                      "| --- | --- | ---: | ---: | ---: | --- |"]
            for f in self.figures:
                ratio = "" if f.ratio is None else \
                    f"{f.ratio:.3f} ({f.ratio_min:.3f}-{f.ratio_max:.3f}) vs {f.reference}"
                lines.append(f"| {f.contender} | {f.metric} | {_num(f.median)} {f.unit} | {_num(f.min)} | "
                             f"{_num(f.max)} | {ratio} |")
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _verdict(target: Target) -> str:
    return "not measured" if target.passed is None else ("PASS" if target.passed else "FAIL")


def targets_markdown(targets: list[Target]) -> str:
    lines = ["| target | measured | limit | result | note |", "| --- | ---: | --- | --- | --- |"]
    for t in targets:
        value = "" if t.value is None else f"{t.value:.3g}"
        lines.append(f"| {t.name} | {value} | {t.limit} | {_verdict(t)} | {t.note} |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Report:
    meta: dict[str, Any]
    sections: list[Section]
    pending: list[str]
    skipped: list[str]

    @property
    def targets(self) -> list[Target]:
        return [t for section in self.sections for t in section.targets]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "pending": self.pending, "skipped": self.skipped,
                "targets": [dataclasses.asdict(t) for t in self.targets],
                "sections": [dataclasses.asdict(s) for s in self.sections]}

    def markdown(self) -> str:
        m = self.meta
        head = [f"## fxpeft benchmarks, {m['date']}", "",
                f"`{m['command']}` on {m['device_name']} ({m['threads']} torch threads, load average "
                f"{m['load_average']} at the start); torch {m['torch']}, transformers {m['transformers']}, "
                f"peft {m['peft']}. Medians over {m['reps']} repetition(s) after {m['warmup']} warm-up round(s), "
                "contenders interleaved; ratios are medians of per-repetition ratios"
                + (" (times are the process's CPU time, `--clock cpu`)." if m.get("clock") == "cpu" else "."), ""]
        if m.get("quick"):
            head += ["**--quick: tiny models and one repetition, a smoke test of the code: its numbers and verdicts "
                     "are not results.**", ""]
        head += [f"- skipped: {item}" for item in self.skipped]
        head += [f"- pending: {item}" for item in self.pending]
        body = ["", "### Targets", "", targets_markdown(self.targets)]
        body += [section.markdown() for section in self.sections]
        return "\n".join(head + body)

    def write(self, directory: Path, stem: str) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{stem}.json", directory / f"{stem}.md", directory / f"{stem}.png"]
        write_atomically(paths[0], lambda p: p.write_text(json.dumps(self.to_json(), indent=1) + "\n"))
        write_atomically(paths[1], lambda p: p.write_text(self.markdown()))
        write_atomically(paths[2], self.chart)
        return paths

    def chart(self, path: Path) -> None:
        """One panel per comparison and unit: each contender's median as a bar, min to max as the whisker."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(section, unit, [f for f in section.figures if f.unit == unit])
                  for section in self.sections for unit in dict.fromkeys(f.unit for f in section.figures)]
        cols = 2
        rows = max(1, (len(panels) + cols - 1) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(13, 0.4 + 2.8 * rows), squeeze=False)
        for ax, (section, unit, figures) in zip(axes.flat, panels):
            labels = [f"{f.contender} | {f.metric}" for f in figures]
            medians = [f.median for f in figures]
            whiskers = [[f.median - f.min for f in figures], [f.max - f.median for f in figures]]
            ax.barh(range(len(labels)), medians, xerr=whiskers, color=[_color(f.contender) for f in figures],
                    capsize=3)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(unit, fontsize=8)
            ax.set_title(section.title.split(":")[0], fontsize=9)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"fxpeft benchmarks {self.meta['date']}: {self.meta['command']} "
                     "(median, whiskers min-max)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=90, format="png")
        plt.close(fig)


def _color(contender: str) -> str:
    kind = contender.split()[0]
    return {"base": "#9e9e9e", "PEFT": "#f28e2b", "fxpeft": "#4e79a7"}.get(kind, "#59a14f")


def write_atomically(path: Path, write) -> None:
    """``write(partial)`` to a temporary name beside ``path``, then rename it into place: no half-written file."""
    partial = path.with_name(path.name + ".tmp")  # *.tmp is git-ignored
    write(partial)
    os.replace(partial, path)


def run_meta(command: str, device: str, reps: int, warmup: int, quick: bool, clock: str,
             comparisons: list[str]) -> dict[str, Any]:
    """What a result file says about its run: the command, the date, the machine and its load, the library versions
    and the timing settings."""
    import datetime
    import platform

    import peft
    import torch
    import transformers

    import fxpeft

    return {"date": datetime.date.today().isoformat(), "command": command.strip(), "device": device,
            "device_name": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
            if device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(), "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "fxpeft": fxpeft.__version__, "reps": reps, "warmup": warmup, "quick": quick, "clock": clock,
            "comparisons": comparisons}

