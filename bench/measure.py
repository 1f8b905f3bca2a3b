"""What the benchmarks share: percentiles, CPU of processes, and a log counter."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def cpu_of(names: tuple[str, ...]) -> float:
    """CPU seconds (user + system) of every process whose command name starts with one of `names`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm.startswith(names):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class LogCounter:
    """A structlog processor counting warnings and errors by event; prints only the first few of each."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if method in ("warning", "error", "exception", "critical"):
            key = (method, str(event_dict.get("event")))
            self.counts[key] += 1
            if self.counts[key] > 3:
                raise structlog.DropEvent
        return event_dict

    @property
    def errors(self) -> int:
        return sum(n for (method, _e), n in self.counts.items() if method != "warning")
