"""Processes of a system: ``fork``, ``spawn``, ``wait``, ``kill``, ``getpid``.

``fork()`` keeps the POSIX contract: 0 in the child, the child's pid in the
parent, ``OSError`` when the machine cannot fork.  In a process that belongs
to a system, the parent also registers the child with the kernel, which
watches it and reclaims its heap pages when it ends, however it ends.  In a
process that belongs to no system it is a plain fork.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from llmasos import _core, control
from llmasos.errors import LLMasOSError


def getpid() -> int:
    return os.getpid()


def _register(pid: int) -> None:
    system = os.environ.get(control.SYSTEM_ENV)
    if not system:
        return
    try:
        control.request("register", system=system, pid=pid, parent=os.getpid())
    except LLMasOSError:
        pass  # the kernel is gone; nobody is left to reclaim for


def fork() -> int:
    """Fork, and register the child with the kernel of this process's system.

    In a system, the child dies with its parent (``PR_SET_PDEATHSIG``), as
    replicas die with the fork server and the fork server with the kernel:
    killing the kernel leaves no process of the system behind.
    """
    pid = os.fork()
    if pid:
        _register(pid)
    elif os.environ.get(control.SYSTEM_ENV):
        _core.set_pdeathsig(signal.SIGKILL)
    return pid


def spawn(target: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``target(*args, **kwargs)`` in a registered child; return its pid.

    The child exits 0 when target returns, 1 (printing the traceback) when it
    raises.
    """
    pid = fork()
    if pid == 0:
        code = 0
        try:
            target(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def wait(pid: int, timeout: float | None = None) -> int:
    """Wait for child pid; its exit code, or minus the signal that killed it.

    Raises ``TimeoutError`` if it is still running after ``timeout`` seconds.
    """
    if timeout is None:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"process {pid} still runs after {timeout} s")
        time.sleep(0.001)


def kill(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send sig (default SIGTERM) to pid."""
    os.kill(pid, sig)
