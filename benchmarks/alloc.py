"""Compare allocators side by side, from Python, and print one table.

Each row times malloc + free pairs of one block size in batches, with the
garbage collector off: a batch runs a fixed number of pairs under
time.perf_counter_ns, and its mean gives one per-pair sample. pairs/s is
read from the median batch; p50 and p99 are taken over the batch means, so
they show how batches vary, not single calls. The peers, run the same way:

- llmasos: heap.malloc(n) then heap.free(buf), on one heap;
- bytearray: bytearray(n), dropped at once (malloc and zeroing by CPython);
- SharedMemory: multiprocessing.shared_memory.SharedMemory(create=True,
  size=n), then close and unlink, the naive way to get a block of shared
  memory; it costs tens of microseconds, so it runs far fewer pairs.

Two more llmasos patterns hold many blocks at once. "hold" allocates
`hold_blocks` blocks, then frees them all, round after round; "hold,
remote free" hands the handles of the blocks to a forked child attached to
the heap, which frees them, before the parent allocates again. A round is
one batch; its time is the parent's mallocs plus the frees (the child times
its own), not the pipe between them. The pages the heap holds after the
first and the last round show whether freed blocks are reused.

Every figure includes the cost of the Python loop around the calls; the
header prints it, measured with an empty loop.

Usage: python benchmarks/alloc.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import gc
import json
import math
import multiprocessing
import statistics
import sys
import time
from multiprocessing.shared_memory import SharedMemory

import llmasos
from _machine import machine

now = time.perf_counter_ns
KIB = 1 << 10
MIB = 1 << 20
SIZES = (64, 256, 4 * KIB, MIB)
HOLD_SIZES = (64, 4 * KIB)
HEAP_BYTES = 256 * MIB
TARGET_SIZE = 64
TARGET_PAIRS_PER_S = 2_000_000
CHILD_TIMEOUT_S = 60.0
START_METHOD = "fork"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many batches of how many pairs each row takes, at most.

    `warmup` batches (or rounds) run untimed before each row, and a row stops
    taking batches after `row_s` seconds (bytearray of 1 MiB zeroes each one).
    """

    pairs: int
    batches: int
    shm_pairs: int
    shm_batches: int
    hold_blocks: int
    hold_rounds: int
    warmup: int
    row_s: float


FULL = Plan(1_000, 10_000, 20, 1_000, 10_000, 500, 20, 4.0)
QUICK = Plan(1_000, 200, 10, 15, 10_000, 10, 2, 0.4)


# -- one batch of each peer ---------------------------------------------------


def empty_batch(size: int, pairs: int) -> int:
    """Time the bare loop that every batch runs; return nanoseconds."""
    start = now()
    for _ in range(pairs):
        pass
    return now() - start


def bytearray_batch(size: int, pairs: int) -> int:
    """Time `pairs` bytearray(size) made and dropped; return nanoseconds."""
    make = bytearray

    start = now()
    for _ in range(pairs):
        make(size)
    return now() - start


def shm_batch(size: int, pairs: int) -> int:
    """Time `pairs` SharedMemory create + close + unlink; return nanoseconds."""
    start = now()
    for _ in range(pairs):
        shm = SharedMemory(create=True, size=size)
        try:
            shm.close()
        finally:
            shm.unlink()
    return now() - start


def llmasos_batch(heap: llmasos.Heap):
    """A batch function timing heap.malloc + heap.free pairs on `heap`."""
    malloc, free = heap.malloc, heap.free

    def batch(size: int, pairs: int) -> int:
        start = now()
        for _ in range(pairs):
            free(malloc(size))
        return now() - start

    return batch


def hold_round(heap: llmasos.Heap):
    """A batch function: malloc `blocks` blocks, then free them all."""
    malloc, free = heap.malloc, heap.free

    def batch(size: int, blocks: int) -> int:
        start = now()
        bufs = [malloc(size) for _ in range(blocks)]
        for buf in bufs:
            free(buf)
        return now() - start

    return batch


# -- the remote-free child ----------------------------------------------------


def remote_freer(name: str, conn) -> None:
    """Child: free each batch of handles that arrives; reply with the time.

    An empty message ends the loop.
    """
    heap = llmasos.Heap.attach(name)
    free = heap.free

    while data := conn.recv_bytes():
        handles = array.array("Q")
        handles.frombytes(data)
        start = now()
        for handle in handles:
            free(handle)
        conn.send(now() - start)
    heap.close()


class RemoteFree:
    """A forked child that frees the blocks the parent sends it.

    Use as a context manager; leaving it stops the child.
    """

    def __init__(self, heap: llmasos.Heap) -> None:
        self.heap = heap
        self.malloc = heap.malloc

    def __enter__(self) -> RemoteFree:
        ctx = multiprocessing.get_context(START_METHOD)
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=remote_freer, args=(self.heap.name, child_end))
        self.proc.start()
        child_end.close()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.send_bytes(b"")
        except OSError:
            pass
        self.proc.join(timeout=CHILD_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()

    def round(self, size: int, blocks: int) -> int:
        """Malloc `blocks` here, have the child free them; return nanoseconds."""
        malloc = self.malloc

        start = now()
        bufs = [malloc(size) for _ in range(blocks)]
        malloc_ns = now() - start

        handles = array.array("Q", (buf.handle for buf in bufs))
        del bufs
        self.conn.send_bytes(handles.tobytes())
        if not self.conn.poll(CHILD_TIMEOUT_S):
            raise RuntimeError(f"the remote-free child sent nothing for {blocks=}")
        return malloc_ns + self.conn.recv()


# -- measuring ----------------------------------------------------------------


def percentile(ordered: list, q: float) -> float:
    """The nearest-rank q-th percentile of an already sorted list."""
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def sample(batch, size: int, pairs: int, batches: int, plan: Plan) -> list:
    """Run warm-up batches, then up to `batches`; return sorted ns per pair."""
    for _ in range(plan.warmup):
        batch(size, pairs)

    per_pair, stop = [], now() + int(plan.row_s * 1e9)
    gc.disable()
    try:
        while len(per_pair) < batches and (now() < stop or len(per_pair) < 3):
            per_pair.append(batch(size, pairs) / pairs)
    finally:
        gc.enable()
    return sorted(per_pair)


def row(allocator: str, pattern: str, size: int, per_pair: list, pairs: int) -> dict:
    """One row of the table from sorted ns-per-pair batch means."""
    p50 = statistics.median(per_pair)
    return {
        "allocator": allocator,
        "pattern": pattern,
        "size": size,
        "batches": len(per_pair),
        "pairs_per_batch": pairs,
        "pairs_per_s": 1e9 / p50,
        "ns_per_pair_p50": p50,
        "ns_per_pair_p99": percentile(per_pair, 99),
    }


def measure_pairs(heap: llmasos.Heap, plan: Plan) -> list:
    """The malloc + free rows of every peer at every size."""
    peers = (
        ("llmasos", llmasos_batch(heap), plan.pairs, plan.batches),
        ("bytearray", bytearray_batch, plan.pairs, plan.batches),
        ("SharedMemory", shm_batch, plan.shm_pairs, plan.shm_batches),
    )
    rows = []
    for size in SIZES:
        for name, batch, pairs, batches in peers:
            per_pair = sample(batch, size, pairs, batches, plan)
            rows.append(row(name, "pair", size, per_pair, pairs))
    return rows


def measure_hold(heap: llmasos.Heap, pattern: str, batch, size: int, plan: Plan):
    """One hold row, with the heap's used pages after the first and last round."""
    n, rounds = plan.hold_blocks, plan.hold_rounds
    batch(size, n)
    pages_first = heap.stats().pages_used

    per_pair = sample(batch, size, n, rounds, plan)
    result = row("llmasos", pattern, size, per_pair, n)
    result["pages_first"] = pages_first
    result["pages_last"] = heap.stats().pages_used
    return result


def measure_holds(heap: llmasos.Heap, plan: Plan) -> list:
    """The hold rows, local and remote free, at each hold size."""
    local = f"hold {plan.hold_blocks}"
    remote = f"hold {plan.hold_blocks}, remote free"
    rows = []
    with RemoteFree(heap) as child:
        for size in HOLD_SIZES:
            rows.append(measure_hold(heap, local, hold_round(heap), size, plan))
            rows.append(measure_hold(heap, remote, child.round, size, plan))
    return rows


def loop_overhead_ns(plan: Plan) -> float:
    """The median cost per pair of the bare batch loop."""
    per_pair = sample(empty_batch, 0, plan.pairs, plan.batches, plan)
    return statistics.median(per_pair)


def add_ratios(rows: list) -> None:
    """Give each llmasos pair row its pairs/s over each peer's at that size."""
    rate = {(r["allocator"], r["size"]): r["pairs_per_s"] for r in rows}
    for r in rows:
        if r["allocator"] == "llmasos" and r["pattern"] == "pair":
            r["vs_bytearray"] = r["pairs_per_s"] / rate["bytearray", r["size"]]
            r["vs_shared_memory"] = r["pairs_per_s"] / rate["SharedMemory", r["size"]]


# -- report -------------------------------------------------------------------


def size_name(size: int) -> str:
    """64 B, 4 KiB, 1 MiB."""
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _fmt_ns(value: float) -> str:
    """Nanoseconds with one decimal below 100, none above."""
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    """A ratio such as 1.52x, or - when there is none."""
    if value is None:
        return "-"
    return f"{value:,.2f}x" if value < 100 else f"{value:,.0f}x"


COLUMNS = (
    ("allocator", 13, "<"), ("pattern", 25, "<"), ("size", 7, ">"),
    ("batches", 14, ">"), ("pairs/s", 12, ">"), ("p50 ns", 10, ">"),
    ("p99 ns", 10, ">"), ("vs bytearr", 11, ">"), ("vs shm", 9, ">"),
    ("pages 1st/last", 16, ">"),
)  # fmt: skip


def cells(r: dict) -> list:
    """The text of one row's cells, in the order of COLUMNS."""
    pages = "-"
    if "pages_first" in r:
        pages = f"{r['pages_first']} / {r['pages_last']}"
    return [
        r["allocator"],
        r["pattern"],
        size_name(r["size"]),
        f"{r['batches']} x {r['pairs_per_batch']}",
        f"{r['pairs_per_s']:,.0f}",
        _fmt_ns(r["ns_per_pair_p50"]),
        _fmt_ns(r["ns_per_pair_p99"]),
        _fmt_ratio(r.get("vs_bytearray")),
        _fmt_ratio(r.get("vs_shared_memory")),
        pages,
    ]


def _line(texts: list) -> str:
    """Texts padded and aligned as COLUMNS says."""
    return "".join(f"{t:{a}{w}}" for t, (_, w, a) in zip(texts, COLUMNS, strict=True))


def table(rows: list, overhead_ns: float) -> str:
    """The rows as a fixed-width table under a header saying what was timed."""
    lines = [
        "malloc + free pairs from Python, one process (remote free: two). pairs/s "
        "from the median batch; p50/p99 ns per pair over batch means.",
        f"Every figure includes the Python loop, {overhead_ns:.1f} ns per pair; "
        "vs: llmasos pairs/s over the peer's; pages: heap pages in use (all "
        "sizes) after the first / last round.",
        _line([name for name, _, _ in COLUMNS]).rstrip(),
    ]
    lines += [_line(cells(r)).rstrip() for r in rows]
    return "\n".join(lines)


def targets(rows: list) -> dict:
    """The llmasos target and its ratios to the peers, at the target size."""
    key = ("llmasos", "pair", TARGET_SIZE)
    ours = next(r for r in rows if (r["allocator"], r["pattern"], r["size"]) == key)
    return {
        "size": TARGET_SIZE,
        "pairs_per_s": ours["pairs_per_s"],
        "target_pairs_per_s": TARGET_PAIRS_PER_S,
        "pass": ours["pairs_per_s"] >= TARGET_PAIRS_PER_S,
        "vs_bytearray": ours["vs_bytearray"],
        "vs_shared_memory": ours["vs_shared_memory"],
    }


def targets_text(t: dict) -> str:
    """The target as printed lines, with PASS or FAIL (not an assertion)."""
    verdict = "PASS" if t["pass"] else "FAIL"
    size = size_name(t["size"])
    return "\n".join(
        [
            "Target (a printed figure, not an assertion):",
            f"  llmasos {size} pairs/s = {t['pairs_per_s']:,.0f} (target >= "
            f"{t['target_pairs_per_s']:,})  {verdict}",
            f"  llmasos / bytearray at {size} = {t['vs_bytearray']:.2f}x; "
            f"llmasos / SharedMemory at {size} = {t['vs_shared_memory']:,.0f}x",
        ]
    )


def heap_report(heap: llmasos.Heap) -> dict:
    """The heap's figures after the run, and after trim() gave spans back."""
    st = heap.stats()
    heap.trim()
    trimmed = heap.stats()
    return {
        "pages_total": st.pages_total,
        "pages_free": st.pages_free,
        "pages_pool": st.pages_pool,
        "pages_large": st.pages_large,
        "blocks": st.blocks,
        "bytes_in_use": st.bytes_in_use,
        "spans": st.spans,
        "orphan_spans": st.orphan_spans,
        "pages_pool_after_trim": trimmed.pages_pool,
        "leaks": st.blocks != 0 or trimmed.pages_free != trimmed.pages_total,
    }


def heap_text(h: dict) -> str:
    """The heap report as printed lines."""
    verdict = "FAIL" if h["leaks"] else "PASS"
    return "\n".join(
        [
            f"Heap after the run: {h['pages_pool']} pool pages ({h['spans']} "
            f"spans, {h['orphan_spans']} orphaned), {h['pages_large']} large "
            f"pages, {h['pages_free']} of {h['pages_total']} pages free, "
            f"{h['blocks']} blocks and {h['bytes_in_use']} bytes in use;",
            f"  after heap.trim(): {h['pages_pool_after_trim']} pool pages.  "
            f"Nothing leaked: {verdict}",
        ]
    )


def _rounded(r: dict) -> dict:
    """A dict with its floats rounded for JSON."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


def run(plan: Plan) -> dict:
    """Measure every row on a fresh heap and destroy the heap afterwards."""
    heap = llmasos.Heap.create(HEAP_BYTES)
    try:
        overhead = loop_overhead_ns(plan)
        rows = measure_pairs(heap, plan)
        add_ratios(rows)
        rows += measure_holds(heap, plan)
        report = heap_report(heap)
    finally:
        heap.destroy()
    return {"rows": rows, "loop_ns_per_pair": overhead, "heap": report}


def report_text(result: dict) -> str:
    """The table, the target and the heap after the run, as printed text."""
    return "\n".join(
        [
            table(result["rows"], result["loop_ns_per_pair"]),
            "",
            targets_text(targets(result["rows"])),
            heap_text(result["heap"]),
        ]
    )


def report_json(result: dict, plan: Plan) -> str:
    """The same figures as one JSON object, with the plan and the machine."""
    rows = [_rounded(r) for r in result["rows"]]
    goals = _rounded(targets(result["rows"]))
    extra = {"plan": dataclasses.asdict(plan), "machine": machine()}
    return json.dumps(result | {"rows": rows, "targets": goals} | extra)


def main(argv: list | None = None) -> int:
    """Measure the allocators and print the table or the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    result = run(plan)
    print(report_json(result, plan) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
