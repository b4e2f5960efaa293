"""Calling services from Python: results, remote exceptions, large payloads
through the heap, the choice of replica, and memory quotas."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import llmasos
from conftest import wait_until

from .conftest import WATCHDOG_S, System, running

SERVICES = """\
[services.kv]
entry = "llmasos.examples.basic:KV"
replicas = 2
idempotent = ["get"]

[services.echo]
entry = "llmasos.examples.basic:Echo"
replicas = 2

[services.probe]
entry = "llmasos.examples.testsvc:Probe"
replicas = 2

[services.quota]
entry = "llmasos.examples.testsvc:Probe"
memory_quota = "1MiB"
"""

SMALL = """\
[services.kv]
entry = "llmasos.examples.basic:KV"
"""

ECHO = """\
[services.echo]
entry = "llmasos.examples.basic:Echo"
"""

MiB = 1 << 20


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory, run_root: Path
) -> Iterator[System]:
    directory = tmp_path_factory.mktemp("calls")
    with running(directory, run_root, "calls", SERVICES, heap_size='"64MiB"') as s:
        yield s


def test_call_returns_the_methods_result(system: System) -> None:
    kv = system.connect("kv")

    kv.put("k", [1, {"a": 2.5}, None, "x"])

    assert kv.get("k") == [1, {"a": 2.5}, None, "x"]
    assert kv.get("missing", default=7) == 7


def test_call_connect_finds_the_system_named_in_the_environment(
    system: System,
) -> None:
    assert os.environ["LLMASOS_SYSTEM"] == system.name

    llmasos.connect("kv").put("from-env", 1)

    assert system.connect("kv").get("from-env") == 1


def test_call_connect_follows_the_system_named_in_the_environment(
    system: System, boot: Callable[..., System]
) -> None:
    first = boot("envfirst", SMALL)
    script = (
        "import os, llmasos\n"
        f"os.environ['LLMASOS_SYSTEM'] = {first.name!r}\n"
        f"llmasos.connect('kv').put('where', {first.name!r})\n"
        f"os.environ['LLMASOS_SYSTEM'] = {system.name!r}\n"
        "print(llmasos.connect('kv').get('where'))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script],
        env=first.env,
        capture_output=True,
        text=True,
        timeout=WATCHDOG_S,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "None\n", f"the second call went to {done.stdout}"


def test_call_async_variant_returns_the_result(system: System) -> None:
    async def main() -> list[object]:
        kv = llmasos.aconnect("kv", system.name)
        await kv.put("ak", "av")
        return await asyncio.gather(kv.get("ak"), kv.get("nothing", "d"))

    got = asyncio.run(main())

    assert got == ["av", "d"]


def test_call_remote_exception_carries_type_message_and_traceback(
    system: System,
) -> None:
    kv = system.connect("kv")

    with pytest.raises(KeyError) as info:
        kv.fail("boom")

    err = info.value
    assert isinstance(err, llmasos.RemoteError)
    assert err.type_name == "KeyError"
    assert err.message == "'boom'"
    assert err.service == "kv"
    assert err.replica in (0, 1)
    assert "llmasos/examples/basic.py" in err.remote_traceback
    assert "raise KeyError(message)" in err.remote_traceback
    assert str(err).startswith("KeyError in service 'kv' replica ")


def test_call_unknown_method_raises_attribute_error_naming_it(system: System) -> None:
    kv = system.connect("kv")

    with pytest.raises(AttributeError, match="no method 'nosuch'"):
        kv.nosuch()

    assert kv.get("missing") is None


def test_call_large_bytes_travel_both_ways(system: System) -> None:
    echo = system.connect("echo")
    payload = os.urandom(4 * MiB + 3)

    back = echo.echo(payload)

    assert back == payload
    assert echo.size(payload) == len(payload)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024),
        np.arange(1 << 16, dtype=np.int32).reshape(256, 256)[:, ::2],
        np.zeros(3, dtype=np.uint8),
    ],
    ids=["8MiB-float64", "non-contiguous-int32", "tiny-uint8"],
)
def test_call_numpy_arrays_travel_both_ways(system: System, arr: np.ndarray) -> None:
    echo = system.connect("echo")

    back = echo.echo(arr)

    assert isinstance(back, np.ndarray)
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_call_buffer_argument_is_read_by_the_service(system: System) -> None:
    echo = system.connect("echo")
    buf = system.heap.malloc(3 * MiB)
    with memoryview(buf) as view:
        view[:] = b"\x05" * len(view)

    size = echo.size(buf)

    assert size == len(memoryview(buf))
    assert buf.alive and buf.owner == os.getpid()
    system.heap.free(buf)


def test_call_buffer_result_is_owned_by_the_caller(system: System) -> None:
    echo = system.connect("echo")

    buf = echo.fill(2 * MiB, 7)

    assert isinstance(buf, llmasos.Buffer)
    assert buf.owner == os.getpid()
    with memoryview(buf) as view:
        assert view[: 2 * MiB] == b"\x07" * (2 * MiB)
    buf.heap.free(buf)


def test_call_least_outstanding_requests_spreads_calls_over_replicas(
    system: System, tmp_path: Path
) -> None:
    probe = system.connect("probe")
    replicas = set(system.ready_pids("probe"))
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    results: list[int] = []

    def caller() -> None:
        results.append(probe.block(str(gate), str(started)))

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(
        lambda: {int(p.name.split(".")[0]) for p in started.iterdir()} == replicas,
        "both replicas to run a call while calls wait",
        WATCHDOG_S,
    )
    gate.touch()
    for t in threads:
        t.join(WATCHDOG_S)

    assert len(results) == 6
    assert set(results) == replicas


def test_call_past_the_memory_quota_raises_memory_error_in_that_service(
    system: System,
) -> None:
    quota, kv = system.connect("quota"), system.connect("kv")
    before = system.ready_pids("quota")

    with pytest.raises(MemoryError) as info:
        quota.hold(2 * MiB)

    assert isinstance(info.value, llmasos.RemoteError)
    assert info.value.service == "quota"
    assert quota.hold(64 << 10) == 64 << 10
    assert quota.release() == 1
    kv.put("after-quota", 1)
    assert kv.get("after-quota") == 1
    assert system.ready_pids("quota") == before


def test_call_with_a_buffer_of_another_heap_fails_and_the_replica_serves_on(
    boot: Callable[..., System], heap: llmasos.Heap
) -> None:
    s = boot("foreign", ECHO)
    echo = s.connect("echo", timeout=5.0)
    foreign = heap.malloc(1000)

    with pytest.raises((ValueError, llmasos.LLMasOSError)):
        echo.size(foreign)

    assert echo.echo("still serving") == "still serving"
