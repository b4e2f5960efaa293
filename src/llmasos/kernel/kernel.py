"""The kernel process: the process table, the registry, supervision and the
control socket of one system.

``boot(manifest)`` runs a kernel in the calling process until it is told to
shut down (Ctrl-C, SIGTERM or the ``shutdown`` request).  Booting:

1. take the system's lock in its run directory (a second boot of the same
   system is refused while the first runs) and clean what a killed kernel
   left behind (its replicas, heap and socket);
2. create the system's heap and fork the fork server from this process;
3. open the control socket and start every replica; the system is ready when
   each replica has said so.

Every process of the system is in the process table: replicas (children of
the fork server, which reports their exits), and processes registered by
``llmasos.fork``/``spawn`` or by an outside client (watched through a pidfd).
Whenever one of them ends, however it ends, its heap pages are reclaimed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmasos import control
from llmasos.errors import LLMasOSError
from llmasos.heap import Heap, unlink
from llmasos.kernel import forkserver
from llmasos.kernel.supervisor import Supervisor
from llmasos.manifest import Manifest, ServiceSpec, load_manifest

log = logging.getLogger("llmasos.kernel")

STOP_GRACE_S = 2.0
FD_SIZE = 4  # bytes of a file descriptor in SCM_RIGHTS data
SAVE_DELAY_S = 0.02  # state.json is rewritten this long after a change
SPARES = 1  # spare processes kept forked ahead of spawns
# A spare taken is replaced once the system has been quiet this long, so that
# the fork of the next does not slow down the replica just started.
SPARE_IDLE_S = 0.005
READY_TIMEOUT_S = 30.0


class KernelError(LLMasOSError):
    """The kernel cannot do what was asked (and says why)."""


@dataclass
class Proc:
    """One row of the process table."""

    pid: int
    kind: str  # "replica", "forkserver", "forked", "client"
    service: str = ""
    replica: int = -1
    state: str = "starting"  # starting, ready, stopping, exited
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    channel: int = 0
    parent: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "kind": self.kind,
            "service": self.service,
            "replica": self.replica,
            "state": self.state,
            "restarts": self.restarts,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }


@dataclass
class Service:
    spec: ServiceSpec
    supervisor: Supervisor
    replicas: dict[int, Proc] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    stopped: bool = False
    wire: bytes = b""  # Kernel.wire_spec's


class Kernel:
    """The kernel of one system; see the module docstring."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.name = manifest.system.name
        self.dir = control.make_run_dir(self.name)
        self.heap_name = f"sys-{self.name}"
        self.logs = self.dir / "logs"
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.save_timer: asyncio.TimerHandle | None = None
        self.procs: dict[int, Proc] = {}
        self.services: dict[str, Service] = {}
        self.stopping = asyncio.Event()
        self.pidfds: dict[int, int] = {}
        self.private: list[int] = []  # see boot()
        # Spares of the fork server: (pid, pipe to send it its spec), the
        # spawns waiting for one, forks asked for and not arrived, and the
        # number of preloads asked for (older spares lack a module).
        self.spares: collections.deque[tuple[int, int]] = collections.deque()
        self.spare_waiters: collections.deque[asyncio.Future[None]] = (
            collections.deque()
        )
        self.spares_asked = 0
        self.preloads = 0
        self.restock_timer: asyncio.TimerHandle | None = None
        self.changed = asyncio.Event()  # a replica got ready or a service failed

    # ---- boot and shutdown ----

    def take_lock(self) -> None:
        self.lock_file = open(self.dir / "kernel.lock", "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_state(self.dir).get("kernel", "?")
            raise KernelError(
                f"system {self.name!r} is already running (kernel pid {pid}); "
                f"stop it with 'llmasos shutdown --system {self.name}'"
            ) from None
        self.clean_leftovers()

    def clean_leftovers(self) -> None:
        """Remove what a kernel of this system that was killed left behind."""
        state = _read_state(self.dir)
        for pid, started in state.get("pids", []):
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    log.info("killed pid %d left by a previous kernel", pid)
        if state.get("heap") and unlink(state["heap"]):
            log.info("removed heap %s left by a previous kernel", state["heap"])
        self.remove_run_files()

    def remove_run_files(self) -> None:
        for leftover in ("control.sock", "state.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / leftover).unlink()

    def create_heap(self) -> None:
        sysspec = self.manifest.system
        unlink(self.heap_name)
        self.heap = Heap.create(
            sysspec.heap_size,
            page_size=sysspec.page_size,
            name=self.heap_name,
            huge_pages=sysspec.huge_pages,
            max_channels=1024,
            max_procs=1024,
        )

    def start_forkserver(self) -> None:
        """Fork the fork server.  It is forked before the heap is made (it
        needs only its name) so that its imports and the heap's allocation
        run side by side."""
        os.environ["LLMASOS_HEAP"] = self.heap_name
        os.environ[control.SYSTEM_ENV] = self.name
        preload = sorted(
            {s.entry.partition(":")[0] for s in self.manifest.services.values()}
        )
        self.ready_r, ready_w = os.pipe()
        self.fs_pid, self.fs_sock = forkserver.start(
            ["llmasos.runtime", *preload],
            close=[self.lock_file.fileno(), self.ready_r, *self.private],
            ready_w=ready_w,
        )
        os.close(ready_w)
        os.set_blocking(self.ready_r, False)
        self.ready_pending = b""
        self.procs[self.fs_pid] = Proc(self.fs_pid, "forkserver", state="ready")

    def save_state(self) -> None:
        """Record what a next kernel must clean if this one is killed: the
        heap, and the processes of the system (never outside clients), each
        with its start time so that a reused pid is left alone."""
        pids = [
            [pid, _start_time(pid)]
            for pid, p in self.procs.items()
            if p.kind != "client"
        ]
        if self.save_timer is not None:
            self.save_timer.cancel()
            self.save_timer = None
        state = {"kernel": os.getpid(), "heap": self.heap.name, "pids": pids}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dir / "state.json")

    def save_state_soon(self) -> None:
        """Save the state once the kernel has been quiet for a moment (one
        save for a burst of changes)."""
        if self.save_timer is None:
            self.save_timer = asyncio.get_running_loop().call_later(
                SAVE_DELAY_S, self.save_state
            )

    async def run(self, ready: Callable[[], object] | None = None) -> None:
        """Serve until asked to stop, then shut everything down; ``ready`` is
        called once every service is ready or has failed."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_reader(self.fs_sock, self.forkserver_events)
        loop.add_reader(self.ready_r, self.ready_lines)
        sock_path = self.dir / "control.sock"
        server = await asyncio.start_unix_server(self.serve_client, path=str(sock_path))
        sock_path.chmod(0o600)
        try:
            await self.start_all()
            log.info(
                "system %r ready: %d services, heap %s",
                self.name,
                len(self.services),
                self.heap.name,
            )
            if ready is not None:
                ready()
            await self.stopping.wait()
        finally:
            server.close()
            await self.shutdown()

    async def start_all(self) -> None:
        for spec in self.manifest.services.values():
            self.add_service(spec)
        await self.wait_ready(list(self.services))

    async def shutdown(self) -> None:
        log.info("system %r shutting down", self.name)
        for svc in self.services.values():
            svc.stopped = True
        await self.stop_procs([p for p in self.procs.values() if p.kind == "replica"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.fs_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.fs_pid, 0)
        for pid in list(self.procs):
            self.reclaim(pid)
        for fd in self.pidfds.values():
            os.close(fd)
        for _, fd in self.spares:
            os.close(fd)
        self.heap.destroy()
        self.remove_run_files()
        self.lock_file.close()

    async def stop_procs(self, procs: list[Proc]) -> None:
        """SIGTERM, a grace period, then SIGKILL."""
        for p in procs:
            p.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.left(procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for p in procs:
            if p.pid in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        while self.left(procs) and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)

    def left(self, procs: list[Proc]) -> bool:
        """Whether any of procs is still in the table.  With the fork server
        gone, its children are the kernel's (the child subreaper's), and
        their exits are read here."""
        if self.fs_pid not in self.procs:
            for pid, code in forkserver.reap():
                self.on_exit(pid, code)
        return any(p.pid in self.procs for p in procs)

    # ---- services and replicas ----

    def add_service(self, spec: ServiceSpec) -> None:
        self.services[spec.name] = Service(spec, Supervisor(spec))
        for i in range(spec.replicas):
            asyncio.create_task(self.start_replica(spec.name, i))

    async def start_replica(self, service: str, index: int) -> None:
        svc = self.services.get(service)
        if svc is None or svc.stopped or index >= svc.spec.replicas:
            return
        # What the spare reads: [the service's spec, replica index, log path]
        log_path = json.dumps(str(self.log_path(service, index))).encode()
        message = b"[%s,%d,%s]\n" % (self.wire_spec(svc), index, log_path)
        pid = await self.spawn(message)
        if svc.stopped or index >= svc.spec.replicas or index in svc.replicas:
            # undeployed, scaled down or started again while waiting
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            return
        proc = Proc(pid, "replica", service, index, restarts=svc.restarts.get(index, 0))
        self.procs[pid] = proc
        svc.replicas[index] = proc
        # Nothing more until the replica is ready: the spare may be waiting
        # for this CPU.
        self.save_state_soon()

    def wire_spec(self, svc: Service) -> bytes:
        """What every replica of a service is told, as JSON, made once per
        service (its number of replicas is not part of it)."""
        if svc.wire:
            return svc.wire
        spec = svc.spec
        wire = {
            "system": self.name,
            "heap": self.heap.name,
            "service": spec.name,
            "entry": spec.entry,
            "env": dict(spec.env),
            "quota_pages": spec.quota_pages,
            "nice": spec.nice,
            "cpu_affinity": list(spec.cpu_affinity),
            "os_policy": spec.os_policy,
            "rt_priority": spec.rt_priority,
            "policy": spec.policy,
            "workers": spec.workers,
            "max_in_flight": spec.max_in_flight,
            "methods": {
                m.name: {
                    "priority": m.priority,
                    "expected_ms": m.expected_ms,
                    "deadline_ms": m.deadline_ms,
                }
                for m in spec.methods.values()
            },
        }
        svc.wire = json.dumps(wire).encode()
        return svc.wire

    def log_path(self, service: str, index: int) -> Path:
        return self.logs / f"{service}.{index}.log"

    # ---- spares of the fork server ----

    async def spawn(self, spec: bytes) -> int:
        """Make a spare the replica ``spec`` describes; returns its pid."""
        while True:
            while not self.spares:
                waiter = asyncio.get_running_loop().create_future()
                self.spare_waiters.append(waiter)
                self.restock()
                try:
                    await waiter
                finally:
                    if waiter in self.spare_waiters:
                        self.spare_waiters.remove(waiter)
            pid, fd = self.spares.popleft()
            self.restock()
            try:
                os.write(fd, spec)  # a pipe of 64 KiB: never blocks
            except BrokenPipeError:
                continue  # that spare died; its exit is on its way
            finally:
                os.close(fd)
            return pid

    def restock(self) -> None:
        """Ask the fork server for the spares that are missing: at once for
        spawns waiting, after a quiet while for the stock."""
        missing = SPARES + len(self.spare_waiters) - len(self.spares)
        missing -= self.spares_asked
        if missing <= 0:
            return
        if self.spare_waiters:
            self.ask_spares(missing)
        elif self.restock_timer is None:
            self.restock_timer = asyncio.get_running_loop().call_later(
                SPARE_IDLE_S, self.restock_later
            )

    def restock_later(self) -> None:
        self.restock_timer = None
        missing = SPARES - len(self.spares) - self.spares_asked
        if missing > 0:
            self.ask_spares(missing)

    def ask_spares(self, n: int) -> None:
        self.spares_asked += n
        self.to_forkserver({"op": "fork", "n": n})

    def to_forkserver(self, msg: dict[str, Any]) -> None:
        self.fs_sock.send(json.dumps(msg).encode())

    def preload(self, module: str) -> None:
        """Have the fork server import module, and drop the spares forked
        before it (they exit when their pipe closes)."""
        self.preloads += 1
        self.to_forkserver({"op": "preload", "module": module})
        while self.spares:
            os.close(self.spares.popleft()[1])
        self.restock()

    def drop_spare(self, pid: int) -> None:
        """Forget a spare that died in stock."""
        for spare in self.spares:
            if spare[0] == pid:
                self.spares.remove(spare)
                os.close(spare[1])
                self.restock()
                return

    def forkserver_events(self) -> None:
        """Read what the fork server sent: spares and exits."""
        while True:
            # (socket.recv_fds of Python 3.11 drops its flags argument)
            try:
                data, ancdata, _, _ = self.fs_sock.recvmsg(
                    65536,
                    socket.CMSG_SPACE(FD_SIZE),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
            except BlockingIOError:
                return
            except OSError:
                data, ancdata = b"", []
            fds = [
                int.from_bytes(cdata[:FD_SIZE], sys.byteorder)
                for level, kind, cdata in ancdata
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            ]
            if not data:
                asyncio.get_running_loop().remove_reader(self.fs_sock)
                self.procs.pop(self.fs_pid, None)
                if not self.stopping.is_set():
                    # Its replicas died with it; a new server and all of them
                    # again is a boot, which is left to whoever booted this.
                    log.error("the fork server died; shutting the system down")
                    self.stopping.set()
                return
            msg = json.loads(data)
            if msg["op"] == "spare":
                self.add_spare(msg["pid"], msg["gen"], fds[0])
            elif msg["op"] == "exit":
                self.on_exit(msg["pid"], msg["code"])

    def add_spare(self, pid: int, gen: int, fd: int) -> None:
        self.spares_asked -= 1
        if gen != self.preloads:
            os.close(fd)  # it lacks a module preloaded since
        else:
            self.spares.append((pid, fd))
        while self.spare_waiters and self.spares:
            waiter = self.spare_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        self.restock()

    async def wait_ready(
        self, services: list[str], timeout: float = READY_TIMEOUT_S
    ) -> None:
        """Wait until every replica of services is ready (or the service
        failed); woken by each change rather than polling."""
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            pending = [
                s
                for s in services
                if s in self.services
                and not self.services[s].supervisor.failed
                and len(self.ready_replicas(s)) < self.services[s].spec.replicas
            ]
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelError(
                    f"services not ready after {timeout:g} s: {', '.join(pending)}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # (wait_for adds a task)
                    await self.changed.wait()

    def ready_lines(self) -> None:
        """Read what replicas wrote on the ready pipe."""
        try:
            data = os.read(self.ready_r, 65536)
        except BlockingIOError:
            return
        *lines, self.ready_pending = (self.ready_pending + data).split(b"\n")
        for line in lines:
            msg = json.loads(line)
            self.mark_ready(msg["pid"], msg["channel"])

    def mark_ready(self, pid: int, channel: int) -> None:
        proc = self.procs.get(pid)
        if proc is None:
            return  # stopped before it was ready
        proc.channel = channel
        proc.state = "ready"
        self.changed.set()
        asyncio.get_running_loop().call_soon(  # after whoever waits for it
            log.info,
            "service %s replica %d ready (pid %d)",
            proc.service,
            proc.replica,
            pid,
        )

    def ready_replicas(self, service: str) -> list[Proc]:
        svc = self.services[service]
        return [p for _, p in sorted(svc.replicas.items()) if p.state == "ready"]

    def on_exit(self, pid: int, code: int) -> None:
        """A process of the system ended: reclaim it, then supervise."""
        proc = self.procs.get(pid)
        self.reclaim(pid)
        if proc is None:
            self.drop_spare(pid)
            return
        if proc.kind != "replica":
            return
        svc = self.services.get(proc.service)
        if svc is None or svc.replicas.get(proc.replica) is not proc:
            return
        del svc.replicas[proc.replica]
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        if proc.state == "stopping" or svc.stopped:
            log.info(
                "service %s replica %d stopped (%s)", proc.service, proc.replica, how
            )
            return
        decision = svc.supervisor.on_exit(code)
        if decision.restart:
            svc.restarts[proc.replica] = proc.restarts + 1
            log.info(
                "service %s replica %d exited (%s); restarting in %.2f s",
                proc.service,
                proc.replica,
                how,
                decision.delay,
            )
            asyncio.get_running_loop().call_later(
                decision.delay,
                lambda: asyncio.create_task(
                    self.start_replica(proc.service, proc.replica)
                ),
            )
        elif decision.failed:
            self.changed.set()
            log.error(
                "service %s failed: %s; not restarting", proc.service, decision.reason
            )
        else:
            log.info(
                "service %s replica %d exited (%s); %s",
                proc.service,
                proc.replica,
                how,
                decision.reason,
            )

    def reclaim(self, pid: int) -> None:
        self.procs.pop(pid, None)
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        self.heap.reclaim(pid)

    def watch(self, pid: int, proc: Proc) -> None:
        """Track a process that is not our child through a pidfd."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.heap.reclaim(pid)
            return
        self.procs[pid] = proc
        self.pidfds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self.on_exit, pid, 0)

    # ---- the control socket ----

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                reply = await self.answer(line)
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the kernel is shutting down with this client still there
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            return _error("malformed", f"cannot read the request: {exc}")
        if req.get("v") != control.VERSION:
            return _error(
                "version",
                f"protocol version {req.get('v')!r} is not "
                f"supported; this kernel speaks version {control.VERSION}",
            )
        op = req.pop("op", None)
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return _error("unknown", f"unknown request {op!r}; known: {', '.join(OPS)}")
        req.pop("v")
        try:
            result = await handler(**req)
        except TypeError as exc:
            return _error("malformed", f"bad arguments for {op!r}: {exc}")
        except LLMasOSError as exc:
            return _error(type(exc).__name__, str(exc))
        return {"v": control.VERSION, "ok": True, "result": result}

    async def op_hello(self, pid: int = 0) -> dict[str, Any]:
        return {
            "system": self.name,
            "kernel": os.getpid(),
            "heap": self.heap.name,
            "page_size": self.heap.page_size,
            "version": control.VERSION,
        }

    async def op_attach(self, pid: int) -> None:
        if pid not in self.procs:
            self.watch(pid, Proc(pid, "client", state="ready"))

    async def op_register(self, pid: int, parent: int, kind: str = "forked") -> None:
        parent_proc = self.procs.get(parent)
        service = parent_proc.service if parent_proc else ""
        self.watch(pid, Proc(pid, kind, service=service, state="ready", parent=parent))
        self.save_state()

    async def op_resolve(self, service: str) -> dict[str, Any]:
        svc = self.services.get(service)
        if svc is None:
            raise KernelError(_no_service(service, self.services))
        return {
            "replicas": [
                {"replica": p.replica, "pid": p.pid, "channel": p.channel}
                for p in self.ready_replicas(service)
            ],
            "idempotent": list(svc.spec.idempotent),
        }

    async def op_ps(self) -> dict[str, Any]:
        pages = self.heap._proc_pages()  # the process table: no walk of the heap
        rows = []
        for proc in sorted(
            self.procs.values(), key=lambda p: (p.service, p.replica, p.pid)
        ):
            rows.append({**proc.row(), "pages": pages.get(proc.pid, 0)})
        services = {
            name: {
                "replicas": svc.spec.replicas,
                "ready": len(self.ready_replicas(name)),
                "failed": svc.supervisor.failed,
                "restarts": sum(svc.restarts.values()),
            }
            for name, svc in self.services.items()
        }
        return {
            "system": self.name,
            "kernel": os.getpid(),
            "procs": rows,
            "services": services,
        }

    def mem_owner(self, pid: int) -> str:
        """Who to charge a process's pages to in ``mem``: its service, else
        its kind; "(spare)" for a spare, which opens its channel ahead of
        its spawn; "(other)" for a process the kernel does not know."""
        proc = self.procs.get(pid)
        if proc is not None:
            return proc.service or f"({proc.kind})"
        if any(spare_pid == pid for spare_pid, _ in self.spares):
            return "(spare)"
        return "(other)"

    async def op_mem(self) -> dict[str, Any]:
        st = self.heap.stats()
        S = st.page_size
        rows: list[dict[str, Any]] = []
        for p in st.procs:
            proc = self.procs.get(p.pid)
            rows.append(
                {
                    "pid": p.pid,
                    "service": self.mem_owner(p.pid),
                    "replica": proc.replica if proc else -1,
                    "pages": p.pages,
                    "page_size": S,
                    "bytes": p.pages * S,
                    "quota_pages": p.quota_pages,
                    "blocks": p.blocks,
                    "bytes_in_use": p.bytes,
                }
            )
        by_service: dict[str, dict[str, int]] = {}
        for r in rows:
            agg = by_service.setdefault(r["service"], {"pages": 0, "bytes": 0})
            agg["pages"] += r["pages"]
            agg["bytes"] += r["bytes"]
        return {
            "page_size": S,
            "pages_total": st.pages_total,
            "pages_free": st.pages_free,
            "pages_used": st.pages_used,
            "procs": rows,
            "services": by_service,
        }

    async def op_scale(self, service: str, replicas: int) -> dict[str, Any]:
        svc = self.services.get(service)
        if svc is None:
            raise KernelError(_no_service(service, self.services))
        if not 0 <= replicas <= 64:
            raise KernelError(f"replicas must be 0 to 64, got {replicas}")
        old = svc.spec.replicas
        svc.spec = _replace(svc.spec, replicas=replicas)
        for i in range(old, replicas):
            await self.start_replica(service, i)
        extra = [p for i, p in svc.replicas.items() if i >= replicas]
        await self.stop_procs(extra)
        await self.wait_ready([service])
        return {"service": service, "replicas": replicas, "was": old}

    async def op_restart(
        self, service: str, replica: int | None = None
    ) -> dict[str, Any]:
        svc = self.services.get(service)
        if svc is None:
            raise KernelError(_no_service(service, self.services))
        svc.supervisor.reset()
        targets = [p for i, p in svc.replicas.items() if replica in (None, i)]
        await self.stop_procs(targets)
        indexes = range(svc.spec.replicas) if replica is None else [replica]
        for i in indexes:
            if i not in svc.replicas:
                await self.start_replica(service, i)
        await self.wait_ready([service])
        return {"service": service, "restarted": len(list(indexes))}

    async def op_deploy(self, manifest: str, service: str) -> dict[str, Any]:
        other = load_manifest(manifest)
        if other.system.page_size != self.manifest.system.page_size:
            raise KernelError(
                "the manifest's page size differs from the running system's"
            )
        spec = other.services.get(service)
        if spec is None:
            raise KernelError(_no_service(service, other.services))
        if service in self.services:
            raise KernelError(
                f"service {service!r} is running already; undeploy it first"
            )
        self.manifest = self.manifest.with_service(spec)
        self.preload(spec.entry.partition(":")[0])
        self.add_service(spec)
        await self.wait_ready([service])
        return {"service": service, "replicas": spec.replicas}

    async def op_undeploy(self, service: str) -> dict[str, Any]:
        svc = self.services.get(service)
        if svc is None:
            raise KernelError(_no_service(service, self.services))
        svc.stopped = True
        await self.stop_procs(list(svc.replicas.values()))
        del self.services[service]
        with contextlib.suppress(LLMasOSError):
            self.manifest = self.manifest.without_service(service)
        return {"service": service}

    async def op_logs(
        self, service: str, replica: int = 0, lines: int = 50
    ) -> dict[str, Any]:
        if service not in self.services:
            raise KernelError(_no_service(service, self.services))
        path = self.log_path(service, replica)
        text = path.read_text(errors="replace") if path.exists() else ""
        return {"path": str(path), "lines": text.splitlines()[-lines:]}

    async def op_shutdown(self) -> None:
        self.stopping.set()


OPS = sorted(name[3:] for name in dir(Kernel) if name.startswith("op_"))


def _error(kind: str, message: str) -> dict[str, Any]:
    return {
        "v": control.VERSION,
        "ok": False,
        "error": {"type": kind, "message": message},
    }


def _no_service(name: str, services: Any) -> str:
    known = ", ".join(sorted(services)) or "none"
    return f"no service named {name!r}; services: {known}"


def _replace(spec: ServiceSpec, **changes: Any) -> ServiceSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _start_time(pid: int) -> int | None:
    """The start time of pid in clock ticks since boot (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot(
    manifest: Manifest,
    ready: Callable[[], object] | None = None,
    private: Sequence[int] = (),
) -> None:
    """Run a kernel for manifest in this process until it shuts down;
    ``ready`` is called once every service is ready or has failed.
    ``private`` are descriptors of this process that the system's other
    processes must not inherit."""
    kernel = Kernel(manifest)
    kernel.private = list(private)
    kernel.take_lock()
    kernel.start_forkserver()
    kernel.create_heap()
    _core_subreaper()
    kernel.save_state()
    asyncio.run(kernel.run(ready))


def _core_subreaper() -> None:
    from llmasos import _core

    _core.set_child_subreaper()
