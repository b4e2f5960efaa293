"""The system commands of the CLI against a running system: ps, mem, logs,
call, scale, restart, deploy and undeploy, their --json forms and --help;
and the control socket's answers to malformed requests."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from llmasos import control
from llmasos.cli import main
from llmasos.units import format_size

from .conftest import System, alive, running, write_manifest

SERVICES = """\
[services.kv]
entry = "llmasos.examples.basic:KV"
replicas = 2

[services.held]
entry = "llmasos.examples.testsvc:Probe"

[services.scaled]
entry = "llmasos.examples.basic:Echo"

[services.rest]
entry = "llmasos.examples.basic:Echo"
replicas = 2
"""

EXTRA = """\
[services.extra]
entry = "llmasos.examples.basic:Echo"
replicas = 2
"""

COMMANDS = [
    "boot",
    "ps",
    "call",
    "deploy",
    "undeploy",
    "scale",
    "restart",
    "logs",
    "mem",
    "shutdown",
    "demo",
    "sched",
]


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, run_root: Path
) -> Iterator[System]:
    with running(tmp_path_factory.mktemp("cli"), run_root, "cli", SERVICES) as s:
        yield s


def all_pids(system: System, *services: str) -> dict[str, list[int]]:
    return {s: system.pids(s) for s in services}


def test_cli_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--help"])

    out = capsys.readouterr().out
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert listed == COMMANDS


@pytest.mark.parametrize("command", [*COMMANDS, "sched simulate"])
def test_cli_help_of_each_command_exits_0(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([*command.split(), "--help"])

    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(f"usage: llmasos {command} ")


def test_cli_ps_prints_the_process_table(system: System) -> None:
    kernel = system.kernel_pid()

    done = system.cli("ps")

    assert done.returncode == 0
    head, columns, *rows = done.stdout.splitlines()
    assert head == f"system {system.name} (kernel pid {kernel})"
    assert columns.split() == [
        "pid",
        "kind",
        "service",
        "replica",
        "state",
        "restarts",
        "pages",
        "uptime_s",
    ]
    cells = {int(r.split()[0]): r.split()[1:5] for r in rows}
    for service in ("kv", "held"):
        for r in system.replicas(service):
            want = ["replica", service, str(r["replica"]), "ready"]
            assert cells[r["pid"]] == want


def test_cli_ps_json_is_the_kernels_answer(system: System) -> None:
    done = system.cli("ps", "--json")

    assert done.returncode == 0
    ps = json.loads(done.stdout)
    assert ps["system"] == system.name
    assert ps["services"]["kv"] == {
        "replicas": 2,
        "ready": 2,
        "failed": False,
        "restarts": 0,
    }
    rows = [p for p in ps["procs"] if p["service"] == "kv"]
    assert sorted(p["pid"] for p in rows) == sorted(system.pids("kv"))
    assert set(rows[0]) >= {"pid", "kind", "replica", "state", "restarts", "pages"}


def mem_row(mem: dict[str, Any], pid: int) -> dict[str, Any]:
    (row,) = [r for r in mem["procs"] if r["pid"] == pid]
    return row


def test_cli_mem_shows_pages_page_size_and_their_product(system: System) -> None:
    (pid,) = system.pids("held")
    held = system.connect("held")
    before = mem_row(json.loads(system.cli("mem", "--json").stdout), pid)
    held.hold(1 << 20)

    as_json = system.cli("mem", "--json")
    as_text = system.cli("mem")

    held.release()
    assert as_json.returncode == as_text.returncode == 0
    mem = json.loads(as_json.stdout)
    S = mem["page_size"]
    row = mem_row(mem, pid)
    assert row["service"] == "held"
    assert row["pages"] >= before["pages"] + (1 << 20) // S
    assert row["bytes"] == row["pages"] * S == row["pages"] * row["page_size"]
    kv_rows = [r for r in mem["procs"] if r["service"] == "kv"]
    assert mem["services"]["kv"]["pages"] == sum(r["pages"] for r in kv_rows)
    assert mem["services"]["kv"]["bytes"] == mem["services"]["kv"]["pages"] * S
    lines = as_text.stdout.splitlines()
    assert lines[0].startswith(f"heap: {mem['pages_used']} of ")
    columns = ["pid", "service", "replica", "N pages", "S", "M = N x S", "quota"]
    assert [c for c in columns if c in lines[2]] == columns
    (text_row,) = [line.split() for line in lines if line.startswith(f"{pid} ")]
    assert text_row[:6] == [
        str(pid),
        "held",
        "0",
        str(row["pages"]),
        format_size(S),
        format_size(row["pages"] * S),
    ]


def test_cli_logs_shows_the_end_of_a_replicas_log(system: System) -> None:
    held = system.connect("held")
    held.say("first line")
    held.say("second line")

    done = system.cli("logs", "held")
    last = system.cli("logs", "held", "-n", "1", "--json")

    assert done.returncode == last.returncode == 0
    assert done.stdout.splitlines()[-2:] == ["first line", "second line"]
    got = json.loads(last.stdout)
    assert got["lines"] == ["second line"]
    assert got["path"] == str(system.dir / "logs" / "held.0.log")


def test_cli_call_prints_the_result(system: System) -> None:
    put = system.cli("call", "kv.put", "k", '{"a": [1, 2]}')
    get = system.cli("call", "kv.get", "k")
    plain = system.cli("call", "kv.put", "s", "plain words")
    get_s = system.cli("call", "kv.get", "s")
    as_json = system.cli("call", "kv.get", "s", "--json")

    assert (put.returncode, put.stdout) == (0, "true\n")
    assert (get.returncode, get.stdout) == (0, '{"a": [1, 2]}\n')
    assert plain.returncode == 0
    assert (get_s.returncode, get_s.stdout) == (0, "plain words\n")
    assert (as_json.returncode, as_json.stdout) == (0, '"plain words"\n')


def test_cli_call_remote_exception_exits_1_naming_its_type(system: System) -> None:
    done = system.cli("call", "kv.fail", "boom")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("llmasos: error: KeyError in service 'kv' replica ")
    assert done.stderr.endswith(": 'boom'\n")


def test_cli_call_unknown_service_exits_1_naming_the_services(system: System) -> None:
    done = system.cli("call", "nosuch.get", "k")

    assert done.returncode == 1
    assert "no service named 'nosuch'" in done.stderr
    assert "kv" in done.stderr


@pytest.mark.parametrize(
    "args",
    [["call", "kv"], ["scale", "kv=many"]],
    ids=["call-without-method", "scale-without-number"],
)
def test_cli_malformed_target_is_a_usage_error(system: System, args: list[str]) -> None:
    done = system.cli(*args)

    assert done.returncode == 2
    assert "expected" in done.stderr


def test_cli_command_without_a_running_system_exits_1(system: System) -> None:
    done = system.cli("ps", "--system", "nosuch")

    assert done.returncode == 1
    assert "system 'nosuch' is not running" in done.stderr


def test_cli_scale_up_then_down(system: System) -> None:
    (first,) = system.wait_ready("scaled", 1)
    others = all_pids(system, "kv", "held", "rest")

    up = system.cli("scale", "scaled=3")
    three = system.wait_ready("scaled", 3)
    down = system.cli("scale", "scaled=1", "--json")

    assert (up.returncode, up.stdout) == (0, "scaled scaled from 1 to 3 replicas\n")
    assert three[0] == first and len(set(three)) == 3
    assert down.returncode == 0
    assert json.loads(down.stdout) == {"service": "scaled", "replicas": 1, "was": 3}
    assert system.wait_ready("scaled", 1) == [first]
    for pid in three[1:]:
        wait_until(lambda pid=pid: not alive(pid), f"replica pid {pid} to exit")
    assert system.ps()["services"]["scaled"]["replicas"] == 1
    assert all_pids(system, "kv", "held", "rest") == others


def test_cli_restart_replaces_the_replicas_of_one_service(system: System) -> None:
    old = system.wait_ready("rest", 2)
    others = all_pids(system, "kv", "held")

    one = system.cli("restart", "rest", "--replica", "1")
    after_one = system.wait_ready("rest", 2)
    every = system.cli("restart", "rest")
    after_all = system.wait_ready("rest", 2)

    assert (one.returncode, one.stdout) == (0, "restarted 1 replicas of rest\n")
    assert after_one[0] == old[0] and after_one[1] != old[1]
    assert (every.returncode, every.stdout) == (0, "restarted 2 replicas of rest\n")
    assert not set(after_all) & set(after_one)
    assert all_pids(system, "kv", "held") == others
    assert system.connect("rest").echo(5) == 5


def test_cli_deploy_and_undeploy_leave_other_services_alone(
    system: System, tmp_path: Path
) -> None:
    extra = write_manifest(tmp_path, system.name, EXTRA)
    before = all_pids(system, "kv", "held", "scaled", "rest")

    deployed = system.cli("deploy", str(extra), "extra")
    pids = system.wait_ready("extra", 2)
    called = system.cli("call", "extra.echo", "hi")
    undeployed = system.cli("undeploy", "extra")

    assert (deployed.returncode, deployed.stdout) == (
        0,
        "deployed extra (2 replicas)\n",
    )
    assert (called.returncode, called.stdout) == (0, "hi\n")
    assert (undeployed.returncode, undeployed.stdout) == (0, "undeployed extra\n")
    assert "extra" not in system.ps()["services"]
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), f"replica pid {pid} to exit")
    assert all_pids(system, "kv", "held", "scaled", "rest") == before


def test_cli_deploy_of_a_running_service_is_refused(system: System) -> None:
    done = system.cli("deploy", str(system.manifest), "kv")

    assert done.returncode == 1
    assert "service 'kv' is running already" in done.stderr


def control_exchange(system: System, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one connection to the control socket; the answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(control.socket_path(system.name)))
        answers = []
        with sock.makefile("rb") as reader:
            for line in lines:
                sock.sendall(line + b"\n")
                answers.append(json.loads(reader.readline()))
    return answers


MALFORMED = {
    "not-json": (b"garbage", "malformed", "cannot read the request"),
    "not-utf8": (b"\xff\xfe{", "malformed", "cannot read the request"),
    "not-an-object": (b"[1, 2]", "malformed", "a request is a JSON object"),
    "no-version": (b'{"op": "ps"}', "version", "this kernel speaks version 1"),
    "wrong-version": (b'{"v": 99, "op": "ps"}', "version", "version 99"),
    "unknown-op": (b'{"v": 1, "op": "reboot"}', "unknown", "known: attach, deploy"),
    "op-not-a-string": (b'{"v": 1, "op": 5}', "unknown", "unknown request 5"),
    "unknown-argument": (b'{"v": 1, "op": "ps", "x": 1}', "malformed", "'ps'"),
    "missing-argument": (b'{"v": 1, "op": "scale"}', "malformed", "'scale'"),
}


@pytest.mark.parametrize("line, kind, words", MALFORMED.values(), ids=MALFORMED)
def test_control_malformed_request_gets_an_error_answer(
    system: System, line: bytes, kind: str, words: str
) -> None:
    bad, good = control_exchange(system, line, b'{"v": 1, "op": "hello"}')

    assert bad["ok"] is False
    assert bad["v"] == control.VERSION
    assert bad["error"]["type"] == kind
    assert words in bad["error"]["message"]
    assert good["ok"] is True
    assert good["result"]["system"] == system.name
