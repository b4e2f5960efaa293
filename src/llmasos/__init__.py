"""LLMasOS: a user-space microkernel for low-latency microservices.

The data plane, importable on its own:

- ``Heap``: a paged heap of POSIX shared memory; ``Buffer``: one block of it.
- ``Channel`` / ``Sender``: bounded MPSC queues in a heap; buffers travel by
  handle, without copying.
- ``Lock``, ``Semaphore``, ``Event``: synchronisation across processes that
  survives a holder being killed.
- ``malloc(n)`` / ``free(buf)``: the heap of the system this process belongs
  to (``NoSystem`` when it belongs to none).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from llmasos.channel import Channel, Sender
from llmasos.errors import (
    ChannelClosed,
    DoubleFree,
    HeapError,
    InvalidHandle,
    LLMasOSError,
    NoSystem,
    StaleHandle,
)
from llmasos.heap import Buffer, Heap, HeapStats
from llmasos.process import fork, getpid, kill, spawn, wait
from llmasos.sync import Event, Lock, Semaphore

if TYPE_CHECKING:
    from llmasos.client import (
        RemoteError,
        ReplicaDied,
        ServiceUnavailable,
        aconnect,
        connect,
    )

__version__ = "0.1.0"

# Service calls are imported on first use: their encoder costs a process
# that only uses the heap, or a CLI command that only asks the kernel, about
# 30 ms of start-up.
_CLIENT_NAMES = {
    "RemoteError",
    "ReplicaDied",
    "ServiceUnavailable",
    "aconnect",
    "connect",
}


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from llmasos import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmasos' has no attribute {name!r}")


HEAP_ENV = "LLMASOS_HEAP"

_system_heap: Heap | None = None


def system_heap() -> Heap:
    """The heap of the system this process belongs to, attached on first use.

    The kernel names it in the environment variable ``LLMASOS_HEAP`` of every
    process it starts; ``use_heap`` sets it by hand.  Any other process asks
    the kernel of its system (``$LLMASOS_SYSTEM``, or the only one running),
    which then reclaims what the process allocated when it exits.
    """
    global _system_heap
    if _system_heap is None or _system_heap.closed:
        name = os.environ.get(HEAP_ENV)
        if not name and _kernel_reachable():
            from llmasos import client

            return client._process(None).heap
        if not name:
            raise NoSystem(
                "this process does not belong to an LLMasOS system: no heap "
                f"is named in ${HEAP_ENV}; start it with the kernel, or call "
                "llmasos.use_heap(heap) first"
            )
        _system_heap = Heap.attach(name)
    return _system_heap


def _kernel_reachable() -> bool:
    from llmasos import control

    try:
        control.default_system()
    except NoSystem:
        return False
    return True


def use_heap(heap: Heap | None) -> None:
    """Make ``heap`` the one ``malloc`` and ``free`` use in this process."""
    global _system_heap
    _system_heap = heap
    if heap is None:
        os.environ.pop(HEAP_ENV, None)
    else:
        os.environ[HEAP_ENV] = heap.name


def malloc(n: int) -> Buffer:
    """Allocate ``n`` bytes of the system heap, owned by this process."""
    return (_system_heap or system_heap()).malloc(n)


def free(buf: Buffer) -> None:
    """Give a buffer of the system heap back."""
    (_system_heap or system_heap()).free(buf)


__all__ = [
    "RemoteError",
    "ReplicaDied",
    "ServiceUnavailable",
    "aconnect",
    "connect",
    "Buffer",
    "Channel",
    "ChannelClosed",
    "DoubleFree",
    "Event",
    "Heap",
    "HeapError",
    "HeapStats",
    "InvalidHandle",
    "LLMasOSError",
    "Lock",
    "NoSystem",
    "Semaphore",
    "Sender",
    "StaleHandle",
    "fork",
    "free",
    "getpid",
    "kill",
    "malloc",
    "spawn",
    "wait",
    "system_heap",
    "use_heap",
]
