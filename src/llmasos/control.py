"""The kernel's control socket: where it lives and how to talk to it.

Every system has a run directory, ``$LLMASOS_RUN_DIR/<system>`` (by default
``$XDG_RUNTIME_DIR/llmasos`` or ``/tmp/llmasos-<uid>``), of mode 0700.  In it
are the kernel's lock, its state file, the replicas' logs and ``control.sock``
(mode 0600), a Unix stream socket.

The protocol is one JSON object a line each way.  A request is
``{"v": 1, "op": NAME, ...arguments}``; the answer is ``{"v": 1, "ok": true,
"result": ...}`` or ``{"v": 1, "ok": false, "error": {"type": ..., "message":
...}}``.  A request of another version, an unknown op or a malformed line gets
an error answer, never a dropped connection.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from llmasos.errors import LLMasOSError, NoSystem

VERSION = 1
SYSTEM_ENV = "LLMASOS_SYSTEM"
REPLICA_ENV = "LLMASOS_REPLICA"  # "service/index" in every replica
RUN_DIR_ENV = "LLMASOS_RUN_DIR"


class ControlError(LLMasOSError):
    """The kernel answered a control request with an error.

    ``type`` is the kind of error the kernel reported, ``message`` its words.
    """

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


def run_root() -> Path:
    """The directory that holds the run directories of all systems."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "llmasos"
    return Path(f"/tmp/llmasos-{os.getuid()}")


def run_dir(system: str) -> Path:
    return run_root() / system


def socket_path(system: str) -> Path:
    return run_dir(system) / "control.sock"


def make_run_dir(system: str) -> Path:
    """Create the run directory (and its root) with mode 0700."""
    path = run_dir(system)
    for p in (path.parent, path):
        p.mkdir(mode=0o700, exist_ok=True)
        if p.stat().st_uid == os.getuid():
            p.chmod(0o700)
    return path


def running_systems() -> list[str]:
    """Names of the systems whose control socket exists."""
    root = run_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "control.sock").exists())


def default_system() -> str:
    """The system this process talks to: ``$LLMASOS_SYSTEM``, else the only
    one running."""
    if os.environ.get(SYSTEM_ENV):
        return os.environ[SYSTEM_ENV]
    systems = running_systems()
    if len(systems) == 1:
        return systems[0]
    if not systems:
        raise NoSystem(
            f"no LLMasOS system is running (none under {run_root()}); start one "
            "with 'llmasos boot MANIFEST'"
        )
    raise NoSystem(
        f"several systems are running ({', '.join(systems)}); name one with "
        f"--system or ${SYSTEM_ENV}"
    )


class ControlClient:
    """A connection to a kernel's control socket."""

    def __init__(self, system: str | None = None, timeout: float = 30.0) -> None:
        self.system = system or default_system()
        path = socket_path(self.system)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NoSystem(
                f"system {self.system!r} is not running: cannot connect to "
                f"{path} ({exc.strerror})"
            ) from None
        self.reader = self.sock.makefile("rb")

    def request(self, op: str, **args: Any) -> Any:
        """Send one request and return its result, or raise ControlError."""
        line = json.dumps({"v": VERSION, "op": op, **args}) + "\n"
        self.sock.sendall(line.encode())
        answer = self.reader.readline()
        if not answer:
            raise ControlError("disconnected", f"the kernel of {self.system!r} hung up")
        reply = json.loads(answer)
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise ControlError(err.get("type", "error"), err.get("message", "?"))
        return reply.get("result")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(op: str, system: str | None = None, **args: Any) -> Any:
    """One request on a connection of its own."""
    with ControlClient(system) as client:
        return client.request(op, **args)
