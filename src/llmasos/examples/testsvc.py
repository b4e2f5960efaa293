"""Services for the kernel's integration tests: a probe that can block, die,
exit cleanly, hold heap memory and fork, and a service that cannot start.

They coordinate with a test through files, which both sides see without any
LLMasOS machinery in between.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import llmasos

GATE_WAIT_S = 60.0  # a probe waiting on a gate gives up after this long


def _wait_for(path: str) -> bool:
    """Wait until path exists; False if it did not within GATE_WAIT_S."""
    deadline = time.monotonic() + GATE_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class Probe:
    """A service whose methods misbehave on request."""

    def __init__(self) -> None:
        self.held: list[llmasos.Buffer] = []

    def pid(self) -> int:
        return os.getpid()

    def say(self, text: str) -> str:
        """Print text to this replica's log."""
        print(text, flush=True)
        return text

    def block(self, gate: str, started: str) -> int:
        """Say so in the directory started, wait for the file gate, return
        this replica's pid."""
        Path(started, f"{os.getpid()}.{time.monotonic_ns()}").touch()
        if not _wait_for(gate):
            raise TimeoutError(f"the gate {gate} never opened")
        return os.getpid()

    def die_once(self, marker: str) -> int:
        """Kill this process if the file marker does not exist yet (making it);
        return the pid once it does."""
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return os.getpid()
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def exit_clean(self) -> None:
        """End this replica with exit code 0."""
        os._exit(0)

    def hold(self, n: int) -> int:
        """Allocate n bytes of the system heap and keep them."""
        self.held.append(llmasos.malloc(n))
        return n

    def release(self) -> int:
        """Free every block held; return how many there were."""
        count = len(self.held)
        for buf in self.held:
            llmasos.free(buf)
        self.held.clear()
        return count

    def fork_holding(self, n: int, stop: str) -> int:
        """Fork with llmasos.fork; the child allocates n bytes and exits once
        the file stop exists.  Returns the child's pid."""
        pid = llmasos.fork()
        if pid == 0:
            code = 1
            try:
                llmasos.malloc(n)
                code = 0 if _wait_for(stop) else 2
            finally:
                os._exit(code)
        return pid

    def reap(self, pid: int) -> int:
        """Wait for a child forked by fork_holding; its exit code."""
        return llmasos.wait(pid, timeout=GATE_WAIT_S)


class Broken:
    """A service whose constructor always raises."""

    def __init__(self) -> None:
        raise RuntimeError("Broken cannot start, on purpose")
