"""Measure the kernel beside multiprocessing and subprocess, in one run.

Five figures of the kernel, each beside the nearest thing Python offers:

1. boot: `llmasos boot --detach` of a 5-service system until every replica is
   ready (the kernel's own view, polled on its control socket, and the
   command's wall time), beside starting 5 `multiprocessing.Process` (spawn
   and fork) until each answered a ping, and 5 `python -c` until each printed
   "ready";
2. spawn: the kernel starting one more replica (a `scale` request from N-1
   to N, on an open control connection, until its reply: the kernel answers
   once the new replica has said it is ready; the fork server keeps one
   spare forked ahead, so this is a spawn into a quiet system, and spawns in
   a burst, as at boot, wait for forks), beside
   `subprocess.run([python, "-c", "pass"])` and one `multiprocessing.Process`;
3. restart: SIGKILL a replica, until `ps` shows a new ready pid for it (the
   service's restart window is 1 ms, so each kill is a first restart, which
   the supervisor makes at once);
4. calls of 64 bytes: client -> service -> client (`call`) and client ->
   front -> back -> front -> client (`relay`), beside a round trip over
   `multiprocessing.connection` (AF_UNIX) to an echoing process;
5. memory: the resident set of the kernel, the fork server and a replica.

Where the processes of the calls run decides the regime: on two CPUs every
wake-up of a sleeping receiver crosses CPUs (70-100 us on an idle virtual
machine), on one it is a context switch, and a spinning waiter competes with
the process it waits for. So by default (`--placement split`, as in ipc.py)
the client runs on one CPU and the services and the echo server on another;
`--placement free` leaves every process to the scheduler.

Every system runs under a temporary LLMASOS_RUN_DIR with a name unique to the
run, and is shut down, its processes gone and its heap removed, however the
run ends. The header names the regime the figures were taken in.

llmasos is imported inside the functions that use it, not at the top: the
multiprocessing spawn children re-import this script, and should pay for no
more than a bare child does.

Usage: python benchmarks/kernel.py [--quick] [--json] [--placement free|split]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _machine import machine, machine_busy_s

now = time.perf_counter_ns
PAYLOAD = b"x" * 64
POLL_S = 0.001
READY_TIMEOUT_S = 60.0

BOOT_MANIFEST = """\
[system]
name = "{name}"

[services.kv0]
entry = "llmasos.examples.basic:KV"

[services.kv1]
entry = "llmasos.examples.basic:KV"

[services.kv2]
entry = "llmasos.examples.basic:KV"

[services.echo0]
entry = "llmasos.examples.basic:Echo"

[services.echo1]
entry = "llmasos.examples.basic:Echo"
"""

# `spare` takes the spawns and the kills. Its restart window is 1 ms, so that
# every kill is a first restart, which the supervisor makes without backoff.
WORK_MANIFEST = """\
[system]
name = "{name}"

[services.front]
entry = "llmasos.examples.benchsvc:Front"
calls = ["back"]
{server_cpus}

[services.back]
entry = "llmasos.examples.benchsvc:Back"
{server_cpus}

[services.spare]
entry = "llmasos.examples.basic:Echo"
restart = "always"
restart_window = 0.001
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many times each operation is measured."""

    boots: int
    starts: int
    spawns: int
    scale_commands: int
    restarts: int
    python_runs: int
    call_warmup: int
    calls: int
    placement: str = "free"
    cpus: tuple[int | None, int | None] = (None, None)


FULL = Plan(15, 10, 60, 5, 60, 10, 2_000, 50_000)
QUICK = Plan(3, 3, 8, 2, 8, 10, 500, 5_000)
CALL_ROUNDS = 5
PLACEMENTS = {
    "free": "every process placed by the scheduler",
    "split": "for the calls, the client pinned to one CPU and the services and "
    "the echo server to another, so every wake-up crosses CPUs",
}


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


# -- helpers ------------------------------------------------------------------


def ms_since(t0: int) -> float:
    """Milliseconds from perf_counter_ns() value `t0` to now."""
    return (now() - t0) / 1e6


def percentile(ordered: list, q: float) -> float:
    """The nearest-rank q-th percentile of an already sorted list."""
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def median_of(runs: int, measure: Callable[[], float]) -> float:
    """The median of `runs` calls of `measure`."""
    return statistics.median(measure() for _ in range(runs))


def status_mib(pid: int, field: str = "VmRSS") -> float:
    """A kB field of /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no {field}")


def pss_mib(pid: int) -> float:
    """The proportional set size of `pid` (shared pages split), in MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/smaps_rollup has no Pss")


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][0] not in "ZX"


def llmasos_command() -> list[str]:
    """The `llmasos` command installed beside this interpreter."""
    script = Path(sys.executable).parent / "llmasos"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "llmasos.cli"]


# -- systems: boot, watch, shut down ------------------------------------------


@dataclasses.dataclass
class System:
    """A system booted by this run, and every pid it was seen to have."""

    name: str
    manifest: Path
    services: int
    pids: set[int] = dataclasses.field(default_factory=set)
    booted: bool = False


class Runs:
    """The systems of this run under one temporary run directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="llmasos-kbench-"))
        os.environ["LLMASOS_RUN_DIR"] = str(self.root / "run")
        self.systems: list[System] = []

    def new(self, template: str, services: int, **fields: str) -> System:
        """A system of `template`, filled with `fields` and a name no other
        system has."""
        name = f"kb{os.getpid()}-{len(self.systems)}"
        path = self.root / f"{name}.toml"
        path.write_text(template.format(name=name, **fields))
        self.systems.append(System(name, path, services))
        return self.systems[-1]

    def close(self) -> None:
        """Shut down every system still up, then remove the run directory."""
        errors = []
        for system in self.systems:
            try:
                shutdown(system)
            except Exception as exc:  # noqa: BLE001 - clean up the others too.
                errors.append(f"{system.name}: {exc!r}")
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise BenchError("cleanup failed: " + "; ".join(errors))


def ps_or_none(system: System) -> dict | None:
    """The kernel's `ps`, or None while it does not answer yet."""
    from llmasos import control
    from llmasos.errors import LLMasOSError

    try:
        return control.request("ps", system=system.name)
    except (LLMasOSError, OSError):
        return None


def all_ready(system: System, ps: dict | None) -> bool:
    """True if `ps` shows every service of `system` with all replicas ready."""
    if ps is None or len(ps["services"]) < system.services:
        return False
    return all(s["ready"] >= s["replicas"] for s in ps["services"].values())


def remember_pids(system: System, ps: dict | None = None) -> None:
    """Note the kernel, fork server and replicas of `system`, for cleanup.

    They are read from `ps` if given, and from the kernel's state file, whose
    entries are pids or [pid, start time].
    """
    if ps is not None:
        system.pids.update([ps["kernel"], *(p["pid"] for p in ps["procs"])])
    try:
        state = json.loads((run_dir(system) / "state.json").read_text())
        entries = [state["kernel"], *state.get("pids", [])]
        system.pids.update(int(e[0] if isinstance(e, list) else e) for e in entries)
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        pass  # no state file, or one of another form: `ps` has to do


def run_dir(system: System) -> Path:
    """The run directory of `system`."""
    from llmasos import control

    return control.run_dir(system.name)


def boot(system: System) -> tuple[float, float]:
    """Boot with `llmasos boot --detach`; ms until all ready, and until it exits.

    Ready is when `ps`, polled every POLL_S, shows every replica ready.
    """
    t0 = now()
    command = [*llmasos_command(), "boot", "--detach", system.manifest]
    cmd = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    system.booted = True
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all_ready(system, ps := ps_or_none(system)):
        if cmd.poll() not in (None, 0) or time.monotonic() > deadline:
            raise BenchError(f"system {system.name} did not boot (see its run dir)")
        time.sleep(POLL_S)
    ready_ms = ms_since(t0)

    if cmd.wait(READY_TIMEOUT_S) != 0:
        raise BenchError(f"llmasos boot of {system.name} exited {cmd.returncode}")
    remember_pids(system, ps)
    return ready_ms, ms_since(t0)


def _belongs_to(pid: int, system: System) -> bool:
    """True if `pid` is a live process of `system` (not a reused pid)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"LLMASOS_SYSTEM={system.name}".encode() in env and alive(pid)


def shutdown(system: System) -> None:
    """Shut `system` down with `llmasos shutdown`; then kill what is left of it
    and remove its heap, so that nothing outlives the run."""
    from llmasos.heap import unlink

    if not system.booted:
        return
    remember_pids(system, ps := ps_or_none(system))
    if ps is not None:
        command = [*llmasos_command(), "shutdown", "--system", system.name]
        subprocess.run(command, stdout=subprocess.DEVNULL, timeout=60, check=False)
    left = wait_gone(system, timeout_s=10.0)

    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unlink(f"sys-{system.name}")
    system.booted = False
    if left:
        raise BenchError(f"{system.name}: killed pids {left} left after shutdown")


def wait_gone(system: System, timeout_s: float) -> list[int]:
    """Wait for every process of `system` to end; the pids still running."""
    deadline = time.monotonic() + timeout_s
    while left := [pid for pid in system.pids if _belongs_to(pid, system)]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return left


# -- boot: llmasos beside multiprocessing and subprocess ----------------------


def _pong(conn: multiprocessing.connection.Connection) -> None:
    """Child of the multiprocessing rows: answer one ping, then wait for "bye".

    Not for the end of the pipe: a forked sibling holds the parent's end open.
    """
    conn.send_bytes(conn.recv_bytes())
    conn.recv_bytes()


def start_mp(method: str, count: int) -> tuple[float, float]:
    """Start `count` processes of context `method` until each answered a ping.

    Returns the milliseconds that took and the RSS (MiB) of one child.
    """
    ctx = multiprocessing.get_context(method)
    t0, pairs = now(), []
    for _ in range(count):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_pong, args=(theirs,))
        proc.start()
        ours.send_bytes(b"ping")
        pairs.append((proc, ours))
    for _, ours in pairs:
        ours.recv_bytes()
    took = ms_since(t0)

    rss = status_mib(pairs[0][0].pid)
    for proc, ours in pairs:
        ours.send_bytes(b"bye")
        ours.close()
        proc.join()
    return took, rss


def start_python(count: int) -> float:
    """Start `count` `python -c` processes; ms until each printed "ready"."""
    code = "print('ready', flush=True)"
    t0 = now()
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        for _ in range(count)
    ]
    for proc in procs:
        if proc.stdout.readline() != b"ready\n":
            raise BenchError("a python -c child did not print ready")
    took = ms_since(t0)
    for proc in procs:
        proc.wait()
        proc.stdout.close()
    return took


def cli_import() -> float:
    """Wall time of `python -c "import llmasos.cli"`, in ms: the CLI's start."""
    t0 = now()
    subprocess.run([sys.executable, "-c", "import llmasos.cli"], check=True)
    return ms_since(t0)


def python_c() -> float:
    """Wall time of `subprocess.run([python, "-c", "pass"])`, in ms."""
    t0 = now()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return ms_since(t0)


def memory(system: System) -> dict:
    """Resident set of the kernel, the fork server and one replica, at idle."""
    time.sleep(0.5)  # let every spinning replica go to sleep
    ps = ps_or_none(system)
    replica = next(p["pid"] for p in ps["procs"] if p["kind"] == "replica")
    server = next(p["pid"] for p in ps["procs"] if p["kind"] == "forkserver")
    return {
        "kernel_rss_mib": status_mib(ps["kernel"]),
        "forkserver_rss_mib": status_mib(server),
        "replica_rss_mib": status_mib(replica),
        "replica_pss_mib": pss_mib(replica),
    }


def measure_boot(runs: Runs, plan: Plan) -> dict:
    """Boot the 5-service system `plan.boots` times, beside the other starts."""
    ready, command, row = [], [], {}
    for i in range(plan.boots):
        system = runs.new(BOOT_MANIFEST, services=5)
        r, c = boot(system)
        ready.append(r)
        command.append(c)
        if i == plan.boots - 1:
            row.update(memory(system))
        shutdown(system)
    row["boot_5_services_ms"] = statistics.median(ready)
    row["boot_command_ms"] = statistics.median(command)
    return row | measure_starts(plan)


def measure_starts(plan: Plan) -> dict:
    """multiprocessing and subprocess: 5 processes, and one, until they answer."""
    row = {}
    for method in ("spawn", "fork"):
        five = [start_mp(method, 5) for _ in range(plan.starts)]
        one = [start_mp(method, 1) for _ in range(plan.starts)]
        row[f"mp_{method}_5_ms"] = statistics.median(t for t, _ in five)
        row[f"mp_{method}_start_ms"] = statistics.median(t for t, _ in one)
        row[f"mp_{method}_child_rss_mib"] = statistics.median(r for _, r in one)
    row["subprocess_5_ms"] = median_of(plan.starts, lambda: start_python(5))
    row["python_c_ms"] = median_of(plan.python_runs, python_c)
    row["cli_import_ms"] = median_of(plan.starts, cli_import)
    row["mp_process_start_ms"] = row["mp_spawn_start_ms"]
    return row


# -- spawn and restart of a replica -------------------------------------------


def wait_ps(ctl, until: Callable[[dict], bool]) -> dict:
    """Poll `ps` on control connection `ctl` every POLL_S until `until(ps)`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not until(ps := ctl.request("ps")):
        if time.monotonic() > deadline:
            raise BenchError("the kernel did not show the expected state in time")
        time.sleep(POLL_S)
    return ps


def spawn_once(ctl, n: int) -> float:
    """Scale `spare` from n-1 to n; ms until the kernel's reply, which comes
    once the new replica is ready (checked with `ps` afterwards)."""
    t0 = now()
    ctl.request("scale", service="spare", replicas=n)
    took = ms_since(t0)
    if ctl.request("ps")["services"]["spare"]["ready"] < n:
        raise BenchError("the kernel answered `scale` before the replica was ready")
    ctl.request("scale", service="spare", replicas=n - 1)
    return took


def scale_command(system: System) -> float:
    """Wall time of `llmasos scale spare=2`, in ms (then back to 1)."""
    from llmasos import control

    t0 = now()
    subprocess.run(
        [*llmasos_command(), "scale", "--system", system.name, "spare=2"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    took = ms_since(t0)
    control.request("scale", system=system.name, service="spare", replicas=1)
    return took


def replica_pid(ps: dict, service: str, index: int) -> int | None:
    """The pid of a ready replica `index` of `service` in `ps`, or None."""
    for p in ps["procs"]:
        if (p["service"], p["replica"], p["state"]) == (service, index, "ready"):
            return p["pid"]
    return None


def restart_once(ctl) -> float:
    """SIGKILL `spare` replica 0; ms until `ps` shows a new ready pid for it."""
    old = replica_pid(ctl.request("ps"), "spare", 0)
    t0 = now()
    os.kill(old, signal.SIGKILL)
    wait_ps(ctl, lambda ps: replica_pid(ps, "spare", 0) not in (None, old))
    took = ms_since(t0)
    time.sleep(0.01)  # past the restart window: the next kill is a first again
    return took


def measure_replicas(system: System, plan: Plan) -> dict:
    """Spawn and restart figures on the `spare` service of the work system."""
    from llmasos import control

    with control.ControlClient(system.name) as ctl:
        spawns = sorted(spawn_once(ctl, 2) for _ in range(plan.spawns))
        restarts = sorted(restart_once(ctl) for _ in range(plan.restarts))
        remember_pids(system, ctl.request("ps"))
    return {
        "spawn_ms": statistics.median(spawns),
        "spawn_max_ms": spawns[-1],
        "scale_command_ms": median_of(
            plan.scale_commands, lambda: scale_command(system)
        ),
        "restart_ms": statistics.median(restarts),
        "restart_max_ms": restarts[-1],
    }


# -- calls --------------------------------------------------------------------


def time_calls(fn: Callable[[bytes], object], count: int, into: list) -> None:
    """Call `fn(PAYLOAD)` `count` times, adding each duration (ns) to `into`."""
    for _ in range(count):
        t0 = now()
        fn(PAYLOAD)
        into.append(now() - t0)


def pin(cpu: int | None) -> None:
    """Run this process on `cpu` only; None leaves it to the scheduler."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _echo_server(listener: multiprocessing.connection.Listener, cpu: int | None):
    """The multiprocessing.connection server: echo until the client leaves."""
    pin(cpu)
    with listener.accept() as conn:
        with contextlib.suppress(EOFError):
            while True:
                conn.send_bytes(conn.recv_bytes())


@contextlib.contextmanager
def mp_echo(root: Path, cpu: int | None):
    """A process echoing over multiprocessing.connection; yields a round trip."""
    ctx = multiprocessing.get_context("fork")
    listener = multiprocessing.connection.Listener(str(root / "echo.sock"), "AF_UNIX")
    server = ctx.Process(target=_echo_server, args=(listener, cpu))
    server.start()
    try:
        with multiprocessing.connection.Client(listener.address, "AF_UNIX") as conn:
            listener.close()
            yield lambda data: conn.send_bytes(data) or conn.recv_bytes()
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


def llmasos_calls(system: System) -> dict:
    """The one-hop (`back.echo`) and two-hop (`front.relay`) calls, checked."""
    import llmasos

    back = llmasos.connect("back", system.name, timeout=30)
    front = llmasos.connect("front", system.name, timeout=30)
    if back.echo(PAYLOAD) != PAYLOAD or front.relay(PAYLOAD) != PAYLOAD:
        raise BenchError("a call did not return its payload")
    return {"call": back.echo, "relay": front.relay}


def measure_calls(system: System, root: Path, plan: Plan) -> dict:
    """p50 and p99 (us) of each kind of call, in interleaved rounds.

    Each round runs every kind in turn, so that a change of load on the
    machine touches them all alike. The echo server is forked before this
    process attaches the system's heap.
    """
    allowed = os.sched_getaffinity(0)
    with mp_echo(root, plan.cpus[1]) as round_trip:
        pin(plan.cpus[0])
        calls = llmasos_calls(system) | {"mp_connection": round_trip}
        samples = {name: [] for name in calls}
        for fn in calls.values():
            time_calls(fn, plan.call_warmup, [])
        for _ in range(CALL_ROUNDS):
            for name, fn in calls.items():
                time_calls(fn, plan.calls // CALL_ROUNDS, samples[name])
    os.sched_setaffinity(0, allowed)

    row = {"spin_us": channel_spin_us()}
    for name, got in samples.items():
        got.sort()
        row[f"{name}_p50_us"] = percentile(got, 50) / 1e3
        row[f"{name}_p99_us"] = percentile(got, 99) / 1e3
    return row


def channel_spin_us() -> float:
    """How long a channel's receiver spins before it sleeps, in us."""
    import llmasos

    probe = llmasos.Channel.create(llmasos.system_heap())
    spin_us = probe.spin_us
    probe.destroy()
    return spin_us


# -- report -------------------------------------------------------------------


def other_load_pct(seconds: float = 0.3) -> float:
    """CPU used by other processes while this run sleeps, in % of one CPU.

    Taken between the phases, when every process of the run sleeps.
    """
    before = machine_busy_s()
    time.sleep(seconds)
    return 100.0 * (machine_busy_s() - before) / seconds


def regime(row: dict) -> str:
    """One sentence naming the conditions the figures were taken in."""
    load = row["other_load_pct"]
    idle = "idle machine" if max(load) < 10 else "machine busy with other work"
    return (
        f"{idle} (other processes took {', '.join(f'{x:.0f}' for x in load)}% "
        f"of a CPU in 0.3 s between the phases), {os.cpu_count()} CPUs, "
        f"{PLACEMENTS[row['placement']]}; a "
        f"waiting llmasos side spins ~{row['spin_us']:.0f} us then sleeps, a "
        "waiting multiprocessing side sleeps at once"
    )


# (label, llmasos key, unit, [(peer label, peer key)])
LABEL_W = 31
LAYOUT = (
    ("boot, 5 services to ready", "boot_5_services_ms", "ms", [
        ("5 mp.Process spawn, to ping", "mp_spawn_5_ms"),
        ("5 mp.Process fork, to ping", "mp_fork_5_ms"),
        ("5 python -c, to 'ready'", "subprocess_5_ms"),
    ]),
    ("  llmasos boot --detach wall", "boot_command_ms", "ms", []),
    ("  CLI start: import llmasos.cli", "cli_import_ms", "ms", []),
    ("spawn 1 replica, to ready", "spawn_ms", "ms", [
        ("python -c pass, run", "python_c_ms"),
        ("1 mp.Process spawn, to ping", "mp_spawn_start_ms"),
        ("1 mp.Process fork, to ping", "mp_fork_start_ms"),
    ]),
    ("  slowest spawn", "spawn_max_ms", "ms", []),
    ("  llmasos scale CLI wall", "scale_command_ms", "ms", []),
    ("restart killed replica", "restart_ms", "ms", []),
    ("  slowest restart", "restart_max_ms", "ms", []),
    ("call 64 B p50, 1 hop", "call_p50_us", "us", [
        ("mp.connection round trip p50", "mp_connection_p50_us"),
    ]),
    ("call 64 B p99, 1 hop", "call_p99_us", "us", [
        ("mp.connection round trip p99", "mp_connection_p99_us"),
    ]),
    ("relay 64 B p50, 2 hops", "relay_p50_us", "us", []),
    ("relay 64 B p99, 2 hops", "relay_p99_us", "us", []),
    ("RSS kernel", "kernel_rss_mib", "MiB", [
        ("mp.Process spawn child RSS", "mp_spawn_child_rss_mib"),
        ("mp.Process fork child RSS", "mp_fork_child_rss_mib"),
    ]),
    ("RSS fork server", "forkserver_rss_mib", "MiB", []),
    ("RSS replica (PSS below)", "replica_rss_mib", "MiB", []),
    ("  PSS replica", "replica_pss_mib", "MiB", []),
)  # fmt: skip


def _fmt(value: float) -> str:
    """One figure for the table."""
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def table_lines(row: dict) -> list[str]:
    """The figures, each llmasos one beside its peers with peer / llmasos."""
    lines = [
        f"{'llmasos':<{LABEL_W}}{'value':>9} {'unit':<4}   {'beside':<30}"
        f"{'value':>9}{'ratio':>7}"
    ]
    for label, key, unit, peers in LAYOUT:
        ours = f"{label:<{LABEL_W}}{_fmt(row[key]):>9} {unit:<4}"
        if not peers:
            lines.append(ours.rstrip())
        for i, (peer, peer_key) in enumerate(peers):
            ratio = row[peer_key] / row[key]
            lead = ours if i == 0 else " " * len(ours)
            lines.append(f"{lead}   {peer:<30}{_fmt(row[peer_key]):>9}{ratio:>6.1f}x")
    return lines


def targets(row: dict) -> dict:
    """The target ratios, each with PASS or FAIL (printed, not asserted)."""
    ratios = {
        "spawn_vs_python_c": row["python_c_ms"] / row["spawn_ms"],
        "call_vs_mp_connection": row["mp_connection_p50_us"] / row["call_p50_us"],
    }
    return {
        name: {"ratio": round(r, 2), "target": 5.0, "verdict": _verdict(r, 5.0)}
        for name, r in ratios.items()
    }


def _verdict(ratio: float, target: float) -> str:
    """PASS if `ratio` reaches `target`, else FAIL."""
    return "PASS" if ratio >= target else "FAIL"


def report(row: dict, plan: Plan) -> str:
    """The whole text report: header, table, targets."""
    lines = [
        f"Kernel benchmark. Regime: {regime(row)}.",
        f"Medians of {plan.boots} boots, {plan.spawns} spawns, {plan.restarts} "
        f"restarts, {plan.starts} starts of each peer; calls: {plan.calls} after "
        f"{plan.call_warmup} warm-up, in {CALL_ROUNDS} interleaved rounds; `ps` "
        f"polled every {POLL_S * 1e3:g} ms; "
        "ratio = peer / llmasos.",
        *table_lines(row),
        "Targets (printed figures, not assertions):",
    ]
    for name, t in targets(row).items():
        lines.append(
            f"  {name}: {t['ratio']:.1f}x (target >= {t['target']:g}x)  {t['verdict']}"
        )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------


def parse_args(argv: list | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="split",
        help="where the processes of the calls run (default: split)",
    )
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan for `--quick` or a full run, with the calls placed as asked."""
    plan = QUICK if args.quick else FULL
    if args.placement == "free":
        return plan
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--placement split needs two CPUs; this process has one")
    return dataclasses.replace(plan, placement="split", cpus=(cpus[0], cpus[-1]))


def measure(runs: Runs, plan: Plan) -> dict:
    """Every figure, in an order that forks no process after the heap is attached."""
    load = [other_load_pct()]
    row = measure_boot(runs, plan)
    server_cpu = plan.cpus[1]
    affinity = "" if server_cpu is None else f"cpu_affinity = [{server_cpu}]"
    work = runs.new(WORK_MANIFEST, services=3, server_cpus=affinity)
    boot(work)
    load.append(other_load_pct())
    row |= measure_replicas(work, plan)
    load.append(other_load_pct())
    row |= measure_calls(work, runs.root, plan)
    load.append(other_load_pct())
    return row | {"other_load_pct": load, "placement": plan.placement}


def _rounded(value: object) -> object:
    """A figure, or a list of them, rounded for JSON."""
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 3) if isinstance(value, float) else value


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the run through its `finally` clauses, which clean up."""
    raise SystemExit(128 + signum)


def main(argv: list | None = None) -> int:
    """Measure and print the table, or the JSON."""
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    runs = Runs()
    try:
        row = measure(runs, plan)
    finally:
        runs.close()

    print(report_json(row, plan) if args.json else report(row, plan))
    return 0


def report_json(row: dict, plan: Plan) -> str:
    """The figures as one JSON object, with the regime, targets and plan."""
    report = {k: _rounded(v) for k, v in row.items()}
    report |= {"regime": regime(row), "targets": targets(row)}
    report |= {"machine": machine(), "plan": dataclasses.asdict(plan)}
    return json.dumps(report)


if __name__ == "__main__":
    sys.exit(main())
