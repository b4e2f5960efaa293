"""How calls between services are encoded.

A request is ``[id, method, args, kwargs, reply, caller, deadline_ns,
priority, sent_ns]`` (times on the monotonic clock, which all processes of a
machine share) and a reply ``[id, ok, value]``, both packed with msgpack.
Plain values are copied into the message.  Large payloads travel through the
heap instead, marked by msgpack extension types:

- ``EXT_BUFFER``: a ``Buffer`` by handle, not a byte of it copied.  In a
  request the callee sees the caller's block (the caller keeps it); in a reply
  the block's ownership moves to the caller.
- ``EXT_BYTES`` and ``EXT_NDARRAY``: bytes-like objects and numpy arrays of at
  least ``LARGE`` bytes, copied once into a heap block instead of being
  serialised; the callee reads them in place (a read-only memoryview, or a
  numpy array over the block).

Blocks the encoder made for a request are listed in ``Encoder.made`` so the
caller frees them once the reply is in.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack

from llmasos.errors import InvalidHandle
from llmasos.heap import Buffer, Heap

EXT_BUFFER = 1
EXT_BYTES = 2
EXT_NDARRAY = 3

LARGE = 16 << 10  # bytes-like values this large go through the heap


def _is_ndarray(obj: Any) -> bool:
    """True for a numpy array; numpy is looked up, never imported here (a
    process that made an array has imported it, and importing it costs every
    process that did not 100 ms)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


class Encoder:
    """Packs messages, moving large payloads into ``heap``."""

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self.made: list[Buffer] = []
        self._packer = msgpack.Packer(default=self._default, autoreset=True)

    def pack(self, obj: Any) -> bytes:
        return self._packer.pack(obj)

    def _default(self, obj: Any) -> msgpack.ExtType:
        if isinstance(obj, Buffer):
            if obj.heap.name != self.heap.name:
                raise InvalidHandle(
                    f"buffer {obj.handle:#x} belongs to heap {obj.heap.name!r}, "
                    f"not to the system's heap {self.heap.name!r}; allocate it "
                    "with llmasos.malloc"
                )
            return msgpack.ExtType(EXT_BUFFER, obj.handle.to_bytes(8, "little"))
        if _is_ndarray(obj):
            return self._ndarray(obj)
        if isinstance(obj, memoryview | bytearray):
            return self._copy_in(EXT_BYTES, b"", obj)
        raise TypeError(f"cannot send a {type(obj).__name__} between services")

    def _ndarray(self, arr: Any) -> msgpack.ExtType:
        head = msgpack.packb([arr.dtype.str, list(arr.shape)])
        data = arr if arr.flags.c_contiguous else arr.copy()
        return self._copy_in(EXT_NDARRAY, head, memoryview(data).cast("B"))

    def _copy_in(self, code: int, head: bytes, data: Any) -> msgpack.ExtType:
        """Copy data into a new block: one memcpy, no serialisation."""
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        buf = self.heap.malloc(max(len(view), 1))
        with memoryview(buf) as dst:
            dst[: len(view)] = view
        self.made.append(buf)
        handle = buf.handle.to_bytes(8, "little")
        return msgpack.ExtType(code, handle + len(view).to_bytes(8, "little") + head)


def prepare(value: Any) -> Any:
    """Wrap top-level large bytes so the encoder moves them by block.

    msgpack packs ``bytes`` itself and never asks ``default``, so large ones
    are turned into memoryviews first; nested values are left as they are.
    """
    if isinstance(value, bytes) and len(value) >= LARGE:
        return memoryview(value)
    return value


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

    def unpack(self, data: bytes | Buffer) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext, strict_map_key=False)

    def _ext(self, code: int, data: bytes) -> Any:
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

            dtype, shape = msgpack.unpackb(data[16:])
            value = numpy.frombuffer(view, dtype=dtype).reshape(shape)
        if not self.reply:
            return value
        value = value.tobytes() if code == EXT_BYTES else value.copy()
        del view
        self.heap.free(self.heap._adopt(handle))
        return value
