"""Locks, semaphores and events shared by the processes of a heap.

Each lives in the heap's sync table and is opened in another process by its
``handle``: ``Lock.open(heap, handle)``.

``Lock`` is robust: when its holder dies (even by SIGKILL) the next
``acquire`` gets it and returns normally, with ``lock.owner_died`` set to
True until the next acquire, so the caller can repair what the lock
protects.  It is not reentrant, and only the thread that acquired it may
release it.  ``Semaphore`` remembers which processes hold its units and gets
them back when a dead holder is reclaimed.  ``Event`` is a flag to wait on.
"""

from __future__ import annotations

from llmasos import _core


class _Sync(_core.Sync):
    _kind = 0

    @classmethod
    def open(cls, heap: _core.Heap, handle: int):  # type: ignore[no-untyped-def]
        """Open the object ``handle`` of ``heap`` in this process."""
        return cls._open(heap, handle, cls._kind)


class Lock(_Sync):
    """A robust mutual-exclusion lock across processes and threads."""

    _kind = _core.SYNC_LOCK
    owner_died = False

    @classmethod
    def create(cls, heap: _core.Heap) -> Lock:
        return cls._create(heap, cls._kind)

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock; False if ``timeout`` seconds passed first."""
        got = self._wait(timeout)
        if got is None:
            return False
        self.owner_died = bool(got)
        return True

    def release(self) -> None:
        self._post()

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Semaphore(_Sync):
    """A counting semaphore across processes and threads."""

    _kind = _core.SYNC_SEM

    @classmethod
    def create(cls, heap: _core.Heap, value: int = 1) -> Semaphore:
        return cls._create(heap, cls._kind, value)

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a unit; False if ``timeout`` seconds passed first."""
        return self._wait(timeout) is not None

    def release(self) -> None:
        self._post()

    @property
    def value(self) -> int:
        return int(self._value())

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Event(_Sync):
    """A flag that processes and threads wait on until it is set."""

    _kind = _core.SYNC_EVENT

    @classmethod
    def create(cls, heap: _core.Heap) -> Event:
        return cls._create(heap, cls._kind)

    def set(self) -> None:
        self._post()

    def clear(self) -> None:
        self._clear()

    def is_set(self) -> bool:
        return bool(self._value())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set; False if ``timeout`` seconds passed first."""
        return self._wait(timeout) is not None
