"""Crash safety: processes killed with SIGKILL at random moments.

Each test runs a bounded number of rounds.  A round forks processes that loop
on heap, channel or lock operations, SIGKILLs one or all of them 0-20 ms
later, reclaims the dead the way the kernel does, and checks that the
survivors keep working, that nothing leaks and that the heap still adds up.
Every wait has a watchdog: pipes are polled with a timeout, children die of
SIGALRM if they hang, and each test has a pytest timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.connection import Connection

import pytest

import llmasos
from conftest import PREFIX, fork_child, kill_and_wait, wait_until
from llmasos.errors import ChannelClosed

PAGE = 4096
ROUNDS = 40
WATCHDOG_S = 20.0  # the longest any single wait may take; not a measurement
CHILD_ALARM_S = 60  # a child still running after this dies of SIGALRM
MORE_STEPS = 50  # steps a survivor must complete after the kill


@pytest.fixture(scope="module", autouse=True)
def no_heap_left_behind() -> Iterator[None]:
    yield
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"llmasos.{PREFIX}")]
    assert left == [], f"heaps left in /dev/shm by {__name__}"


# ---- processes and pipes ----

_spawned: list[int] = []


@pytest.fixture(autouse=True)
def reap_children() -> Iterator[None]:
    """Kill the children a failed test left running, and reap them."""
    yield
    while _spawned:
        pid = _spawned.pop()
        try:
            running = os.waitpid(pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            continue  # reaped already: the pid is no longer ours
        if running:
            kill_and_wait(pid)


def spawn(body: Callable[[Connection], object]) -> tuple[int, Connection]:
    """Fork a child running body(conn); conn is its pipe to the test."""
    ours, theirs = multiprocessing.Pipe()

    def run() -> None:
        ours.close()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(CHILD_ALARM_S)
        body(theirs)

    pid = fork_child(run)
    _spawned.append(pid)
    theirs.close()
    return pid, ours


def expect(conn: Connection, who: object) -> object:
    """The next message on conn, failing if none comes within the watchdog."""
    if not conn.poll(WATCHDOG_S):
        raise AssertionError(f"no word from {who} within {WATCHDOG_S} s")
    try:
        return conn.recv()
    except (EOFError, OSError):
        raise AssertionError(
            f"{who} closed its pipe: it died; see its stderr"
        ) from None


def tell(conn: Connection, who: object, msg: object) -> None:
    """Send msg to a child, failing clearly if the child has died."""
    try:
        conn.send(msg)
    except OSError as exc:
        raise AssertionError(f"{who} is gone ({exc}); see its stderr") from None


def join(pid: int) -> int:
    """Wait for pid to exit, under the watchdog; its exit code."""
    codes: list[int] = []

    def gone() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
        return bool(done)

    wait_until(gone, f"process {pid} to exit", WATCHDOG_S)
    return codes[0]


def stop_and_join(kids: list[tuple[int, Connection]]) -> None:
    """Tell the kids to stop, wait for their report and their exit."""
    for pid, conn in kids:
        tell(conn, pid, "stop")
    for pid, conn in kids:
        assert expect(conn, pid) == "done"
        assert join(pid) == 0, f"survivor {pid} failed"


def run_steps(conn: Connection, step: Callable[[], object]) -> None:
    """A child's loop: run step until told "stop"; on "more", answer "alive"
    once MORE_STEPS more steps have run."""
    left = -1
    while True:
        if conn.poll():
            if conn.recv() == "stop":
                return
            left = MORE_STEPS
        step()
        left -= 1
        if left == 0:
            conn.send("alive")


def assert_nothing_leaked(heap: llmasos.Heap, what: str, channels: int = 0) -> None:
    st = heap.stats()
    assert st.pages_free + st.pages_large + st.pages_pool == st.pages_total, what
    assert st.pages_free == st.pages_total, f"{what}: pages leaked: {st}"
    assert st.blocks == 0, f"{what}: blocks leaked: {st}"
    assert (st.spans, st.orphan_spans, st.procs) == (0, 0, ()), f"{what}: {st}"
    assert st.channels == channels, f"{what}: {st}"


# ---- messages whose bytes say who sent them ----


def payload(sender: int, seq: int, size: int) -> bytes:
    """size bytes (at least 8) that say who sent them, and can be checked."""
    head = struct.pack("<ii", sender, seq)
    return (head * (size // 8 + 1))[:size]


def label(msg: bytes | llmasos.Buffer) -> tuple[int, int]:
    """(sender, seq) of a message, from its first bytes only."""
    return struct.unpack_from("<ii", msg)


def open_payload(msg: bytes | llmasos.Buffer) -> tuple[int, int]:
    """(sender, seq) of a message, after checking all of its bytes."""
    sender, seq = label(msg)
    with memoryview(msg) as m:
        assert m == payload(sender, seq, len(m)), f"message {sender}:{seq} corrupted"
    return sender, seq


def buffer_with(heap: llmasos.Heap, sender: int, seq: int, size: int):
    buf = heap.malloc(size)
    with memoryview(buf) as m:
        m[:] = payload(sender, seq, size)
    return buf


def random_size(rng: random.Random, max_pages: int = 4) -> int:
    return rng.choice(
        [rng.randint(8, 2048), PAGE, rng.randint(PAGE + 1, max_pages * PAGE)]
    )


# ---- everything at once: heap, channels and a lock ----


def churn(name: str, lock_handle: int, seed: int, conn: Connection) -> None:
    """Malloc, free, send, receive and lock at random until told to stop."""
    heap = llmasos.Heap.attach(name)
    rng, me, held = random.Random(seed), os.getpid(), []
    inbox = llmasos.Channel.create(heap, capacity=32)
    conn.send(inbox.handle)
    peers = [
        llmasos.Sender.open(heap, hd)
        for hd in expect(conn, "test")
        if hd != inbox.handle
    ]
    lock = llmasos.Lock.open(heap, lock_handle)
    seq = iter(range(10**9))

    def take(msg: bytes | llmasos.Buffer) -> None:
        open_payload(msg)
        if isinstance(msg, llmasos.Buffer):
            assert msg.owner == me
            held.append(msg)

    def step() -> None:
        r = rng.random()
        if r < 0.3:
            held.append(buffer_with(heap, me, next(seq), random_size(rng)))
        elif r < 0.5 and held:
            heap.free(held.pop(rng.randrange(len(held))))
        elif r < 0.75:
            msg = (
                held.pop()
                if held and r < 0.6
                else payload(me, next(seq), rng.randint(8, 200))
            )
            try:
                rng.choice(peers).send(msg, timeout=0.02)
            except (TimeoutError, ChannelClosed):
                if isinstance(msg, llmasos.Buffer):
                    held.append(msg)
        elif r < 0.9:
            for _ in range(4):
                try:
                    take(inbox.recv_nowait())
                except BlockingIOError:
                    break
        elif r < 0.98:
            if lock.acquire(timeout=0.05):
                lock.release()
        else:
            heap.trim()
        while len(held) > 40:
            heap.free(held.pop(0))

    conn.send("ready")
    run_steps(conn, step)
    while True:
        try:
            take(inbox.recv_nowait())
        except BlockingIOError:
            break
    inbox.destroy()
    for buf in held:
        heap.free(buf)
    heap.trim()
    conn.send("done")


@pytest.mark.timeout(120)
def test_crash_killed_churners_are_reclaimed_and_survivors_go_on(
    heap: llmasos.Heap,
) -> None:
    lock = llmasos.Lock.create(heap)
    for rnd in range(ROUNDS):
        rng = random.Random(rnd)
        kids = [
            spawn(partial(churn, heap.name, lock.handle, rng.getrandbits(32)))
            for _ in range(3)
        ]
        inboxes = [expect(conn, pid) for pid, conn in kids]
        for pid, conn in kids:
            tell(conn, pid, inboxes)
        assert [expect(conn, pid) for pid, conn in kids] == ["ready"] * 3

        time.sleep(rng.uniform(0, 0.02))  # a random moment to kill at
        victims = kids if rng.random() < 0.4 else [rng.choice(kids)]
        for pid, _ in victims:
            kill_and_wait(pid)
        for pid, _ in victims:
            heap.reclaim(pid)
        survivors = [k for k in kids if k not in victims]
        for pid, conn in survivors:
            tell(conn, pid, "more")
        for pid, conn in survivors:
            assert expect(conn, pid) == "alive"
        stop_and_join(survivors)

        what = f"round {rnd}, {len(victims)} killed"
        assert heap.stats().blocks == 0, f"{what}: blocks left before reclaim"
        for pid, _ in survivors:
            heap.reclaim(pid)
        assert lock.acquire(timeout=WATCHDOG_S), f"{what}: the lock is wedged"
        lock.release()
        assert_nothing_leaked(heap, what)


# ---- a lock whose holder dies inside its critical section ----


def hold_lock_for_ever(name: str, lock_handle: int, conn: Connection) -> None:
    heap = llmasos.Heap.attach(name)
    lock = llmasos.Lock.open(heap, lock_handle)
    counter = heap.malloc(8)
    assert lock.acquire(timeout=WATCHDOG_S)
    conn.send("in")
    with memoryview(counter) as m:
        while True:  # the section: updates what the lock protects, never ends
            m[0] = (m[0] + 1) % 256


def wait_for_lock(name: str, lock_handle: int, conn: Connection) -> None:
    heap = llmasos.Heap.attach(name)
    lock = llmasos.Lock.open(heap, lock_handle)
    conn.send("waiting")
    got = lock.acquire(timeout=WATCHDOG_S)
    conn.send((got, lock.owner_died))
    lock.release()


@pytest.mark.timeout(60)
def test_crash_lock_holder_killed_mid_section_next_holder_sees_owner_died(
    heap: llmasos.Heap,
) -> None:
    lock = llmasos.Lock.create(heap)
    for rnd in range(ROUNDS):
        rng = random.Random(rnd)
        holder, holder_conn = spawn(partial(hold_lock_for_ever, heap.name, lock.handle))
        assert expect(holder_conn, holder) == "in"
        waiter = (
            spawn(partial(wait_for_lock, heap.name, lock.handle)) if rnd % 2 else None
        )
        if waiter:
            assert expect(waiter[1], waiter[0]) == "waiting"

        time.sleep(rng.uniform(0, 0.02))  # a random moment to kill at
        kill_and_wait(holder)
        heap.reclaim(holder)

        if waiter:
            assert expect(waiter[1], waiter[0]) == (True, True), f"round {rnd}"
            assert join(waiter[0]) == 0
            assert lock.acquire(timeout=WATCHDOG_S)
            assert not lock.owner_died, f"round {rnd}: released normally"
        else:
            assert lock.acquire(timeout=WATCHDOG_S)
            assert lock.owner_died, f"round {rnd}: the holder was killed"
        lock.release()
        assert_nothing_leaked(heap, f"round {rnd}")


# ---- a heap whose free runs are slow to search ----

HOLES = 2500  # free runs of 2 pages that every 3-page malloc looks through


def fragment(heap: llmasos.Heap) -> list:
    """Leave HOLES free runs of two pages, each behind a pinned page, so
    that a malloc of three pages scans them all holding the heap lock."""
    pins, holes = [], []
    for _ in range(HOLES):
        holes.append(heap.malloc(2 * PAGE))
        pins.append(heap.malloc(PAGE))
    for hole in holes:
        heap.free(hole)
    return pins


def assert_as_before(heap: llmasos.Heap, base: llmasos.HeapStats, what: str) -> None:
    st = heap.stats()
    assert st.pages_free + st.pages_large + st.pages_pool == st.pages_total, what
    assert (st.pages_free, st.blocks, st.spans, st.channels, st.procs) == (
        base.pages_free,
        base.blocks,
        base.spans,
        base.channels,
        base.procs,
    ), f"{what}: {st}"


def unpin(heap: llmasos.Heap, pins: list) -> None:
    """Free the pins; then the heap must be one free run again."""
    for pin in pins:
        heap.free(pin)
    assert_nothing_leaked(heap, "after the last round")
    st = heap.stats()
    assert st.largest_free_run == st.pages_total, "free runs left unmerged"
    heap.free(heap.malloc(st.pages_total * PAGE))


# ---- senders killed in the middle of a send ----

SLOT = 16384  # big slots: a send copies up to 16 KiB holding the send lock


def send_numbered(name: str, chan: int, me: int, seed: int, conn: Connection) -> None:
    """Send numbered messages, bytes and buffers by turns, until told to
    stop; then send the end mark (seq -1)."""
    heap = llmasos.Heap.attach(name)
    tx, rng = llmasos.Sender.open(heap, chan), random.Random(seed)
    seq, msg = 0, None

    def step() -> None:
        nonlocal seq, msg
        r = rng.random()
        if msg is None and r < 0.4:
            msg = payload(me, seq, rng.randint(8, tx.max_inline))
        elif msg is None:
            size = 3 * PAGE if r < 0.8 else random_size(rng, 8)
            msg = buffer_with(heap, me, seq, size)
        try:
            tx.send(msg, timeout=0.01)
        except TimeoutError:
            return  # the same message again next step
        seq, msg = seq + 1, None

    conn.send("ready")
    run_steps(conn, step)
    if isinstance(msg, llmasos.Buffer):
        heap.free(msg)
    tx.send(payload(me, -1, 8), timeout=WATCHDOG_S)
    conn.send("done")


def recv_until(
    rx: llmasos.Channel, got: dict, done: Callable[[], bool], senders: list[int]
) -> None:
    """Receive into got (sender -> list of messages) until done(); the
    processes senders must stay alive meanwhile."""
    deadline = time.monotonic() + WATCHDOG_S
    while not done():
        try:
            msg = rx.recv(timeout=0.005)
        except TimeoutError:
            msg = None
        if msg is not None:
            got[label(msg)[0]].append(msg)
            continue
        for pid in senders:
            assert os.waitpid(pid, os.WNOHANG)[0] == 0, f"sender {pid} died"
        assert time.monotonic() < deadline, "the channel is wedged"


def kill_a_sender_midway(
    heap: llmasos.Heap, rx: llmasos.Channel, rng: random.Random
) -> tuple[int, dict[int, list]]:
    """Run two senders into rx, kill one at a random moment, reclaim it,
    receive MORE_STEPS messages more from the other, then stop that one.
    Returns the victim's number and the messages of each sender."""
    kids = [
        spawn(partial(send_numbered, heap.name, rx.handle, k, rng.getrandbits(32)))
        for k in range(2)
    ]
    assert [expect(conn, pid) for pid, conn in kids] == ["ready"] * 2
    got: dict[int, list] = {0: [], 1: []}
    victim = rng.randrange(2)
    (dead, _), (alive, alive_conn) = kids[victim], kids[1 - victim]
    theirs = got[1 - victim]

    kill_at = time.monotonic() + rng.uniform(0, 0.02)
    recv_until(rx, got, lambda: time.monotonic() >= kill_at, [dead, alive])
    kill_and_wait(dead)
    heap.reclaim(dead)
    since = len(theirs)
    recv_until(rx, got, lambda: len(theirs) >= since + MORE_STEPS, [alive])
    tell(alive_conn, alive, "stop")
    recv_until(rx, got, lambda: label(theirs[-1])[1] == -1, [])
    assert expect(alive_conn, alive) == "done"
    assert join(alive) == 0
    heap.reclaim(alive)
    theirs.pop()  # the end mark
    return victim, got


@pytest.mark.timeout(120)
def test_crash_sender_killed_mid_send_never_wedges_the_channel(make_heap) -> None:
    heap, me = make_heap(64 << 20), os.getpid()
    pins = fragment(heap)  # a malloc of 3 pages holds the heap lock a while
    base = heap.stats()
    for rnd in range(ROUNDS):
        rx = llmasos.Channel.create(heap, capacity=64, slot_size=SLOT)

        victim, got = kill_a_sender_midway(heap, rx, random.Random(rnd))

        what = f"round {rnd}, sender {victim} killed"
        for k in (0, 1):
            seqs = [open_payload(m)[1] for m in got[k]]
            assert seqs == list(range(len(seqs))), f"{what}: sender {k} out of order"
        with pytest.raises(BlockingIOError):
            rx.recv_nowait()
        for msg in got[0] + got[1]:
            if isinstance(msg, llmasos.Buffer):
                assert msg.owner == me, what
                heap.free(msg)
        rx.destroy()
        heap.trim()
        assert_as_before(heap, base, what)

    unpin(heap, pins)
    heap.destroy()


# ---- the heap lock's holder killed in the middle of an operation ----


def large_churn(name: str, seed: int, conn: Connection) -> None:
    """Malloc and free page runs (each takes the heap lock) in a tight loop,
    with stats and trim now and then; check each block's ends at its free."""
    heap = llmasos.Heap.attach(name)
    rng, me, held = random.Random(seed), os.getpid(), []
    seq = iter(range(10**9))

    def free_one(k: int) -> None:
        buf, tag = held.pop(k)
        with memoryview(buf) as m:
            assert bytes(m[:8]) == bytes(m[-8:]) == tag
        heap.free(buf)

    def step() -> None:
        r = rng.random()
        if r < 0.45 or not held:
            pages = 3 if r < 0.4 else rng.randint(4, 32)
            buf = heap.malloc(pages * PAGE - rng.randrange(PAGE))
            tag = struct.pack("<ii", me, next(seq))
            with memoryview(buf) as m:
                m[:8] = m[-8:] = tag
            held.append((buf, tag))
        elif r < 0.95:
            free_one(rng.randrange(len(held)))
        elif r < 0.99:
            heap.stats()
        else:
            heap.trim()
        while len(held) > 8:
            free_one(0)

    conn.send("ready")
    run_steps(conn, step)
    while held:
        free_one(0)
    conn.send("done")


@pytest.mark.timeout(120)
def test_crash_heap_lock_holder_killed_mid_operation_is_repaired(make_heap) -> None:
    heap = make_heap(64 << 20)
    pins = fragment(heap)
    base = heap.stats()
    for rnd in range(ROUNDS):
        rng = random.Random(rnd)
        kids = [
            spawn(partial(large_churn, heap.name, rng.getrandbits(32)))
            for _ in range(3)
        ]
        assert [expect(conn, pid) for pid, conn in kids] == ["ready"] * 3

        time.sleep(rng.uniform(0, 0.02))  # a random moment to kill at
        victims = kids if rng.random() < 0.4 else [rng.choice(kids)]
        for pid, _ in victims:
            kill_and_wait(pid)
        st = heap.stats()  # takes the heap lock: repairs it if a victim held it

        what = f"round {rnd}, {len(victims)} killed"
        assert st.pages_free + st.pages_large + st.pages_pool == st.pages_total, what
        assert sum(p.pages for p in st.procs) == st.pages_large + st.pages_pool, what
        assert st.blocks_small == 0 and st.spans == 0, what
        survivors = [k for k in kids if k not in victims]
        for pid, conn in survivors:
            tell(conn, pid, "more")
        for pid, conn in survivors:
            assert expect(conn, pid) == "alive", what
        for pid, _ in victims:
            heap.reclaim(pid)
        stop_and_join(survivors)
        assert_as_before(heap, base, what)

    unpin(heap, pins)
    heap.destroy()


# ---- a receiver killed with blocks queued for it ----


def receive_some(name: str, seed: int, conn: Connection) -> None:
    """Receive a random number of messages, keeping some buffers, then
    stop receiving and wait to be killed."""
    heap = llmasos.Heap.attach(name)
    rng, held = random.Random(seed), []
    inbox = llmasos.Channel.create(heap, capacity=64)
    conn.send(inbox.handle)
    for _ in range(rng.randint(0, 60)):
        msg = inbox.recv(timeout=WATCHDOG_S)
        open_payload(msg)
        if isinstance(msg, llmasos.Buffer) and rng.random() < 0.5:
            held.append(msg)
        elif isinstance(msg, llmasos.Buffer):
            heap.free(msg)
    signal.pause()


@pytest.mark.timeout(60)
def test_crash_receiver_killed_with_blocks_queued_reclaim_frees_them(
    heap: llmasos.Heap,
) -> None:
    me, queued = os.getpid(), 0
    for rnd in range(ROUNDS):
        rng = random.Random(rnd)
        pid, conn = spawn(partial(receive_some, heap.name, rng.getrandbits(32)))
        tx = llmasos.Sender.open(heap, expect(conn, pid))

        for seq in range(rng.randint(1, 60)):
            if rng.random() < 0.3:
                msg = payload(me, seq, rng.randint(8, 200))
            else:
                msg = buffer_with(heap, me, seq, random_size(rng))
            tx.send(msg, timeout=WATCHDOG_S)
        time.sleep(rng.uniform(0, 0.02))  # a random moment to kill at
        kill_and_wait(pid)
        queued += tx.stats()["queued"]
        heap.reclaim(pid)

        what = f"round {rnd}"
        assert heap.stats().blocks == 0, f"{what}: queued blocks were not freed"
        with pytest.raises(ChannelClosed):
            tx.send(b"after", timeout=WATCHDOG_S)
        heap.trim()
        assert_nothing_leaked(heap, what)
    assert queued > 0, "no round killed a receiver with messages queued"


# ---- messages of more than a slot travel in blocks ----


def send_then_exit(name: str, chan: int, conn: Connection) -> None:
    heap = llmasos.Heap.attach(name)
    tx = llmasos.Sender.open(heap, chan)
    for seq, size in enumerate([40, 1000, 30000]):
        tx.send(payload(1, seq, size), timeout=WATCHDOG_S)
    tx.send(buffer_with(heap, 1, 3, 1000), timeout=WATCHDOG_S)
    conn.send("sent")


def test_crash_big_bytes_sent_before_the_sender_died_arrive_after_reclaim(
    heap: llmasos.Heap,
) -> None:
    rx = llmasos.Channel.create(heap)
    pid, conn = spawn(partial(send_then_exit, heap.name, rx.handle))
    assert expect(conn, pid) == "sent"
    assert join(pid) == 0

    heap.reclaim(pid)  # what the kernel does when a process exits

    msgs = [rx.recv(timeout=WATCHDOG_S) for _ in range(4)]
    assert [open_payload(m) for m in msgs] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert [len(m) for m in msgs] == [40, 1000, 30000, 1000]
    heap.free(msgs[3])
    rx.destroy()
    assert_nothing_leaked(heap, "after the receiver took every message")


def sit_on_inbox(name: str, conn: Connection) -> None:
    heap = llmasos.Heap.attach(name)
    inbox = llmasos.Channel.create(heap)
    conn.send(inbox.handle)
    signal.pause()


def test_crash_receiver_killed_with_big_bytes_queued_reclaim_frees_them(
    heap: llmasos.Heap,
) -> None:
    pid, conn = spawn(partial(sit_on_inbox, heap.name))
    tx = llmasos.Sender.open(heap, expect(conn, pid))
    for seq, size in enumerate([1000, 30000]):
        tx.send(payload(0, seq, size), timeout=WATCHDOG_S)

    kill_and_wait(pid)
    heap.reclaim(pid)

    assert heap.stats().blocks == 0, "blocks queued for the dead receiver leaked"
    heap.trim()
    assert_nothing_leaked(heap, "after the receiver's reclaim")
