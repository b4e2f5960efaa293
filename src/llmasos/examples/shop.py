"""The services of docs/examples/shop.toml: a small shop."""

from __future__ import annotations

import os
from typing import Any

import llmasos
from llmasos.examples import basic


class KV(basic.KV):
    """The key-value store of examples.basic, with its statistics."""

    def stats(self) -> dict[str, int]:
        return {"keys": len(self.data), "pid": os.getpid()}


class Auth:
    def check(self, user: str) -> bool:
        return bool(user) and not user.startswith("banned")


class Catalog:
    def __init__(self) -> None:
        self.kv = llmasos.connect("kv")

    def get(self, item: str) -> dict[str, Any]:
        return {"item": item, "price": self.kv.get(f"price:{item}", 10)}

    def list(self) -> list[str]:
        return [f"item{i}" for i in range(10)]


class Cart:
    def __init__(self) -> None:
        self.kv = llmasos.connect("kv")
        self.auth = llmasos.connect("auth")

    def add(self, user: str, item: str) -> int:
        if not self.auth.check(user):
            raise PermissionError(f"user {user!r} may not shop")
        items = self.kv.get(f"cart:{user}", [])
        items.append(item)
        self.kv.put(f"cart:{user}", items)
        return len(items)


class Frontend:
    def __init__(self) -> None:
        self.catalog = llmasos.connect("catalog")
        self.cart = llmasos.connect("cart")
        self.greeting = os.environ.get("GREETING", "hello")

    def hello(self) -> str:
        return self.greeting

    def checkout(self, user: str, item: str) -> dict[str, Any]:
        price = self.catalog.get(item)["price"]
        return {"items": self.cart.add(user, item), "price": price}
