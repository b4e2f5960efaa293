"""The system commands of the ``llmasos`` CLI: boot, ps, call, deploy,
undeploy, scale, restart, logs, mem, shutdown.

Each handler takes the parsed arguments, prints a table for people (or JSON
with ``--json``) and returns the exit status.  All but ``boot`` are clients of
the kernel's control socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import time
from collections.abc import Sequence
from typing import Any

from llmasos import control
from llmasos.errors import LLMasOSError
from llmasos.manifest import load_manifest
from llmasos.units import format_size

BOOT_TIMEOUT_S = 60.0  # how long `boot --detach` waits for the system


class UsageError(LLMasOSError, ValueError):
    """A command line that does not say what the command needs."""


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table with a header."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, result: Any, text: str) -> int:
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def run_boot(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s"
    )
    from llmasos.kernel import boot

    if not args.detach:
        boot(
            manifest,
            ready=lambda: print(f"system {manifest.system.name!r} ready", flush=True),
        )
        return 0
    return _boot_detached(manifest)


def _boot_detached(manifest: Any) -> int:
    """Start a kernel that outlives this command; return once it is ready.

    The kernel is a grandchild (fork, setsid, fork), so it is nobody's zombie
    when it exits.  It writes its pid on a pipe, then a line once every
    service is ready or has failed; the pipe closing before that line means
    the kernel died.
    """
    name = manifest.system.name
    log_path = control.make_run_dir(name) / "kernel.log"
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.write(w, b"%d\n" % os.getpid())
        _run_daemon(manifest, log_path, w)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r, "rb") as pipe:
        kernel = int(pipe.readline() or 0)
        ready = select.select([pipe], [], [], BOOT_TIMEOUT_S)[0] and pipe.readline()
    if not ready:
        if kernel and _alive(kernel):
            print(
                f"llmasos: error: system {name!r} not ready after {BOOT_TIMEOUT_S:g} s",
                file=sys.stderr,
            )
            return 1
        tail = log_path.read_text().splitlines()[-1:]
        print("llmasos: error: the kernel exited: " + " / ".join(tail), file=sys.stderr)
        return 1
    return _report_booted(name, kernel, log_path)


def _run_daemon(manifest: Any, log_path: Any, ready_w: int) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        from llmasos.kernel import boot

        def ready() -> None:
            os.write(ready_w, b"ready\n")
            os.close(ready_w)

        boot(manifest, ready, private=[ready_w])
    except BaseException as exc:
        print(f"llmasos: kernel failed: {exc}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def _report_booted(name: str, kernel: int, log_path: Any) -> int:
    failed = [
        s
        for s, v in control.request("ps", system=name)["services"].items()
        if v["failed"]
    ]
    if failed:
        print(
            f"llmasos: error: system {name!r} booted (kernel pid {kernel}) but "
            f"these services failed: {', '.join(failed)}; see "
            f"'llmasos logs SERVICE --system {name}'",
            file=sys.stderr,
        )
        return 1
    print(f"system {name!r} ready (kernel pid {kernel}); logs in {log_path.parent}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


def run_ps(args: argparse.Namespace) -> int:
    ps = control.request("ps", system=args.system)
    rows = [
        {**r, "replica": r["replica"] if r["replica"] >= 0 else "-"}
        for r in ps["procs"]
    ]
    text = table(
        rows,
        ["pid", "kind", "service", "replica", "state", "restarts", "pages", "uptime_s"],
    )
    return emit(args, ps, f"system {ps['system']} (kernel pid {ps['kernel']})\n{text}")


def parse_value(text: str) -> Any:
    """A CLI argument: JSON if it reads as JSON, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_call(args: argparse.Namespace) -> int:
    import llmasos

    service, _, method = args.target.partition(".")
    if not method:
        raise UsageError(f"call: expected SERVICE.METHOD, got {args.target!r}")
    proxy = llmasos.connect(service, args.system, timeout=args.timeout)
    value = getattr(proxy, method)(*(parse_value(a) for a in args.args))
    if args.json:
        print(json.dumps(value, default=repr))
    else:
        print(value if isinstance(value, str) else json.dumps(value, default=repr))
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.manifest)
    services = [args.service] if args.service else list(load_manifest(path).services)
    results = [
        control.request("deploy", system=args.system, manifest=path, service=s)
        for s in services
    ]
    return emit(
        args,
        results,
        "\n".join(
            f"deployed {r['service']} ({r['replicas']} replicas)" for r in results
        ),
    )


def run_undeploy(args: argparse.Namespace) -> int:
    r = control.request("undeploy", system=args.system, service=args.service)
    return emit(args, r, f"undeployed {r['service']}")


def run_scale(args: argparse.Namespace) -> int:
    service, sep, count = args.target.partition("=")
    if not sep or not count.isdigit():
        raise UsageError(f"scale: expected SERVICE=N, got {args.target!r}")
    r = control.request(
        "scale", system=args.system, service=service, replicas=int(count)
    )
    return emit(
        args, r, f"scaled {service} from {r['was']} to {r['replicas']} replicas"
    )


def run_restart(args: argparse.Namespace) -> int:
    r = control.request(
        "restart", system=args.system, service=args.service, replica=args.replica
    )
    return emit(args, r, f"restarted {r['restarted']} replicas of {args.service}")


def run_logs(args: argparse.Namespace) -> int:
    r = control.request(
        "logs",
        system=args.system,
        service=args.service,
        replica=args.replica,
        lines=args.lines,
    )
    return emit(args, r, "\n".join(r["lines"]))


def run_mem(args: argparse.Namespace) -> int:
    m = control.request("mem", system=args.system)
    S = m["page_size"]
    rows = [
        {
            **r,
            "replica": r["replica"] if r["replica"] >= 0 else "-",
            "N pages": r["pages"],
            "S": format_size(S),
            "M = N x S": format_size(r["bytes"]),
            "quota": format_size(r["quota_pages"] * S) if r["quota_pages"] else "-",
        }
        for r in m["procs"]
    ]
    per_proc = table(
        rows,
        ["pid", "service", "replica", "N pages", "S", "M = N x S", "quota", "blocks"],
    )
    svc_rows = [
        {"service": k, "N pages": v["pages"], "M = N x S": format_size(v["bytes"])}
        for k, v in sorted(m["services"].items())
    ]
    text = (
        f"heap: {m['pages_used']} of {m['pages_total']} pages "
        f"of {format_size(S)} in use\n\n"
        f"{per_proc}\n\n{table(svc_rows, ['service', 'N pages', 'M = N x S'])}"
    )
    return emit(args, m, text)


def run_shutdown(args: argparse.Namespace) -> int:
    system = args.system or control.default_system()
    sock = control.socket_path(system)
    control.request("shutdown", system=system)
    deadline = time.monotonic() + 30
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return emit(args, {"system": system}, f"system {system!r} shut down")


def add_commands(groups: Any) -> None:
    """Add the system commands to the CLI's subparsers."""

    def command(
        name: str, help_: str, run: Any, json_: bool = True
    ) -> argparse.ArgumentParser:
        p = groups.add_parser(
            name, help=help_, description=help_[0].upper() + help_[1:] + "."
        )
        p.add_argument(
            "--system", help="the system to talk to (default: the only one running)"
        )
        if json_:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(run=run)
        return p

    p = command(
        "boot", "boot a system from a manifest and run its kernel", run_boot, False
    )
    p.add_argument("manifest", metavar="MANIFEST", help="the manifest, a TOML file")
    p.add_argument(
        "--detach", action="store_true", help="run the kernel in the background"
    )
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    command("ps", "show the process table", run_ps)
    p = command("call", "call a method of a service", run_call)
    p.add_argument("target", metavar="SERVICE.METHOD")
    p.add_argument(
        "args", nargs="*", metavar="ARG", help="arguments, JSON or plain strings"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p = command(
        "deploy", "start a service of a manifest in the running system", run_deploy
    )
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument(
        "service", metavar="SERVICE", nargs="?", help="default: every service"
    )
    p = command(
        "undeploy", "stop a service and remove it from the system", run_undeploy
    )
    p.add_argument("service", metavar="SERVICE")
    p = command("scale", "change the number of replicas of a service", run_scale)
    p.add_argument("target", metavar="SERVICE=N")
    p = command(
        "restart", "restart a service's replicas (and clear a failure)", run_restart
    )
    p.add_argument("service", metavar="SERVICE")
    p.add_argument("--replica", type=int, help="only this replica")
    p = command("logs", "show the end of a replica's log", run_logs)
    p.add_argument("service", metavar="SERVICE")
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("-n", "--lines", type=int, default=50)
    command("mem", "show heap pages per process and service (M = N x S)", run_mem)
    command("shutdown", "stop every service and the kernel", run_shutdown)
    p = groups.add_parser(
        "demo",
        help="boot a small system, load it, kill a replica, report",
        description="Boot a built-in system, drive a load through it, kill a "
        "replica and watch it come back, print a report and shut down.",
    )
    p.add_argument(
        "--rounds", type=int, default=2000, help="rounds of calls (default 2000)"
    )
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from llmasos import demo

    return demo.run(args.rounds)
