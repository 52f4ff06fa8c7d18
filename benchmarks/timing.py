"""Timing and statistics: interleaved repetitions, medians with min and max, paired ratios.

On a shared or thermally throttled machine absolute times drift by 10-15 % between runs, so every
comparison runs its contenders round-robin in one process (repetition k runs each contender once, starting
from a rotating position) and ratios are the median of the per-repetition ratios: a slow patch of time hits
both sides of a ratio alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

__all__ = ["CLOCKS", "Figure", "interleaved", "figure", "single", "synchronizer"]

# What a repetition's time is: elapsed time, or the process's CPU time (blind to other processes taking the cores;
# with one torch thread it is the work itself, with more it also counts OpenMP threads spinning while they wait).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclasses.dataclass
class Figure:
    """One measured quantity of one contender: median, min and max over repetitions.

    ``ratio`` is the median over repetitions of (this / reference), with its own min and max, where the
    figure has a ``reference`` contender measured in the same repetitions."""

    contender: str
    metric: str
    unit: str
    median: float
    min: float
    max: float
    samples: list[float]
    reference: str | None = None
    ratio: float | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock: waits for queued GPU work on CUDA, nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleaved(calls: dict[str, Callable[[], object]], reps: int, warmup: int,
                sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each contender (by ``clock``, one of :data:`CLOCKS`): ``warmup`` untimed rounds, then
    ``reps`` timed round-robin rounds."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        start = rep % len(names)
        for name in names[start:] + names[:start]:
            sync()
            began = clock()
            calls[name]()
            sync()
            times[name].append(clock() - began)
    return times


def figure(contender: str, metric: str, unit: str, samples: list[float], reference: str | None = None,
           reference_samples: list[float] | None = None, scale: float = 1.0) -> Figure:
    """Summarise ``samples`` (multiplied by ``scale``, e.g. 1e3 for seconds to ms) and pair them with a reference."""
    values = [value * scale for value in samples]
    result = Figure(contender, metric, unit, statistics.median(values), min(values), max(values), values)
    if reference is not None and reference_samples is not None and reference != contender:
        ratios = [mine / theirs for mine, theirs in zip(samples, reference_samples) if theirs > 0]
        if ratios:
            result.reference = reference
            result.ratio, result.ratio_min, result.ratio_max = statistics.median(ratios), min(ratios), max(ratios)
    return result


def single(contender: str, metric: str, unit: str, value: float) -> Figure:
    """A figure measured once (a count, a one-off time)."""
    return Figure(contender, metric, unit, value, value, value, [value])
