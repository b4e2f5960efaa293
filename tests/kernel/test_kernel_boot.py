"""Booting and stopping a system: manifest errors, one process per replica,
the files of a running system, a second boot, shutdown, and a kernel that is
killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import wait_until

from .conftest import (
    System,
    alive,
    heap_path,
    parent_of,
    run_cli,
    running,
    unique_system,
)

SERVICES = """\
[services.kv]
entry = "llmasos.examples.basic:KV"
replicas = 2

[services.echo]
entry = "llmasos.examples.basic:Echo"
replicas = 2
"""


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, run_root: Path
) -> Iterator[System]:
    with running(tmp_path_factory.mktemp("boot"), run_root, "boot", SERVICES) as s:
        yield s


BAD_MANIFESTS = {
    "replicas-not-a-number": ('replicas = "two"', "services.kv.replicas"),
    "unknown-field": ("replica = 2", "services.kv.replica"),
    "entry-not-module-class": ('entry = "nope"', "services.kv.entry"),
    "unknown-restart-policy": ('restart = "sometimes"', "services.kv.restart"),
}


@pytest.mark.parametrize("line, field", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS)
def test_boot_bad_manifest_names_file_line_and_field(
    tmp_path: Path, run_root: Path, line: str, field: str
) -> None:
    name = unique_system("bad")
    text = (
        f'[system]\nname = "{name}"\n\n[services.kv]\n'
        f'entry = "llmasos.examples.basic:KV"\n{line}\n'
    )
    if line.startswith("entry"):
        text = text.replace('entry = "llmasos.examples.basic:KV"\n', "")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    lineno = text.splitlines().index(line) + 1

    done = run_cli("boot", str(path), "--detach")

    assert done.returncode == 2
    assert done.stderr.startswith(f"llmasos: error: {path}:{lineno}: {field}: ")
    assert len(done.stderr.splitlines()) == 1
    assert not (run_root / name / "control.sock").exists()
    assert not heap_path(name).exists()


def test_boot_starts_each_replica_as_its_own_process(system: System) -> None:
    kernel = system.kernel_pid()

    rows = system.replicas("kv") + system.replicas("echo")

    pids = [r["pid"] for r in rows]
    assert len(set(pids)) == len(pids) == 4
    assert kernel not in pids
    assert all(r["state"] == "ready" for r in rows)
    (forkserver,) = [
        p["pid"] for p in system.ps()["procs"] if p["kind"] == "forkserver"
    ]
    assert {parent_of(pid) for pid in pids} == {forkserver}
    assert forkserver != kernel
    assert parent_of(forkserver) == kernel


def test_boot_run_dir_is_private_and_socket_is_owner_only(system: System) -> None:
    sock = system.dir / "control.sock"

    dir_mode = stat.S_IMODE(system.dir.stat().st_mode)
    sock_mode = stat.S_IMODE(sock.stat().st_mode)

    assert dir_mode == 0o700
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert sock_mode == 0o600
    assert heap_path(system.name).exists()


def test_boot_refuses_a_second_boot_of_a_running_system(system: System) -> None:
    before = system.ps()

    done = system.cli("boot", str(system.manifest), "--detach")

    assert done.returncode == 1
    assert "running" in done.stderr
    after = system.ps()
    assert after["kernel"] == before["kernel"]
    assert [p["pid"] for p in after["procs"]] == [p["pid"] for p in before["procs"]]


def test_shutdown_removes_heap_socket_and_processes(
    boot: Callable[..., System],
) -> None:
    s = boot("down", SERVICES)
    kernel = s.kernel_pid()
    pids = s.pids("kv") + s.pids("echo")
    forkserver = parent_of(pids[0])

    done = s.cli("shutdown")

    assert done.returncode == 0
    assert "shut down" in done.stdout
    assert not (s.dir / "control.sock").exists()
    assert not heap_path(s.name).exists()
    for pid in [kernel, forkserver, *pids]:
        wait_until(lambda pid=pid: not alive(pid), f"process {pid} to exit")


def test_kernel_killed_takes_every_process_down_and_reboot_cleans_up(
    boot: Callable[..., System],
) -> None:
    s = boot("killed", SERVICES)
    kernel = s.kernel_pid()
    pids = s.pids("kv") + s.pids("echo")
    forkserver = parent_of(pids[0])

    os.kill(kernel, signal.SIGKILL)

    for pid in [kernel, forkserver, *pids]:
        wait_until(lambda pid=pid: not alive(pid), f"process {pid} to die")
    rebooted = s.cli("boot", str(s.manifest), "--detach")
    assert rebooted.returncode == 0, rebooted.stderr
    assert s.kernel_pid() != kernel
    assert f"removed heap sys-{s.name} left by a previous kernel" in s.kernel_log()
    put = s.cli("call", "kv.put", "k", "v")
    assert (put.returncode, put.stdout) == (0, "true\n")
    assert s.cli("call", "kv.get", "k").stdout == "v\n"


def test_fork_server_killed_shuts_the_system_down_cleanly(
    boot: Callable[..., System],
) -> None:
    s = boot("fsdied", SERVICES)
    kernel = s.kernel_pid()
    pids = s.pids("kv") + s.pids("echo")
    forkserver = parent_of(pids[0])

    os.kill(forkserver, signal.SIGKILL)

    for pid in [kernel, *pids]:
        wait_until(lambda pid=pid: not alive(pid), f"process {pid} to exit")
    assert "the fork server died; shutting the system down" in s.kernel_log()
    assert not (s.dir / "control.sock").exists()
    assert not heap_path(s.name).exists()


def test_kernel_killed_reboot_leaves_an_outside_client_alive(
    boot: Callable[..., System],
) -> None:
    s = boot("client", SERVICES)
    script = (
        "import sys, llmasos\n"
        "print(llmasos.connect('kv').put('c', 1), flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**s.env, "LLMASOS_SYSTEM": s.name}
    client = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == "True\n"
        assert s.cli("restart", "kv").returncode == 0  # the kernel saves its state
        kernel = s.kernel_pid()

        os.kill(kernel, signal.SIGKILL)
        wait_until(lambda: not alive(kernel), f"kernel {kernel} to die")
        rebooted = s.cli("boot", str(s.manifest), "--detach")

        assert rebooted.returncode == 0, rebooted.stderr
        assert client.poll() is None, "the reboot killed a client of the old kernel"
    finally:
        client.kill()
        client.communicate()
