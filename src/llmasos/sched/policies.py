"""Run-queue policies: which waiting request a worker runs next.

A policy holds the requests waiting for one worker and answers one question:
which of them runs next, at a given time. There are four:

    fifo      arrival order
    priority  static priority, higher first; arrival order within a level
    hrrn      highest response ratio (T + D) / D first, where T is the time
              the request has waited and D its expected duration
    edf       earliest deadline first; requests without one come last

Rules shared by every policy:

- Ties go to the earlier arrival, then to the name that sorts first, then to
  the request pushed first.
- A request whose deadline has been reached when it comes up to run is
  dropped, never run. Dropped requests collect in the policy until the
  caller takes them with `take_expired()` and answers each one with
  `DeadlineExceeded`.
- Time comes from an injectable clock, a callable returning seconds, so the
  same objects schedule live calls against `time.monotonic` and replay
  traces in virtual time (`llmasos.sched.simulate`). `pop` and `peek` also
  accept the time explicitly.
- A policy is not thread-safe: the owner of a run queue serialises `push`
  and `pop` under one lock.

Entry points: `Request`, `make_policy`, the four policy classes,
`DurationEstimator`. Exceptions raised here:

    LLMasOSError
     +-- DeadlineExceeded
     +-- UnknownPolicyError (also a ValueError)
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmasos.errors import LLMasOSError

Clock = Callable[[], float]

POLICY_NAMES = ("fifo", "priority", "hrrn", "edf")

# Measured durations are clamped up to this, so an expected duration D is
# never zero and the response ratio (T + D) / D is always defined.
MIN_DURATION = 1e-6

# Expected duration of a method with neither a prior nor a measurement yet:
# 1 ms, the order of a short local call. Its first measurement replaces it.
DEFAULT_PRIOR = 0.001


class DeadlineExceeded(LLMasOSError):
    """A request reached its deadline before it could start; it never ran."""

    def __init__(self, request: Request, now: float) -> None:
        super().__init__(request, now)
        self.request = request
        self.now = now

    def __str__(self) -> str:
        deadline = self.request.deadline
        shown = "(none)" if deadline is None else f"{deadline:g}"
        return (
            f"request {self.request.name!r} was dropped without running: its "
            f"deadline {shown} had been reached at "
            f"{self.now:g}; raise the call's timeout or reduce the load on "
            f"the service"
        )


class UnknownPolicyError(LLMasOSError, ValueError):
    """A policy name that is not one of `POLICY_NAMES`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        choices = ", ".join(POLICY_NAMES)
        return f"unknown scheduling policy {self.name!r}; choose one of {choices}"


@dataclass(slots=True)
class Request:
    """One call waiting for a worker (not frozen: a frozen dataclass costs
    each queued call a microsecond more to make; no policy changes one).

    `arrival` and `deadline` are clock readings in seconds. `duration` is
    the expected duration D when the caller knows it (a trace does);
    otherwise `hrrn` asks its `DurationEstimator` for the figure learned for
    `method`. `priority` is the call's own priority; None means the
    method's default. `payload` carries what the caller needs to run the
    request; no policy looks at it.
    """

    name: str
    arrival: float
    duration: float | None = None
    method: str | None = None
    priority: int | None = None
    deadline: float | None = None
    payload: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.duration is not None and not self.duration > 0:
            raise ValueError(
                f"request {self.name!r}: expected duration must be > 0, "
                f"got {self.duration!r}"
            )

    def expired(self, now: float) -> bool:
        """True if the deadline has been reached at `now`: too late to start."""
        return self.deadline is not None and now >= self.deadline


@dataclass(frozen=True, slots=True)
class RunQueueStats:
    """A snapshot of one run queue's counters."""

    policy: str
    queued: int
    pushed: int
    started: int
    expired: int


class DurationEstimator:
    """The expected duration D of each method, learned from measurements.

    Until a method's first measurement its estimate is its prior: the
    figure in `priors` (a manifest can declare one per method), else
    `default_prior`. The first measurement replaces the prior; each later
    one moves the estimate by an exponential moving average,
    `estimate += alpha * (measured - estimate)`.
    """

    def __init__(
        self,
        default_prior: float = DEFAULT_PRIOR,
        priors: Mapping[str, float] | None = None,
        alpha: float = 0.2,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.default_prior = max(default_prior, MIN_DURATION)
        self.alpha = alpha
        self._priors = {k: max(v, MIN_DURATION) for k, v in (priors or {}).items()}
        self._learned: dict[str | None, float] = {}

    def estimate(self, method: str | None) -> float:
        """Return the expected duration of `method` in seconds, always > 0."""
        learned = self._learned.get(method)
        if learned is not None:
            return learned

        if method is not None and method in self._priors:
            return self._priors[method]
        return self.default_prior

    def record(self, method: str | None, measured: float) -> None:
        """Fold one measured duration of `method` into its estimate."""
        measured = max(measured, MIN_DURATION)
        learned = self._learned.get(method)
        if learned is None:
            self._learned[method] = measured
        else:
            self._learned[method] = learned + self.alpha * (measured - learned)


class Policy(ABC):
    """A run queue ordered by one policy.

    Subclasses say how requests are stored (`_insert`), which one is best
    at a time (`_best`) and how to remove it (`_remove_best`); this class
    drops expired requests and keeps the counters.
    """

    name: ClassVar[str]

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._seq: Iterator[int] = itertools.count()
        self._expired: list[Request] = []
        # Requests waiting, expired ones not yet found included: what
        # len() says, as an attribute for the replica's path of every call.
        self.queued = 0
        self._pushed = 0
        self._started = 0
        self._expired_total = 0

    def __len__(self) -> int:
        return self.queued

    def push(self, request: Request) -> None:
        """Add a request to the queue."""
        self._insert(request, next(self._seq))
        self.queued += 1
        self._pushed += 1

    def peek(self, now: float | None = None) -> Request | None:
        """Return the request that `pop` would return, leaving it queued.

        Like `pop`, this moves expired requests it meets to the expired list.
        """
        now = self.clock() if now is None else now
        while True:
            request = self._best(now)
            if request is None or not request.expired(now):
                return request

            self._take_best(request)
            self._expired.append(request)
            self._expired_total += 1

    def pop(self, now: float | None = None) -> Request | None:
        """Remove and return the request to run at `now` (default: the clock).

        Returns None when no runnable request is left. Requests found expired
        on the way are kept for `take_expired`.
        """
        request = self.peek(now)
        if request is not None:
            self._take_best(request)
            self._started += 1
        return request

    def take_expired(self) -> list[Request]:
        """Return the requests dropped for their deadline since the last call."""
        expired, self._expired = self._expired, []
        return expired

    def stats(self) -> RunQueueStats:
        """Return a snapshot of the queue's counters."""
        return RunQueueStats(
            policy=self.name,
            queued=self.queued,
            pushed=self._pushed,
            started=self._started,
            expired=self._expired_total,
        )

    def _take_best(self, request: Request) -> None:
        self._remove_best(request)
        self.queued -= 1

    @abstractmethod
    def _insert(self, request: Request, seq: int) -> None:
        """Store `request`; `seq` is unique and grows with each push."""

    @abstractmethod
    def _best(self, now: float) -> Request | None:
        """Return the best request at `now` without removing it."""

    @abstractmethod
    def _remove_best(self, request: Request) -> None:
        """Remove `request`, which `_best` has just returned."""


class _HeapPolicy(Policy):
    """A policy whose order does not change with time: one binary heap.

    Push and pop cost O(log n). Entries are `(*rank, arrival, name, seq,
    request)`; `seq` is unique, so requests themselves are never compared.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._heap: list[tuple[Any, ...]] = []

    @abstractmethod
    def _rank(self, request: Request) -> tuple[float, ...]:
        """Return the part of the order that comes before the tie-breaks."""

    def _insert(self, request: Request, seq: int) -> None:
        entry = (*self._rank(request), request.arrival, request.name, seq, request)
        heapq.heappush(self._heap, entry)

    def _best(self, now: float) -> Request | None:
        return self._heap[0][-1] if self._heap else None

    def _remove_best(self, request: Request) -> None:
        heapq.heappop(self._heap)


class FifoPolicy(_HeapPolicy):
    """First come, first served: the earliest arrival runs first."""

    name = "fifo"

    def _rank(self, request: Request) -> tuple[float, ...]:
        return ()


class PriorityPolicy(_HeapPolicy):
    """Static priorities: the highest runs first, arrival order within a level.

    A request's priority is its own if it has one, else its method's default
    from `method_priorities`, else 0.
    """

    name = "priority"

    def __init__(
        self,
        clock: Clock = time.monotonic,
        method_priorities: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(clock)
        self.method_priorities = dict(method_priorities or {})

    def priority_of(self, request: Request) -> int:
        """Return the priority `request` is scheduled at."""
        if request.priority is not None:
            return request.priority
        if request.method is None:
            return 0
        return self.method_priorities.get(request.method, 0)

    def _rank(self, request: Request) -> tuple[float, ...]:
        return (-self.priority_of(request),)


class EdfPolicy(_HeapPolicy):
    """Earliest deadline first; requests without a deadline run last, FIFO.

    Expired requests are always at the front of this queue, so every one is
    dropped as soon as a pop happens after its deadline.
    """

    name = "edf"

    def _rank(self, request: Request) -> tuple[float, ...]:
        deadline = request.deadline
        return (math.inf if deadline is None else deadline,)


class HrrnPolicy(Policy):
    """Highest response ratio next: (T + D) / D, with T waited, D expected.

    The ratio is 1 + T / D. Requests that share D gain ratio at the same
    rate, so among them the oldest always leads. The queue therefore keeps
    one heap per group of requests sharing D (by method, or by duration when
    the request states one) and compares only the k group heads: a pick
    costs O(k + log n). With a few methods per service k stays small however
    many thousands of requests wait. A trace where every request has its own
    duration makes k = n, a linear scan per pick.
    """

    name = "hrrn"

    def __init__(
        self,
        clock: Clock = time.monotonic,
        estimator: DurationEstimator | None = None,
    ) -> None:
        super().__init__(clock)
        self.estimator = estimator or DurationEstimator()
        self._groups: dict[tuple[str, Any], list[tuple[Any, ...]]] = {}

    def expected_duration(self, request: Request) -> float:
        """Return D for `request`: its own figure, else its method's estimate."""
        if request.duration is not None:
            return request.duration
        return self.estimator.estimate(request.method)

    def response_ratio(self, request: Request, now: float) -> float:
        """Return (T + D) / D for `request` at `now`."""
        return response_ratio(now - request.arrival, self.expected_duration(request))

    def _insert(self, request: Request, seq: int) -> None:
        group = self._groups.setdefault(_group_of(request), [])
        heapq.heappush(group, (request.arrival, request.name, seq, request))

    def _best(self, now: float) -> Request | None:
        # Scores are -T / D, so the lowest leads; the head tuple breaks ties
        # by arrival, name and push order, and never compares requests.
        best: tuple[float, tuple[Any, ...]] | None = None
        for key, group in self._groups.items():
            head = group[0]
            candidate = ((head[0] - now) / self._group_duration(key), head)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else best[1][-1]

    def _remove_best(self, request: Request) -> None:
        key = _group_of(request)
        group = self._groups[key]
        heapq.heappop(group)
        if not group:
            del self._groups[key]

    def _group_duration(self, key: tuple[str, Any]) -> float:
        """Return the D shared by the requests of group `key`."""
        kind, value = key
        return value if kind == "duration" else self.estimator.estimate(value)


def response_ratio(waited: float, duration: float) -> float:
    """Return the response ratio (T + D) / D of a request.

    It is 1 for a request that has just arrived and grows with the wait T,
    faster for a short D: short requests go first, yet a long request left
    waiting behind a stream of short ones keeps gaining on each newcomer
    until it leads.
    """
    return (waited + duration) / duration


def make_policy(
    name: str,
    *,
    clock: Clock = time.monotonic,
    method_priorities: Mapping[str, int] | None = None,
    estimator: DurationEstimator | None = None,
) -> Policy:
    """Return an empty run queue ordered by the policy called `name`.

    `method_priorities` is used by `priority` only, `estimator` by `hrrn`.
    Raises UnknownPolicyError for a name not in `POLICY_NAMES`.
    """
    match name:
        case "fifo":
            return FifoPolicy(clock)
        case "priority":
            return PriorityPolicy(clock, method_priorities)
        case "hrrn":
            return HrrnPolicy(clock, estimator)
        case "edf":
            return EdfPolicy(clock)
    raise UnknownPolicyError(name)


def _group_of(request: Request) -> tuple[str, Any]:
    """Return the HRRN group of `request`: the requests sharing its D."""
    if request.duration is not None:
        return ("duration", request.duration)
    return ("method", request.method)
