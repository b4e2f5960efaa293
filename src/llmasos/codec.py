"""How calls between services are encoded.

A request is ``[id, method, args, kwargs, reply, caller, deadline_ns,
priority, sent_ns]`` (times on the monotonic clock, which all processes of a
machine share) and a reply ``[id, ok, value]``, both in MessagePack (with
msgspec, whose encoder and decoder are made once and cost a third to a half
of msgpack's per message).  Plain values are copied into the message;
msgspec also takes sets and tuples (they arrive as lists), dataclasses (as
maps) and datetimes (aware ones arrive as datetimes, naive ones as ISO
strings).  Large payloads travel through the heap instead, marked
by extension types:

- ``EXT_BUFFER``: a ``Buffer`` by handle, not a byte of it copied.  In a
  request the callee sees the caller's block (the caller keeps it); in a reply
  the block's ownership moves to the caller.
- ``EXT_BYTES`` and ``EXT_NDARRAY``: numpy arrays, and bytes-like arguments of
  at least ``LARGE`` bytes (``prepare`` marks those), copied once into a heap
  block instead of being serialised; the callee reads them in place (a
  read-only memoryview, or a numpy array over the block).  A large bytes-like
  value nested in another, or returned, is copied into the message like a
  small one.

Blocks the encoder made for a request are listed in ``Encoder.made`` so the
caller frees them once the reply is in.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from llmasos.errors import InvalidHandle
from llmasos.heap import Buffer, Heap

EXT_BUFFER = 1
EXT_BYTES = 2
EXT_NDARRAY = 3

LARGE = 16 << 10  # bytes-like arguments this large go through the heap

DecodeError = msgspec.DecodeError

_BYTES_LIKE = (bytes, bytearray, memoryview)  # (a tuple: quicker than a union)


def _is_ndarray(obj: Any) -> bool:
    """True for a numpy array; numpy is looked up, never imported here (a
    process that made an array has imported it, and importing it costs every
    process that did not 100 ms)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


class _Large:
    """A large bytes-like argument, to be moved through the heap (msgspec
    encodes bytes-like values itself and would never ask the encoder)."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


def prepare(value: Any) -> Any:
    """Mark a large bytes-like argument so the encoder moves it by block;
    anything else is returned as it is."""
    if (
        isinstance(value, _BYTES_LIKE)
        and (value.nbytes if isinstance(value, memoryview) else len(value)) >= LARGE
    ):
        return _Large(value)
    return value


class Encoder:
    """Packs messages, moving large payloads into ``heap``."""

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self.made: list[Buffer] = []
        self.pack = msgspec.msgpack.Encoder(enc_hook=self._hook).encode

    def _hook(self, obj: Any) -> msgspec.msgpack.Ext:
        if isinstance(obj, Buffer):
            if obj.heap.name != self.heap.name:
                raise InvalidHandle(
                    f"buffer {obj.handle:#x} belongs to heap {obj.heap.name!r}, "
                    f"not to the system's heap {self.heap.name!r}; allocate it "
                    "with llmasos.malloc"
                )
            return msgspec.msgpack.Ext(EXT_BUFFER, obj.handle.to_bytes(8, "little"))
        if isinstance(obj, _Large):
            return self._copy_in(EXT_BYTES, b"", obj.data)
        if _is_ndarray(obj):
            return self._ndarray(obj)
        raise TypeError(f"cannot send a {type(obj).__name__} between services")

    def _ndarray(self, arr: Any) -> msgspec.msgpack.Ext:
        head = msgspec.msgpack.encode([arr.dtype.str, list(arr.shape)])
        data = arr if arr.flags.c_contiguous else arr.copy()
        return self._copy_in(EXT_NDARRAY, head, data.reshape(-1).view("u1"))

    def _copy_in(self, code: int, head: bytes, data: Any) -> msgspec.msgpack.Ext:
        """Copy data into a new block: one memcpy, no serialisation."""
        view = memoryview(data).cast("B")
        buf = self.heap.malloc(max(len(view), 1))
        with memoryview(buf) as dst:
            dst[: len(view)] = view
        self.made.append(buf)
        handle = buf.handle.to_bytes(8, "little")
        return msgspec.msgpack.Ext(
            code, handle + len(view).to_bytes(8, "little") + head
        )


class Decoder:
    """Unpacks messages, opening heap payloads.

    For a request (``reply=False``) payloads are read in place: a ``Buffer``
    is the caller's block, lent for the call, and large bytes and arrays are
    views of blocks the caller frees after the reply.  For a reply
    (``reply=True``) the blocks are now the caller's: a ``Buffer`` comes back
    owned, and copied payloads are read out into plain values and their
    blocks freed at once.
    """

    def __init__(self, heap: Heap, reply: bool = False) -> None:
        self.heap = heap
        self.reply = reply
        self.unpack = msgspec.msgpack.Decoder(ext_hook=self._ext).decode

    def _ext(self, code: int, data: memoryview) -> Any:
        handle = int.from_bytes(data[:8], "little")
        if code == EXT_BUFFER:
            return self.heap._adopt(handle) if self.reply else self.heap.open(handle)
        size = int.from_bytes(data[8:16], "little")
        buf = self.heap.open(handle)
        view = memoryview(buf)[:size]
        if code == EXT_BYTES:
            value: Any = view.toreadonly()
        else:
            import numpy

            dtype, shape = msgspec.msgpack.decode(data[16:])
            value = numpy.frombuffer(view, dtype=dtype).reshape(shape)
        if not self.reply:
            return value
        value = value.tobytes() if code == EXT_BYTES else value.copy()
        del view
        self.heap.free(self.heap._adopt(handle))
        return value
