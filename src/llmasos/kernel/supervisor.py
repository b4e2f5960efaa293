"""Restart decisions: policies, exponential backoff and intensity limits.

A service's supervisor is asked what to do when one of its replicas exits.
``always`` restarts it whatever the exit, ``on-failure`` only when the exit
code is not 0 (a signal counts as a failure), ``never`` leaves it down.  A
restart waits ``backoff_initial * 2 ** (n - 1)`` seconds, capped at
``backoff_max``, where n counts the restarts inside the current window; the
first is immediate.  More than ``max_restarts`` restarts within
``restart_window`` seconds mark the service failed, as an OTP supervisor
gives up: it is reported and left down until restarted by hand.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmasos.manifest import ServiceSpec


@dataclass
class Decision:
    restart: bool
    delay: float = 0.0
    failed: bool = False
    reason: str = ""


@dataclass
class Supervisor:
    spec: ServiceSpec
    clock: Callable[[], float] = time.monotonic
    recent: deque[float] = field(default_factory=deque)
    failed: bool = False

    def on_exit(self, code: int) -> Decision:
        """What to do about a replica that exited with code (-N: signal N)."""
        if self.failed:
            return Decision(False, reason="the service has failed")
        policy = self.spec.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            return Decision(False, reason=f"restart policy {policy!r}")
        now = self.clock()
        while self.recent and now - self.recent[0] > self.spec.restart_window:
            self.recent.popleft()
        if len(self.recent) >= self.spec.max_restarts:
            self.failed = True
            return Decision(
                False,
                failed=True,
                reason=(
                    f"more than {self.spec.max_restarts} restarts in "
                    f"{self.spec.restart_window:g} s"
                ),
            )
        self.recent.append(now)
        n = len(self.recent) - 1
        delay = 0.0 if n == 0 else self.spec.backoff_initial * 2 ** (n - 1)
        return Decision(True, delay=min(delay, self.spec.backoff_max))

    def reset(self) -> None:
        """Forget past restarts (a restart asked for by hand)."""
        self.recent.clear()
        self.failed = False
