"""The services of ``llmasos demo``: a frontend, a key-value store and an
image service that moves large buffers without copying them."""

from __future__ import annotations

import os
from typing import Any

import llmasos


class Store:
    """An in-memory key-value store."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value

    def pid(self) -> int:
        return os.getpid()


class Imaging:
    """Inverts 8-bit images held in heap buffers."""

    def invert(self, image: llmasos.Buffer) -> llmasos.Buffer:
        out = llmasos.malloc(len(image))
        src, dst = memoryview(image), memoryview(out)
        table = bytes(255 - i for i in range(256))
        dst[:] = bytes(src).translate(table)
        src.release()
        dst.release()
        return out


class Frontend:
    """Takes orders: reads and writes the store."""

    def __init__(self) -> None:
        self.store = llmasos.connect("store")

    def order(self, user: str, item: str) -> int:
        count = (self.store.get(f"orders:{user}") or 0) + 1
        self.store.put(f"orders:{user}", count)
        return count
