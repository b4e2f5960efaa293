"""Spares: processes the fork server forks ahead of spawns, whose spec pipe
the kernel holds.  A spare that dies in stock is replaced, a deploy of a new
module replaces the spare forked without it, and a burst of spawns larger
than the stock waits for forks."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_until

from .conftest import System, alive, running, write_manifest

SERVICES = """\
[services.echo]
entry = "llmasos.examples.basic:Echo"
"""


@pytest.fixture
def system(tmp_path: Path, run_root: Path) -> Iterator[System]:
    with running(tmp_path, run_root, "spares", SERVICES) as s:
        yield s


def spares(system: System) -> list[int]:
    """The pids `mem` charges to (spare): spares attach the heap and open
    their channel before they are needed."""
    mem = json.loads(system.cli("mem", "--json").stdout)
    return [p["pid"] for p in mem["procs"] if p["service"] == "(spare)"]


def one_spare(system: System) -> int:
    """Wait until the kernel holds exactly one spare; its pid."""
    wait_until(lambda: len(spares(system)) == 1, "one spare in stock")
    (pid,) = spares(system)
    return pid


def test_spare_becomes_the_next_replica_and_is_replaced(system: System) -> None:
    spare = one_spare(system)

    assert system.cli("scale", "echo=2").returncode == 0

    assert system.ready_pids("echo")[1] == spare
    wait_until(lambda: spares(system) not in ([], [spare]), "a new spare")


def test_spare_killed_in_stock_is_replaced_and_spawns_go_on(system: System) -> None:
    spare = one_spare(system)

    os.kill(spare, signal.SIGKILL)
    wait_until(lambda: spares(system) not in ([], [spare]), "a spare in its place")
    scaled = system.cli("scale", "echo=2")

    assert scaled.returncode == 0, scaled.stderr
    assert spare not in system.wait_ready("echo", 2)
    assert system.connect("echo").echo("still served") == "still served"


def test_spare_forked_before_a_deploy_is_replaced_by_one_with_its_module(
    system: System, tmp_path: Path
) -> None:
    spare = one_spare(system)
    extra = write_manifest(
        tmp_path,
        system.name,
        """\
        [services.sched]
        entry = "llmasos.examples.schedsvc:Work"
        """,
    )

    deployed = system.cli("deploy", str(extra), "sched")

    assert deployed.returncode == 0, deployed.stderr
    wait_until(lambda: not alive(spare), "the old spare to exit")
    assert spare not in system.ready_pids("sched")
    one_spare(system)


def test_spawns_in_a_burst_wait_for_forks(system: System) -> None:
    one_spare(system)

    scaled = system.cli("scale", "echo=5")

    assert scaled.returncode == 0, scaled.stderr
    pids = system.wait_ready("echo", 5)
    assert len(set(pids)) == 5
    for _ in range(5):
        assert system.connect("echo").echo(1) == 1
