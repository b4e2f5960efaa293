"""Fixtures that boot real systems with the real CLI and take them down.

Every system runs under a run directory of this test session (never a
user's), with a name unique to the test run.  ``boot`` starts systems for
one test; modules whose tests leave each other alone share one through a
module-scoped fixture of their own around ``running``.  Taking a system down
asks its kernel to shut down, and, as a last resort, kills the kernel and
removes its heap.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmasos
from conftest import wait_until
from llmasos import control

WATCHDOG_S = 60.0
CLI_TIMEOUT_S = 120.0
_names = itertools.count()


def unique_system(tag: str) -> str:
    """A system name of at most 32 characters, unique to this test run."""
    return f"k{os.getpid() % 100000}-{tag[:16]}-{next(_names)}"


def alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def heap_path(system: str) -> Path:
    return Path(f"/dev/shm/llmasos.sys-{system}")


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m llmasos.cli ARGS``; its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "llmasos.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_S,
    )


class System:
    """A booted system as a test sees it: its CLI, process table and files."""

    def __init__(self, name: str, root: Path, manifest: Path) -> None:
        self.name = name
        self.root = root
        self.manifest = manifest
        self.dir = root / name
        self.env = {**os.environ, control.RUN_DIR_ENV: str(root)}
        self.env.pop(llmasos.HEAP_ENV, None)
        self.env.pop(control.SYSTEM_ENV, None)
        self._heap: llmasos.Heap | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run an llmasos command; all but boot talk to this system through
        $LLMASOS_SYSTEM (a kernel is booted as a user would, without it)."""
        env = self.env
        if args[0] != "boot":
            env = {**env, control.SYSTEM_ENV: self.name}
        return run_cli(*args, env=env)

    def connect(self, service: str, **kw: Any) -> llmasos.client.ServiceProxy:
        """A proxy to service of this system, named (see
        test_call_connect_follows_the_system_named_in_the_environment)."""
        return llmasos.connect(service, self.name, **kw)

    @property
    def heap(self) -> llmasos.Heap:
        """The system's heap, attached by this process on first use."""
        if self._heap is None:
            hello = control.request("hello", system=self.name)
            self._heap = llmasos.Heap.attach(hello["heap"])
        return self._heap

    def ps(self) -> dict[str, Any]:
        return control.request("ps", system=self.name)

    def kernel_pid(self) -> int:
        return self.ps()["kernel"]

    def replicas(self, service: str) -> list[dict[str, Any]]:
        """The rows of service's replicas, by replica index."""
        rows = [
            r
            for r in self.ps()["procs"]
            if r["kind"] == "replica" and r["service"] == service
        ]
        return sorted(rows, key=lambda r: r["replica"])

    def pids(self, service: str) -> list[int]:
        return [r["pid"] for r in self.replicas(service)]

    def ready_pids(self, service: str) -> list[int]:
        return [r["pid"] for r in self.replicas(service) if r["state"] == "ready"]

    def wait_ready(self, service: str, count: int) -> list[int]:
        """Wait until service has count ready replicas; their pids."""
        wait_until(
            lambda: len(self.ready_pids(service)) == count,
            f"{count} ready replicas of {service}",
            WATCHDOG_S,
        )
        return self.ready_pids(service)

    def kernel_log(self) -> str:
        return (self.dir / "kernel.log").read_text()

    def wait_log(self, text: str) -> None:
        wait_until(lambda: text in self.kernel_log(), f"{text!r} in the kernel log")

    def take_down(self) -> None:
        """Shut the system down; kill the kernel and remove the heap if that
        fails.  Raises if the kernel had to be killed."""
        try:
            kernel = self.kernel_pid()
        except llmasos.LLMasOSError:
            kernel = 0  # not running (a test killed it, or it never booted)
        problem = ""
        if self._heap is not None:
            self._heap.close()
        if kernel:
            done = self.cli("shutdown", "--system", self.name)
            try:
                wait_until(lambda: not alive(kernel), f"kernel {kernel} to exit")
            except AssertionError:
                os.kill(kernel, signal.SIGKILL)
                problem = f"shutdown left the kernel running: {done.stderr}"
        heap_path(self.name).unlink(missing_ok=True)
        if problem:
            raise AssertionError(problem)


def write_manifest(directory: Path, name: str, services: str, **system: str) -> Path:
    """A manifest of system name with the given [services...] tables."""
    settings = {"heap_size": '"32MiB"', **system}
    lines = [f'name = "{name}"', *(f"{k} = {v}" for k, v in settings.items())]
    text = "[system]\n" + "\n".join(lines) + "\n\n" + textwrap.dedent(services)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def boot_system(
    directory: Path,
    root: Path,
    tag: str,
    services: str,
    may_fail: tuple[str, ...] = (),
    **system: str,
) -> System:
    """Boot a system with the CLI (``boot --detach``); fails the test if the
    boot fails, unless only the services in may_fail did (boot then exits 1
    and names them)."""
    name = unique_system(tag)
    sys_ = System(name, root, write_manifest(directory, name, services, **system))
    booted = sys_.cli("boot", str(sys_.manifest), "--detach")
    failed_as_allowed = may_fail and booted.stderr.rstrip().endswith(
        "these services failed: "
        + ", ".join(may_fail)
        + f"; see 'llmasos logs SERVICE --system {name}'"
    )
    if booted.returncode != 0 and not failed_as_allowed:
        sys_.take_down()
        raise AssertionError(f"boot of {name} failed: {booted.stderr}")
    return sys_


@pytest.fixture(scope="package")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run directory of every system of these tests, in this process's
    environment too, so that ``llmasos.connect`` looks there."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(control.RUN_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="package", autouse=True)
def _no_heap_of_ours_left(run_root: Path) -> Iterator[None]:
    """Fail the run if a system's heap outlives its system."""
    yield
    prefix = f"llmasos.sys-k{os.getpid() % 100000}-"
    left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    for n in left:
        os.unlink(os.path.join("/dev/shm", n))
    assert not left, f"heaps left over by the kernel tests (now removed): {left}"


def forget_heap(sys_: System) -> None:
    """Drop the heap of sys_ that calls made this process attach, so that the
    next system's calls attach their own."""
    if os.environ.get(llmasos.HEAP_ENV) == f"sys-{sys_.name}":
        llmasos.use_heap(None)


@contextlib.contextmanager
def running(
    directory: Path,
    root: Path,
    tag: str,
    services: str,
    may_fail: tuple[str, ...] = (),
    **system: str,
) -> Iterator[System]:
    """A booted system, the system of this process while it runs."""
    with pytest.MonkeyPatch.context() as mp:
        sys_ = boot_system(directory, root, tag, services, may_fail, **system)
        mp.setenv(control.SYSTEM_ENV, sys_.name)
        try:
            yield sys_
        finally:
            forget_heap(sys_)
            sys_.take_down()


@pytest.fixture
def boot(tmp_path: Path, run_root: Path) -> Iterator[Callable[..., System]]:
    """Boot systems for one test: ``boot(tag, services, **system)``; the
    last one booted is this process's system.  All are taken down after."""
    with contextlib.ExitStack() as stack:

        def start(tag: str, services: str, **system: str) -> System:
            return stack.enter_context(
                running(tmp_path, run_root, tag, services, **system)
            )

        yield start
