"""The shared heap: pages, pools and the buffers they hand out.

``Heap.create(size)`` makes a heap in POSIX shared memory; ``Heap.attach(name)``
maps it in another process.  ``heap.malloc(n)`` returns a ``Buffer`` owned by
the calling process, ``heap.free(buf)`` gives it back, ``heap.open(handle)``
opens a block that another process allocated.  ``heap.stats()`` walks the
heap and returns a ``HeapStats`` snapshot; ``heap.reclaim(pid)`` gives back
everything a dead process owned.

The hot methods (malloc, free, open) are those of the C type underneath, with
no Python frame in between.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from llmasos import _core
from llmasos.errors import HugePagesUnavailable

Buffer = _core.Buffer


@dataclass(frozen=True)
class ProcStats:
    """What one process holds in a heap."""

    pid: int
    pages: int
    quota_pages: int
    blocks: int
    bytes: int


@dataclass(frozen=True)
class HeapStats:
    """A snapshot of a heap, taken under its lock.

    ``pages_total == pages_free + pages_large + pages_pool`` always holds;
    ``pages_meta`` are the pages of the heap's own tables, counted apart.
    """

    page_size: int
    pages_total: int
    pages_free: int
    pages_meta: int
    pages_large: int
    pages_pool: int
    largest_free_run: int
    blocks_small: int
    blocks_large: int
    bytes_in_use: int
    spans: int
    orphan_spans: int
    channels: int
    syncs: int
    procs: tuple[ProcStats, ...]

    @property
    def pages_used(self) -> int:
        return self.pages_large + self.pages_pool

    @property
    def blocks(self) -> int:
        return self.blocks_small + self.blocks_large

    def proc(self, pid: int) -> ProcStats:
        """The entry of pid, zeros if it holds nothing."""
        for p in self.procs:
            if p.pid == pid:
                return p
        return ProcStats(pid, 0, 0, 0, 0)


def _huge_pages_free() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Heap(_core.Heap):
    """A heap of shared memory cut into pages of ``page_size`` bytes."""

    @classmethod
    def create(
        cls,
        size: int,
        *,
        page_size: int = 4096,
        name: str | None = None,
        huge_pages: bool = False,
        max_channels: int = 256,
        max_syncs: int = 256,
        max_procs: int = 256,
    ) -> Heap:
        """Make a new heap of ``size`` bytes (metadata included).

        ``page_size`` is any power of two from 4 KiB.  ``huge_pages=True``
        backs the heap with 2 MiB hugetlbfs pages and needs the machine to
        have them reserved (``/proc/sys/vm/nr_hugepages``).
        """
        name = name or f"heap-{os.getpid()}-{secrets.token_hex(4)}"
        if page_size < 4096 or page_size & (page_size - 1):
            raise ValueError(
                f"page_size must be a power of two of at least 4096, got {page_size}"
            )
        if huge_pages:
            _check_huge_pages(size, page_size)
        return cls._create(
            name, size, page_size, max_channels, max_syncs, max_procs, huge_pages
        )

    @classmethod
    def attach(cls, name: str) -> Heap:
        """Map the existing heap ``name`` into this process."""
        return cls._attach(name)

    def stats(self) -> HeapStats:
        """Walk the heap under its lock; see ``HeapStats``."""
        raw = self._stats()
        procs = tuple(ProcStats(**p) for p in raw.pop("procs"))
        return HeapStats(procs=procs, **raw)

    def destroy(self) -> None:
        """Remove the heap's name from the system and unmap it here.

        Processes that mapped it keep their mapping until they close it.
        """
        name = self.name
        self.close()
        _core.unlink(name)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<llmasos.Heap closed>"
        return (
            f"<llmasos.Heap {self.name!r} size={self.size} page_size={self.page_size}>"
        )


def _check_huge_pages(size: int, page_size: int) -> None:
    huge = 2 << 20
    if page_size % huge:
        raise ValueError(f"huge pages need a page_size multiple of {huge} bytes")
    need, free = -(-size // huge), _huge_pages_free()
    if not os.path.isdir("/dev/hugepages") or free < need:
        raise HugePagesUnavailable(
            f"cannot back a heap of {size} bytes with huge pages: it needs "
            f"{need} free 2 MiB pages and the machine has {free} "
            "(HugePages_Free in /proc/meminfo), and hugetlbfs must be mounted "
            "at /dev/hugepages; reserve them with "
            "'echo N > /proc/sys/vm/nr_hugepages' as root, or create the heap "
            "without huge_pages"
        )


def unlink(name: str) -> bool:
    """Remove the heap ``name`` from the system; False if there was none."""
    return _core.unlink(name)
