"""What :func:`fxpeft.verify` returns: a :class:`Report` of :class:`Finding` s and the :class:`Check` s that ran.

The checks add to a :class:`Findings` list as they go; a finding is an error (something that does not hold) or
a note (a check that could not run here, and why), never both.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Sequence

__all__ = ["ERROR", "NOTE", "Finding", "Findings", "Check", "Report"]

ERROR, NOTE = "error", "note"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing that does not hold (``severity="error"``) or a check that could not run (``"note"``).

    ``subject`` is the node, tensor or output concerned; ``module`` its module path where there is one;
    ``message`` a sentence a person understands; ``details`` numbers for machines (shapes, differences)."""

    kind: str
    subject: str
    message: str
    module: str = ""
    severity: str = ERROR
    details: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        # strict JSON has no NaN or Infinity: write them as strings
        details = {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
                   for key, value in self.details.items()}
        return {"kind": self.kind, "severity": self.severity, "subject": self.subject, "module": self.module,
                "message": self.message, "details": details}

    def __str__(self) -> str:
        where = f" ({self.module})" if self.module and self.module not in self.subject else ""
        return f"[{self.kind}] {self.subject}{where}: {self.message}"


class Findings(list):
    """The findings of one run, in the order the checks found them."""

    def add(self, kind: str, subject: str, message: str, module: str = "", **details) -> None:
        """An error of ``kind`` about ``subject`` (``details``: numbers for machines)."""
        self.append(Finding(kind, subject, message, module, ERROR, details))

    def note(self, subject: str, message: str) -> None:
        """A note: something about ``subject`` could not be checked here, and why."""
        self.append(Finding("skipped", subject, message, severity=NOTE))

    def has(self, *kinds: str) -> bool:
        """Whether an error of one of ``kinds`` (any error, given none) was found."""
        return any(finding.severity == ERROR and (not kinds or finding.kind in kinds) for finding in self)


@dataclasses.dataclass
class Check:
    """One of the checks: what it compared, whether it holds (``status``: ok, fail, skipped) and how long."""

    name: str
    status: str
    result: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report(Sequence):
    """The findings of :func:`verify` (a sequence of :class:`Finding`), and the checks that produced them."""

    base: str
    adapter: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)

    def __getitem__(self, index):
        return self.findings[index]

    def __len__(self) -> int:
        return len(self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error (notes about skipped checks do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == ERROR]

    def kinds(self) -> set[str]:
        """The kinds of the failing findings."""
        return {finding.kind for finding in self.failures}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "base": self.base, "adapter": self.adapter,
                "checks": [check.to_dict() for check in self.checks],
                "findings": [finding.to_dict() for finding in self.findings]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str, allow_nan=False)

    def summary(self, limit: int = 20) -> str:
        """A few lines: what was compared, what holds, what differs."""
        lines = [f"fxpeft check: base {self.base}", f"              adapter {self.adapter}"]
        width = max((len(check.name) for check in self.checks), default=0)
        for check in self.checks:
            status = {"ok": "ok", "fail": "FAIL", "skipped": "skipped"}[check.status]
            lines.append(f"  {status:<8} {check.name:<{width}}  {check.result} [{check.seconds:.1f}s]")
        errors, notes = self.failures, [f for f in self.findings if f.severity != ERROR]
        for title, group in (("differs", errors), ("notes", notes)):
            if group:
                lines.append(f"{title} ({len(group)}):")
                lines += [f"  {finding}" for finding in group[:limit]]
                if len(group) > limit:
                    lines.append(f"  ... and {len(group) - limit} more (--json lists them all)")
        if self.ok:
            lines.append("result: OK, the adapted model is the base model plus its declared adapters")
        else:
            counts = collections.Counter(finding.kind for finding in errors)
            lines.append("result: FAIL, " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        return "\n".join(lines)
