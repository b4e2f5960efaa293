"""Shared fixtures: heaps with unique names, removed after each test, and a
check at the end of the run that no shared memory of ours is left over."""

from __future__ import annotations

import os
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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"llmasos.{PREFIX}")]
    if left:
        for n in left:
            os.unlink(os.path.join("/dev/shm", n))
        session.exitstatus = 1
        print(f"\nshared memory left over by the tests (now removed): {left}")
