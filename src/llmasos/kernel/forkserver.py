"""The fork server: a preloaded template process that forks replicas.

The kernel forks it once at boot.  It imports LLMasOS and the modules of the
services named in the manifest, then waits on a socket for spawn requests;
for each it forks a child that is ready to run at once, with no interpreter
to start and nothing to import.  It reaps its children and reports every
exit to the kernel.

Messages, one JSON object a line:

    kernel -> server   {"op": "spawn", "id": N, "spec": {...}}
                       {"op": "preload", "module": "pkg.mod"}
    server -> kernel   {"op": "spawned", "id": N, "pid": P}
                       {"op": "exit", "pid": P, "code": C}
    replica -> kernel  {"op": "ready", "pid": P, "channel": H}
                       (C is the exit code, or minus the signal number)

A replica says it is ready by writing a line to a pipe the kernel made before
forking the server (cheaper than a connection to the control socket, and one
wake-up fewer than a relay through the server); the line may reach the
kernel before the server's "spawned" for the same pid.

To take the fork out of a spawn's latency, the server keeps one spare
child forked in advance, blocked on a pipe; a spawn writes the spec to it and
forks the next spare (as Android's zygote keeps a pool of unspecialised
processes).  A spare that is not a replica yet exits when its pipe closes.

The server dies with the kernel (PR_SET_PDEATHSIG), and every replica dies
with the server, so killing the kernel leaves no process behind.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

from llmasos import _core

SPARE_IDLE_S = 0.005


def start(
    preload: list[str], close: list[int], ready_w: int
) -> tuple[int, socket.socket]:
    """Fork the server; returns its pid and the kernel's end of its socket.

    ``close`` are the kernel's descriptors the server must not keep (its
    lock, which would outlive a killed kernel in the server's children);
    ``ready_w`` is the pipe on which replicas tell the kernel they are ready.
    """
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        for fd in close:
            os.close(fd)
        code = 0
        try:
            _Server(theirs, preload, ready_w).serve()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    theirs.close()
    return pid, ours


class _Server:
    def __init__(self, sock: socket.socket, preload: list[str], ready_w: int) -> None:
        _core.set_pdeathsig(signal.SIGKILL)
        os.setpgid(0, 0)  # Ctrl-C in the terminal goes to the kernel only
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.sock = sock
        self.pending = b""
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ready_w = ready_w
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        for module in preload:
            self._preload(module)
        self._freeze()
        self.spare: tuple[int, int] | None = None  # (pid, its spec pipe)

    @staticmethod
    def _freeze() -> None:
        """Move every object made so far out of the collector's sight, so
        that a child's first collection does not write to (and so copy) the
        pages of all the objects it inherited."""
        gc.collect()
        gc.freeze()

    def _preload(self, module: str) -> None:
        try:
            importlib.import_module(module)
        except Exception:
            traceback.print_exc()  # the replica will fail, and say why

    def serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "kernel")
        sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        while True:
            # The next spare is forked once the server is idle (5 ms without
            # a message), so as not to delay the ready of the replica just
            # started nor the spawns of a burst.
            events = sel.select(SPARE_IDLE_S if self.spare is None else None)
            if not events and self.spare is None:
                self._fork_spare()
            for key, _ in events:
                if key.data == "signal":
                    self._drain_wakeups()
                    self._reap()
                elif not self._request():
                    return

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _request(self) -> bool:
        """Handle every whole line that arrived; False once the kernel is gone."""
        data = self.sock.recv(65536)
        if not data:
            return False
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg["op"] == "spawn":
                pid = self._spawn(msg["spec"])
                self._send({"op": "spawned", "id": msg["id"], "pid": pid})
            elif msg["op"] == "preload":
                self._preload(msg["module"])
                self._freeze()
                self._replace_spare()
        return True

    def _send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._send(
                {"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)}
            )

    def _spawn(self, spec: dict[str, Any]) -> int:
        """Start a replica: hand spec to the spare child forked in advance,
        then fork the next spare.  The cost of a fork of this big process
        (milliseconds, most of it in copy-on-write faults) is thus paid
        between spawns, not during one."""
        if self.spare is None:
            self._fork_spare()
        assert self.spare is not None
        pid, spec_w = self.spare
        self.spare = None
        try:
            os.write(spec_w, json.dumps(spec).encode() + b"\n")
        except BrokenPipeError:  # the spare died; its exit is reported
            os.close(spec_w)
            return self._spawn(spec)
        os.close(spec_w)
        return pid

    def _fork_spare(self) -> None:
        spec_r, spec_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(spec_w)
            os._exit(_child(spec_r, self))
        os.close(spec_r)
        self.spare = (pid, spec_w)

    def _replace_spare(self) -> None:
        """Fork a spare that has every module preloaded so far."""
        if self.spare is not None:
            os.close(self.spare[1])  # the old spare reads EOF and exits
            self.spare = None
        self._fork_spare()


def _child(spec_r: int, server: _Server) -> int:
    """A spare: cut from the server, wait for a spec, then become a replica."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        server.sock.close()
        os.close(server.wake_r)
        os.close(server.wake_w)
        if server.spare is not None:
            os.close(server.spare[1])
        _core.set_pdeathsig(signal.SIGKILL)
        from llmasos import runtime

        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        prepared = runtime.prepare(os.environ["LLMASOS_HEAP"])
        line = _read_line(spec_r)
        if not line:
            return 0  # replaced by a newer spare, or the server is gone
        spec = json.loads(line)
        spec["ready_fd"] = server.ready_w
        _redirect(spec["log"])
        _apply_os_settings(spec)
        os.environ.update(spec["env"])
        code = runtime.run(spec, prepared)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        data += chunk
    return data


def _redirect(path: str) -> None:
    """Send fds 1 and 2 (and so sys.stdout and sys.stderr) to the log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _apply_os_settings(spec: dict[str, Any]) -> None:
    """Nice value, CPU affinity and real-time policy, with one clear warning
    (in the replica's log) where the machine refuses."""
    if spec.get("nice"):
        _try(lambda: os.nice(spec["nice"]), f"nice {spec['nice']}")
    if spec.get("cpu_affinity"):
        cpus = set(spec["cpu_affinity"])
        _try(lambda: os.sched_setaffinity(0, cpus), f"CPU affinity {sorted(cpus)}")
    policy = {"fifo": os.SCHED_FIFO, "rr": os.SCHED_RR}.get(spec.get("os_policy", ""))
    if policy is not None:
        param = os.sched_param(spec.get("rt_priority", 1))
        _try(
            lambda: os.sched_setscheduler(0, policy, param),
            f"{spec['os_policy']} scheduling",
        )


def _try(action: Any, what: str) -> None:
    try:
        action()
    except OSError as exc:
        print(
            f"llmasos: warning: {what} refused by the machine ({exc.strerror}); "
            "running without it",
            file=sys.stderr,
        )
