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
import contextlib
import fcntl
import json
import logging
import os
import signal
import time
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


class Kernel:
    """The kernel of one system; see the module docstring."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.name = manifest.system.name
        self.dir = control.make_run_dir(self.name)
        self.procs: dict[int, Proc] = {}
        self.services: dict[str, Service] = {}
        self.stopping = asyncio.Event()
        self.spawn_ids = 0
        self.spawning: dict[int, asyncio.Future[int]] = {}
        self.pidfds: dict[int, int] = {}
        self.early_ready: dict[int, int] = {}  # pid -> channel, before spawned
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
        name = f"sys-{self.name}"
        unlink(name)
        self.heap = Heap.create(
            sysspec.heap_size,
            page_size=sysspec.page_size,
            name=name,
            huge_pages=sysspec.huge_pages,
            max_channels=1024,
            max_procs=1024,
        )
        os.environ["LLMASOS_HEAP"] = name
        os.environ[control.SYSTEM_ENV] = self.name

    def start_forkserver(self) -> None:
        preload = sorted(
            {s.entry.partition(":")[0] for s in self.manifest.services.values()}
        )
        self.ready_r, ready_w = os.pipe()
        self.fs_pid, self.fs_sock = forkserver.start(
            ["llmasos.runtime", *preload],
            close=[self.lock_file.fileno(), self.ready_r],
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
        state = {"kernel": os.getpid(), "heap": self.heap.name, "pids": pids}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dir / "state.json")

    async def run(self) -> None:
        """Serve until asked to stop, then shut everything down."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        reader, self.fs_writer = await asyncio.open_connection(sock=self.fs_sock)
        loop.add_reader(self.ready_r, self.ready_lines)
        fs_task = asyncio.create_task(self.forkserver_events(reader))
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
            await self.stopping.wait()
        finally:
            server.close()
            await self.shutdown()
            fs_task.cancel()

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
        while any(p.pid in self.procs for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for p in procs:
            if p.pid in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        while (
            any(p.pid in self.procs for p in procs) and time.monotonic() < deadline + 5
        ):
            await asyncio.sleep(0.01)

    # ---- services and replicas ----

    def add_service(self, spec: ServiceSpec) -> None:
        self.services[spec.name] = Service(spec, Supervisor(spec))
        for i in range(spec.replicas):
            asyncio.create_task(self.start_replica(spec.name, i))

    async def start_replica(self, service: str, index: int) -> None:
        svc = self.services.get(service)
        if svc is None or svc.stopped or index >= svc.spec.replicas:
            return
        spec = svc.spec
        pid = await self.spawn(
            {
                "system": self.name,
                "heap": self.heap.name,
                "service": service,
                "replica": index,
                "entry": spec.entry,
                "env": {**spec.env, control.REPLICA_ENV: f"{service}/{index}"},
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
                "log": str(self.log_path(service, index)),
            }
        )
        proc = Proc(pid, "replica", service, index, restarts=svc.restarts.get(index, 0))
        self.procs[pid] = proc
        svc.replicas[index] = proc
        if pid in self.early_ready:
            self.mark_ready(pid, self.early_ready.pop(pid))
        asyncio.get_running_loop().call_soon(self.save_state)
        log.info("service %s replica %d started (pid %d)", service, index, pid)

    def log_path(self, service: str, index: int) -> Path:
        (self.dir / "logs").mkdir(mode=0o700, exist_ok=True)
        return self.dir / "logs" / f"{service}.{index}.log"

    async def spawn(self, spec: dict[str, Any]) -> int:
        self.spawn_ids += 1
        fut = asyncio.get_running_loop().create_future()
        self.spawning[self.spawn_ids] = fut
        msg = {"op": "spawn", "id": self.spawn_ids, "spec": spec}
        self.fs_writer.write((json.dumps(msg) + "\n").encode())
        return await fut

    async def forkserver_events(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "spawned":
                self.spawning.pop(msg["id"]).set_result(msg["pid"])
            elif msg["op"] == "exit":
                self.on_exit(msg["pid"], msg["code"])
        if not self.stopping.is_set():
            log.error("the fork server died; shutting the system down")
            self.stopping.set()

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
                await asyncio.wait_for(self.changed.wait(), left)

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
            self.early_ready[pid] = channel  # its "spawned" is being handled
            return
        proc.channel = channel
        proc.state = "ready"
        self.changed.set()

    def ready_replicas(self, service: str) -> list[Proc]:
        svc = self.services[service]
        return [p for _, p in sorted(svc.replicas.items()) if p.state == "ready"]

    def on_exit(self, pid: int, code: int) -> None:
        """A process of the system ended: reclaim it, then supervise."""
        proc = self.procs.get(pid)
        self.reclaim(pid)
        if proc is None or proc.kind != "replica":
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

    async def op_mem(self) -> dict[str, Any]:
        st = self.heap.stats()
        S = st.page_size
        rows: list[dict[str, Any]] = []
        for p in st.procs:
            proc = self.procs.get(p.pid)
            rows.append(
                {
                    "pid": p.pid,
                    "service": _mem_owner(proc),
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
        self.fs_writer.write(
            (
                json.dumps({"op": "preload", "module": spec.entry.partition(":")[0]})
                + "\n"
            ).encode()
        )
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


def _mem_owner(proc: Proc | None) -> str:
    """Who to charge a process's pages to in ``mem``: its service, else its
    kind; "(other)" for one the kernel does not list (the fork server's spare,
    which has opened its channel ahead of its first spawn)."""
    if proc is None:
        return "(other)"
    return proc.service or f"({proc.kind})"


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


def boot(manifest: Manifest, ready: Any = None) -> None:
    """Run a kernel for manifest in this process until it shuts down."""
    kernel = Kernel(manifest)
    kernel.take_lock()
    kernel.create_heap()
    kernel.start_forkserver()
    _core_subreaper()
    kernel.save_state()
    asyncio.run(_run(kernel, ready))


async def _run(kernel: Kernel, ready: Any) -> None:
    if ready is not None:
        asyncio.get_running_loop().call_soon(ready)
    await kernel.run()


def _core_subreaper() -> None:
    from llmasos import _core

    _core.set_child_subreaper()
