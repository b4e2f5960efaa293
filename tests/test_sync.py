"""Locks, semaphores and events shared by processes, and what happens when a
holder is killed."""

from __future__ import annotations

import os
import signal
from functools import partial

import pytest

import llmasos
from conftest import Children, asleep, wait_until
from llmasos.errors import InvalidHandle


class Signal:
    """A one-way pipe from children to the parent, one byte per event."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self) -> None:
        os.write(self.w, b"x")

    def wait(self, what: str) -> None:
        """Wait for one byte; a child that died first leaves EOF only once
        every copy of the write end is gone, so the parent closes its own."""
        if self.w >= 0:
            os.close(self.w)
            self.w = -1
        assert os.read(self.r, 1) == b"x", f"a child died before {what}"


def test_lock_excludes_other_processes(heap: llmasos.Heap, children: Children) -> None:
    lock = llmasos.Lock.create(heap)
    counter = heap.malloc(8)
    rounds = 300

    def worker() -> None:
        mine = llmasos.Lock.open(heap, lock.handle)
        with memoryview(heap.open(counter.handle)) as shared:
            for _ in range(rounds):
                with mine:
                    value = int.from_bytes(shared[:8], "little")
                    os.sched_yield()
                    shared[:8] = (value + 1).to_bytes(8, "little")

    pids = [children.fork(worker) for _ in range(3)]

    for pid in pids:
        assert children.join(pid, "a worker to finish") == 0
    with memoryview(counter) as shared:
        assert int.from_bytes(shared[:8], "little") == 3 * rounds
    heap.free(counter)


def hold_for_ever(lock: llmasos.Lock, held: Signal) -> None:
    """A child's body: take lock, say so, and wait to be killed."""
    lock.acquire()
    held.send()
    signal.pause()


def test_lock_of_a_killed_holder_goes_to_the_next_acquirer(
    heap: llmasos.Heap, children: Children
) -> None:
    lock = llmasos.Lock.create(heap)
    held = Signal()
    holder = partial(hold_for_ever, lock, held)

    pid = children.fork(holder)
    held.wait("taking the lock")
    children.kill(pid)

    assert lock.acquire(timeout=30)
    assert lock.owner_died
    lock.release()
    assert lock.acquire(timeout=30)
    assert not lock.owner_died
    lock.release()


def test_lock_waiter_gets_it_when_the_holder_is_killed(
    heap: llmasos.Heap, children: Children
) -> None:
    lock = llmasos.Lock.create(heap)
    held = Signal()
    holder = partial(hold_for_ever, lock, held)

    def waiter() -> None:
        mine = llmasos.Lock.open(heap, lock.handle)
        assert mine.acquire()
        assert mine.owner_died
        mine.release()

    holder_pid = children.fork(holder)
    held.wait("taking the lock")
    waiter_pid = children.fork(waiter)
    wait_until(lambda: asleep(waiter_pid), "the waiter to block")

    children.kill(holder_pid)

    assert children.join(waiter_pid, "the waiter to get the lock") == 0


def test_lock_acquire_times_out_while_another_process_holds_it(
    heap: llmasos.Heap, children: Children
) -> None:
    lock = llmasos.Lock.create(heap)
    held, go = Signal(), Signal()

    def holder() -> None:
        mine = llmasos.Lock.open(heap, lock.handle)
        mine.acquire()
        held.send()
        os.read(go.r, 1)
        mine.release()

    pid = children.fork(holder)
    held.wait("taking the lock")

    assert lock.acquire(timeout=0.05) is False
    assert lock.acquire(timeout=0) is False
    go.send()
    assert children.join(pid, "the holder to release") == 0
    assert lock.acquire(timeout=30) is True
    assert not lock.owner_died
    lock.release()


def test_lock_open_in_another_process_is_the_same_lock(
    heap: llmasos.Heap, children: Children
) -> None:
    lock = llmasos.Lock.create(heap)
    lock.acquire()
    refused = Signal()

    def other() -> None:
        mine = llmasos.Lock.open(heap, lock.handle)
        assert isinstance(mine, llmasos.Lock)
        assert mine.handle == lock.handle
        assert mine.acquire(timeout=0.05) is False
        refused.send()
        assert mine.acquire(timeout=30) is True
        mine.release()

    pid = children.fork(other)
    refused.wait("trying the lock")
    lock.release()

    assert children.join(pid, "the other process to take the lock") == 0


def test_lock_release_by_a_non_holder_raises_runtime_error(
    heap: llmasos.Heap, children: Children
) -> None:
    lock = llmasos.Lock.create(heap)

    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()

    lock.acquire()
    pid = children.fork(lambda: pytest.raises(RuntimeError, lock.release))
    assert children.join(pid, "the child to try a release") == 0
    lock.release()


@pytest.mark.parametrize("timeout", [None, 5.0, 0.0], ids=["forever", "5s", "0s"])
def test_lock_acquire_twice_raises_runtime_error(
    heap: llmasos.Heap, timeout: float | None
) -> None:
    lock = llmasos.Lock.create(heap)
    lock.acquire()

    with pytest.raises(RuntimeError, match="not reentrant"):
        lock.acquire(timeout=timeout)

    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_semaphore_counts_units_across_processes(
    heap: llmasos.Heap, children: Children
) -> None:
    sem = llmasos.Semaphore.create(heap, 2)
    took = Signal()

    def taker() -> None:
        mine = llmasos.Semaphore.open(heap, sem.handle)
        assert mine.acquire(timeout=30)
        took.send()
        assert mine.acquire(timeout=30)

    assert sem.acquire(timeout=30)
    pid = children.fork(taker)
    took.wait("taking a unit")
    assert sem.value == 0
    assert sem.acquire(timeout=0.05) is False
    wait_until(lambda: asleep(pid), "the taker to block")

    sem.release()

    assert children.join(pid, "the taker to get the unit") == 0
    assert sem.value == 0


def test_semaphore_units_of_a_killed_holder_return_on_reclaim(
    heap: llmasos.Heap, children: Children
) -> None:
    sem = llmasos.Semaphore.create(heap, 3)
    took = Signal()

    def holder() -> None:
        mine = llmasos.Semaphore.open(heap, sem.handle)
        assert mine.acquire(timeout=30)
        assert mine.acquire(timeout=30)
        took.send()
        signal.pause()

    pid = children.fork(holder)
    took.wait("taking two units")
    assert sem.acquire(timeout=30)
    assert sem.value == 0
    children.kill(pid)

    heap.reclaim(pid)

    assert sem.value == 2
    sem.release()
    assert sem.value == 3


def test_event_set_wakes_waiters_in_other_processes(
    heap: llmasos.Heap, children: Children
) -> None:
    event = llmasos.Event.create(heap)

    def waiter() -> None:
        mine = llmasos.Event.open(heap, event.handle)
        assert mine.wait() is True
        assert mine.is_set()

    waiters = [children.fork(waiter) for _ in range(2)]
    for pid in waiters:
        wait_until(lambda pid=pid: asleep(pid), "a waiter to block")

    setter = children.fork(lambda: llmasos.Event.open(heap, event.handle).set())

    assert children.join(setter, "the setter to exit") == 0
    for pid in waiters:
        assert children.join(pid, "a waiter to wake") == 0
    assert event.is_set()


def test_event_wait_returns_false_until_set(heap: llmasos.Heap) -> None:
    event = llmasos.Event.create(heap)

    assert event.wait(timeout=0.05) is False
    assert event.wait(timeout=0) is False
    assert not event.is_set()

    event.set()
    assert event.wait(timeout=0) is True
    event.clear()
    assert event.wait(timeout=0) is False


@pytest.mark.parametrize(
    "handle", [0, 1, 12345, (7 << 32) | 3, 0xFFFF_FFFF_FFFF_FFFF], ids=hex
)
def test_lock_open_of_a_bad_handle_raises_invalid_handle(
    heap: llmasos.Heap, handle: int
) -> None:
    with pytest.raises(InvalidHandle):
        llmasos.Lock.open(heap, handle)


def test_lock_open_of_another_kind_raises_invalid_handle(heap: llmasos.Heap) -> None:
    sem = llmasos.Semaphore.create(heap)

    with pytest.raises(InvalidHandle):
        llmasos.Lock.open(heap, sem.handle)

    with pytest.raises(InvalidHandle):
        llmasos.Event.open(heap, sem.handle)


@pytest.mark.parametrize(
    "kind", [llmasos.Lock, llmasos.Semaphore, llmasos.Event], ids=lambda k: k.__name__
)
def test_sync_destroyed_cannot_be_opened(heap: llmasos.Heap, kind: type) -> None:
    before = heap.stats().syncs
    obj = kind.create(heap)
    assert heap.stats().syncs == before + 1

    obj.destroy()

    with pytest.raises(InvalidHandle):
        kind.open(heap, obj.handle)
    assert heap.stats().syncs == before
