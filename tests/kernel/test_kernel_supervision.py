"""Supervision: replicas that die are restarted or left down by their
service's policy, a service that keeps failing is given up, and calls to a
replica that dies fail fast or are retried."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmasos
from conftest import wait_until

from .conftest import WATCHDOG_S, System, alive, running

SERVICES = """\
[services.always]
entry = "llmasos.examples.testsvc:Probe"
restart = "always"

[services.never]
entry = "llmasos.examples.testsvc:Probe"
restart = "never"

[services.onfail]
entry = "llmasos.examples.testsvc:Probe"
restart = "on-failure"

[services.broken]
entry = "llmasos.examples.testsvc:Broken"
restart = "always"
max_restarts = 2
backoff_initial = 0.01
backoff_max = 0.05

[services.echo]
entry = "llmasos.examples.basic:Echo"
replicas = 2

[services.retry]
entry = "llmasos.examples.testsvc:Probe"
replicas = 2
idempotent = ["die_once"]
"""


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, run_root: Path
) -> Iterator[System]:
    directory = tmp_path_factory.mktemp("supervision")
    with running(
        directory, run_root, "supervision", SERVICES, may_fail=("broken",)
    ) as s:
        yield s


def restarts(system: System, service: str) -> int:
    return system.ps()["services"][service]["restarts"]


def test_supervision_restarts_a_killed_replica(system: System) -> None:
    always = system.connect("always", timeout=WATCHDOG_S)
    (old,) = system.wait_ready("always", 1)
    assert always.pid() == old

    os.kill(old, signal.SIGKILL)

    wait_until(lambda: restarts(system, "always") == 1, "a restart of always")
    (new,) = system.wait_ready("always", 1)
    assert new != old
    assert system.replicas("always")[0]["restarts"] == 1
    assert always.pid() == new


def test_supervision_never_leaves_a_killed_replica_down(system: System) -> None:
    (old,) = system.wait_ready("never", 1)

    os.kill(old, signal.SIGKILL)

    system.wait_log("service never replica 0 exited (signal 9); restart policy 'never'")
    assert system.replicas("never") == []
    assert system.ps()["services"]["never"] == {
        "replicas": 1,
        "ready": 0,
        "failed": False,
        "restarts": 0,
    }
    with pytest.raises(llmasos.ServiceUnavailable, match="'never'"):
        system.connect("never", timeout=0.2).pid()


def test_supervision_on_failure_leaves_a_clean_exit_down(system: System) -> None:
    onfail = system.connect("onfail", timeout=WATCHDOG_S)
    system.wait_ready("onfail", 1)

    with pytest.raises(llmasos.ReplicaDied):
        onfail.exit_clean()

    system.wait_log(
        "service onfail replica 0 exited (exit code 0); restart policy 'on-failure'"
    )
    assert system.replicas("onfail") == []
    assert restarts(system, "onfail") == 0


def test_supervision_gives_up_on_a_service_that_keeps_failing(system: System) -> None:
    def failed() -> bool:
        return system.ps()["services"]["broken"]["failed"]

    wait_until(failed, "the service broken to be marked failed")

    assert system.ps()["services"]["broken"]["restarts"] == 2
    assert "service broken failed: more than 2 restarts in 10 s" in system.kernel_log()
    assert system.replicas("broken") == []
    logs = system.cli("logs", "broken")
    assert "RuntimeError: Broken cannot start, on purpose" in logs.stdout


def test_supervision_call_to_a_dying_replica_raises_replica_died(
    system: System,
) -> None:
    echo = system.connect("echo", timeout=WATCHDOG_S)
    by_pid = {r["pid"]: r["replica"] for r in system.replicas("echo")}
    before = restarts(system, "echo")

    with pytest.raises(llmasos.ReplicaDied) as info:
        echo.crash()

    found = re.search(r"service 'echo' replica (\d+) \(pid (\d+)\)", str(info.value))
    assert found, str(info.value)
    assert by_pid[int(found[2])] == int(found[1])
    assert "'crash'" in str(info.value)
    wait_until(lambda: restarts(system, "echo") == before + 1, "echo to restart")
    system.wait_ready("echo", 2)
    assert echo.echo("again") == "again"


def test_supervision_idempotent_call_is_retried_on_another_replica(
    system: System, tmp_path: Path
) -> None:
    retry = system.connect("retry", timeout=WATCHDOG_S)
    pids = system.wait_ready("retry", 2)
    marker = tmp_path / "died-once"

    answered = retry.die_once(str(marker))

    assert marker.exists()
    assert answered in pids
    (died,) = set(pids) - {answered}
    wait_until(lambda: not alive(died), f"replica pid {died} to die")
    wait_until(lambda: restarts(system, "retry") == 1, "retry to restart")
    assert answered in system.wait_ready("retry", 2)
