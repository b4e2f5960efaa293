"""Small services for trying LLMasOS out: a key-value store and an echo."""

from __future__ import annotations

import os
from typing import Any

import llmasos


class KV:
    """An in-memory key-value store."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> bool:
        self.data[key] = value
        return True

    def keys(self) -> list[str]:
        return sorted(self.data)

    def fail(self, message: str) -> None:
        raise KeyError(message)

    def pid(self) -> int:
        return os.getpid()


class Echo:
    """Returns what it is given; moves buffers and arrays without copying."""

    def echo(self, value: Any) -> Any:
        return value

    def size(self, payload: Any) -> int:
        return len(memoryview(payload).cast("B"))

    def fill(self, n: int, byte: int) -> llmasos.Buffer:
        buf = llmasos.malloc(n)
        with memoryview(buf) as view:
            view[:] = bytes([byte]) * n
        return buf

    async def later(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(3)
