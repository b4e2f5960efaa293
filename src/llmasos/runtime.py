"""The inside of a replica: receive calls, schedule them, run them, reply.

A replica is a process started by the kernel's fork server.  It attaches the
system's heap, makes an instance of its service class, opens the channel its
callers send to, tells the kernel it is ready, and serves.

Scheduling.  Requests are drained from the channel eagerly into a run queue
ordered by the service's policy (``fifo``, ``priority``, ``hrrn``, ``edf``; see
``llmasos.sched``), so the policy sees all the waiting work, not only the head
of the channel.  ``workers`` threads serve as leader and followers: one of
them (the leader) waits on the channel; the thread that receives drains the
channel and runs the best request itself, waking another worker to lead only
when that request is expected to be slow or more are queued.  In the common
case the request therefore runs on the thread that received it: handing a
request from one thread to another costs as much as the whole call.
Coroutine methods run on an event loop of their own thread.  At most
``max_in_flight`` requests are in progress at once.  A request whose deadline
(from the caller's timeout) has passed is answered with
``DeadlineExceeded`` and never run.

Errors raised by a method go back to the caller with their type, message and
traceback; the replica carries on.  SIGTERM ends it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import llmasos
from llmasos.channel import Channel, Sender
from llmasos.codec import Decoder, Encoder
from llmasos.errors import ChannelClosed
from llmasos.heap import Buffer, Heap
from llmasos.sched.policies import DurationEstimator, Request, make_policy

CHANNEL_CAPACITY = 1024  # requests a replica's channel holds

# A call expected to take longer than this hands the channel to another
# worker while it runs; a quicker one keeps it, as waking a thread would cost
# more than the call.
HAND_OVER_S = 0.0005


def load_entry(entry: str) -> type:
    """Import ``package.module:Class``."""
    module_name, _, attr = entry.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no {attr!r}") from None


def public_methods(obj: object) -> dict[str, Callable[..., Any]]:
    """The methods callers may call: public and callable."""
    methods = {}
    for name in dir(type(obj)):
        if not name.startswith("_") and callable(getattr(obj, name, None)):
            methods[name] = getattr(obj, name)
    return methods


def _error(exc: Exception) -> list[str]:
    """What a caller gets of an exception: type name, message, traceback."""
    return [type(exc).__name__, str(exc), traceback.format_exc()]


def _arrival(sent_ns: int) -> float:
    """When a request arrived, on the monotonic clock: when it was sent, but
    never in the future (the caller's clock is the same clock)."""
    return min(sent_ns / 1e9, time.monotonic())


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


class _Codecs(threading.local):
    def __init__(self, heap: Heap) -> None:
        self.encoder, self.decoder = Encoder(heap), Decoder(heap)


class Replica:
    """One replica serving one service instance on one channel."""

    def __init__(
        self,
        service: str,
        index: int,
        obj: object,
        heap: Heap,
        spec: dict[str, Any] | None = None,
        channel: Channel | None = None,
    ) -> None:
        spec = spec or {}
        self.service, self.index, self.heap = service, index, heap
        self.methods = public_methods(obj)
        self.coroutines = {
            name for name, fn in self.methods.items() if inspect.iscoroutinefunction(fn)
        }
        self.channel = channel or Channel.create(heap, capacity=CHANNEL_CAPACITY)
        self.codecs = _Codecs(heap)
        self.senders: dict[int, Sender] = {}
        methods = spec.get("methods", {})
        self.estimator = DurationEstimator(
            priors={
                m: v["expected_ms"] / 1e3
                for m, v in methods.items()
                if v.get("expected_ms")
            }
        )
        self.queue = make_policy(
            spec.get("policy", "fifo"),
            method_priorities={m: v.get("priority", 0) for m, v in methods.items()},
            estimator=self.estimator,
        )
        self.deadlines = {
            m: v["deadline_ms"] / 1e3
            for m, v in methods.items()
            if v.get("deadline_ms")
        }
        self.workers = max(1, spec.get("workers", 1))
        self.max_in_flight = max(1, spec.get("max_in_flight", 64))
        # `with self.lock` rather than `with self.cond`: the same lock,
        # without two Python calls per use on the path of every request.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.threads = 1  # workers started: this one, then more on demand
        self.idle = 0  # workers waiting on cond
        self.leader = False
        self.in_flight = 0
        self.loop: Any = None  # an asyncio loop, made for the first coroutine

    # ---- serving ----

    def serve(self) -> None:
        """Serve until SIGTERM (the main thread is one of the workers)."""
        signal.signal(signal.SIGTERM, _stop)
        try:
            self._work()
        except _Stop:
            pass
        finally:
            self.channel.destroy()

    def _work(self) -> None:
        finished = False  # whether this thread's last request is done
        while True:
            item = self._next(finished)
            try:
                if isinstance(item, Request):
                    finished = self._run(item.payload, item.deadline)
                elif item[6] or self.deadlines:
                    finished = self._run(item, self._deadline(item))
                else:
                    finished = self._run(item, None)
            except Exception:  # a bug of ours: say so, keep serving
                traceback.print_exc()
                finished = True

    def _next(self, finished: bool) -> Request | list:
        """Count the thread's last request done (if ``finished``), then
        return the next request to run: the best of the run queue, or,
        leading the wait on the channel when nobody else does, the one
        received.

        When that one is alone (nothing else queued, nothing in the channel)
        it runs as it came, without passing through the run queue: the cost
        of a call is the product, and no policy has a choice to make.
        """
        with self.lock:
            if finished:
                self.in_flight -= 1
            while True:
                req = self._pop()
                if req is not None:
                    if self.queue.queued:
                        self._wake()  # more to run: another worker may
                    return req
                if not self.leader:
                    self.leader = True
                    break
                self.idle += 1
                self.cond.wait()
                self.idle -= 1
        try:
            first = self.channel.recv()
        except BaseException:
            with self.lock:
                self.leader = False
            raise
        with self.lock:
            if (
                not self.queue.queued
                and not self.channel.queued
                and self.in_flight < self.max_in_flight
            ):
                alone = self._decode(first)
                if alone is not None:
                    self.leader = False
                    self.in_flight += 1
                    if (
                        self.workers > 1
                        and self.estimator.estimate(alone[1]) > HAND_OVER_S
                    ):
                        self._wake()  # a slow call: let another thread lead
                    return alone
            else:
                self._queue(first)
            self._drain()  # still the leader: the channel is ours alone
            self.leader = False
            req = self._pop()
            self._wake()
        return req if req is not None else self._next(False)

    def _wake(self) -> None:
        """Wake a follower; cond held.  Workers start when first needed:
        most replicas never need more than the one that receives."""
        if self.idle:
            self.cond.notify()
        elif self.threads < self.workers:
            self.threads += 1
            name = f"worker-{self.threads - 1}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _pop(self) -> Request | None:
        """Pop the best request if one may start; cond held.

        The channel has one consumer: while a leader waits on it nobody else
        may drain it (when no thread leads, none is inside recv).
        """
        if not self.leader:
            self._drain()
        if not self.queue.queued or self.in_flight >= self.max_in_flight:
            return None
        req = self.queue.pop()
        for expired in self.queue.take_expired():
            self._reply_late(expired.payload)
        if req is not None:
            self.in_flight += 1
        return req

    def _drain(self) -> None:
        """Move every message waiting in the channel to the run queue."""
        while self.channel.queued:
            self._queue(self.channel.recv_nowait())

    def _queue(self, msg: bytes) -> None:
        req = self._decode(msg)
        if req is None:
            return
        req_id, method, _, _, _, _, _, prio, sent = req
        self.queue.push(
            Request(
                name=str(req_id),
                arrival=_arrival(sent),
                method=method,
                priority=prio or None,
                deadline=self._deadline(req),
                payload=req,
            )
        )

    def _decode(self, msg: bytes) -> list | None:
        """The request in msg, ``[id, method, args, kwargs, reply, caller,
        deadline_ns, priority, sent_ns]``, or None (reported in the log) for
        a message that cannot be read: it has no reply address to answer."""
        try:
            req = self.codecs.decoder.unpack(msg)
            if type(req) is not list or len(req) != 9:
                raise ValueError(f"a request has 9 fields, not {req!r}")
        except Exception:
            traceback.print_exc()
            return None
        return req

    def _deadline(self, req: list) -> float | None:
        """When the request must have started, on the monotonic clock: the
        caller's deadline, else the manifest's deadline after its arrival."""
        if req[6]:
            return float(req[6] / 1e9)
        budget = self.deadlines.get(req[1])
        return None if budget is None else _arrival(req[8]) + budget

    def _run(self, req: list, deadline: float | None) -> bool:
        """Run a request and reply; False when it goes on as a coroutine
        (whose end is counted by ``_done``)."""
        req_id, method, args, kwargs, reply, caller, _, _, _ = req
        if deadline is not None and time.monotonic() >= deadline:
            self._reply_late(req)
            return True
        fn = self.methods.get(method)
        t0 = time.perf_counter()
        try:
            if fn is None:
                raise AttributeError(
                    f"service {self.service!r} has no method {method!r}"
                )
            value = fn(*args, **kwargs)
        except Exception as exc:
            message = [req_id, False, _error(exc)]
        else:
            if method in self.coroutines:
                self._start_async(req, value)
                return False
            message = [req_id, True, value]
        self.estimator.record(method, time.perf_counter() - t0)
        self._reply(reply, caller, message)
        return True

    def _done(self) -> None:
        """Count a coroutine's request done (from the loop's thread)."""
        with self.lock:
            self.in_flight -= 1
            if self.queue.queued or self.in_flight + 1 >= self.max_in_flight:
                self._wake()

    def _start_async(self, req: list, coro: Any) -> None:
        """Run a coroutine on the replica's event loop; reply when it ends."""
        import asyncio  # only services with coroutine methods need it

        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(
                target=self.loop.run_forever, name="loop", daemon=True
            ).start()
        req_id, method, _, _, reply, caller, _, _, _ = req
        t0 = time.perf_counter()

        async def run() -> None:
            try:
                value = await coro
                message = [req_id, True, value]
            except Exception as exc:
                message = [req_id, False, _error(exc)]
            self.estimator.record(method, time.perf_counter() - t0)
            self._done()
            self._reply(reply, caller, message)

        asyncio.run_coroutine_threadsafe(run(), self.loop)

    # ---- replies ----

    def _reply_late(self, req: list) -> None:
        """Answer a request whose deadline passed before it could run."""
        req_id, _, _, _, reply, caller, _, _, _ = req
        error = [
            "DeadlineExceeded",
            "the call's deadline passed before it could run",
            "",
        ]
        self._reply(reply, caller, [req_id, False, error])

    def _reply(self, handle: int, caller: int, message: list) -> None:
        """Send the reply; blocks made or returned move to the caller."""
        enc = self.codecs.encoder
        try:
            data = enc.pack(message)
        except Exception as exc:
            message[1:] = [False, [type(exc).__name__, str(exc), ""]]
            data = enc.pack(message)
        if enc.made:
            for buf in enc.made:
                self.heap.give(buf, caller)
            enc.made.clear()
        value = message[2]
        if message[1] and isinstance(value, Buffer) and value.alive:
            self.heap.give(value, caller)
        try:
            (self.senders.get(handle) or self._sender(handle)).send(data, timeout=5.0)
        except (ChannelClosed, TimeoutError):
            self.senders.pop(handle, None)  # the caller is gone or stuck

    def _sender(self, handle: int) -> Sender:
        sender = self.senders[handle] = Sender.open(self.heap, handle)
        return sender


class Prepared(NamedTuple):
    """What a spare has made before it knows which replica it will be."""

    heap: Heap
    channel: Channel


def prepare(heap_name: str) -> Prepared:
    """What a spare process waiting to become a replica can do before it
    knows which: attach the heap and open the channel (it already is the
    replica's process).  It also runs once, on a stand-in service, the code
    a replica runs first: the first touch of a page shared with the fork
    server copies it, which is better done before a spawn than during one."""
    heap = Heap.attach(heap_name)
    channel = Channel.create(heap, capacity=CHANNEL_CAPACITY)
    json.loads(json.dumps({"op": "ready", "pid": 0, "channel": 0}))
    for name in ("fifo", "priority", "hrrn", "edf"):
        make_policy(name, estimator=DurationEstimator())
    stand_in = {"methods": {"run": {"priority": 0, "expected_ms": 1.0}}}
    Replica("", 0, _StandIn(), heap, stand_in, channel)
    llmasos.use_heap(heap)
    return Prepared(heap, channel)


class _StandIn:
    def run(self) -> None:
        pass


def run(spec: dict[str, Any], prepared: Prepared) -> int:
    """Body of a replica process; returns its exit code."""
    heap = prepared.heap
    llmasos.use_heap(heap)
    if spec.get("quota_pages"):
        heap.set_quota(os.getpid(), spec["quota_pages"])
    obj = load_entry(spec["entry"])()
    replica = Replica(
        spec["service"], spec["replica"], obj, heap, spec, prepared.channel
    )
    # One write of less than PIPE_BUF bytes: atomic among all replicas.
    ready = {"op": "ready", "pid": os.getpid(), "channel": replica.channel.handle}
    os.write(spec["ready_fd"], json.dumps(ready).encode() + b"\n")
    os.close(spec["ready_fd"])
    replica.serve()
    return 0
