"""Tests of the manifest loader: values, defaults, and where each error points."""

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest

from llmasos.errors import LLMasOSError
from llmasos.manifest import (
    ManifestError,
    MethodSpec,
    ServiceSpec,
    SystemSpec,
    load_manifest,
    parse_manifest,
)
from llmasos.units import format_size, human_size, parse_size

DOCS = Path(__file__).resolve().parents[1] / "docs"

# Six lines; the cases below add theirs from line 7.
BASE = """\
[system]
name = "shop"
heap_size = "64MiB"

[services.kv]
entry = "llmasos.examples.kv:KV"
"""

FULL = """\
[system]
name = "shop"
heap_size = "64MiB"
page_size = "2MiB"
huge_pages = true

[services.auth]
entry = "llmasos.examples.shop:Auth"

[services.kv]
entry = "llmasos.examples.kv:KV"
replicas = 2
restart = "always"
backoff_initial = 0.1
backoff_max = 4
max_restarts = 3
restart_window = 30.0
memory_quota = "3MiB"
nice = 5
cpu_affinity = [0, 1]
env = { KV_BUCKETS = "1024", MODE = "fast" }
calls = ["auth"]
policy = "hrrn"
workers = 8
max_in_flight = 128
os_policy = "rr"
rt_priority = 10
idempotent = ["get", "stats"]

[services.kv.methods.get]
priority = 5
expected_ms = 0.2
deadline_ms = 10
"""


def parse_error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "shop.toml")
    return info.value


def test_manifest_full_round_trip() -> None:
    manifest = parse_manifest(FULL, "shop.toml")

    data = manifest.to_dict()

    assert json.loads(json.dumps(data)) == data
    assert data["path"] == "shop.toml"
    assert data["system"] == {
        "name": "shop",
        "heap_size": 64 << 20,
        "page_size": 2 << 20,
        "huge_pages": True,
    }
    assert list(data["services"]) == ["auth", "kv"]
    assert data["services"]["kv"] == {
        "name": "kv",
        "entry": "llmasos.examples.kv:KV",
        "replicas": 2,
        "restart": "always",
        "backoff_initial": 0.1,
        "backoff_max": 4.0,
        "max_restarts": 3,
        "restart_window": 30.0,
        "memory_quota": 3 << 20,
        "quota_pages": 2,
        "nice": 5,
        "cpu_affinity": [0, 1],
        "env": {"KV_BUCKETS": "1024", "MODE": "fast"},
        "calls": ["auth"],
        "policy": "hrrn",
        "workers": 8,
        "max_in_flight": 128,
        "os_policy": "rr",
        "rt_priority": 10,
        "idempotent": ["get", "stats"],
        "methods": {
            "get": {
                "name": "get",
                "priority": 5,
                "expected_ms": 0.2,
                "deadline_ms": 10.0,
            }
        },
    }


def test_manifest_defaults_come_from_the_specs() -> None:
    manifest = parse_manifest(BASE)

    kv = manifest.services["kv"]

    assert manifest.path == "<string>"
    assert manifest.system == SystemSpec(name="shop", heap_size=64 << 20)
    assert kv == ServiceSpec(
        name="kv",
        entry="llmasos.examples.kv:KV",
        memory_quota=64 << 20,
        quota_pages=(64 << 20) // 4096,
    )


def test_manifest_example_loads_and_round_trips() -> None:
    manifest = load_manifest(DOCS / "examples" / "shop.toml")

    kv = manifest.services["kv"]
    again = manifest.without_service("frontend").with_service(
        manifest.services["frontend"]
    )

    assert manifest.system.name == "shop"
    assert kv.entry == "llmasos.examples.shop:KV"
    assert all(
        s.entry.startswith("llmasos.examples.shop:") for s in manifest.services.values()
    )
    assert again == manifest


ERROR_CASES = [
    pytest.param(
        BASE + "replicas = \n",
        7,
        "services.kv.replicas",
        "not valid TOML: invalid value at column 12",
        id="toml-syntax",
    ),
    pytest.param(
        BASE + "replicas = 1\nreplicas = 2\n",
        8,
        "services.kv.replicas",
        "not valid TOML: cannot overwrite a value",
        id="toml-duplicate-key",
    ),
    pytest.param(
        BASE + 'replicas = "two"\n',
        7,
        "services.kv.replicas",
        'expected a whole number from 1 to 64, got "two"',
        id="wrong-type",
    ),
    pytest.param(
        BASE + "nice = 40\n",
        7,
        "services.kv.nice",
        "expected a whole number from -20 to 19, got 40",
        id="out-of-range",
    ),
    pytest.param(
        BASE + 'restart = "sometimes"\n',
        7,
        "services.kv.restart",
        'expected one of "always", "on-failure", "never", got "sometimes"',
        id="restart-not-a-choice",
    ),
    pytest.param(
        BASE + 'policy = "lifo"\n',
        7,
        "services.kv.policy",
        'expected one of "fifo", "priority", "hrrn", "edf", got "lifo"',
        id="policy-not-a-choice",
    ),
    pytest.param(
        BASE + 'memory_quota = "8MB"\n',
        7,
        "services.kv.memory_quota",
        'got "8MB"',
        id="size-decimal-unit",
    ),
    pytest.param(
        BASE + 'memory_quota = "1GiB"\n',
        7,
        "services.kv.memory_quota",
        'expected a size from 1 byte to heap_size (64MiB), got "1GiB"',
        id="quota-above-heap",
    ),
    pytest.param(
        BASE.replace("kv:KV", "kv.KV"),
        6,
        "services.kv.entry",
        'expected an entry point "package.module:Class", got "llmasos.examples.kv.KV"',
        id="entry-without-class",
    ),
    pytest.param(
        BASE.replace('entry = "llmasos.examples.kv:KV"', "replicas = 2"),
        5,
        "services.kv.entry",
        'missing; expected an entry point "package.module:Class"',
        id="entry-missing",
    ),
    pytest.param(
        '# no system\n\n[services.kv]\nentry = "a:B"\n',
        1,
        "system",
        "missing; expected a table [system]",
        id="system-missing",
    ),
    pytest.param(
        '# shop\n[system]\nheap_size = "64MiB"\n',
        2,
        "system.name",
        "missing; expected a system name of 1 to 32 characters",
        id="system-name-missing",
    ),
    pytest.param(
        BASE.replace('"shop"', '"Shop!"'),
        2,
        "system.name",
        'got "Shop!"',
        id="system-name-invalid",
    ),
    pytest.param(
        BASE.replace('"64MiB"', "5000"),
        3,
        "system.heap_size",
        "expected a whole number of pages of 4KiB, got 5000",
        id="heap-not-whole-pages",
    ),
    pytest.param(
        BASE.replace('"64MiB"', '"3MiB"\nhuge_pages = true'),
        3,
        "system.heap_size",
        'expected a multiple of "2MiB" with huge_pages = true, got "3MiB"',
        id="heap-not-huge-pages",
    ),
    pytest.param(
        BASE.replace('"64MiB"', '"64MiB"\npage_size = "12KiB"'),
        4,
        "system.page_size",
        'expected a power of two from "4KiB" to "1GiB", got "12KiB"',
        id="page-size-not-power-of-two",
    ),
    pytest.param(
        BASE + "backoff_max = 0.01\n",
        7,
        "services.kv.backoff_max",
        "no less than backoff_initial (0.05), got 0.01",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        BASE + "restart_window = 0\n",
        7,
        "services.kv.restart_window",
        "expected a number of seconds greater than 0, got 0",
        id="window-not-positive",
    ),
    pytest.param(
        BASE + 'os_policy = "rr"\n',
        5,
        "services.kv.rt_priority",
        'missing; expected a whole number from 1 to 99 with os_policy "rr"',
        id="rt-priority-missing",
    ),
    pytest.param(
        BASE + "rt_priority = 5\n",
        7,
        "services.kv.rt_priority",
        'expected no rt_priority with os_policy "other"',
        id="rt-priority-without-rt-policy",
    ),
    pytest.param(
        BASE + "env = { PORT = 8080 }\n",
        7,
        "services.kv.env.PORT",
        'expected a string such as "8080", got 8080',
        id="env-value-not-string",
    ),
    pytest.param(
        BASE + "cpu_affinity = [0, 0]\n",
        7,
        "services.kv.cpu_affinity",
        "each listed once, got [0, 0]",
        id="cpu-listed-twice",
    ),
    pytest.param(
        BASE + "cpu_affinity = [-1]\n",
        7,
        "services.kv.cpu_affinity",
        "CPU ids from 0 to 1023",
        id="cpu-negative",
    ),
    pytest.param(
        BASE + 'idempotent = ["get", 3]\n',
        7,
        "services.kv.idempotent",
        'expected a list of method names, each listed once, got ["get", 3]',
        id="idempotent-not-names",
    ),
    pytest.param(
        BASE + "\n[services.kv.methods.get]\nexpected_ms = 0\n",
        9,
        "services.kv.methods.get.expected_ms",
        "expected a number of milliseconds greater than 0, got 0",
        id="method-time-not-positive",
    ),
    pytest.param(
        '[system]\nname = "shop"\n\n[services]\nkv.entry = "a:B"\nkv.workers = 0\n',
        6,
        "services.kv.workers",
        "expected a whole number from 1 to 256, got 0",
        id="dotted-key",
    ),
    pytest.param(
        BASE + '\n[services.Auth]\nentry = "a:B"\n',
        8,
        "services.Auth",
        "expected a service name of 1 to 32 characters from a-z, 0-9, _ and -,"
        ' got "Auth"',
        id="service-name-invalid",
    ),
    pytest.param(
        '[system]\nname = "shop"\n\n[services]\nkv = 3\n',
        5,
        "services.kv",
        "expected a table [services.kv], got 3",
        id="service-not-a-table",
    ),
    pytest.param(
        BASE + 'calls = ["auth"]\n',
        7,
        "services.kv.calls",
        'expected names of services in this manifest, got "auth"',
        id="call-to-unknown-service",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "expected"), ERROR_CASES)
def test_manifest_error_names_line_and_field(
    text: str, line: int, field: str, expected: str
) -> None:
    error = parse_error(text)

    assert (error.path, error.line, error.field) == ("shop.toml", line, field)
    assert str(error).startswith(f"shop.toml:{line}: {field}: ")
    assert expected in error.message


def test_manifest_unknown_field_suggests_close_match() -> None:
    error = parse_error(BASE + "replica = 2\n")

    assert (error.line, error.field) == (7, "services.kv.replica")
    assert error.message.startswith(
        'unknown field "replica" (did you mean "replicas"?); expected one of '
    )
    assert "backoff_initial, backoff_max, calls," in error.message


def test_manifest_unknown_table_suggests_close_match() -> None:
    error = parse_error(BASE + '\n[service.auth]\nentry = "a:B"\n')

    assert (error.line, error.field) == (8, "service")
    assert 'unknown field "service" (did you mean "services"?)' in error.message


def test_manifest_call_to_unknown_service_suggests_close_match() -> None:
    text = BASE + 'calls = ["autth"]\n\n[services.auth]\nentry = "a:B"\n'

    error = parse_error(text)

    assert str(error) == (
        "shop.toml:7: services.kv.calls: expected names of services in this"
        ' manifest, got "autth" (did you mean "auth"?)'
    )


@pytest.mark.parametrize(
    ("quota", "page_size", "pages"),
    [
        pytest.param('"8MiB"', '"4KiB"', 2048, id="8MiB-in-4KiB"),
        pytest.param("4097", '"4KiB"', 2, id="one-byte-over-a-page"),
        pytest.param("1", '"4KiB"', 1, id="one-byte"),
        pytest.param('"3MiB"', '"2MiB"', 2, id="3MiB-in-2MiB"),
        pytest.param('"64MiB"', "65536", 1024, id="whole-heap"),
    ],
)
def test_manifest_quota_pages_round_up(quota: str, page_size: str, pages: int) -> None:
    text = BASE.replace('"64MiB"', f'"64MiB"\npage_size = {page_size}')

    manifest = parse_manifest(text + f"memory_quota = {quota}\n")

    assert manifest.services["kv"].quota_pages == pages


@pytest.mark.parametrize(
    ("page_size", "accepted"),
    [
        pytest.param('"4KiB"', True, id="4KiB"),
        pytest.param('"2MiB"', True, id="2MiB"),
        pytest.param("65536", True, id="64KiB-as-int"),
        pytest.param("12288", False, id="12KiB"),
        pytest.param('"2KiB"', False, id="below-4KiB"),
        pytest.param('"2GiB"', False, id="above-1GiB"),
    ],
)
def test_manifest_page_size_is_a_power_of_two(page_size: str, accepted: bool) -> None:
    text = f'[system]\nname = "shop"\nheap_size = "2GiB"\npage_size = {page_size}\n'

    if accepted:
        parse_manifest(text)
    else:
        assert parse_error(text).field == "system.page_size"


def test_manifest_error_is_an_llmasos_error_and_pickles() -> None:
    error = parse_error(BASE + "replicas = 0\n")

    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(error, LLMasOSError)
    assert isinstance(error, ValueError)
    assert str(copy) == str(error)
    assert (copy.line, copy.field) == (7, "services.kv.replicas")


def test_load_manifest_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shop.toml"
    path.write_text(BASE + "workers = 0\n")

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    assert str(info.value).startswith(f"{path}:7: services.kv.workers: ")


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    assert (info.value.path, info.value.line) == (str(path), None)
    assert str(info.value) == (
        f"{path}: cannot read the manifest (No such file or directory);"
        " expected a readable TOML file"
    )


def test_manifest_without_service_refuses_a_called_service() -> None:
    manifest = parse_manifest(
        BASE + 'calls = ["auth"]\n\n[services.auth]\nentry = "a:B"\n'
    )

    with pytest.raises(ManifestError) as info:
        manifest.without_service("auth")

    assert info.value.field == "services.auth"
    assert "kv calls" in info.value.message
    assert list(manifest.without_service("kv").services) == ["auth"]


def test_manifest_with_service_checks_calls_and_quota() -> None:
    manifest = parse_manifest(BASE)
    kv = manifest.services["kv"]
    caller = dataclasses.replace(kv, name="web", calls=("nope",))
    wrong_pages = dataclasses.replace(kv, name="web", quota_pages=1)

    with pytest.raises(ManifestError) as calls:
        manifest.with_service(caller)
    with pytest.raises(ManifestError) as pages:
        manifest.with_service(wrong_pages)

    assert calls.value.field == "services.web.calls"
    assert pages.value.field == "services.web.quota_pages"
    replaced = manifest.with_service(dataclasses.replace(kv, replicas=3))
    assert replaced.services["kv"].replicas == 3


def test_manifest_docs_describe_every_field() -> None:
    reference = (DOCS / "manifest.md").read_text()
    specs = (SystemSpec, ServiceSpec, MethodSpec)

    names = {f.name for spec in specs for f in dataclasses.fields(spec)}
    described = set(re.findall(r"^\| `(\w+)` \|", reference, re.MULTILINE))

    assert names - {"name", "quota_pages"} <= described
    assert "`quota_pages`" in reference


@pytest.mark.parametrize(
    ("text", "size", "exact"),
    [
        pytest.param("0", 0, "0B", id="zero"),
        pytest.param("4096", 4096, "4KiB", id="bytes"),
        pytest.param("64MiB", 64 << 20, "64MiB", id="MiB"),
        pytest.param("1.5 GiB", 3 << 29, "1536MiB", id="fraction"),
        pytest.param("2mib", 2 << 20, "2MiB", id="any-case"),
        pytest.param("4097", 4097, "4097B", id="odd"),
    ],
)
def test_size_parse_and_format(text: str, size: int, exact: str) -> None:
    assert parse_size(text) == size
    assert format_size(size) == exact
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["8MB", "-1", "1.3B", "MiB", "", "1 2KiB"])
def test_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_size(text)


def test_size_human() -> None:
    assert [human_size(n) for n in (512, 1536, 64 << 20)] == [
        "512 B",
        "1.5 KiB",
        "64.0 MiB",
    ]
