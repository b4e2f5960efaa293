"""Compare inter-process transports side by side and print one table.

Each row forks a fresh pair of processes, A ("client") and B ("server"), joined
by one transport, and both run the same script over it:

1. round trip: A sends 64 B and B echoes them; after a warm-up A records every
   round trip, and each side its CPU time (getrusage) as a share of wall time;
2. idle wait: B waits in recv while A sleeps, then A sends one message; B's
   CPU time over that wait is what a blocked receiver costs;
3. rate: A pushes N messages of 64 B one way and B counts them;
4. hand-off: B says it is waiting, A produces a 1 MiB or 64 MiB payload (not
   timed: the data is made where the transport wants it, in shared memory for
   the zero-copy rows), then sends it; the time runs until B holds the whole
   payload as a usable buffer.

One-way times subtract timestamps taken in two processes: time.perf_counter_ns
reads CLOCK_MONOTONIC, which every process on one Linux machine shares.

Where A and B run decides the regime: on two CPUs every wake-up of a sleeping
receiver crosses CPUs (70-100 us on an idle virtual machine), on one CPU it is
a context switch. So A and B are pinned to two CPUs unless `--placement` says
otherwise, and the header names the regime the figures were taken in.

Usage: python benchmarks/ipc.py [--quick] [--only NAME[,NAME]] [--json]
                                [--placement split|same|free]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import glob
import importlib
import importlib.metadata
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import traceback

from _machine import OtherLoadMeter, machine

now = time.perf_counter_ns
MIB = 1 << 20
PING = bytes(range(64))
SIDES = ("a", "b")
START_METHOD = "fork"
IOX_RUN_PREFIX = "iox2ipcbench"
IOX_PREFIX = f"{IOX_RUN_PREFIX}{os.getpid()}_"
IOX_NODES_DIR = "/tmp/iceoryx2/nodes"
FIGURES = (
    "rtt_p50_us",
    "rtt_p99_us",
    "rtt_p999_us",
    "msgs_per_s",
    "handoff_1mib_us",
    "handoff_64mib_us",
    "cpu_client_pct",
    "cpu_server_pct",
    "idle_wait_cpu_pct",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many samples each step takes, how long a row may run, and where.

    `cpus` pins A and B to one CPU each; None leaves a side to the scheduler.
    """

    rtt_warmup: int
    rtt_samples: int
    rate_messages: int
    handoff_reps: int
    idle_s: float
    row_timeout_s: float
    handoff_sizes: tuple[int, ...] = (MIB, 64 * MIB)
    placement: str = "split"
    cpus: tuple[int | None, int | None] = (None, None)


HANDOFF_KEYS = ("handoff_1mib_us", "handoff_64mib_us")
PLACEMENTS = {
    "split": "A and B pinned to two CPUs, so every wake-up crosses CPUs",
    "same": "A and B pinned to one CPU, so a wake-up is a context switch",
    "free": "A and B placed by the scheduler, on one CPU or two by chance",
}


FULL = Plan(2_000, 20_000, 100_000, 5, 1.0, 240.0)
QUICK = Plan(100, 1_000, 5_000, 2, 0.25, 90.0)


class RowError(Exception):
    """A row could not be measured; the message says why."""


# -- transports ---------------------------------------------------------------


class Transport:
    """One row: a transport between two processes, A and B.

    The object is made in the parent, which calls `prepare` before forking and
    `cleanup` after both children ended. Each child then uses its own copy as
    its end: `open(side)`, `address`, `connect(peer_address)`, the message
    calls, `close`. Messages arrive whole and in order, and none are lost.
    """

    name = ""
    module: str | None = None
    zero_copy = False

    def prepare(self) -> None:
        """Make what both children inherit (parent, before fork)."""

    def cleanup(self) -> None:
        """Remove what `prepare` made (parent, after both children ended)."""

    def open(self, side: str) -> None:
        """Open this process's receiving end (child)."""
        self.side = side
        self.peer = "b" if side == "a" else "a"

    def address(self) -> object:
        """What the peer needs to reach the end made by `open`."""
        return None

    def connect(self, peer_address: object) -> None:
        """Open the sending end towards the peer (child)."""

    def send(self, data: bytes) -> None:
        """Send one message, a copy of `data`."""
        raise NotImplementedError

    def recv(self) -> bytes:
        """Wait for the next message and return it."""
        raise NotImplementedError

    def make_payload(self, size: int) -> object:
        """Produce `size` bytes ready to be handed off (not timed)."""
        return b"\xa5" * size

    def send_payload(self, payload: object) -> None:
        """Hand a payload from `make_payload` to the peer."""
        self.send(payload)

    def recv_payload(self) -> memoryview:
        """Wait for a handed-off payload and return a view of all of it."""
        return memoryview(self.recv())

    def release_payload(self) -> None:
        """Give back the payload of the last `recv_payload` (not timed)."""

    def close(self) -> None:
        """Close this process's ends (child)."""


_HEADER = struct.Struct("<Q")
_PIPE_BUF = 4096


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to a blocking file descriptor."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | bytearray:
    """Read exactly `size` bytes from a blocking file descriptor."""
    first = os.read(fd, size)
    if len(first) == size:
        return first

    buf = bytearray(size)
    buf[: len(first)] = first
    view, got = memoryview(buf), len(first)
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError(f"pipe closed after {got} of {size} bytes")
        got += n
    return buf


class OsPipe(Transport):
    """Two os.pipe()s, one per direction; each message is length + bytes."""

    name = "os.pipe"

    def prepare(self) -> None:
        self.pipes = {side: os.pipe() for side in SIDES}

    def cleanup(self) -> None:
        for fd in (fd for pair in self.pipes.values() for fd in pair):
            os.close(fd)

    def open(self, side: str) -> None:
        super().open(side)
        self.rfd, self.wfd = self.pipes[self.peer][0], self.pipes[side][1]
        os.close(self.pipes[self.peer][1])
        os.close(self.pipes[side][0])

    def send(self, data: bytes) -> None:
        header = _HEADER.pack(len(data))
        if len(data) + len(header) <= _PIPE_BUF:
            _write_all(self.wfd, header + data)
            return
        _write_all(self.wfd, header)
        _write_all(self.wfd, data)

    def recv(self) -> bytes:
        (size,) = _HEADER.unpack(_read_exact(self.rfd, _HEADER.size))
        return _read_exact(self.rfd, size)


class MpPipe(Transport):
    """multiprocessing.Pipe(duplex=True), with send_bytes / recv_bytes."""

    name = "multiprocessing.Pipe"

    def prepare(self) -> None:
        self.conns = dict(zip(SIDES, multiprocessing.Pipe(duplex=True), strict=True))

    def cleanup(self) -> None:
        for conn in self.conns.values():
            conn.close()

    def open(self, side: str) -> None:
        super().open(side)
        self.conn = self.conns[side]
        self.conns[self.peer].close()

    def send(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    def recv(self) -> bytes:
        return self.conn.recv_bytes()


class MpQueue(Transport):
    """Two multiprocessing.Queues, one per direction, carrying bytes."""

    name = "multiprocessing.Queue"

    def prepare(self) -> None:
        ctx = multiprocessing.get_context(START_METHOD)
        self.queues = {side: ctx.Queue() for side in SIDES}

    def cleanup(self) -> None:
        for queue in self.queues.values():
            queue.close()

    def open(self, side: str) -> None:
        super().open(side)
        self.inbox, self.outbox = self.queues[self.peer], self.queues[side]

    def send(self, data: bytes) -> None:
        self.outbox.put(data)

    def recv(self) -> bytes:
        return self.inbox.get()

    def close(self) -> None:
        self.outbox.close()
        self.outbox.join_thread()


class ZmqIpc(Transport):
    """A pyzmq PAIR socket over ipc:// in a temporary directory; B binds."""

    name = "pyzmq-ipc"
    module = "zmq"
    _copy_limit = 64 * 1024

    def prepare(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="ipcbench-zmq-")
        self.endpoint = f"ipc://{self.tmpdir}/pair.sock"

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def open(self, side: str) -> None:
        import zmq

        super().open(side)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        if side == "b":
            self.sock.bind(self.endpoint)
        else:
            self.sock.connect(self.endpoint)

    def send(self, data: bytes) -> None:
        self.sock.send(data, copy=len(data) < self._copy_limit)

    def recv(self) -> bytes:
        return self.sock.recv()

    def recv_payload(self) -> memoryview:
        return self.sock.recv(copy=False).buffer

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _iox_config():
    """iceoryx2 config whose files carry this run's prefix, for cleanup."""
    import iceoryx2 as iox2

    config = iox2.config.default()
    config.global_cfg.prefix = iox2.FileName.new(IOX_PREFIX)
    return config


def _iox_node():
    """An iceoryx2 node that leaves signals to Python, so kill works."""
    import iceoryx2 as iox2

    iox2.set_log_level(iox2.LogLevel.Error)
    return (
        iox2.NodeBuilder.new()
        .config(_iox_config())
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )


class Iceoryx2(Transport):
    """iceoryx2 publish-subscribe of byte slices, one service per direction.

    Lossless: safe overflow is off and publishers retry until delivered. The
    hand-off uses a second service per direction sized for 64 MiB, since a
    publisher's segment holds max slice length times its chunk count. A busy
    receiver polls `receive()`; a blocking one sleeps on an event listener,
    which the sender notifies after every sample.
    """

    module = "iceoryx2"
    zero_copy = True
    _kinds = {"small": (len(PING), 256), "big": (64 * MIB, 2)}

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.name = "iceoryx2-busy" if busy else "iceoryx2-blocking"

    def _service(self, src: str, kind: str):
        import iceoryx2 as iox2

        name = f"ipcbench/{self.name}/{src}/{kind}"
        return (
            self.node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(self._kinds[kind][1])
            .open_or_create()
        )

    def _event(self, src: str):
        import iceoryx2 as iox2

        name = f"ipcbench/{self.name}/{src}/event"
        return self.node.service_builder(iox2.ServiceName.new(name)).event()

    def open(self, side: str) -> None:
        super().open(side)
        self.node = _iox_node()
        self.held, self.listener, self.notifier = None, None, None
        self.subs = {
            kind: self._service(self.peer, kind)
            .subscriber_builder()
            .buffer_size(depth)
            .create()
            for kind, (_, depth) in self._kinds.items()
        }
        if not self.busy:
            events = self._event(self.peer).open_or_create()
            self.listener = events.listener_builder().create()

    def connect(self, peer_address: object) -> None:
        import iceoryx2 as iox2

        retry = iox2.BackpressureStrategy.RetryUntilDelivered
        self.pubs = {
            kind: self._service(self.side, kind)
            .publisher_builder()
            .initial_max_slice_len(max_len)
            .backpressure_strategy(retry)
            .create()
            for kind, (max_len, _) in self._kinds.items()
        }
        if not self.busy:
            events = self._event(self.side).open_or_create()
            self.notifier = events.notifier_builder().create()

    def _deliver(self, sample) -> None:
        """Send an initialised sample and wake the peer if it sleeps."""
        if sample.send() != 1:
            raise RowError(f"{self.name}: a sample reached no subscriber")
        if self.notifier is not None:
            self.notifier.notify()

    def _take(self, kind: str):
        """Wait for the next sample of `kind`: poll, or sleep on the listener."""
        sub, listener = self.subs[kind], self.listener
        while True:
            sample = sub.receive()
            if sample is not None:
                return sample
            if listener is not None:
                listener.blocking_wait()

    def send(self, data: bytes) -> None:
        sample = self.pubs["small"].loan_slice_uninit(len(data))
        ctypes.memmove(sample.payload_ptr, data, len(data))
        self._deliver(sample.assume_init())

    def recv(self) -> bytes:
        sample = self._take("small")
        data = ctypes.string_at(sample.payload_ptr, sample.header.number_of_elements)
        sample.delete()
        return data

    def make_payload(self, size: int):
        sample = self.pubs["big"].loan_slice_uninit(size)
        ctypes.memset(sample.payload_ptr, 0xA5, size)
        return sample

    def send_payload(self, payload) -> None:
        self._deliver(payload.assume_init())

    def recv_payload(self) -> memoryview:
        self.held = self._take("big")
        return self.held.payload().as_memory_view().cast("B")

    def release_payload(self) -> None:
        self.held.delete()
        self.held = None

    def close(self) -> None:
        ports = [*self.pubs.values(), *self.subs.values()]
        for port in ports + [self.listener, self.notifier]:
            if port is not None:
                port.delete()
        del self.pubs, self.subs, self.listener, self.notifier, self.node


def _iox_run_is_over(path: str) -> bool:
    """True if the run whose prefix names `path` is this one or has ended."""
    pid = int(os.path.basename(path)[len(IOX_RUN_PREFIX) :].split("_", 1)[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _cleanup_iceoryx2() -> None:
    """Remove dead iceoryx2 nodes, then the files of this run and of killed runs.

    Every file carries the prefix of the run that made it, with its pid, so a
    run killed before its own cleanup leaves files that the next run removes.
    """
    if "iceoryx2" in sys.modules:
        _iox_node().try_cleanup_dead_nodes()

    paths = glob.glob(f"/dev/shm/{IOX_RUN_PREFIX}*")
    for folder, _, files in os.walk(os.path.dirname(IOX_NODES_DIR)):
        paths += [os.path.join(folder, f) for f in files if IOX_RUN_PREFIX in f]
    for path in filter(_iox_run_is_over, paths):
        os.unlink(path)
        folder = os.path.dirname(path)
        if os.path.dirname(folder) == IOX_NODES_DIR:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


class Llmasos(Transport):
    """llmasos channels in one shared heap: one channel per direction.

    Small messages are copied into channel slots; a hand-off sends a heap
    Buffer as a handle, so its bytes never move.
    """

    name = "llmasos"
    module = "llmasos"
    zero_copy = True
    heap_bytes = 256 << 20

    def prepare(self) -> None:
        import llmasos

        self.owner = llmasos.Heap.create(self.heap_bytes)
        self.heap_name = self.owner.name

    def cleanup(self) -> None:
        self.owner.destroy()

    def open(self, side: str) -> None:
        import llmasos

        super().open(side)
        self.heap = llmasos.Heap.attach(self.heap_name)
        self.channel = llmasos.Channel.create(self.heap, capacity=1024)
        self.held = None

    def address(self) -> object:
        return self.channel.handle

    def connect(self, peer_address: object) -> None:
        import llmasos

        self.sender = llmasos.Sender.open(self.heap, peer_address)

    def send(self, data: bytes) -> None:
        self.sender.send(data)

    def recv(self) -> bytes:
        return self.channel.recv()

    def make_payload(self, size: int):
        buf = self.heap.malloc(size)
        with memoryview(buf) as view:
            view.cast("B")[:] = b"\xa5" * size
        return buf

    def recv_payload(self) -> memoryview:
        self.held = self.channel.recv()
        return memoryview(self.held)

    def release_payload(self) -> None:
        self.heap.free(self.held)
        self.held = None


TRANSPORTS = (
    OsPipe(),
    MpPipe(),
    MpQueue(),
    ZmqIpc(),
    Iceoryx2(busy=True),
    Iceoryx2(busy=False),
    Llmasos(),
)


# -- the script both children run ---------------------------------------------


def _cpu_ns() -> int:
    """CPU time this process used so far, user plus system, in ns."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round((usage.ru_utime + usage.ru_stime) * 1e9)


class CpuMeter:
    """CPU time of this process since creation, as % of its wall time."""

    def __init__(self) -> None:
        self.cpu0, self.wall0 = _cpu_ns(), now()

    def percent(self) -> float:
        return 100.0 * (_cpu_ns() - self.cpu0) / max(1, now() - self.wall0)


def rtt_client(t: Transport, plan: Plan) -> dict:
    """A: ping-pong 64 B, timing each round trip after the warm-up."""
    for _ in range(plan.rtt_warmup):
        t.send(PING)
        t.recv()

    samples = [0] * plan.rtt_samples
    meter = CpuMeter()
    for i in range(plan.rtt_samples):
        t0 = now()
        t.send(PING)
        reply = t.recv()
        samples[i] = now() - t0
    cpu = meter.percent()

    if bytes(reply) != PING:
        raise RowError(f"the echo came back as {bytes(reply)[:16]!r}...")
    return {"rtt_ns": samples, "cpu_client_pct": cpu}


def rtt_server(t: Transport, plan: Plan) -> dict:
    """B: echo every ping; measure CPU over the timed part."""
    for _ in range(plan.rtt_warmup):
        t.send(t.recv())

    meter = CpuMeter()
    for _ in range(plan.rtt_samples):
        t.send(t.recv())
    return {"cpu_server_pct": meter.percent()}


def idle_sender(t: Transport, plan: Plan) -> dict:
    """A: stay silent for the idle time, then release B with one message."""
    time.sleep(plan.idle_s)
    t.send(PING)
    return {}


def idle_waiter(t: Transport, plan: Plan) -> dict:
    """B: measure the CPU used while blocked in recv with nothing arriving."""
    meter = CpuMeter()
    t.recv()
    return {"idle_wait_cpu_pct": meter.percent()}


def rate_sender(t: Transport, plan: Plan) -> dict:
    """A: push N messages one way as fast as the transport takes them."""
    start = now()
    for _ in range(plan.rate_messages):
        t.send(PING)
    return {"rate_start_ns": start}


def rate_receiver(t: Transport, plan: Plan) -> dict:
    """B: count N messages and stamp the arrival of the last one."""
    for _ in range(plan.rate_messages):
        t.recv()
    return {"rate_end_ns": now()}


# Hand-offs before each timed one, to bring both sides out of sleep and
# warm the path; 64 KiB takes the large-block path of a heap with 4 KiB pages.
WARM_TRIPS = 20
WARM_BYTES = 64 << 10


def handoff_sender(t: Transport, plan: Plan) -> dict:
    """A: produce a payload, tell B, and on B's "ready" stamp and send it.

    Once A holds the payload, A and B make WARM_TRIPS round trips that hand
    off a WARM_BYTES payload the same way.  Both then wait actively, as in
    the round trip, and the caches and TLB entries that writing the payload
    evicted are warm again: what is timed is the move, not a wake-up or a
    cold cache (writing 64 MiB evicts everything, and on this virtual
    machine the first call after it, of any size, pays 5 to 20 us of cache
    and TLB misses).
    """
    starts = {size: [] for size in plan.handoff_sizes}
    for size in plan.handoff_sizes:
        for _ in range(plan.handoff_reps):
            payload = t.make_payload(size)
            for _ in range(WARM_TRIPS):
                t.send_payload(t.make_payload(WARM_BYTES))
                t.recv()
            starts[size].append(now())
            t.send_payload(payload)
            del payload

    t.recv()
    return {"handoff_start_ns": starts}


def handoff_receiver(t: Transport, plan: Plan) -> dict:
    """B: when A holds a payload, say "ready", stamp when it is usable."""
    ends = {size: [] for size in plan.handoff_sizes}
    for size in plan.handoff_sizes:
        for _ in range(plan.handoff_reps):
            for _ in range(WARM_TRIPS):
                with t.recv_payload():
                    pass
                t.release_payload()
                t.send(PING)
            view = t.recv_payload()
            ends[size].append(now())
            _check_payload(view, size)
            t.release_payload()

    t.send(PING)
    return {"handoff_end_ns": ends}


def _check_payload(view: memoryview, size: int) -> None:
    """Fail unless `view` is the whole payload (first and last byte read)."""
    with view:
        if view.nbytes != size or view[0] != 0xA5 or view[-1] != 0xA5:
            raise RowError(f"a {size}-byte hand-off arrived as {view.nbytes} bytes")


SCRIPT = (
    (rtt_client, rtt_server),
    (idle_sender, idle_waiter),
    (rate_sender, rate_receiver),
    (handoff_sender, handoff_receiver),
)


def _die_with_parent() -> None:
    """Ask Linux to kill this child if the parent dies, so no spinner is left."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def child_main(t: Transport, side: str, ctl, plan: Plan) -> None:
    """Run one side of a row, reporting to the parent over `ctl`."""
    try:
        _die_with_parent()
        cpu = plan.cpus[SIDES.index(side)]
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        t.open(side)
        ctl.send(("address", t.address()))
        t.connect(ctl.recv())
        ctl.send(("connected", None))
        ctl.recv()

        result = {}
        for step in SCRIPT:
            result.update(step[SIDES.index(side)](t, plan))
        t.close()
        ctl.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        place = f"{where.name} ({os.path.basename(where.filename)}:{where.lineno})"
        ctl.send(("error", f"{side}: {exc!r} in {place}"))


# -- the parent: one row at a time --------------------------------------------


def _gather(ctls: dict, kind: str, deadline: float) -> dict:
    """Wait for one `kind` message from each child; raise on error or timeout."""
    got, waiting = {}, {conn: side for side, conn in ctls.items()}
    while waiting:
        ready = multiprocessing.connection.wait(
            list(waiting), timeout=max(0.0, deadline - time.monotonic())
        )
        if not ready:
            raise RowError(
                f"timed out waiting for {kind} from {sorted(waiting.values())}"
            )
        for conn in ready:
            tag, value = conn.recv()
            if tag == "error":
                raise RowError(value)
            got[waiting.pop(conn)] = value
    return got


def _handshake(ctls: dict, deadline: float) -> None:
    """Swap the children's addresses, then start both once both connected."""
    addresses = _gather(ctls, "address", deadline)
    ctls["a"].send(addresses["b"])
    ctls["b"].send(addresses["a"])

    _gather(ctls, "connected", deadline)
    for conn in ctls.values():
        conn.send("go")


def _stop(procs: list, grace_s: float) -> None:
    """Join the children; kill any still running after `grace_s`."""
    for proc in procs:
        proc.join(timeout=grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _run_pair(t: Transport, plan: Plan) -> dict:
    """Fork A and B over a prepared transport and return both results."""
    ctx = multiprocessing.get_context(START_METHOD)
    deadline = time.monotonic() + plan.row_timeout_s
    ctls, procs, ok = {}, [], False
    try:
        for side in SIDES:
            ctls[side], child_end = ctx.Pipe()
            proc = ctx.Process(target=child_main, args=(t, side, child_end, plan))
            proc.start()
            procs.append(proc)
            child_end.close()
        _handshake(ctls, deadline)
        results = _gather(ctls, "result", deadline)
        ok = True
        return results
    finally:
        _stop(procs, grace_s=10.0 if ok else 0.0)


def _check_import(t: Transport) -> str | None:
    """Return why the row's library cannot be used, or None if it can."""
    if t.module is None:
        return None
    try:
        importlib.import_module(t.module)
    except ImportError as exc:
        return f"not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - a broken import is reported.
        return f"import failed ({exc!r})"
    return None


def run_row(t: Transport, plan: Plan) -> dict:
    """Measure one transport; a failure becomes a row with an `error`."""
    error = _check_import(t)
    if error is not None:
        return {"transport": t.name, "error": error}

    try:
        t.prepare()
    except Exception as exc:  # noqa: BLE001 - a broken setup is reported.
        return {"transport": t.name, "error": f"setup failed ({exc!r})"}
    try:
        return figures(t.name, _run_pair(t, plan), plan)
    except RowError as exc:
        return {"transport": t.name, "error": str(exc)}
    finally:
        t.cleanup()


def percentile(ordered: list, q: float) -> float:
    """The nearest-rank q-th percentile of an already sorted list."""
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def figures(name: str, results: dict, plan: Plan) -> dict:
    """Turn both children's raw results into one row of the table."""
    a, b = results["a"], results["b"]
    rtt = sorted(a["rtt_ns"])
    rate_s = (b["rate_end_ns"] - a["rate_start_ns"]) / 1e9

    row = {"transport": name}
    for q, key in ((50, "rtt_p50_us"), (99, "rtt_p99_us"), (99.9, "rtt_p999_us")):
        row[key] = percentile(rtt, q) / 1e3
    row["msgs_per_s"] = plan.rate_messages / rate_s
    for size, key in zip(plan.handoff_sizes, HANDOFF_KEYS, strict=True):
        spans = zip(a["handoff_start_ns"][size], b["handoff_end_ns"][size], strict=True)
        row[key] = statistics.median(end - start for start, end in spans) / 1e3
    row["cpu_client_pct"] = a["cpu_client_pct"]
    row["cpu_server_pct"] = b["cpu_server_pct"]
    row["idle_wait_cpu_pct"] = b["idle_wait_cpu_pct"]
    return row


# -- report ---------------------------------------------------------------------


def regime(info: dict, plan: Plan) -> str:
    """One sentence naming the conditions the figures were taken in."""
    other = max(info["other_load_cpu_pct"].values(), default=0.0)
    load = "idle machine" if other < 10 else "machine busy with other work"
    return (
        f"{load} (other processes took at most {other:.0f}% of a CPU in a row), "
        f"{PLACEMENTS[plan.placement]}; blocking wake-ups: one message in "
        "flight and the receiver sleeps in the kernel between messages, except "
        "iceoryx2-busy (busy-polls) and llmasos (spins spin_us, then sleeps)"
    )


def _fmt(key: str, value: float | None) -> str:
    """Format one figure for the table."""
    if value is None:
        return "-"
    if key == "msgs_per_s":
        return f"{value:,.0f}"
    if key.endswith("_pct"):
        return f"{value:.0f}"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


HEADINGS = (
    "p50 us", "p99 us", "p99.9 us", "msgs/s", "1MiB us",
    "64MiB us", "cpu A %", "cpu B %", "idle %",
)  # fmt: skip


def table(rows: list, info: dict, plan: Plan) -> str:
    """The rows as a fixed-width text table under a header naming the regime."""
    name_w = max(len(r["transport"]) for r in rows) + 2
    zero = [t.name for t in TRANSPORTS if t.zero_copy]
    lines = [
        f"IPC transports, two processes per row. Regime: {regime(info, plan)}.",
        f"RTT: 64 B ping-pong, {plan.rtt_samples} samples after {plan.rtt_warmup} "
        f"warm-up; rate: {plan.rate_messages} x 64 B one way; hand-off: median of "
        f"{plan.handoff_reps}, until the receiver holds a usable buffer; cpu A/B: "
        f"client/server during RTT; idle: receiver blocked {plan.idle_s} s. "
        f"Zero-copy hand-off (payload made in shared memory): {', '.join(zero)}.",
        "transport".ljust(name_w) + "".join(h.rjust(11) for h in HEADINGS),
    ]
    for row in rows:
        cells = row["transport"].ljust(name_w)
        if "error" in row:
            lines.append(cells + row["error"])
            continue
        lines.append(cells + "".join(_fmt(k, row[k]).rjust(11) for k in FIGURES))
    return "\n".join(lines)


def _verdict(value: float, limit: float) -> str:
    """PASS if a ratio meets its target limit, else FAIL."""
    return "PASS" if value <= limit else "FAIL"


def targets(rows: list) -> str:
    """The llmasos target ratios, each with PASS or FAIL (printed, not asserted)."""
    by_name = {r["transport"]: r for r in rows if "error" not in r}
    ours = by_name.get("llmasos")
    if ours is None:
        return "Targets: n/a, the llmasos row has no figures."

    lines = ["Targets (printed figures, not assertions):"]
    pipe = by_name.get("multiprocessing.Pipe")
    if pipe is not None:
        ratio = ours["rtt_p50_us"] / pipe["rtt_p50_us"]
        lines.append(
            f"  llmasos p50 / multiprocessing.Pipe p50 = {ratio:.3f}"
            f" (target <= 1/20 = 0.050)  {_verdict(ratio, 1 / 20)}"
        )
    for name, other in by_name.items():
        if name != "llmasos":
            ratio = ours["rtt_p50_us"] / other["rtt_p50_us"]
            lines.append(
                f"  llmasos p50 / {name} p50 = {ratio:.3f}"
                f" (target <= 1, not slower)  {_verdict(ratio, 1.0)}"
            )
    ratio = ours["handoff_64mib_us"] / ours["rtt_p50_us"]
    lines.append(
        f"  llmasos handoff_64mib_us / rtt_p50_us = {ratio:.2f}"
        f" (target <= 2)  {_verdict(ratio, 2.0)}"
    )
    return "\n".join(lines)


def _rounded(row: dict) -> dict:
    """A row with its figures rounded for JSON."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def parse_args(argv: list | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", help="comma-separated transport names")
    parser.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="split",
        help="CPUs for A and B: two pinned (default), one pinned, or free",
    )
    args = parser.parse_args(argv)

    names = [t.name for t in TRANSPORTS]
    args.only = args.only.split(",") if args.only else names
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown transport {unknown}; choose from {', '.join(names)}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan for `--quick` or a full run, with A and B placed as asked."""
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {"split": (cpus[0], cpus[-1]), "same": (cpus[0], cpus[0])}
    if args.placement == "split" and len(cpus) < 2:
        raise SystemExit("--placement split needs two CPUs; this process has one")

    plan = QUICK if args.quick else FULL
    cpus_ab = pinned.get(args.placement, (None, None))
    return dataclasses.replace(plan, placement=args.placement, cpus=cpus_ab)


def run_rows(args: argparse.Namespace, plan: Plan, info: dict) -> list:
    """Measure the selected rows, noting the CPU other processes took in each."""
    rows = []
    try:
        for t in TRANSPORTS:
            if t.name in args.only:
                meter = OtherLoadMeter()
                rows.append(run_row(t, plan))
                info["other_load_cpu_pct"][t.name] = round(meter.percent(), 1)
    finally:
        _cleanup_iceoryx2()
    return rows


def main(argv: list | None = None) -> int:
    """Measure the selected transports and print the table or the JSON."""
    args = parse_args(argv)
    plan = make_plan(args)
    info = machine("pyzmq", "iceoryx2") | {
        "other_load_cpu_pct": {},
        "start_method": START_METHOD,
    }
    rows = run_rows(args, plan, info)

    if args.json:
        report = {"rows": [_rounded(r) for r in rows], "regime": regime(info, plan)}
        print(json.dumps(report | {"machine": info, "plan": dataclasses.asdict(plan)}))
    else:
        print(table(rows, info, plan))
        print()
        print(targets(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
