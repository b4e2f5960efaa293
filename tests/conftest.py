"""Shared fixtures: heaps with unique names, removed after each test, and a
check at the end of the run that no shared memory of ours is left over."""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Callable, Iterator

import pytest

import llmasos

PREFIX = f"t{os.getpid()}-"
_counter = iter(range(10**9))


def unique_name(tag: str = "heap") -> str:
    return f"{PREFIX}{tag}-{next(_counter)}"


@pytest.fixture
def heap() -> Iterator[llmasos.Heap]:
    h = llmasos.Heap.create(16 << 20, name=unique_name())
    yield h
    name = h.name
    if not h.closed:
        h.destroy()
    llmasos.heap.unlink(name)


@pytest.fixture
def make_heap() -> Iterator[Callable[..., llmasos.Heap]]:
    made: list[str] = []

    def make(size: int = 16 << 20, **kw: object) -> llmasos.Heap:
        h = llmasos.Heap.create(size, name=unique_name(), **kw)  # type: ignore[arg-type]
        made.append(h.name)
        return h

    yield make
    for name in made:
        llmasos.heap.unlink(name)


def wait_until(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait for cond() to hold, failing with what after timeout (a watchdog,
    not a measurement)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def fork_child(body: Callable[[], object]) -> int:
    """Run body in a forked child that exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def kill_and_wait(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Children:
    """Forked children of one test; those not joined are killed at its end."""

    def __init__(self) -> None:
        self.live: list[int] = []

    def fork(self, body: Callable[[], object]) -> int:
        pid = fork_child(body)
        self.live.append(pid)
        return pid

    def receiver(
        self,
        heap: llmasos.Heap,
        body: Callable[[llmasos.Channel], object],
        **create: int,
    ) -> tuple[int, int]:
        """Fork a child that makes a channel and runs body on it; returns the
        child's pid and the channel's handle."""
        r, w = os.pipe()

        def child() -> None:
            ch = llmasos.Channel.create(heap, **create)
            os.write(w, ch.handle.to_bytes(8, "little"))
            body(ch)

        pid = self.fork(child)
        os.close(w)
        data = os.read(r, 8)
        os.close(r)
        assert len(data) == 8, "the receiver failed to make its channel"
        return pid, int.from_bytes(data, "little")

    def join(self, pid: int, what: str) -> int:
        """Wait for pid to exit (a watchdog); its exit code."""
        return self.join_usage(pid, what)[0]

    def join_usage(self, pid: int, what: str) -> tuple[int, resource.struct_rusage]:
        """Wait for pid to exit (a watchdog); its exit code and rusage."""
        done: list[tuple[int, int, resource.struct_rusage]] = []

        def exited() -> bool:
            got = os.wait4(pid, os.WNOHANG)
            if got[0] == pid:
                done.append(got)
            return bool(done)

        wait_until(exited, what)
        self.live.remove(pid)
        return os.waitstatus_to_exitcode(done[0][1]), done[0][2]

    def kill(self, pid: int) -> None:
        kill_and_wait(pid)
        self.live.remove(pid)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    yield kids
    for pid in kids.live:
        kill_and_wait(pid)


def asleep(pid: int) -> bool:
    """True while pid sleeps in the kernel (state S in /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"llmasos.{PREFIX}")]
    if left:
        for n in left:
            os.unlink(os.path.join("/dev/shm", n))
        session.exitstatus = 1
        print(f"\nshared memory left over by the tests (now removed): {left}")
