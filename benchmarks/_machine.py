"""The machine the benchmarks run on: what it is, and how busy it is besides
the benchmark.

Figures taken while other processes use the CPUs are not comparable with an
idle machine's; each benchmark measures the load of others and says so, and
its JSON names the machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time


def machine(*dists: str) -> dict:
    """What the figures were measured on, with the versions of ``dists``
    (None for one not installed) besides LLMasOS's."""
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    models = [ln.split(":", 1)[1] for ln in cpuinfo.splitlines() if "model name" in ln]
    versions = {}
    for dist in ("llmasos", *dists):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": models[0].strip() if models else platform.machine(),
        "cpus": os.cpu_count(),
        "virtualised": " hypervisor" in cpuinfo,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent outside idle since boot."""
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process and its ended children."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoadMeter:
    """CPU that processes outside this benchmark used, in % of one CPU."""

    def __init__(self) -> None:
        self.busy0, self.own0 = machine_busy_s(), own_cpu_s()
        self.wall0 = time.monotonic()

    def percent(self, also_ours_s: float = 0.0) -> float:
        """The share since the meter started; also_ours_s is CPU of processes
        of the benchmark that are not its children (a system it booted)."""
        busy = machine_busy_s() - self.busy0
        other = busy - (own_cpu_s() - self.own0) - also_ours_s
        return max(0.0, 100.0 * other / (time.monotonic() - self.wall0))
