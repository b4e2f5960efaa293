"""The paged heap: allocation, errors, buffers, ownership and reclaim."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest

import llmasos
from conftest import exit_code, fork_child, kill_and_wait, unique_name
from llmasos.errors import (
    DoubleFree,
    HugePagesUnavailable,
    InvalidHandle,
    LayoutMismatch,
    NoSystem,
    StaleHandle,
)


def test_heap_attach_sees_the_same_bytes(heap: llmasos.Heap) -> None:
    buf = heap.malloc(64)
    memoryview(buf)[:5] = b"hello"

    def child() -> None:
        other = llmasos.Heap.attach(heap.name)
        seen = other.open(buf.handle)
        assert bytes(memoryview(seen)[:5]) == b"hello"
        memoryview(seen)[:5] = b"HELLO"

    assert exit_code(fork_child(child)) == 0
    assert bytes(memoryview(buf)[:5]) == b"HELLO"


@pytest.mark.parametrize("size", [1, 16, 100, 2048, 2049, 4096, 3 * 4096 + 1, 1 << 20])
def test_heap_large_blocks_take_ceil_m_over_s_pages(
    heap: llmasos.Heap, size: int
) -> None:
    before = heap.stats()

    buf = heap.malloc(size)
    after = heap.stats()

    assert len(buf) == size
    if size > heap.size_classes[-1]:
        assert after.pages_large - before.pages_large == math.ceil(size / 4096)
    else:
        assert after.blocks_small - before.blocks_small == 1
    heap.free(buf)


@pytest.mark.parametrize("page_size", [8192, 65536, 2 << 20])
def test_heap_page_size_is_any_power_of_two(make_heap, page_size: int) -> None:
    h = make_heap(max(16 * page_size, 1 << 20), page_size=page_size)

    buf = h.malloc(page_size + 1)

    assert h.page_size == page_size
    assert h.stats().pages_large == 2
    assert h.size_classes[-1] <= page_size // 2
    h.free(buf)
    h.destroy()


@pytest.mark.parametrize("page_size", [1000, 2048, 4097, 12288])
def test_heap_page_size_must_be_a_power_of_two_from_4k(page_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        llmasos.Heap.create(1 << 20, page_size=page_size, name=unique_name())


def test_heap_huge_pages_refused_clearly_when_absent() -> None:
    if os.path.isdir("/dev/hugepages") and llmasos.heap._huge_pages_free() >= 4:
        pytest.skip("this machine has huge pages; the error path is not reachable")

    with pytest.raises(HugePagesUnavailable, match="nr_hugepages"):
        llmasos.Heap.create(8 << 20, page_size=2 << 20, huge_pages=True)


def test_heap_attach_refuses_another_layout(heap: llmasos.Heap) -> None:
    name = unique_name("bogus")
    path = f"/dev/shm/llmasos.{name}"
    with open(path, "wb") as f:
        f.write(b"\0" * 65536)
    try:
        with pytest.raises(LayoutMismatch, match="incompatible version"):
            llmasos.Heap.attach(name)
    finally:
        os.unlink(path)


def test_heap_attach_of_missing_heap_names_it() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-heap"):
        llmasos.Heap.attach("no-such-heap")


def test_heap_exhaustion_says_what_was_asked_and_what_is_free(make_heap) -> None:
    h = make_heap(1 << 20)

    with pytest.raises(MemoryError, match=r"malloc\(2097152\).*512 pages.*free"):
        h.malloc(2 << 20)

    assert h.stats().blocks == 0
    h.destroy()


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_heap_malloc_refuses_sizes_below_one(heap: llmasos.Heap, size: int) -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        heap.malloc(size)


@pytest.mark.parametrize("size", [32, 1 << 16])
def test_heap_double_free_raises_and_keeps_the_heap(
    heap: llmasos.Heap, size: int
) -> None:
    buf = heap.malloc(size)
    handle = buf.handle
    heap.free(buf)
    before = heap.stats()

    with pytest.raises(DoubleFree):
        heap.free(buf)
    with pytest.raises(DoubleFree):
        heap.free(handle)

    assert heap.stats() == before


@pytest.mark.parametrize("size", [32, 1 << 16])
def test_heap_use_after_free_is_refused_by_generation(
    heap: llmasos.Heap, size: int
) -> None:
    buf = heap.malloc(size)
    handle = buf.handle
    heap.free(buf)
    again = heap.malloc(size)  # likely the same memory, a new generation

    with pytest.raises(StaleHandle):
        heap.open(handle)
    with pytest.raises(StaleHandle):
        memoryview(buf)
    heap.free(again)


def test_heap_freed_elsewhere_is_stale_here(heap: llmasos.Heap) -> None:
    buf = heap.malloc(100)
    view_free = heap.open(buf.handle)
    heap.free(buf)

    with pytest.raises(StaleHandle):
        memoryview(view_free)


@pytest.mark.parametrize(
    "handle", [0, 1, 12345, (1 << 40) - 1, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF]
)
def test_heap_forged_handles_are_refused(heap: llmasos.Heap, handle: int) -> None:
    keep = heap.malloc(64)
    before = heap.stats()

    with pytest.raises(InvalidHandle):
        heap.open(handle)
    with pytest.raises((InvalidHandle, DoubleFree)):
        heap.free(handle)

    assert heap.stats() == before
    heap.free(keep)


def test_heap_handle_of_another_heap_is_refused(heap: llmasos.Heap, make_heap) -> None:
    other = make_heap(1 << 20)
    buf = other.malloc(64)

    with pytest.raises(InvalidHandle, match="another heap"):
        heap.free(buf)
    other.free(buf)
    other.destroy()


def test_buffer_free_with_live_view_raises_buffer_error(heap: llmasos.Heap) -> None:
    buf = heap.malloc(128)
    view = memoryview(buf)

    with pytest.raises(BufferError, match="1 memoryviews"):
        heap.free(buf)

    view.release()
    heap.free(buf)


def test_buffer_numpy_sees_shared_bytes_without_copy(heap: llmasos.Heap) -> None:
    buf = heap.malloc(1 << 20)

    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = 7

    assert arr.ctypes.data == buf.address
    assert sum(memoryview(buf)[:10]) == 70
    del arr
    heap.free(buf)


def test_buffer_with_block_frees_on_exit(heap: llmasos.Heap) -> None:
    with heap.malloc(1000) as buf:
        memoryview(buf)[0] = 1

    assert not buf.alive
    assert heap.stats().blocks == 0


def test_heap_reclaim_returns_all_a_killed_process_owned(heap: llmasos.Heap) -> None:
    before = heap.stats()
    r, w = os.pipe()

    def child() -> None:
        for i in range(1000):
            heap.malloc(1 + (i * 7919) % 9000)
        os.write(w, b"x")
        signal.pause()

    pid = fork_child(child)
    os.close(w)
    assert os.read(r, 1) == b"x", "the child failed to allocate"
    assert heap.stats().proc(pid).blocks == 1000
    kill_and_wait(pid)

    heap.reclaim(pid)

    after = heap.stats()
    assert after.pages_free == before.pages_free
    assert after.blocks == before.blocks
    assert after.proc(pid).pages == 0
    os.close(r)


def test_heap_reclaim_keeps_blocks_handed_to_the_living(heap: llmasos.Heap) -> None:
    ch = llmasos.Channel.create(heap)

    def child() -> None:
        buf = heap.malloc(200)  # a pool block, in a span the child owns
        memoryview(buf)[:3] = b"abc"
        ch.sender().send(buf)

    pid = fork_child(child)
    assert exit_code(pid) == 0
    got = ch.recv(timeout=10)

    heap.reclaim(pid)

    assert got.owner == os.getpid()
    assert bytes(memoryview(got)[:3]) == b"abc"
    assert heap.stats().orphan_spans == 1
    heap.free(got)
    assert heap.stats().orphan_spans == 0
    ch.destroy()


def test_heap_quota_limits_one_process_only(heap: llmasos.Heap) -> None:
    def child() -> None:
        heap.set_quota(os.getpid(), 4)
        small = heap.malloc(3 * 4096)
        with pytest.raises(MemoryError, match="quota"):
            heap.malloc(2 * 4096)
        heap.free(small)

    assert exit_code(fork_child(child)) == 0
    heap.free(heap.malloc(8 * 4096))


def test_module_malloc_needs_a_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(llmasos.HEAP_ENV, raising=False)
    monkeypatch.setattr(llmasos, "_system_heap", None)

    with pytest.raises(NoSystem, match="does not belong"):
        llmasos.malloc(10)


def test_module_malloc_uses_the_system_heap(
    heap: llmasos.Heap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llmasos, "_system_heap", None)
    monkeypatch.setenv(llmasos.HEAP_ENV, heap.name)

    buf = llmasos.malloc(10)

    assert heap.open(buf.handle)
    llmasos.free(buf)
    assert heap.stats().blocks == 0


def test_heap_trim_returns_empty_spans(heap: llmasos.Heap) -> None:
    bufs = [heap.malloc(48) for _ in range(1000)]
    for b in bufs:
        heap.free(b)

    heap.trim()

    st = heap.stats()
    assert st.pages_free == st.pages_total


def test_heap_too_small_for_its_tables_says_so() -> None:
    with pytest.raises(ValueError, match="too small"):
        llmasos.Heap.create(64 << 10, name=unique_name())
