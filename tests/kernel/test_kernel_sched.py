"""Scheduling inside a replica, seen from callers: a call that waited in the
run queue past its deadline is dropped, never run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import wait_until

from .conftest import WATCHDOG_S, System

SERVICES = """\
[services.probe]
entry = "llmasos.examples.testsvc:Probe"
policy = "edf"
workers = 1
max_in_flight = 1
"""


def test_sched_call_past_its_deadline_is_dropped_unrun(
    boot: Callable[..., System], tmp_path: Path
) -> None:
    system = boot("sched", SERVICES)
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    blocker = threading.Thread(
        target=system.connect("probe", timeout=WATCHDOG_S).block,
        args=(str(gate), str(started)),
    )
    blocker.start()
    wait_until(lambda: any(started.iterdir()), "the probe to start blocking")
    late = system.connect("probe", timeout=0.2)

    with pytest.raises(TimeoutError):
        late.say("never said")  # queued behind the blocked call
    gate.touch()
    blocker.join(WATCHDOG_S)
    waiter = system.connect("probe", timeout=WATCHDOG_S)

    assert waiter.say("after") == "after"
    log = "\n".join(system.cli("logs", "probe", "-n", "100").stdout.splitlines())
    assert "after" in log and "never said" not in log
