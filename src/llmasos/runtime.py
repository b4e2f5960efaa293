"""The inside of a replica: the loop that receives calls and runs them.

A replica is a process started by the kernel's fork server.  It attaches the
system's heap, makes an instance of its service class, opens the channel its
callers send to, tells the kernel it is ready, and then serves: receive a
request, run the method on this very thread (handing a request to another
thread would cost as much as the whole call), send the reply.  Coroutine
methods run on an event loop owned by this thread.

Errors raised by a method go back to the caller with their type, message and
traceback; the replica carries on.  SIGTERM ends the loop between requests.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from llmasos import control
from llmasos.channel import Channel, Sender
from llmasos.codec import Decoder, Encoder
from llmasos.errors import ChannelClosed
from llmasos.heap import Buffer, Heap

REPLICA_ENV = "LLMASOS_REPLICA"  # "service/index" in every replica


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


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


class Replica:
    """One replica serving one service instance on one channel."""

    def __init__(self, service: str, index: int, obj: object, heap: Heap) -> None:
        self.service, self.index, self.heap = service, index, heap
        self.methods = public_methods(obj)
        self.channel = Channel.create(heap, capacity=1024)
        self.encoder, self.decoder = Encoder(heap), Decoder(heap)
        self.senders: dict[int, Sender] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.calls = 0

    def serve(self) -> None:
        """Receive and run calls until SIGTERM."""
        signal.signal(signal.SIGTERM, _stop)
        try:
            while True:
                self.handle(self.channel.recv())
        except _Stop:
            pass
        finally:
            self.channel.destroy()

    def handle(self, msg: bytes) -> None:
        req_id, method, args, kwargs, reply, caller, deadline, _prio = (
            self.decoder.unpack(msg)
        )
        if deadline and time.monotonic_ns() > deadline:
            value: Any = ["DeadlineExceeded", "the call's deadline passed before it ran", ""]
            ok = False
        else:
            ok, value = self.run(method, args, kwargs)
        self.reply(reply, caller, [req_id, ok, value])

    def run(self, method: str, args: list, kwargs: dict) -> tuple[bool, Any]:
        fn = self.methods.get(method)
        try:
            if fn is None:
                raise AttributeError(
                    f"service {self.service!r} has no method {method!r}"
                )
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = self._await(value)
            self.calls += 1
            return True, value
        except Exception as exc:
            return False, [type(exc).__name__, str(exc), traceback.format_exc()]

    def _await(self, value: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(value)

    def reply(self, handle: int, caller: int, message: list) -> None:
        """Send the reply; blocks made or returned move to the caller."""
        enc = self.encoder
        try:
            data = enc.pack(message)
        except Exception as exc:
            message[1:] = [False, [type(exc).__name__, str(exc), ""]]
            data = enc.pack(message)
        for buf in enc.made:
            self.heap.give(buf, caller)
        enc.made.clear()
        value = message[2]
        if message[1] and isinstance(value, Buffer) and value.alive:
            self.heap.give(value, caller)
        try:
            self._sender(handle).send(data, timeout=5.0)
        except (ChannelClosed, TimeoutError):
            self.senders.pop(handle, None)  # the caller is gone or stuck

    def _sender(self, handle: int) -> Sender:
        sender = self.senders.get(handle)
        if sender is None:
            sender = self.senders[handle] = Sender.open(self.heap, handle)
        return sender


def run(spec: dict[str, Any]) -> int:
    """Body of a replica process; returns its exit code."""
    heap = Heap.attach(spec["heap"])
    import llmasos

    llmasos.use_heap(heap)
    if spec.get("quota_pages"):
        heap.set_quota(os.getpid(), spec["quota_pages"])
    obj = load_entry(spec["entry"])()
    replica = Replica(spec["service"], spec["replica"], obj, heap)
    control.request(
        "ready",
        system=spec["system"],
        pid=os.getpid(),
        service=spec["service"],
        replica=spec["replica"],
        channel=replica.channel.handle,
    )
    replica.serve()
    return 0
