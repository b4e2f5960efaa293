"""Replay a trace of requests through the run-queue policies in virtual time.

A trace is a CSV file with a header row. Columns `name`, `arrival` and
`duration` are required, `priority` and `deadline` optional, in any order;
times are in seconds of virtual time and a deadline is an absolute time,
not a timeout. One non-preemptive worker runs the requests: whenever it is
free it pops the policy's choice among those that have arrived and runs it
for its whole duration. The policies are the live ones, driven by a
`VirtualClock` that jumps from event to event, and D is the trace's
duration.

Entry points: `load_trace`, `simulate`, `format_results`, `results_to_json`.
`TraceError` (an LLMasOSError) reports a file that cannot be read or a
malformed line, with the file, line and column.
"""

from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.errors import LLMasOSError
from llmasos.sched.policies import Policy, Request, make_policy

REQUIRED_COLUMNS = ("name", "arrival", "duration")
OPTIONAL_COLUMNS = ("priority", "deadline")


class TraceError(LLMasOSError):
    """A trace file cannot be read, or one of its lines is malformed."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class _BadField(ValueError):
    """A field that does not parse; the message says what was expected."""


class VirtualClock:
    """A clock that stands still until the simulator moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, when: float) -> None:
        """Move the clock forward to `when`; time never runs backwards."""
        self.now = max(self.now, when)


@dataclass(frozen=True, slots=True)
class Run:
    """One request the worker ran, with its times."""

    name: str
    arrival: float
    duration: float
    deadline: float | None
    start: float
    finish: float

    @property
    def turnaround(self) -> float:
        """Time from arrival to finish."""
        return self.finish - self.arrival

    @property
    def normalised_turnaround(self) -> float:
        """Turnaround divided by duration: 1 means the request never waited."""
        return self.turnaround / self.duration

    @property
    def late(self) -> bool:
        """True if the request finished after its deadline."""
        return self.deadline is not None and self.finish > self.deadline

    def as_dict(self) -> dict[str, Any]:
        """Return the run as JSON-ready values."""
        return {
            "name": self.name,
            "arrival": self.arrival,
            "duration": self.duration,
            "deadline": self.deadline,
            "start": self.start,
            "finish": self.finish,
            "turnaround": self.turnaround,
            "normalised_turnaround": self.normalised_turnaround,
            "late": self.late,
        }


@dataclass(frozen=True, slots=True)
class Drop:
    """One request dropped, never run, because its deadline came first."""

    name: str
    arrival: float
    deadline: float
    dropped_at: float

    def as_dict(self) -> dict[str, Any]:
        """Return the drop as JSON-ready values."""
        return {
            "name": self.name,
            "arrival": self.arrival,
            "deadline": self.deadline,
            "dropped_at": self.dropped_at,
        }


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """The outcome of one trace under one policy; runs and drops in trace order."""

    policy: str
    runs: tuple[Run, ...]
    drops: tuple[Drop, ...]

    @property
    def mean_turnaround(self) -> float | None:
        """Mean turnaround of the requests run; None if none ran."""
        return _mean(run.turnaround for run in self.runs)

    @property
    def mean_normalised_turnaround(self) -> float | None:
        """Mean normalised turnaround of the requests run; None if none ran."""
        return _mean(run.normalised_turnaround for run in self.runs)

    @property
    def late(self) -> int:
        """Number of requests that ran but finished after their deadline."""
        return sum(run.late for run in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready values."""
        return {
            "requests": [run.as_dict() for run in self.runs],
            "mean_turnaround": self.mean_turnaround,
            "mean_normalised_turnaround": self.mean_normalised_turnaround,
            "dropped": [drop.as_dict() for drop in self.drops],
            "deadline_misses": len(self.drops) + self.late,
        }


def load_trace(path: str | Path) -> list[Request]:
    """Read a trace file into requests, in file order.

    Raises TraceError naming the file, line and column of the first problem.
    """
    shown = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as lines:
            return parse_trace(lines, shown)
    except OSError as exc:
        raise TraceError(shown, None, f"cannot read the trace: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(shown, None, "the trace is not UTF-8 text") from exc


def parse_trace(lines: Iterable[str], path: str = "<trace>") -> list[Request]:
    """Parse the lines of a trace; `path` names the source in errors."""
    reader = csv.reader(lines, skipinitialspace=True)
    try:
        rows = [(reader.line_num, row) for row in _rows(reader)]
    except csv.Error as exc:
        raise TraceError(path, reader.line_num, f"not valid CSV: {exc}") from exc

    if not rows:
        raise TraceError(path, None, f"the trace is empty; {_expected_header()}")
    header_line, header = rows[0]
    columns = _parse_header(path, header_line, header)
    requests = [_parse_row(path, line, columns, row) for line, row in rows[1:]]

    if not requests:
        raise TraceError(path, None, "the trace has a header but no requests")
    _check_unique_names(path, rows[1:], requests)
    return requests


def simulate(requests: Sequence[Request], policy_name: str) -> SimulationResult:
    """Run `requests` on one non-preemptive worker under `policy_name`.

    Every request must state its duration. The worker starts at time 0,
    idles until the next arrival when nothing waits, and breaks ties as the
    policy does: earlier arrival, then the name that sorts first.
    """
    clock = VirtualClock()
    policy = make_policy(policy_name, clock=clock)
    arrivals = deque(sorted(requests, key=_trace_order))
    runs: list[Run] = []
    drops: list[Drop] = []

    while arrivals or policy:
        _admit(policy, arrivals, clock.now)
        if not policy:
            clock.advance_to(arrivals[0].arrival)
            continue

        request = policy.pop()
        drops.extend(_drop(expired, clock.now) for expired in policy.take_expired())
        if request is not None:
            runs.append(_run(request, clock))

    return SimulationResult(
        policy=policy_name,
        runs=tuple(sorted(runs, key=_trace_order)),
        drops=tuple(sorted(drops, key=_trace_order)),
    )


def results_to_json(results: Sequence[SimulationResult]) -> str:
    """Return the results as a JSON object keyed by policy name."""
    return json.dumps({result.policy: result.as_dict() for result in results}, indent=2)


def format_results(results: Sequence[SimulationResult]) -> str:
    """Return one table per policy and, for several, a summary side by side."""
    blocks = [_format_result(result) for result in results]
    if len(results) > 1:
        blocks.append(_format_summary(results))
    return "\n\n".join(blocks)


# Loading.


def _rows(reader: Iterator[list[str]]) -> Iterator[list[str]]:
    """Yield the rows of a CSV reader that are not blank."""
    for row in reader:
        if any(field.strip() for field in row):
            yield [field.strip() for field in row]


def _expected_header() -> str:
    optional = ", ".join(OPTIONAL_COLUMNS)
    return f"expected a header row naming {', '.join(REQUIRED_COLUMNS)} [, {optional}]"


def _parse_header(path: str, line: int, header: list[str]) -> list[str]:
    """Check the header row and return its column names, in order."""
    columns = [name.lower() for name in header]
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    for number, column in enumerate(columns, start=1):
        if column not in known:
            raise TraceError(
                path,
                line,
                f"column {number}: unknown column {column!r}; {_expected_header()}",
            )
        if columns.index(column) != number - 1:
            raise TraceError(path, line, f"column {number}: {column!r} appears twice")

    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise TraceError(
            path, line, f"missing column {missing[0]!r}; {_expected_header()}"
        )
    return columns


def _parse_row(path: str, line: int, columns: list[str], row: list[str]) -> Request:
    """Turn one data row into a Request."""
    if len(row) != len(columns):
        raise TraceError(
            path,
            line,
            f"expected {len(columns)} fields ({', '.join(columns)}), found {len(row)}",
        )

    values: dict[str, Any] = {}
    for number, (column, text) in enumerate(zip(columns, row, strict=True), start=1):
        try:
            values[column] = _FIELD_PARSERS[column](text)
        except _BadField as exc:
            raise TraceError(
                path,
                line,
                f"column {number} ({column}): expected {exc}, found {text!r}",
            ) from None
    return Request(**values)


def _check_unique_names(
    path: str, rows: list[tuple[int, list[str]]], requests: list[Request]
) -> None:
    """Reject a trace where two requests share a name: results are by name."""
    first_line: dict[str, int] = {}
    for (line, _row), request in zip(rows, requests, strict=True):
        if request.name in first_line:
            raise TraceError(
                path,
                line,
                f"column 'name': request {request.name!r} already appears on "
                f"line {first_line[request.name]}; names must be unique",
            )
        first_line[request.name] = line


def _parse_name(text: str) -> str:
    if not text:
        raise _BadField("a non-empty name")
    return text


def _parse_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadField(what) from None
    if not math.isfinite(value):
        raise _BadField(what)
    return value


def _parse_arrival(text: str) -> float:
    what = "an arrival time >= 0 in seconds"
    value = _parse_number(text, what)
    if value < 0:
        raise _BadField(what)
    return value


def _parse_duration(text: str) -> float:
    what = "a duration > 0 in seconds"
    value = _parse_number(text, what)
    if value <= 0:
        raise _BadField(what)
    return value


def _parse_priority(text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise _BadField("an integer priority or an empty field") from None


def _parse_deadline(text: str) -> float | None:
    if not text:
        return None
    return _parse_number(text, "an absolute deadline in seconds or an empty field")


_FIELD_PARSERS: dict[str, Callable[[str], Any]] = {
    "name": _parse_name,
    "arrival": _parse_arrival,
    "duration": _parse_duration,
    "priority": _parse_priority,
    "deadline": _parse_deadline,
}


# Simulation.


def _trace_order(item: Request | Run | Drop) -> tuple[float, str]:
    return (item.arrival, item.name)


def _admit(policy: Policy, arrivals: deque[Request], now: float) -> None:
    """Push every request that has arrived by `now` into the run queue."""
    while arrivals and arrivals[0].arrival <= now:
        policy.push(arrivals.popleft())


def _run(request: Request, clock: VirtualClock) -> Run:
    """Run `request` to completion from the clock's time; advance the clock."""
    if request.duration is None:
        raise ValueError(f"request {request.name!r} has no duration to simulate")

    start = clock.now
    clock.advance_to(start + request.duration)
    return Run(
        name=request.name,
        arrival=request.arrival,
        duration=request.duration,
        deadline=request.deadline,
        start=start,
        finish=clock.now,
    )


def _drop(request: Request, now: float) -> Drop:
    assert request.deadline is not None, "only requests with a deadline expire"
    return Drop(request.name, request.arrival, request.deadline, now)


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


# Formatting.


def _format_result(result: SimulationResult) -> str:
    """Return the table of one policy's runs, then its drops if any."""
    with_deadlines = any(run.deadline is not None for run in result.runs)
    header = ["name", "arrival", "duration", "start", "finish"]
    header += ["turnaround", "normalised"]
    if with_deadlines:
        header += ["deadline", "late"]
    rows = [_run_cells(run, with_deadlines) for run in result.runs]
    rows.append(_mean_cells(result, len(header)))

    title = (
        f"{result.policy}: {len(result.runs)} run, {len(result.drops)} dropped, "
        f"{result.late} late"
    )
    lines = [title, *_table(header, rows)]
    if result.drops:
        lines += ["", *_format_drops(result.drops)]
    return "\n".join(lines)


def _format_drops(drops: Sequence[Drop]) -> list[str]:
    """Return the table of requests dropped for their deadline."""
    header = ["dropped", "arrival", "deadline", "dropped at"]
    return _table(header, [_drop_cells(drop) for drop in drops])


def _format_summary(results: Sequence[SimulationResult]) -> str:
    """Return the means and counts of every policy, one row each."""
    header = ["policy", "mean turnaround", "mean normalised", "run", "dropped", "late"]
    rows = [
        [
            result.policy,
            _ratio(result.mean_turnaround),
            _ratio(result.mean_normalised_turnaround),
            str(len(result.runs)),
            str(len(result.drops)),
            str(result.late),
        ]
        for result in results
    ]
    return "\n".join(["summary", *_table(header, rows)])


def _run_cells(run: Run, with_deadlines: bool) -> list[str]:
    cells = [run.name, _time(run.arrival), _time(run.duration), _time(run.start)]
    cells += [_time(run.finish), _time(run.turnaround)]
    cells.append(_ratio(run.normalised_turnaround))
    if with_deadlines:
        cells += [_time(run.deadline), "yes" if run.late else ""]
    return cells


def _mean_cells(result: SimulationResult, width: int) -> list[str]:
    cells = ["mean", "", "", "", "", _ratio(result.mean_turnaround)]
    cells.append(_ratio(result.mean_normalised_turnaround))
    return cells + [""] * (width - len(cells))


def _drop_cells(drop: Drop) -> list[str]:
    return [
        drop.name,
        _time(drop.arrival),
        _time(drop.deadline),
        _time(drop.dropped_at),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lay out cells in columns: the first left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        ]
        return "  ".join([first, *rest]).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _time(value: float | None) -> str:
    """Format a time with at most three decimals and no trailing zeros."""
    if value is None:
        return "-"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
