"""``llmasos demo``: the main job, end to end.

Boots a small built-in system (a frontend that calls a store, and an image
service that moves 1 MiB buffers without copying), drives a short load
through it, kills a replica of the store with SIGKILL half-way and shows the
kernel bring it back, prints a report (calls, p50/p99 latency per service,
memory per service, restarts) and shuts the system down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llmasos
from llmasos import control
from llmasos.commands import table
from llmasos.units import format_size

MANIFEST = """\
[system]
name = "{name}"
heap_size = "128MiB"

[services.frontend]
entry = "llmasos.examples.demo:Frontend"
replicas = 2
memory_quota = "8MiB"
calls = ["store"]

[services.store]
entry = "llmasos.examples.demo:Store"
replicas = 2
restart = "always"
memory_quota = "8MiB"
idempotent = ["get", "pid"]

[services.imaging]
entry = "llmasos.examples.demo:Imaging"
memory_quota = "48MiB"
"""


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmasos.cli", *args], check=True)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    """Calls made by the demo, timed per service."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def call(self, service: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return fn(*args)
        except llmasos.LLMasOSError as exc:
            self.errors[service] = self.errors.get(service, 0) + 1
            print(f"  call to {service} failed: {exc}")
            return None
        finally:
            self.times.setdefault(service, []).append(
                (time.perf_counter_ns() - t0) / 1e3
            )

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "service": s,
                "calls": len(t),
                "errors": self.errors.get(s, 0),
                "p50 us": f"{_percentile(t, 0.5):.1f}",
                "p99 us": f"{_percentile(t, 0.99):.1f}",
            }
            for s, t in sorted(self.times.items())
        ]


def drive(load: Load, rounds: int, kill_at: int, name: str) -> int:
    """The load; kills store replica 0 at round kill_at; returns its pid."""
    front = llmasos.connect("frontend", timeout=10)
    store = llmasos.connect("store", timeout=10)
    imaging = llmasos.connect("imaging", timeout=10)
    heap = llmasos.system_heap()
    image = heap.malloc(1 << 20)
    memoryview(image)[:] = bytes(range(256)) * 4096
    victim = 0
    for i in range(rounds):
        if i == kill_at:
            victim = _store_replica_pid(name)
            print(f"round {i}: killing store replica 0 (pid {victim}) with SIGKILL")
            os.kill(victim, signal.SIGKILL)
        load.call("frontend", front.order, f"user{i % 10}", "book")
        load.call("store", store.get, f"orders:user{i % 10}")
        if i % 10 == 0:
            out = load.call("imaging", imaging.invert, image)
            if out is not None:
                assert memoryview(out)[1] == 254
                heap.free(out)
    heap.free(image)
    return victim


def _store_replica_pid(name: str) -> int:
    ps = control.request("ps", system=name)
    return next(
        p["pid"] for p in ps["procs"] if p["service"] == "store" and p["replica"] == 0
    )


def wait_back(name: str, old_pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ps = control.request("ps", system=name)
        for p in ps["procs"]:
            if (
                p["service"] == "store"
                and p["replica"] == 0
                and p["pid"] != old_pid
                and p["state"] == "ready"
            ):
                return p
        time.sleep(0.01)
    raise llmasos.LLMasOSError("the store replica did not come back within 20 s")


def report(load: Load, name: str) -> None:
    print("\ncalls (client -> service -> client), per service:")
    print(table(load.rows(), ["service", "calls", "errors", "p50 us", "p99 us"]))
    mem = control.request("mem", system=name)
    rows = [
        {
            "service": s,
            "N pages": v["pages"],
            "S": format_size(mem["page_size"]),
            "M = N x S": format_size(v["bytes"]),
        }
        for s, v in sorted(mem["services"].items())
    ]
    print("\nheap memory per service:")
    print(table(rows, ["service", "N pages", "S", "M = N x S"]))
    ps = control.request("ps", system=name)
    rows = [
        {
            "service": s,
            "replicas": f"{v['ready']}/{v['replicas']}",
            "restarts": v["restarts"],
        }
        for s, v in sorted(ps["services"].items())
    ]
    print("\nservices:")
    print(table(rows, ["service", "replicas", "restarts"]))


def run(rounds: int = 2000) -> int:
    name = f"demo-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.toml"
        path.write_text(MANIFEST.format(name=name))
        print(f"booting system {name!r} from a built-in manifest")
        _cli("boot", str(path), "--detach")
        os.environ[control.SYSTEM_ENV] = name
        try:
            _cli("ps", "--system", name)
            load = Load()
            t0 = time.monotonic()
            victim = drive(load, rounds, rounds // 2, name)
            back = wait_back(name, victim)
            print(
                f"store replica 0 is back: pid {back['pid']}, "
                f"restarts {back['restarts']} ({time.monotonic() - t0:.1f} s of load)"
            )
            report(load, name)
        finally:
            _cli("shutdown", "--system", name)
    return 0
