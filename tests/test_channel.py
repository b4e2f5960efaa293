"""Channels: messages between processes, buffers moved without copying, full
and empty channels, a receiver that dies, and how receivers wait."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable

import pytest

import llmasos
from conftest import Children, asleep, wait_until
from llmasos.errors import ChannelClosed, StaleHandle

Body = Callable[[llmasos.Channel], object]


def message(i: int, size: int) -> bytes:
    """Message i of the given size, distinct for each i."""
    head = f"{i}:".encode()
    return (head * (size // len(head) + 1))[:size]


def test_channel_inline_bytes_arrive_in_order(
    heap: llmasos.Heap, children: Children
) -> None:
    ch = llmasos.Channel.create(heap, capacity=64)
    sizes = [i % (ch.max_inline + 1) for i in range(5000)]

    def sender() -> None:
        tx = llmasos.Sender.open(heap, ch.handle)
        for i, size in enumerate(sizes):
            tx.send(message(i, size))

    pid = children.fork(sender)
    got = [ch.recv(timeout=30) for _ in sizes]

    assert children.join(pid, "the sender to exit") == 0
    assert got == [message(i, size) for i, size in enumerate(sizes)]
    assert ch.stats()["sent"] == len(sizes)
    ch.destroy()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(1, id="one-byte-over"),
        pytest.param(4096, id="a-page-over"),
        pytest.param(1 << 20, id="a-megabyte-over"),
    ],
)
def test_channel_bytes_above_max_inline_arrive_whole(
    heap: llmasos.Heap, children: Children, extra: int
) -> None:
    ch = llmasos.Channel.create(heap)
    payload = random.Random(extra).randbytes(ch.max_inline + extra)
    before = heap.stats()

    pid = children.fork(lambda: ch.sender().send(payload))
    got = ch.recv(timeout=30)

    assert children.join(pid, "the sender to exit") == 0
    assert got == payload
    assert heap.stats().blocks == before.blocks
    ch.destroy()


def test_channel_large_bytes_survive_reclaim_of_their_sender(
    heap: llmasos.Heap, children: Children
) -> None:
    ch = llmasos.Channel.create(heap)
    payload = random.Random(7).randbytes(3 * ch.max_inline)
    pid = children.fork(lambda: ch.sender().send(payload))
    assert children.join(pid, "the sender to exit") == 0

    heap.reclaim(pid)

    assert ch.recv(timeout=30) == payload
    ch.destroy()


def test_channel_buffer_moves_without_copy(
    heap: llmasos.Heap, children: Children
) -> None:
    ch = llmasos.Channel.create(heap)
    r, w = os.pipe()

    def sender() -> None:
        buf = heap.malloc(3 * 4096)
        memoryview(buf)[:5] = b"moved"
        os.write(w, buf.handle.to_bytes(8, "little"))
        os.write(w, buf.address.to_bytes(8, "little"))

        llmasos.Sender.open(heap, ch.handle).send(buf)

        assert not buf.alive
        assert buf.owner == os.getppid()
        with pytest.raises(StaleHandle):
            memoryview(buf)
        with pytest.raises(StaleHandle):
            heap.free(buf)

    pid = children.fork(sender)
    os.close(w)
    handle = int.from_bytes(os.read(r, 8), "little")
    address = int.from_bytes(os.read(r, 8), "little")
    os.close(r)
    got = ch.recv(timeout=30)

    assert children.join(pid, "the sender to exit") == 0
    assert isinstance(got, llmasos.Buffer)
    assert (got.handle, got.address) == (handle, address)
    assert got.owner == os.getpid()
    assert bytes(memoryview(got)[:5]) == b"moved"
    heap.free(got)
    ch.destroy()


def test_channel_send_of_a_viewed_buffer_raises_buffer_error(
    heap: llmasos.Heap,
) -> None:
    ch = llmasos.Channel.create(heap)
    tx = ch.sender()
    buf = heap.malloc(100)
    view = memoryview(buf)

    with pytest.raises(BufferError):
        tx.send(buf)

    assert buf.alive
    assert ch.stats()["queued"] == 0
    assert ch.stats()["sent"] == 0
    view.release()
    tx.send(buf)
    heap.free(ch.recv_nowait())
    ch.destroy()


@pytest.mark.parametrize(
    "send, error",
    [
        pytest.param(lambda tx: tx.send_nowait(b"x"), BlockingIOError, id="nowait"),
        pytest.param(
            lambda tx: tx.send(b"x", block=False), BlockingIOError, id="block-false"
        ),
        pytest.param(
            lambda tx: tx.send(b"x", timeout=0.05), TimeoutError, id="timeout"
        ),
        pytest.param(lambda tx: tx.send(b"x", timeout=0), TimeoutError, id="zero"),
    ],
)
def test_channel_full_refuses_to_send(
    heap: llmasos.Heap, send: Callable[[llmasos.Sender], None], error: type
) -> None:
    ch = llmasos.Channel.create(heap, capacity=4)
    tx = ch.sender()
    for i in range(4):
        tx.send_nowait(b"%d" % i)

    with pytest.raises(error):
        send(tx)

    assert ch.stats()["queued"] == 4
    assert ch.stats()["sent"] == 4
    assert [ch.recv_nowait() for _ in range(4)] == [b"0", b"1", b"2", b"3"]
    ch.destroy()


@pytest.mark.parametrize(
    "recv, error",
    [
        pytest.param(lambda ch: ch.recv(timeout=0.05), TimeoutError, id="timeout"),
        pytest.param(lambda ch: ch.recv(timeout=0), TimeoutError, id="zero"),
        pytest.param(lambda ch: ch.recv_nowait(), BlockingIOError, id="nowait"),
    ],
)
def test_channel_empty_refuses_to_recv(
    heap: llmasos.Heap, recv: Callable[[llmasos.Channel], object], error: type
) -> None:
    ch = llmasos.Channel.create(heap)

    with pytest.raises(error):
        recv(ch)

    ch.destroy()


def test_channel_many_senders_deliver_each_message_once(
    heap: llmasos.Heap, children: Children
) -> None:
    ch = llmasos.Channel.create(heap, capacity=32)
    per_sender = 2000

    def sender(k: int) -> None:
        tx = llmasos.Sender.open(heap, ch.handle)
        for i in range(per_sender):
            tx.send(f"{k}:{i}".encode())

    pids = [children.fork(lambda k=k: sender(k)) for k in range(3)]
    got = [ch.recv(timeout=30).decode() for _ in range(3 * per_sender)]

    for pid in pids:
        assert children.join(pid, "a sender to exit") == 0
    for k in range(3):
        mine = [int(m.split(":")[1]) for m in got if m.startswith(f"{k}:")]
        assert mine == list(range(per_sender))
    with pytest.raises(BlockingIOError):
        ch.recv_nowait()
    ch.destroy()


def test_channel_killed_receiver_closes_it_for_blocked_senders(
    heap: llmasos.Heap, children: Children
) -> None:
    before = heap.stats()
    rx, handle = children.receiver(heap, lambda ch: signal.pause(), capacity=4)
    tx = llmasos.Sender.open(heap, handle)

    def sender() -> None:
        tx.send(heap.malloc(3 * 4096))
        for _ in range(3):
            tx.send(heap.malloc(100))
        with pytest.raises(ChannelClosed):
            tx.send(b"blocked")

    pid = children.fork(sender)
    wait_until(lambda: tx.stats()["queued"] == 4, "the channel to fill")
    wait_until(lambda: asleep(pid), "the sender to block")
    children.kill(rx)

    assert children.join(pid, "the blocked sender to see the channel closed") == 0
    assert tx.stats()["closed"]
    heap.reclaim(rx)
    with pytest.raises(ChannelClosed):
        tx.send(b"late", timeout=10)
    with pytest.raises(ChannelClosed):
        llmasos.Sender.open(heap, handle)
    after = heap.stats()
    assert after.proc(rx).blocks == 0
    assert after.proc(rx).pages == 0
    assert after.blocks == before.blocks
    assert after.channels == before.channels


def test_channel_reclaim_of_receiver_frees_queued_large_bytes(
    heap: llmasos.Heap, children: Children
) -> None:
    before = heap.stats()
    rx, handle = children.receiver(heap, lambda ch: signal.pause())
    tx = llmasos.Sender.open(heap, handle)
    tx.send(bytes(3 * tx.max_inline))
    children.kill(rx)

    heap.reclaim(rx)

    assert heap.stats().blocks == before.blocks


def test_channel_destroy_closes_it_and_frees_what_it_held(
    heap: llmasos.Heap,
) -> None:
    before = heap.stats()
    ch = llmasos.Channel.create(heap)
    tx = ch.sender()
    tx.send(heap.malloc(100))
    tx.send(bytes(2 * ch.max_inline))

    ch.destroy()

    with pytest.raises(ChannelClosed):
        tx.send(b"x")
    with pytest.raises(ChannelClosed):
        llmasos.Sender.open(heap, ch.handle)
    assert heap.stats().blocks == before.blocks
    assert heap.stats().channels == before.channels


@pytest.mark.parametrize(
    "handle", [0, 1, 12345, (7 << 32) | 3, 0xFFFF_FFFF_FFFF_FFFF], ids=hex
)
def test_channel_open_of_a_bogus_handle_raises_channel_closed(
    heap: llmasos.Heap, handle: int
) -> None:
    with pytest.raises(ChannelClosed):
        llmasos.Sender.open(heap, handle)


def test_channel_blocked_recv_uses_no_cpu(
    heap: llmasos.Heap, children: Children
) -> None:
    def receiver() -> None:
        ch = llmasos.Channel.create(heap)
        ch.spin_us = 100
        with pytest.raises(TimeoutError):
            ch.recv(timeout=1.0)
        ch.destroy()

    pid = children.fork(receiver)
    code, usage = children.join_usage(pid, "the receiver to time out")

    assert code == 0
    assert usage.ru_utime + usage.ru_stime < 0.3


def test_channel_recv_is_interrupted_by_a_signal_handler(
    heap: llmasos.Heap, children: Children
) -> None:
    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm

    def receiver() -> None:
        ch = llmasos.Channel.create(heap)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.05)

        with pytest.raises(Alarm):
            ch.recv()

        assert not ch.stats()["receiver_sleeping"]
        ch.sender().send(b"still works")
        assert ch.recv_nowait() == b"still works"
        ch.destroy()

    pid = children.fork(receiver)

    assert children.join(pid, "the alarm to interrupt recv") == 0


def test_channel_stats_count_queued_sent_and_closed(heap: llmasos.Heap) -> None:
    ch = llmasos.Channel.create(heap, capacity=5, slot_size=128)
    tx = ch.sender()
    assert ch.stats() == {
        "receiver": os.getpid(),
        "capacity": 8,
        "slot_size": 128,
        "queued": 0,
        "closed": False,
        "receiver_sleeping": False,
        "sent": 0,
        "wakeups": 0,
    }

    for i in range(3):
        tx.send(b"%d" % i)
    ch.recv_nowait()
    ch.close()

    st = tx.stats()
    assert (st["queued"], st["sent"], st["closed"]) == (2, 3, True)
    with pytest.raises(ChannelClosed):
        tx.send(b"after close")
    assert [ch.recv_nowait(), ch.recv_nowait()] == [b"1", b"2"]
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=10)
    ch.destroy()


def test_channel_wakes_a_sleeping_receiver(
    heap: llmasos.Heap, children: Children
) -> None:
    def body(ch: llmasos.Channel) -> None:
        assert ch.recv(timeout=30) == b"wake up"

    rx, handle = children.receiver(heap, body)
    tx = llmasos.Sender.open(heap, handle)
    wait_until(lambda: tx.stats()["receiver_sleeping"], "the receiver to sleep")

    tx.send(b"wake up")

    assert children.join(rx, "the receiver to wake") == 0
    assert tx.stats()["wakeups"] == 1
    heap.reclaim(rx)


def test_channel_busy_receiver_needs_no_wakeups(
    heap: llmasos.Heap, children: Children
) -> None:
    count = 2000

    def body(ch: llmasos.Channel) -> None:
        ch.spin_us = 30_000_000
        for i in range(count):
            assert ch.recv() == b"%d" % i

    rx, handle = children.receiver(heap, body, capacity=64)
    tx = llmasos.Sender.open(heap, handle)
    before = tx.stats()

    for i in range(count):
        tx.send(b"%d" % i)

    assert children.join(rx, "the receiver to take every message") == 0
    after = tx.stats()
    assert after["sent"] - before["sent"] == count
    assert after["wakeups"] - before["wakeups"] < count // 20
    heap.reclaim(rx)
