"""Processes of a system: ``llmasos.fork`` in a service and in a client,
``spawn``, ``wait`` and ``kill``; the kernel lists forked processes and
reclaims their heap pages when they end."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmasos
from conftest import wait_until
from llmasos import control

from .conftest import WATCHDOG_S, System, alive, parent_of, running

SERVICES = """\
[services.probe]
entry = "llmasos.examples.testsvc:Probe"
"""

KiB = 1 << 10


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, run_root: Path
) -> Iterator[System]:
    directory = tmp_path_factory.mktemp("process")
    with running(directory, run_root, "process", SERVICES) as s:
        yield s


def row_of(system: System, pid: int) -> dict[str, Any] | None:
    rows = [r for r in system.ps()["procs"] if r["pid"] == pid]
    return rows[0] if rows else None


def pages_of(system: System, pid: int) -> int:
    mem = control.request("mem", system=system.name)
    return sum(r["pages"] for r in mem["procs"] if r["pid"] == pid)


def pages_used(system: System) -> int:
    return control.request("mem", system=system.name)["pages_used"]


@contextlib.contextmanager
def reaped(pid: int) -> Iterator[None]:
    """Kill and reap child pid if the block leaves it behind (a failed test)."""
    try:
        yield
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def wait_gone(system: System, pid: int) -> None:
    """Wait until pid has left the process table and holds no page."""
    wait_until(
        lambda: row_of(system, pid) is None and pages_of(system, pid) == 0,
        f"pid {pid} to leave the process table with its pages reclaimed",
        WATCHDOG_S,
    )


def test_process_fork_in_a_service_registers_the_child_and_reclaims_its_pages(
    system: System, tmp_path: Path
) -> None:
    probe = system.connect("probe", timeout=WATCHDOG_S)
    (parent,) = system.pids("probe")
    assert probe.pid() == parent  # this thread's reply channel now exists
    used = pages_used(system)
    stop = tmp_path / "stop"

    child = probe.fork_holding(512 * KiB, str(stop))

    assert child > 0 and child != parent
    wait_until(lambda: row_of(system, child) is not None, "the child in ps")
    row = row_of(system, child)
    assert row is not None
    assert (row["kind"], row["service"]) == ("forked", "probe")
    wait_until(
        lambda: pages_of(system, child) >= 512 * KiB // 4096,
        "the child's pages in mem",
    )
    stop.touch()
    assert probe.reap(child) == 0
    wait_gone(system, child)
    assert pages_used(system) == used


def test_process_fork_returns_0_in_the_child_and_its_pid_in_the_parent(
    system: System,
) -> None:
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()

    pid = llmasos.fork()
    if pid == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        os.write(to_parent_w, f"{pid} {os.getpid()}".encode())
        os.read(to_child_r, 1)  # until the parent closes its end
        os._exit(0)

    with reaped(pid):
        os.close(to_parent_w)
        os.close(to_child_r)
        said = os.read(to_parent_r, 64).decode()
        os.close(to_parent_r)
        assert said == f"0 {pid}"
        wait_until(lambda: row_of(system, pid) is not None, "the child in ps")
        assert row_of(system, pid)["kind"] == "forked"  # type: ignore[index]
        os.close(to_child_w)
        assert llmasos.wait(pid, timeout=WATCHDOG_S) == 0
    wait_gone(system, pid)


def test_process_forked_child_and_parent_call_through_one_proxy_at_once(
    system: System,
) -> None:
    # A proxy made before the fork; each side must get its own answers.
    probe = llmasos.connect("probe", timeout=5)  # via $LLMASOS_SYSTEM
    assert probe.say("parent") == "parent"
    r, w = os.pipe()

    pid = llmasos.fork()
    if pid == 0:
        code = 1
        try:
            got = [probe.say(f"child {i}") for i in range(300)]
            code = 0 if got == [f"child {i}" for i in range(300)] else 2
        finally:
            os.write(w, b"done")
            os._exit(code)

    with reaped(pid):
        os.close(w)
        got = [probe.say(f"parent {i}") for i in range(300)]
        os.read(r, 4)
        os.close(r)
        assert llmasos.wait(pid, timeout=WATCHDOG_S) == 0
    assert got == [f"parent {i}" for i in range(300)]


def test_process_spawn_and_wait_report_the_exit_code(system: System) -> None:
    def fail() -> None:
        raise RuntimeError("spawned to fail")

    ok = llmasos.spawn(lambda: None)
    bad = llmasos.spawn(fail)

    assert llmasos.wait(ok, timeout=WATCHDOG_S) == 0
    assert llmasos.wait(bad, timeout=WATCHDOG_S) == 1
    wait_gone(system, ok)
    wait_gone(system, bad)


def test_process_kill_ends_a_spawned_process_and_its_pages_are_reclaimed(
    system: System,
) -> None:
    ready_r, ready_w = os.pipe()
    used = pages_used(system)

    def holder() -> None:
        system.heap.malloc(256 * KiB)
        os.write(ready_w, b"x")
        signal.pause()

    pid = llmasos.spawn(holder)

    with reaped(pid):
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        wait_until(lambda: row_of(system, pid) is not None, "the child in ps")
        assert pages_of(system, pid) >= 256 * KiB // 4096
        with pytest.raises(TimeoutError, match=str(pid)):
            llmasos.wait(pid, timeout=0.01)
        llmasos.kill(pid)
        assert llmasos.wait(pid, timeout=WATCHDOG_S) == -signal.SIGTERM
    wait_gone(system, pid)
    assert pages_used(system) == used


def test_process_forked_by_a_replica_does_not_outlive_a_killed_kernel(
    boot: Callable[..., System], tmp_path: Path
) -> None:
    s = boot("forkkill", SERVICES)
    stop = tmp_path / "stop"
    child = s.connect("probe").fork_holding(4096, str(stop))
    wait_until(lambda: row_of(s, child) is not None, "the child in ps")
    kernel = s.kernel_pid()
    (replica,) = s.pids("probe")
    forkserver = parent_of(replica)

    os.kill(kernel, signal.SIGKILL)

    try:
        for pid in (kernel, forkserver, replica):
            wait_until(lambda pid=pid: not alive(pid), f"process {pid} to die")
        rebooted = s.cli("boot", str(s.manifest), "--detach")
        assert rebooted.returncode == 0, rebooted.stderr
        wait_until(lambda: not alive(child), f"forked process {child} to die")
    finally:
        stop.touch()  # the child exits by itself once this exists
