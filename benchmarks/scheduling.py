"""Compare the run-queue policies on a real service and print one table.

For each policy (fifo, priority, hrrn, edf) the run boots a system of one
service, `work` (`llmasos.examples.schedsvc:Work`): one replica, one worker,
`max_in_flight = 1`, the policy under test. Its methods `short` and `long`
keep the replica's CPU busy for 1 ms and 10 ms; the manifest gives `short`
priority 5 and `long` priority 0, and each its run time as `expected_ms`.

A client process replays one open-loop schedule, the same for every policy:
Poisson arrivals, 90 % short and 10 % long requests, at 80 % of the
replica's capacity, then 120 % (the queue grows), then 80 % again (it
drains). Load counts run time only; each call's own cost (decoding, replying)
comes on top. The client sends each request at its time from a pool of threads,
each call blocking its thread, so the pool must hold more calls than ever
wait at once: the replica can only order what has reached its run queue. The
table shows the peak of calls in flight beside the pool's size.

The schedule runs twice per policy:

1. waits: no timeouts. A request's waiting time is its response time, from
   its scheduled arrival to its reply, minus the run time the method
   measured; throughput is replies per second over the pass.
2. deadlines: each call's timeout is its budget (50 ms short, 500 ms long)
   less the time since its scheduled arrival, so the replica's deadline is
   arrival + budget. A miss is a call dropped by the replica
   (`DeadlineExceeded`), one the client gave up on, one the client could not
   send before its budget ran out, or a reply later than the budget. This
   pass is separate because dropping expired requests sheds load, which
   would cut the waits of the first pass short.

Without deadlines `edf` orders by arrival, so its row of waits repeats
`fifo`'s: the difference between the two shows the noise of the machine.
Short requests alone use about half of the replica even at 120 %, so
`priority` delays long requests but cannot starve them; the last line of the
targets compares their longest wait with `fifo`'s, beside `hrrn`'s ratio.

On a machine with two or more CPUs the replica is pinned to the last one and
the client and kernel to the others. A PNG of the distributions of waits
goes to benchmarks/out/scheduling.png.

Usage: python benchmarks/scheduling.py [--quick] [--json] [--only POLICY[,...]]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _machine import OtherLoadMeter, machine

POLICIES = ("fifo", "priority", "hrrn", "edf")
KINDS = ("short", "long")
RUN_MS = {"short": 1.0, "long": 10.0}
PRIORITY = {"short": 5, "long": 0}
BUDGET_MS = {"short": 50.0, "long": 500.0}
LONG_SHARE = 0.1
SERVICE = "work"
OUT_DIR = Path(__file__).resolve().parent / "out"
PLOT_PATH = OUT_DIR / "scheduling.png"
SETTLE_S = 0.3

MANIFEST = """\
[system]
name = "{name}"

[services.work]
entry = "llmasos.examples.schedsvc:Work"
policy = "{policy}"
workers = 1
max_in_flight = 1
{affinity}
[services.work.methods.short]
priority = {short_priority}
expected_ms = {short_ms}

[services.work.methods.long]
priority = {long_priority}
expected_ms = {long_ms}
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The schedule's phases, (seconds, load as a share of capacity), the
    client's thread pool and the seed of the arrivals."""

    phases: tuple[tuple[float, float], ...]
    threads: int
    seed: int = 1


FULL = Plan(((4.0, 0.8), (4.0, 1.2), (7.0, 0.8)), threads=384)
QUICK = Plan(((0.75, 0.8), (1.0, 1.2), (1.5, 0.8)), threads=256)


class BenchError(Exception):
    """A policy could not be measured; the message says why."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One request as the client saw it; times are time.monotonic() seconds.

    `outcome` is "ok", "dropped" (DeadlineExceeded from the replica),
    "timeout" (the client stopped waiting), "expired" (its budget was gone
    before it could be sent) or "error".
    """

    kind: str
    due: float
    sent: float
    replied: float
    run_ms: float | None
    outcome: str


# -- the schedule ---------------------------------------------------------------


def make_schedule(plan: Plan) -> list[tuple[float, str]]:
    """Poisson arrivals (seconds from the start, kind) for every phase of `plan`."""
    rng = random.Random(plan.seed)
    mean_s = ((1 - LONG_SHARE) * RUN_MS["short"] + LONG_SHARE * RUN_MS["long"]) / 1e3
    arrivals, start = [], 0.0
    for seconds, load in plan.phases:
        rate = load / mean_s
        t = start + rng.expovariate(rate)
        while t < start + seconds:
            arrivals.append((t, "long" if rng.random() < LONG_SHARE else "short"))
            t += rng.expovariate(rate)
        start += seconds
    return arrivals


# -- systems: boot and shut down --------------------------------------------------


def llmasos_command() -> list[str]:
    """The `llmasos` command installed beside this interpreter."""
    script = Path(sys.executable).parent / "llmasos"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "llmasos.cli"]


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it is not alive.

    A process is known by its pid and this together, so a pid the kernel
    reuses for another process is never taken for it.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in "ZX":
        return None
    return int(fields[19])


def _parent(pid: int) -> int:
    """The parent of `pid` (for a replica, the fork server)."""
    fields = _stat_fields(pid)
    if fields is None:
        raise BenchError(f"process {pid} ended while the system booted")
    return int(fields[1])


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) `pid` used; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class System:
    """One system of this run: the service `work` under one policy."""

    def __init__(self, root: Path, policy: str, cpu: int | None) -> None:
        self.name = f"sched{os.getpid()}-{policy}"
        self.manifest = root / f"{self.name}.toml"
        affinity = "" if cpu is None else f"cpu_affinity = [{cpu}]\n"
        self.manifest.write_text(
            MANIFEST.format(
                name=self.name,
                policy=policy,
                affinity=affinity,
                **{f"{k}_priority": PRIORITY[k] for k in KINDS},
                **{f"{k}_ms": RUN_MS[k] for k in KINDS},
            )
        )
        self.procs: dict[int, int | None] = {}  # pid -> start time

    def boot(self) -> None:
        """Boot with `llmasos boot --detach`, which returns once all is ready."""
        from llmasos import control

        command = [*llmasos_command(), "boot", "--detach", str(self.manifest)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90)
        if done.returncode != 0:
            raise BenchError(f"{self.name} did not boot: {done.stderr.strip()}")
        ps = control.request("ps", system=self.name)
        if ps["services"][SERVICE]["ready"] < 1:
            log = control.run_dir(self.name) / "logs" / f"{SERVICE}.0.log"
            tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
            raise BenchError(f"{self.name}: {SERVICE} did not start: {tail}")
        replicas = [p["pid"] for p in ps["procs"] if p["kind"] == "replica"]
        pids = {ps["kernel"], *replicas, *(_parent(pid) for pid in replicas)}
        self.procs = {pid: _started(pid) for pid in pids}

    def cpu_s(self) -> float:
        """CPU seconds used so far by the kernel, fork server and replica."""
        return sum(_cpu_s(pid) for pid in self.procs)

    def left(self) -> list[int]:
        """The processes of the system still alive."""
        return [pid for pid, t in self.procs.items() if t and _started(pid) == t]

    def shutdown(self) -> list[str]:
        """Shut the system down; kill what is left, remove its heap, say what was."""
        from llmasos.heap import unlink

        command = [*llmasos_command(), "shutdown", "--system", self.name]
        subprocess.run(command, capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + 10
        while self.left() and time.monotonic() < deadline:
            time.sleep(0.01)

        problems, left = [], self.left()
        if left:
            problems.append(f"{self.name}: killed pids {left} left after shutdown")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if unlink(f"sys-{self.name}"):
            problems.append(f"{self.name}: removed its heap, left after shutdown")
        return problems


# -- the client -------------------------------------------------------------------


def warm_up(pool: ThreadPoolExecutor, system: str, threads: int) -> None:
    """Start every thread of `pool`, each with its reply channel, by one `ping`."""
    import llmasos

    proxy = llmasos.connect(SERVICE, system, timeout=30.0)
    barrier = threading.Barrier(threads)

    def ping() -> None:
        proxy.ping()
        barrier.wait(timeout=30.0)

    for future in [pool.submit(ping) for _ in range(threads)]:
        future.result()


def call_open(proxy: object, kind: str, due: float) -> Record:
    """Make one call without a timeout and record it."""
    from llmasos import LLMasOSError

    sent = time.monotonic()
    try:
        run_ms = getattr(proxy, kind)(RUN_MS[kind])
    except LLMasOSError:
        return Record(kind, due, sent, time.monotonic(), None, "error")
    return Record(kind, due, sent, time.monotonic(), run_ms, "ok")


def call_with_deadline(system: str, kind: str, due: float) -> Record:
    """Make one call whose deadline is `due` plus its budget, and record it."""
    import llmasos

    sent = time.monotonic()
    left = BUDGET_MS[kind] / 1e3 - (sent - due)
    if left <= 0:
        return Record(kind, due, sent, sent, None, "expired")
    proxy = llmasos.connect(SERVICE, system, timeout=left)
    try:
        run_ms = getattr(proxy, kind)(RUN_MS[kind])
    except (TimeoutError, BlockingIOError) as exc:
        # A call whose time ran out while it waited may end in BlockingIOError
        # instead of TimeoutError: the client then asks its reply channel for
        # a message with a timeout of 0, which raises that.
        outcome = "dropped" if isinstance(exc, llmasos.RemoteError) else "timeout"
        return Record(kind, due, sent, time.monotonic(), None, outcome)
    except llmasos.LLMasOSError:
        return Record(kind, due, sent, time.monotonic(), None, "error")
    return Record(kind, due, sent, time.monotonic(), run_ms, "ok")


def run_pass(
    pool: ThreadPoolExecutor,
    schedule: list[tuple[float, str]],
    call: Callable[[str, float], Record],
) -> list[Record]:
    """Hand each request of `schedule` to `pool` at its time; wait for all."""
    start = time.monotonic() + 0.05
    futures = []
    for at, kind in schedule:
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(call, kind, start + at))
    return [future.result() for future in futures]


def client_main(system: str, plan: Plan, schedule: list, conn) -> None:
    """The client process: warm up, run both passes, send the records back."""
    import llmasos

    try:
        with ThreadPoolExecutor(plan.threads) as pool:
            warm_up(pool, system, plan.threads)
            proxy = llmasos.connect(SERVICE, system)
            cpu0, wall0 = time.process_time(), time.monotonic()
            waits = run_pass(pool, schedule, functools.partial(call_open, proxy))
            cpu = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
            time.sleep(SETTLE_S)
            call = functools.partial(call_with_deadline, system)
            deadlines = run_pass(pool, schedule, call)
        result = {"waits": waits, "deadlines": deadlines, "client_cpu_pct": cpu}
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        conn.send(("error", f"client: {exc!r} at {where.name}:{where.lineno}"))


def measure(system: str, plan: Plan, schedule: list) -> dict:
    """Run the client in a forked process and return its records."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=client_main, args=(system, plan, schedule, theirs))
    proc.start()
    theirs.close()
    try:
        if not ours.poll(4 * sum(s for s, _ in plan.phases) + 120):
            raise BenchError(f"{system}: the client gave no answer in time")
        tag, value = ours.recv()
    except EOFError:
        raise BenchError(f"{system}: the client ended without an answer") from None
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if tag == "error":
        raise BenchError(value)
    return value


# -- figures --------------------------------------------------------------------


def percentile(ordered: list, q: float) -> float:
    """The nearest-rank q-th percentile of an already sorted list."""
    if not ordered:
        return math.nan
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def waits_ms(records: list[Record], kind: str) -> list[float]:
    """Sorted waiting times of the answered requests of `kind`, in ms."""
    return sorted(
        (r.replied - r.due) * 1e3 - r.run_ms
        for r in records
        if r.kind == kind and r.outcome == "ok"
    )


def wait_figures(waits: list[float]) -> dict:
    """p50, p99 and maximum of sorted waits."""
    return {
        "p50_ms": percentile(waits, 50),
        "p99_ms": percentile(waits, 99),
        "max_wait_ms": waits[-1] if waits else math.nan,
    }


def peak_in_flight(records: list[Record]) -> int:
    """Most requests between their scheduled arrival and their reply at once."""
    events = sorted([(r.due, 1) for r in records] + [(r.replied, -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def misses(records: list[Record]) -> dict:
    """Deadline misses of the deadline pass, by reason, and their total."""
    reasons = ("dropped", "timeout", "expired")
    counts = {reason: sum(r.outcome == reason for r in records) for reason in reasons}
    counts["late"] = sum(
        r.outcome == "ok" and (r.replied - r.due) * 1e3 > BUDGET_MS[r.kind]
        for r in records
    )
    return counts | {"total": sum(counts.values())}


def figures(raw: dict) -> dict:
    """One policy's figures from the records of its two passes."""
    records, deadline_records = raw["waits"], raw["deadlines"]
    answered = [r for r in records if r.outcome == "ok"]
    span = max(r.replied for r in records) - min(r.due for r in records)
    lags = sorted((r.sent - r.due) * 1e3 for r in records)
    missed = misses(deadline_records)
    return {
        **{kind: wait_figures(waits_ms(records, kind)) for kind in KINDS},
        "throughput_per_s": len(answered) / span,
        "deadline_misses": missed["total"],
        "misses_by_reason": missed,
        "errors": sum(r.outcome == "error" for r in records + deadline_records),
        "send_lag_p99_ms": percentile(lags, 99),
        "peak_in_flight": peak_in_flight(records),
        "client_cpu_pct": raw["client_cpu_pct"],
    }


# -- report ---------------------------------------------------------------------


def regime(plan: Plan, cpu: int | None, requests: int) -> str:
    """Sentences naming the workload and where it ran."""
    phases = ", ".join(f"{s:g} s at {load:.0%}" for s, load in plan.phases)
    place = (
        "replica, client and kernel on any CPU"
        if cpu is None
        else f"replica pinned to CPU {cpu}, client and kernel to the others"
    )
    return (
        f"{requests} requests, {1 - LONG_SHARE:.0%} short ({RUN_MS['short']:g} ms) "
        f"and {LONG_SHARE:.0%} long ({RUN_MS['long']:g} ms); {phases}; one replica, "
        f"one worker; {place}; client pool of {plan.threads} threads. Deadline "
        f"budgets: {BUDGET_MS['short']:g} ms short, {BUDGET_MS['long']:g} ms long."
    )


def load_note(results: dict) -> str:
    """One sentence on how busy the machine was with other work."""
    loads = [f["other_load_cpu_pct"] for f in results.values() if "error" not in f]
    other = max(loads, default=0.0)
    if other < 10:
        return f"Idle machine: other processes took at most {other:.0f}% of a CPU."
    return (
        f"Machine busy with other work: other processes took up to {other:.0f}% "
        "of a CPU during a policy's run, which slows the replica and the client "
        "and makes the figures noisier (see other % below)."
    )


def _ms(value: float) -> str:
    """A time in ms for the table."""
    if math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


HEADINGS = (
    "short p50", "short p99", "short max", "long p50", "long p99",
    "long max", "req/s", "misses",
)  # fmt: skip
CHECK_HEADINGS = (
    "dropped", "timed out", "expired", "late", "errors", "lag p99",
    "in flight", "client %", "other %",
)  # fmt: skip


CHECK_TEXT = (
    "Deadline misses by reason; errors of both passes. First pass: the client's "
    "send lag p99 (ms), its peak of calls in flight / pool size (fifo and edf "
    "order by arrival here, so calls beyond the pool wait in its queue in the "
    "same order) and its CPU; CPU of other processes (both % of one CPU)."
)


def _row(name: str, fig: dict) -> str:
    """One line of the main table."""
    cells = [_ms(fig[k][q]) for k in KINDS for q in ("p50_ms", "p99_ms", "max_wait_ms")]
    cells += [f"{fig['throughput_per_s']:,.0f}", str(fig["deadline_misses"])]
    return name.ljust(10) + "".join(c.rjust(11) for c in cells)


def _check_row(name: str, fig: dict, plan: Plan) -> str:
    """One line of the table of how each pass went."""
    by = fig["misses_by_reason"]
    cells = [str(by[k]) for k in ("dropped", "timeout", "expired", "late")]
    cells += [str(fig["errors"]), _ms(fig["send_lag_p99_ms"])]
    cells.append(f"{fig['peak_in_flight']}/{plan.threads}")
    cells += [f"{fig[k]:.0f}" for k in ("client_cpu_pct", "other_load_cpu_pct")]
    return name.ljust(10) + "".join(c.rjust(11) for c in cells)


def table(results: dict, plan: Plan, info: dict) -> str:
    """The results as two fixed-width tables under a header naming the regime."""
    header = f"Run-queue policies on a live replica. {info['regime']} "
    header += load_note(results)
    lines = [
        *textwrap.wrap(header, width=98),
        "Waits in ms (response - run time), first pass; misses from the deadline pass.",
        "policy".ljust(10) + "".join(h.rjust(11) for h in HEADINGS),
    ]
    lines += [_error_or(name, fig, _row) for name, fig in results.items()]
    lines += ["", *textwrap.wrap(CHECK_TEXT, width=98)]
    lines.append("policy".ljust(10) + "".join(h.rjust(11) for h in CHECK_HEADINGS))
    check = functools.partial(_check_row, plan=plan)
    lines += [_error_or(name, fig, check) for name, fig in results.items()]
    return "\n".join(lines)


def _error_or(name: str, fig: dict, row: Callable[[str, dict], str]) -> str:
    """The row of a measured policy, or its error."""
    return name.ljust(10) + fig["error"] if "error" in fig else row(name, fig)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _check(figure: str, value: float, limit: float, strict: bool = False) -> dict:
    """One target: a figure, its value, and whether it stays within `limit`
    (below it if `strict`). A NaN value fails."""
    passed = value < limit if strict else value <= limit
    shown = f"{'<' if strict else '<='} {limit:.3g}"
    return {"figure": figure, "value": value, "limit": shown, "pass": passed}


def target_checks(results: dict) -> list[dict]:
    """The target ratios, each with its limit and whether it is met."""
    ok = {name: fig for name, fig in results.items() if "error" not in fig}
    fifo, checks = ok.get("fifo"), []
    if fifo is None:
        return checks

    if "hrrn" in ok:
        short = ok["hrrn"]["short"]["p99_ms"] / fifo["short"]["p99_ms"]
        longest = ok["hrrn"]["long"]["max_wait_ms"] / fifo["long"]["max_wait_ms"]
        checks.append(_check("hrrn short p99 / fifo short p99", short, 1 / 3))
        checks.append(_check("hrrn long max / fifo long max", longest, 3.0))
    if "edf" in ok:
        edf, base = ok["edf"]["deadline_misses"], fifo["deadline_misses"]
        value = edf / base if base else math.nan
        checks.append(_check("edf misses / fifo misses", value, 1.0, strict=True))
    return checks


def starvation_note(results: dict) -> str | None:
    """How much longer `priority` makes long requests wait than `fifo`."""
    ok = {name: fig for name, fig in results.items() if "error" not in fig}
    if "priority" not in ok or "fifo" not in ok:
        return None
    ratio = ok["priority"]["long"]["max_wait_ms"] / ok["fifo"]["long"]["max_wait_ms"]
    return (
        f"  priority long max / fifo long max = {ratio:.2f} (no target: short "
        "requests alone fill about half the replica, too little to starve long ones)"
    )


def pool_warnings(results: dict, plan: Plan) -> list[str]:
    """A warning for each reordering policy whose calls outgrew the pool.

    Calls beyond the pool wait in its queue in arrival order, where the
    replica cannot see them: a policy other than fifo (or edf without
    deadlines) is then not what was measured.
    """
    return [
        f"Warning: {name} wanted {fig['peak_in_flight']} calls in flight, more "
        f"than the pool's {plan.threads} threads; part of its queue waited in "
        "arrival order in the client, so its figures show partly that order."
        for name, fig in results.items()
        if name in ("priority", "hrrn")
        and "error" not in fig
        and fig["peak_in_flight"] > plan.threads
    ]


def targets_text(results: dict) -> str:
    """The target ratios with PASS or FAIL (printed figures, not assertions)."""
    checks = target_checks(results)
    if not checks:
        return "Targets: n/a, fifo has no figures to compare with."
    lines = ["Targets (printed figures, not assertions):"]
    for check in checks:
        lines.append(
            f"  {check['figure']} = {check['value']:.3f} (target "
            f"{check['limit']})  {_verdict(check['pass'])}"
        )
    note = starvation_note(results)
    return "\n".join(lines + ([note] if note else []))


def plot(waits: dict, path: Path) -> None:
    """Write the distribution of waits per class and policy as a PNG of CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        _plot_cdfs(ax, waits, kind)
    axes[0].set_ylabel("share of requests waiting at most x")
    axes[0].legend(loc="lower right")
    fig.suptitle("Waiting time per request, one replica, no deadlines (first pass)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cdfs(ax, waits: dict, kind: str) -> None:
    """Draw on `ax` the CDF of the waits of `kind` under every policy."""
    for name, by_kind in waits.items():
        values = [max(w, 0.01) for w in by_kind[kind]]  # a log axis has no 0
        shares = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, shares, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("waiting time (ms, log scale)")
    ax.set_title(f"{kind} requests ({RUN_MS[kind]:g} ms)")
    ax.grid(True, which="both", alpha=0.3)


def _rounded(value: object) -> object:
    """`value` with its floats rounded for JSON, NaN as null."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    return value


# -- main -------------------------------------------------------------------------


def parse_args(argv: list | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", help="comma-separated policy names")
    args = parser.parse_args(argv)

    args.only = args.only.split(",") if args.only else list(POLICIES)
    unknown = sorted(set(args.only) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policy {unknown}; choose from {', '.join(POLICIES)}")
    return args


def pin_cpus() -> int | None:
    """Pin this process (and so the kernel and client) off the last CPU, which
    the replica gets; None, and no pinning, on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, cpus[:-1])
    return cpus[-1]


def run_policy(root: Path, policy: str, cpu: int | None, plan: Plan, schedule: list):
    """Boot a system with `policy`, measure it, shut it down.

    Returns the policy's figures (or its error), its waits by kind, and what
    the shutdown left behind.
    """
    system, meter = System(root, policy, cpu), OtherLoadMeter()
    try:
        system.boot()
        raw = measure(system.name, plan, schedule)
        other = meter.percent(system.cpu_s())
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        raw, error = None, str(exc)
    finally:
        problems = system.shutdown()

    if raw is None:
        return {"error": error}, None, problems
    waits = {kind: waits_ms(raw["waits"], kind) for kind in KINDS}
    return figures(raw) | {"other_load_cpu_pct": other}, waits, problems


def run_all(args: argparse.Namespace, plan: Plan, schedule: list, cpu: int | None):
    """Measure every selected policy in its own system under a temporary run
    directory; return figures, waits and cleanup problems."""
    root = Path(tempfile.mkdtemp(prefix="llmasos-schedbench-"))
    os.environ["LLMASOS_RUN_DIR"] = str(root / "run")
    results, waits, problems = {}, {}, []
    try:
        for policy in args.only:
            fig, policy_waits, left = run_policy(root, policy, cpu, plan, schedule)
            results[policy], problems = fig, problems + left
            if policy_waits is not None:
                waits[policy] = policy_waits
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results, waits, problems


def main(argv: list | None = None) -> int:
    """Measure the selected policies and print the table or the JSON."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    schedule = make_schedule(plan)
    cpu = pin_cpus()
    info = machine() | {"regime": regime(plan, cpu, len(schedule))}
    results, waits, problems = run_all(args, plan, schedule, cpu)
    if waits:
        plot(waits, PLOT_PATH)

    if args.json:
        report = {"policies": results, "targets": target_checks(results)}
        report |= {"machine": info, "plan": dataclasses.asdict(plan)}
        report |= {"plot": str(PLOT_PATH) if waits else None}
        report |= {"warnings": pool_warnings(results, plan)}
        print(json.dumps(_rounded(report | {"cleanup_problems": problems})))
    else:
        print(table(results, plan, info), targets_text(results), sep="\n\n")
        for warning in pool_warnings(results, plan):
            print(textwrap.fill(warning, width=98))
        print(f"\nPlot: {PLOT_PATH}" if waits else "\nPlot: none, nothing measured")
        for problem in problems:
            print(f"cleanup: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
