"""The fork server: a preloaded template process that forks replicas.

The kernel forks it once at boot.  It imports LLMasOS and the modules of the
services named in the manifest, then forks, when the kernel asks, spare
children: processes that have attached the heap and opened their channel,
and wait on a pipe for the spec of the replica they are to become.  The
server hands the write end of that pipe to the kernel (SCM_RIGHTS), so that
a spawn is one write from the kernel to a process that is ready to run at
once: no interpreter to start, nothing to import, and no hop through the
server.  The server reaps its children and reports every exit.

The kernel and the server talk over a SOCK_SEQPACKET pair, one JSON object a
packet:

    kernel -> server   {"op": "fork", "n": N}        fork N spares now
                       {"op": "preload", "module": "pkg.mod"}
    server -> kernel   {"op": "spare", "pid": P, "gen": G}   + the pipe's fd
                       {"op": "exit", "pid": P, "code": C}
    kernel -> spare    the replica's spec, one JSON line on the pipe
    replica -> kernel  {"op": "ready", "pid": P, "channel": H}

C is the exit code, or minus the signal number.  G counts the preloads the
server had done when it forked the spare: a spare forked before a preload
lacks its module, and the kernel closes its pipe.  A spare whose pipe closes
exits.  A replica says it is ready by writing a line to a pipe the kernel
made before forking the server (cheaper than a connection to the control
socket); the idea of keeping processes forked ahead of need is Android's
zygote's.

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
from collections.abc import Iterator
from typing import Any

from llmasos import _core, control


def start(
    preload: list[str], close: list[int], ready_w: int
) -> tuple[int, socket.socket]:
    """Fork the server; returns its pid and the kernel's end of its socket.

    ``close`` are the kernel's descriptors the server must not keep (its
    lock, which would outlive a killed kernel in the server's children);
    ``ready_w`` is the pipe on which replicas tell the kernel they are ready.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ready_w = ready_w
        self.gen = 0  # preloads done
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        for module in preload:
            self._preload(module)
        self._freeze()

    @staticmethod
    def _freeze() -> None:
        """Move every object made so far out of the collector's sight, so
        that a child's first collection does not write to (and so copy) the
        pages of all the objects it inherited.  No collection first: it
        would cost each boot 10 ms for the little garbage imports leave."""
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
            for key, _ in sel.select():
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
        """Handle one message; False once the kernel is gone."""
        data = self.sock.recv(65536)
        if not data:
            return False
        msg = json.loads(data)
        if msg["op"] == "fork":
            for _ in range(msg["n"]):
                self._fork_spare()
        elif msg["op"] == "preload":
            self._preload(msg["module"])
            self._freeze()
            self.gen += 1
        return True

    def _send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))

    def _reap(self) -> None:
        for pid, code in reap():
            self._send({"op": "exit", "pid": pid, "code": code})

    def _fork_spare(self) -> None:
        """Fork a spare and hand its spec pipe to the kernel.  The fork of
        this big process costs milliseconds, most of it in copy-on-write
        faults; the kernel asks for spares between spawns, not during one."""
        spec_r, spec_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(spec_w)
            os._exit(_child(spec_r, self))
        os.close(spec_r)
        self._send({"op": "spare", "pid": pid, "gen": self.gen}, (spec_w,))
        os.close(spec_w)  # the kernel's copy is now the only one


def reap() -> Iterator[tuple[int, int]]:
    """Reap every child that has exited: (pid, exit code, or minus the
    signal number)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def _child(spec_r: int, server: _Server) -> int:
    """A spare: cut from the server, wait for a spec, then become a replica."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        server.sock.close()
        os.close(server.wake_r)
        os.close(server.wake_w)
        _core.set_pdeathsig(signal.SIGKILL)
        from llmasos import runtime

        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        _redirect_stdin()
        prepared = runtime.prepare(os.environ["LLMASOS_HEAP"])
        # The first touch of a page shared with the server copies it: better
        # done now, on a stand-in, than during a spawn.
        _specialise(_STAND_IN, -1)
        line = _read_line(spec_r)
        if not line:
            return 0  # not needed any more, or the kernel is gone
        code = runtime.run(_specialise(line, server.ready_w), prepared)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _specialise(line: bytes, ready_w: int) -> dict[str, Any]:
    """Make the spare the replica the kernel's line describes, up to its
    service: its log, OS settings and environment; returns its spec."""
    spec, index, log = json.loads(line)
    spec["replica"] = index
    spec["ready_fd"] = ready_w
    if log:  # (the stand-in keeps the server's output, to report its errors)
        _redirect(log)
    _apply_os_settings(spec)
    os.environ.update(spec["env"])
    os.environ[control.REPLICA_ENV] = f"{spec['service']}/{index}"
    return spec


_STAND_IN = json.dumps([{"service": "", "env": {}}, 0, ""]).encode()


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


def _redirect_stdin() -> None:
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
