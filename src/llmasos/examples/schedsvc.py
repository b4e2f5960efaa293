"""Services for `benchmarks/scheduling.py`: requests that keep a CPU busy.

`Work.short(ms)` and `Work.long(ms)` spin on `time.perf_counter` for `ms`
milliseconds and return the milliseconds they ran, so that a caller can take
its waiting time as its response time minus the run time. They spin rather
than sleep: the run time is then real CPU time, which no sleep granularity
rounds, and the worker is as busy as it would be on real computation. Two
methods doing the same thing exist so that the manifest can give each its own
priority and expected duration, and the run queue can tell them apart.
"""

from __future__ import annotations

import os
import time


def spin(ms: float) -> float:
    """Keep this CPU busy for `ms` milliseconds; return the milliseconds spent."""
    start = time.perf_counter()
    end = start + ms / 1e3
    now = start
    while now < end:
        now = time.perf_counter()
    return (now - start) * 1e3


class Work:
    """One worker's worth of CPU-bound requests, short and long."""

    def short(self, ms: float) -> float:
        """A short request: spin for `ms` milliseconds, return the time spent."""
        return spin(ms)

    def long(self, ms: float) -> float:
        """A long request: spin for `ms` milliseconds, return the time spent."""
        return spin(ms)

    def ping(self) -> int:
        """Answer at once with this replica's pid (a warm-up call that leaves
        the expected durations of `short` and `long` untouched)."""
        return os.getpid()
