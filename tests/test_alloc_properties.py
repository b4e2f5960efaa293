"""Properties of the allocator under random malloc and free in several processes.

Three worker processes, forked once for the module, attach a fresh heap for
each example and run the operations the test sends them over pipes: malloc
in one worker, free of any live block by any worker (so that frees cross
processes and take the remote-free path), and now and then trim.  After each
operation the test checks that live blocks never share a byte and that the
heap's statistics add up; each block is filled at malloc with bytes unique to
it and checked when it is freed.  A falsifying example prints as the list of
operations that produced it.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import llmasos
from conftest import fork_child, kill_and_wait, unique_name

PAGE = 4096
HEAP_SIZE = 16 << 20
NWORKERS = 3
OFF_MASK = (1 << 40) - 1
ANSWER_S = 30.0  # a watchdog on each answer of a worker, not a measurement
IDLE_EXIT_S = 300.0  # a worker whose test went away exits after this


def pattern(seed: int, size: int) -> bytes:
    """The bytes a block is filled with: unique to the block's seed."""
    tag = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=32).digest()
    return (tag * (size // len(tag) + 1))[:size]


def block_offset(handle: int) -> int:
    return (handle & OFF_MASK) << 4


# ---- the worker side: runs in the forked processes ----


def _attach(state: dict, name: str) -> int:
    if state.get("heap") is not None and not state["heap"].closed:
        state["heap"].close()
    state["heap"] = llmasos.Heap.attach(name)
    return os.getpid()


def _malloc(state: dict, size: int, seed: int) -> int:
    buf = state["heap"].malloc(size)
    with memoryview(buf) as m:
        m[:] = pattern(seed, size)
    return buf.handle


def _free(state: dict, handle: int, size: int, seed: int) -> bool:
    """Free the block handle names; True if its bytes were still its own."""
    heap = state["heap"]
    seen = heap.open(handle)
    with memoryview(seen) as m:
        intact = len(seen) == size and m == pattern(seed, size)
    heap.free(handle)
    return intact


def _churn(state: dict, conn: Connection, seed: int, given: list) -> None:
    """Malloc and free at random until killed; given are (handle, size, seed)
    of blocks other workers allocated, freed here across processes."""
    heap, rng, mine = state["heap"], random.Random(seed), []
    conn.send(("ok", "churning"))
    for step in range(10**9):
        if given and rng.random() < 0.2:
            heap.free(given.pop()[0])
        elif mine and rng.random() < 0.45:
            heap.free(mine.pop(rng.randrange(len(mine))))
        else:
            size = rng.choice([rng.randint(1, 2048), PAGE, rng.randint(2, 16) * PAGE])
            try:
                mine.append(heap.malloc(size))
            except MemoryError:
                while mine:
                    heap.free(mine.pop())
        if step % 64 == 63:
            heap.trim()


def _close(state: dict) -> None:
    if state.get("heap") is not None:
        state["heap"].close()
        state["heap"] = None


def _serve(conn: Connection) -> None:
    """Answer requests until the pipe closes or stays idle too long."""
    state: dict = {}
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while conn.poll(IDLE_EXIT_S):
        try:
            op, *args = conn.recv()
        except EOFError:
            return
        try:
            if op == "churn":
                _churn(state, conn, *args)
                continue
            handler = {
                "attach": _attach,
                "malloc": _malloc,
                "free": _free,
                "trim": lambda s: s["heap"].trim(),
                "close": _close,
            }[op]
            reply = ("ok", handler(state, *args))
        except Exception as exc:  # reported to the test, which fails on it
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


class Worker:
    """A forked process that runs heap operations sent over a pipe."""

    def __init__(self) -> None:
        self.conn, child_end = multiprocessing.Pipe()

        def body() -> None:
            self.conn.close()
            _serve(child_end)

        self.pid = fork_child(body)
        self.reaped = False
        child_end.close()

    def call(self, *request: object) -> object:
        """Run request in the worker; its result, or AssertionError."""
        try:
            self.conn.send(request)
            if not self.conn.poll(ANSWER_S):
                raise AssertionError(f"worker {self.pid} did not answer {request}")
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise AssertionError(f"worker {self.pid} died running {request}") from None
        if status != "ok":
            raise AssertionError(f"worker {self.pid} failed {request}: {value}")
        return value

    def dead(self) -> bool:
        if not self.reaped:
            self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
        return self.reaped

    def stop(self) -> None:
        """Kill the worker (if it still runs) and reap it."""
        self.conn.close()
        if not self.reaped:
            kill_and_wait(self.pid)
            self.reaped = True


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    crew = [Worker() for _ in range(NWORKERS)]
    yield crew
    for w in crew:
        w.stop()


def replace_dead(crew: list[Worker]) -> None:
    """Fork anew the workers a failed example left dead."""
    for k, w in enumerate(crew):
        if w.dead():
            w.conn.close()
            crew[k] = Worker()


# ---- the test side: a model of the live blocks ----


@dataclass(frozen=True)
class Block:
    handle: int
    size: int
    seed: int
    owner: int  # index of the worker that allocated it

    @property
    def start(self) -> int:
        return block_offset(self.handle)

    @property
    def end(self) -> int:
        return self.start + self.size


class Model:
    """The blocks a test believes live, checked against the heap."""

    def __init__(self, heap: llmasos.Heap, crew: list[Worker]) -> None:
        self.heap, self.crew = heap, crew
        self.live: dict[int, Block] = {}
        self.serial = 0
        self.small_max = heap.size_classes[-1]

    def malloc(self, k: int, size: int) -> None:
        self.serial += 1
        handle = self.crew[k].call("malloc", size, self.serial)
        block = Block(handle, size, self.serial, k)

        self.check_placement(block)
        self.live[handle] = block

    def free(self, k: int, block: Block) -> None:
        intact = self.crew[k].call("free", block.handle, block.size, block.seed)

        del self.live[block.handle]
        assert intact, (
            f"block {block.handle:#x} ({block.size} bytes at {block.start:#x}, "
            f"allocated by worker {block.owner}) was overwritten before its free"
        )

    def check_placement(self, new: Block) -> None:
        lo = self.heap.stats().pages_meta * PAGE
        assert new.handle not in self.live, f"handle {new.handle:#x} given twice"
        assert lo <= new.start and new.end <= self.heap.size
        assert new.start % 16 == 0
        assert (new.start % PAGE == 0) == (new.size > self.small_max), (
            f"a block of {new.size} bytes at {new.start:#x}: large blocks "
            "start a page, pool blocks never do"
        )
        for old in self.live.values():
            assert new.end <= old.start or old.end <= new.start, (
                f"block {new.handle:#x} [{new.start:#x}, {new.end:#x}) overlaps "
                f"live block {old.handle:#x} [{old.start:#x}, {old.end:#x})"
            )

    def check_stats(self) -> None:
        st = self.heap.stats()
        blocks = list(self.live.values())
        large = [b for b in blocks if b.size > self.small_max]

        assert st.pages_free + st.pages_large + st.pages_pool == st.pages_total
        assert sum(p.pages for p in st.procs) == st.pages_large + st.pages_pool
        assert st.orphan_spans == 0
        assert st.blocks_small + st.blocks_large == len(blocks)
        assert st.blocks_large == len(large)
        assert st.pages_large == sum(math.ceil(b.size / PAGE) for b in large)
        assert st.bytes_in_use == sum(b.size for b in blocks)
        for k, w in enumerate(self.crew):
            mine = [b for b in blocks if b.owner == k]
            assert st.proc(w.pid).blocks == len(mine), f"worker {k}"
            assert st.proc(w.pid).bytes == sum(b.size for b in mine), f"worker {k}"

    def run(self, ops: list[tuple[str, int, int]]) -> None:
        for kind, k, arg in ops:
            if kind == "malloc":
                self.malloc(k, arg)
            elif kind == "free" and self.live:
                self.free(k, list(self.live.values())[arg % len(self.live)])
            elif kind == "trim":
                self.crew[k].call("trim")
            self.check_stats()

    def free_all_and_trim(self) -> None:
        """Free every live block from the worker after its owner, then trim."""
        for block in list(self.live.values()):
            self.free((block.owner + 1) % len(self.crew), block)
        for w in self.crew:
            w.call("trim")
        self.check_stats()


def sizes() -> st.SearchStrategy[int]:
    """Sizes of every pool class, of exactly a page, and of page runs."""
    return st.one_of(
        st.integers(1, 2048),
        st.sampled_from([1, 16, 17, 128, 129, 2047, 2048, 2049]),
        st.just(PAGE),
        st.integers(2, 16).flatmap(lambda n: st.sampled_from([n * PAGE, n * PAGE - 1])),
        st.integers(PAGE + 1, 16 * PAGE),
    )


def op_lists(palette: list[int]) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    kinds = ("malloc",) * 4 + ("free",) * 3 + ("trim",)
    op = st.tuples(
        st.sampled_from(kinds), st.integers(0, NWORKERS - 1), st.sampled_from(palette)
    )
    return st.lists(op, min_size=40, max_size=120)


# A few sizes per example, so that blocks of one class fill whole spans.
OPS = st.lists(sizes(), min_size=1, max_size=4).flatmap(op_lists)


def with_heap_attached(crew: list[Worker]) -> llmasos.Heap:
    heap = llmasos.Heap.create(HEAP_SIZE, name=unique_name("prop"))
    for w in crew:
        w.call("attach", heap.name)
    return heap


def detach_and_destroy(heap: llmasos.Heap, crew: list[Worker]) -> None:
    for w in crew:
        if not w.dead():
            w.call("close")
    heap.destroy()


# Two pages freed into the free run after them, then a span of five pages
# laid over them: its third page keeps the head word of the run it merged.
SPAN_OVER_A_MERGED_RUN = [
    ("malloc", 0, PAGE),
    ("malloc", 0, PAGE),
    ("free", 0, 0),
    ("free", 0, 0),
] + [("malloc", 0, 2048)] * 5


@settings(max_examples=300, deadline=None, print_blob=True)
@given(ops=OPS)
@example(ops=SPAN_OVER_A_MERGED_RUN)
def test_alloc_blocks_of_three_processes_never_overlap_and_stats_add_up(
    workers: list[Worker], ops: list[tuple[str, int, int]]
) -> None:
    replace_dead(workers)
    heap = with_heap_attached(workers)
    try:
        model = Model(heap, workers)

        model.run(ops)
        model.free_all_and_trim()

        st_end = heap.stats()
        assert st_end.pages_free == st_end.pages_total
        assert st_end.spans == 0
        assert st_end.procs == ()
    finally:
        detach_and_destroy(heap, workers)


# Not shrunk: the moment of the kill varies from run to run anyway.
@settings(
    max_examples=25,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    ops=OPS,
    seed=st.integers(0, 2**32 - 1),
    delay=st.floats(0.0, 0.02),
)
def test_alloc_workers_killed_midway_are_reclaimed_to_an_empty_heap(
    ops: list[tuple[str, int, int]], seed: int, delay: float
) -> None:
    crew = [Worker() for _ in range(NWORKERS)]
    heap = with_heap_attached(crew)
    try:
        model = Model(heap, crew)
        model.run(ops)
        given_out = [[] for _ in crew]
        for n, b in enumerate(model.live.values()):
            given_out[n % len(crew)].append((b.handle, b.size, b.seed))

        for k, w in enumerate(crew):
            w.call("churn", seed + k, given_out[k])
        time.sleep(delay)  # lets the churn run a random while; not a wait
        for w in crew:
            w.stop()
        for w in crew:
            heap.reclaim(w.pid)

        st_end = heap.stats()
        assert st_end.pages_free == st_end.pages_total, st_end
        assert st_end.blocks == 0
        assert st_end.spans == 0
        assert st_end.procs == ()
    finally:
        for w in crew:
            w.stop()
        heap.destroy()


def test_alloc_free_never_merges_with_a_stale_run_head(
    heap: llmasos.Heap,
) -> None:
    # Freeing a run merges it with its left neighbour when that neighbour is
    # free.  Here the page on the left is a live one-page block whose size in
    # bytes (3000) equals the index of a page holding the stale head word of a
    # run merged away earlier, whose length reaches exactly that page.
    meta = heap.stats().pages_meta
    p, n = 3000, 10  # the stale run: pages [p, p + n)
    q = p + n - 1
    a = heap.malloc((p - meta) * PAGE)
    b = heap.malloc(n * PAGE)
    c = heap.malloc(PAGE)
    heap.free(b)
    heap.free(a)  # merges [meta, p) with [p, q]: page p keeps its old head
    d = heap.malloc((q - meta) * PAGE)  # [meta, q)
    e = heap.malloc(p)  # one page: page q
    assert block_offset(e.handle) == q * PAGE

    heap.free(c)
    f = heap.malloc(20 * PAGE)

    start = block_offset(f.handle)
    for live in (d, e):
        at = block_offset(live.handle)
        assert start + len(f) <= at or at + len(live) <= start, (
            f"the new block [{start:#x}, {start + len(f):#x}) overlaps the live "
            f"block [{at:#x}, {at + len(live):#x})"
        )
    heap.free(f)
    st_end = heap.stats()
    assert st_end.pages_free + st_end.pages_large == st_end.pages_total
