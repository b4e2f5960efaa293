"""Services for `benchmarks/kernel.py`: a front that relays to a back.

`Front.relay(x)` calls `Back.echo(x)` and returns its answer, so a call of
`relay` from a client travels client -> front -> back -> front -> client: two
hops of service calls, each with its encoding and decoding.
"""

from __future__ import annotations

from typing import Any

import llmasos


class Back:
    """The far end: returns what it is given."""

    def echo(self, value: Any) -> Any:
        return value


class Front:
    """The near end: passes every call on to the service `back`."""

    def __init__(self) -> None:
        self.back = llmasos.connect("back")

    def relay(self, value: Any) -> Any:
        return self.back.echo(value)
