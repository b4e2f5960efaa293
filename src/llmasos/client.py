"""Calling services: ``llmasos.connect("kv").get("k")``.

``connect(service)`` returns a proxy whose attributes are the service's
methods.  A call picks the replica with the fewest requests waiting in its
channel, sends the request, and waits for the reply on a channel of the
calling thread.  While it waits it checks, every ``CHECK_S`` seconds, that
the replica is still alive: a call to a replica that died fails fast with
``ReplicaDied``, or, for a method the manifest declares idempotent, is tried
once more on another replica.

``aconnect(service)`` is the asyncio variant; its calls run the same code on
the loop's default executor, which costs a thread hand-off (tens of
microseconds) per call.

A process that is not a replica (a script, the CLI) registers itself with
the kernel on its first call, so that its heap blocks are reclaimed when it
exits.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from llmasos import control
from llmasos.channel import Channel, Sender
from llmasos.codec import Decoder, Encoder, prepare
from llmasos.errors import ChannelClosed, LLMasOSError
from llmasos.heap import Buffer, Heap

# How often a waiting caller checks that its replica lives: the futex it
# sleeps on cannot also wait for a death, so a long call costs a wake-up
# every CHECK_S.
CHECK_S = 0.02
RESOLVE_WAIT_S = 10.0  # how long a call waits for a replica to be ready


MAX_RESENDS = 5  # tries of a request no replica could take


class _Undelivered(Exception):
    """The request never reached the replica: safe to send again."""


class RemoteError(LLMasOSError):
    """An exception raised by a service method, carried back to the caller.

    ``type_name`` is the remote exception's class name, ``remote_traceback``
    its traceback as text; ``service`` and ``replica`` say where it was
    raised.  When the remote class is a built-in exception, the error raised
    here is also an instance of it, so ``except KeyError`` works.
    """

    type_name = "Exception"

    def __init__(
        self,
        message: str,
        service: str = "",
        replica: int = -1,
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.service = service
        self.replica = replica
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return (
            f"{self.type_name} in service {self.service!r} replica {self.replica}: "
            f"{self.message}"
        )


class ReplicaDied(LLMasOSError):
    """The replica serving a call died before it answered."""


class ServiceUnavailable(LLMasOSError):
    """No replica of the service is ready."""


@functools.cache
def _remote_class(type_name: str) -> type[RemoteError]:
    # DeadlineExceeded: the callee dropped the call unrun; a kind of timeout.
    base = (
        TimeoutError
        if type_name == "DeadlineExceeded"
        else getattr(builtins, type_name, None)
    )
    bases: tuple[type, ...] = (RemoteError,)
    if isinstance(base, type) and issubclass(base, Exception):
        try:
            base("probe")
            bases = (RemoteError, base)
        except Exception:
            pass
    return type(f"Remote{type_name}", bases, {"type_name": type_name})


def remote_error(info: list, service: str, replica: int) -> RemoteError:
    type_name, message, tb = info
    return _remote_class(type_name)(message, service, replica, tb)


@dataclass(eq=False)  # compared by identity: the registry's own objects
class _Replica:
    index: int
    pid: int
    sender: Sender


class _Process:
    """What a calling process shares between its threads and proxies."""

    def __init__(self, system: str) -> None:
        self.system = system
        self.lock = threading.Lock()
        self.control = control.ControlClient(system)
        hello = self.control.request("hello", pid=os.getpid())
        self.heap = _system_heap(hello["heap"])
        if not os.environ.get(control.REPLICA_ENV):
            self.control.request("attach", pid=os.getpid())
        self.registry: dict[str, tuple[list[_Replica], frozenset[str]]] = {}
        self.local = threading.local()

    def request(self, op: str, **args: Any) -> Any:
        with self.lock:
            return self.control.request(op, **args)

    def replicas(
        self, service: str, refresh: bool = False
    ) -> tuple[list[_Replica], frozenset[str]]:
        if refresh or service not in self.registry:
            found = self.request("resolve", service=service)
            reps = [
                _Replica(r["replica"], r["pid"], Sender.open(self.heap, r["channel"]))
                for r in found["replicas"]
            ]
            self.registry[service] = (reps, frozenset(found["idempotent"]))
        return self.registry[service]

    def thread(self) -> _Thread:
        ctx = getattr(self.local, "ctx", None)
        if ctx is None:
            ctx = self.local.ctx = _Thread(self.heap)
        return ctx


class _Thread:
    """A calling thread's reply channel and codecs."""

    def __init__(self, heap: Heap) -> None:
        self.reply = Channel.create(heap, capacity=16)
        self.handle = self.reply.handle
        self.encoder, self.decoder = Encoder(heap), Decoder(heap, reply=True)
        self.ids = itertools.count(1)
        self.pid = os.getpid()


def _system_heap(name: str) -> Heap:
    import llmasos

    heap = llmasos._system_heap
    if heap is not None and not heap.closed and heap.name == name:
        return heap
    heap = Heap.attach(name)
    llmasos.use_heap(heap)
    return heap


_processes: dict[str | None, _Process] = {}
_processes_lock = threading.Lock()


def _process(system: str | None) -> _Process:
    """The calling process's link to a system: the one named, else the one
    in ``$LLMASOS_SYSTEM``, else the only one running."""
    key = system or os.environ.get(control.SYSTEM_ENV)
    proc = _processes.get(key)
    if proc is not None:
        return proc
    with _processes_lock:
        name = key or control.default_system()
        proc = _processes.get(name)
        if proc is None:
            proc = _processes[name] = _Process(name)
        _processes[key] = proc
        return proc


_forks = 0  # forks of this process so far: a proxy's cached _Process is void after one


def _forget_after_fork() -> None:
    global _forks
    _processes.clear()
    _forks += 1


os.register_at_fork(after_in_child=_forget_after_fork)


class ServiceProxy:
    """Calls the methods of a service: ``proxy.method(*args, **kwargs)``.

    A proxy without a system name follows ``$LLMASOS_SYSTEM`` (else the only
    system running) as it is at its first call, and after a fork.
    """

    def __init__(
        self,
        service: str,
        system: str | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> None:
        self._service = service
        self._system = system
        self._timeout = timeout
        self._priority = priority
        self._last: _Replica | None = None
        # The link to the system, found on the first call (reading the
        # environment on every call would cost a microsecond) and again
        # after a fork.
        self._proc: _Process | None = None
        self._proc_forks = -1

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        bound = functools.partial(self._call, method)
        setattr(self, method, bound)
        return bound

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call method on a replica.  A request that could not be delivered
        (the replica's channel closed: it died or restarted) is sent again to
        a replica resolved anew; one that was delivered is sent again only
        for an idempotent method, once."""
        proc = self._proc
        if proc is None or self._proc_forks != _forks:
            proc = self._proc = _process(self._system)
            self._proc_forks = _forks
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        retried = undelivered = 0
        dead = -1  # the replica a retry should avoid
        while True:
            found = None if undelivered else proc.registry.get(self._service)
            reps, idempotent = found or self._ready(proc, deadline, undelivered > 0)
            if dead >= 0:
                reps = [r for r in reps if r.index != dead] or reps
            rep = reps[0] if len(reps) == 1 else self._pick(reps)
            try:
                return self._call_once(proc, rep, method, args, kwargs, deadline)
            except _Undelivered:
                proc.registry.pop(self._service, None)
                undelivered += 1
                if undelivered > MAX_RESENDS:
                    raise ServiceUnavailable(
                        f"service {self._service!r}: no replica took the call "
                        f"{method!r} after {MAX_RESENDS} tries"
                    ) from None
            except ReplicaDied:
                proc.registry.pop(self._service, None)
                if method not in idempotent or retried:
                    raise
                retried += 1
                dead = rep.index

    def _ready(
        self, proc: _Process, deadline: float | None, refresh: bool = False
    ) -> tuple[list[_Replica], frozenset[str]]:
        until = None
        while True:
            reps, idempotent = proc.replicas(self._service, refresh)
            if reps:
                return reps, idempotent
            if until is None:
                until = deadline or time.monotonic() + RESOLVE_WAIT_S
            if time.monotonic() > until:
                raise ServiceUnavailable(
                    f"service {self._service!r} of system {proc.system!r} has no "
                    "ready replica"
                )
            time.sleep(0.01)
            refresh = True

    def _pick(self, reps: list[_Replica]) -> _Replica:
        """The replica with the fewest requests queued; on a tie the one used
        last, which is likely still spinning on its channel and answers
        without a wake-up."""
        if len(reps) == 1:
            return reps[0]
        last = self._last
        best = last if last in reps else reps[0]
        best_queued = _queued(best)
        for rep in reps:
            if best_queued == 0:
                break
            queued = _queued(rep)
            if queued < best_queued:
                best, best_queued = rep, queued
        self._last = best
        return best

    def _call_once(
        self,
        proc: _Process,
        rep: _Replica,
        method: str,
        args: tuple,
        kwargs: dict,
        deadline: float | None,
    ) -> Any:
        """Send one request to rep and wait for its reply; every call goes
        through here, so it does no more than it must."""
        try:
            ctx = proc.local.ctx
        except AttributeError:
            ctx = proc.thread()
        req_id = next(ctx.ids)
        enc = ctx.encoder
        try:
            data = enc.pack(
                [
                    req_id,
                    method,
                    list(map(prepare, args)),
                    kwargs,
                    ctx.handle,
                    ctx.pid,
                    0 if deadline is None else int(deadline * 1e9),
                    self._priority,
                    time.monotonic_ns(),
                ]
            )
            try:
                rep.sender.send(data, timeout=_left(deadline))
            except ChannelClosed:
                raise _Undelivered from None
            recv, unpack = ctx.reply.recv, ctx.decoder.unpack
            while True:
                try:
                    msg = recv(
                        timeout=CHECK_S
                        if deadline is None
                        else min(max(0.0, deadline - time.monotonic()), CHECK_S)
                    )
                except TimeoutError:
                    self._check(rep, method, deadline)
                    continue
                got_id, ok, value = unpack(msg)
                if got_id == req_id:
                    break
                # else: the late reply of a call that timed out; dropped
        finally:
            if enc.made:
                for buf in enc.made:
                    proc.heap.free(buf)
                enc.made.clear()
        if not ok:
            raise remote_error(value, self._service, rep.index)
        if isinstance(value, Buffer):
            return _same_buffer(value, args)
        return value

    def _check(self, rep: _Replica, method: str, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"call {self._service}.{method} on replica {rep.index} got no "
                f"answer within {self._timeout} s"
            )
        try:
            os.kill(rep.pid, 0)
        except ProcessLookupError:
            raise ReplicaDied(
                f"service {self._service!r} replica {rep.index} (pid {rep.pid}) "
                f"died during a call of {method!r}"
            ) from None


def _same_buffer(value: Buffer, args: tuple) -> Buffer:
    """A Buffer the callee returned that is one of the caller's arguments
    comes back as that very object, not as a second one over the block."""
    for arg in args:
        if isinstance(arg, Buffer) and arg.handle == value.handle:
            return arg
    return value


def _queued(rep: _Replica) -> int:
    try:
        return rep.sender.queued
    except ChannelClosed:
        return 1 << 30


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def connect(
    service: str,
    system: str | None = None,
    *,
    timeout: float | None = None,
    priority: int = 0,
) -> ServiceProxy:
    """A proxy calling ``service`` of ``system`` (default: this process's)."""
    return ServiceProxy(service, system, timeout, priority)


class AsyncServiceProxy:
    """``await proxy.method(...)``: the calls of ServiceProxy, off the loop."""

    def __init__(self, proxy: ServiceProxy) -> None:
        self._proxy = proxy

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._proxy, method)

        async def acall(*args: Any, **kwargs: Any) -> Any:
            import asyncio  # not at the top: it costs every caller 80 ms

            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, functools.partial(call, *args, **kwargs)
            )

        return acall


def aconnect(
    service: str,
    system: str | None = None,
    *,
    timeout: float | None = None,
    priority: int = 0,
) -> AsyncServiceProxy:
    """The asyncio variant of ``connect``."""
    return AsyncServiceProxy(ServiceProxy(service, system, timeout, priority))
