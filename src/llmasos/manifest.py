"""The manifest: the TOML file that declares a system and its services.

``load_manifest(path)`` reads a file and ``parse_manifest(text)`` a string; both
return a frozen ``Manifest`` or raise ``ManifestError``, which names the file,
the line and the dotted field, and says what was expected::

    shop.toml:7: services.kv.replicas: expected a whole number from 1 to 64, got "two"

Checking stops at the first error. Only what the file alone can decide is
checked here; what depends on the machine (which CPUs exist, whether huge pages
are available) is checked when the system boots. Defaults live on the
dataclasses below and nowhere else. Every field is described in
docs/manifest.md.
"""

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmasos.errors import LLMasOSError
from llmasos.units import EXPECTED_SIZE, format_size, parse_size

RESTART_POLICIES = ("always", "on-failure", "never")
POLICIES = ("fifo", "priority", "hrrn", "edf")
OS_POLICIES = ("other", "fifo", "rr")
MIN_PAGE_SIZE = 4 << 10
MAX_PAGE_SIZE = 1 << 30
HUGE_PAGE_SIZE = 2 << 20
MAX_CPU = 1023

_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_NAME_CHARS = "1 to 32 characters from a-z, 0-9, _ and -"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENTRY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
_ENTRY_EXPECTED = 'an entry point "package.module:Class"'


class ManifestError(LLMasOSError, ValueError):
    """A manifest is unreadable or wrong; says where, in which field, and why.

    ``path`` is the file, ``line`` the 1-based line (None when no line applies),
    ``field`` the dotted field such as ``services.kv.replicas`` (None for errors
    of the whole file) and ``message`` what was expected and what was found.
    """

    def __init__(
        self,
        message: str,
        path: str,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, path, line, field)
        self.message = message
        self.path = path
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return ": ".join(part for part in (where, self.field, self.message) if part)


@dataclass(frozen=True, kw_only=True)
class SystemSpec:
    """Kernel settings: the ``[system]`` table. Sizes are in bytes."""

    name: str
    heap_size: int = 64 << 20
    page_size: int = 4 << 10
    huge_pages: bool = False

    @property
    def heap_pages(self) -> int:
        """Number of pages in the heap; heap_size is a whole number of pages."""
        return self.heap_size // self.page_size


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Scheduling defaults of one method: a ``[services.X.methods.M]`` table."""

    name: str
    priority: int = 0
    expected_ms: float | None = None
    deadline_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """One service: a ``[services.X]`` table.

    ``quota_pages`` is derived, ``ceil(memory_quota / page_size)`` with the page
    size of the manifest's system; the loader sets it and ``Manifest.with_service``
    checks it. ``rt_priority`` is 0 unless ``os_policy`` is ``fifo`` or ``rr``.
    """

    name: str
    entry: str
    replicas: int = 1
    restart: str = "on-failure"
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    max_restarts: int = 5
    restart_window: float = 10.0
    memory_quota: int
    quota_pages: int
    nice: int = 0
    cpu_affinity: tuple[int, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    calls: tuple[str, ...] = ()
    policy: str = "fifo"
    workers: int = 4
    max_in_flight: int = 64
    os_policy: str = "other"
    rt_priority: int = 0
    idempotent: tuple[str, ...] = ()
    methods: Mapping[str, MethodSpec] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: the system and its services in file order."""

    system: SystemSpec
    services: Mapping[str, ServiceSpec]
    path: str = "<string>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as plain dicts, lists and scalars, ready for JSON.

        Sizes are in bytes; each service also carries its derived quota_pages.
        """
        services = {name: _plain(spec) for name, spec in self.services.items()}
        return {"path": self.path, "system": _plain(self.system), "services": services}

    def with_service(self, spec: ServiceSpec) -> "Manifest":
        """Return a copy with *spec* added, or replacing the service of its name.

        The spec's values are trusted (they come from a loaded manifest); its
        quota_pages must match this system's page size and the services it calls
        must exist here.
        """
        pages = _ceil_div(spec.memory_quota, self.system.page_size)
        if spec.quota_pages != pages:
            raise self._error(
                f"services.{spec.name}.quota_pages",
                f"expected {pages} pages of {format_size(self.system.page_size)}"
                f" for a quota of {format_size(spec.memory_quota)},"
                f" got {spec.quota_pages}",
            )

        services = {**self.services, spec.name: spec}
        _raise_unknown_call(services, self._error)
        return Manifest(self.system, services, self.path)

    def without_service(self, name: str) -> "Manifest":
        """Return a copy without service *name*, which no other service may call."""
        if name not in self.services:
            raise self._error(f"services.{name}", _not_one_of(name, self.services))

        callers = [s.name for s in self.services.values() if name in s.calls]
        if callers:
            raise self._error(
                f"services.{name}",
                f"cannot remove a service that {', '.join(callers)} calls;"
                " expected no other service to list it in calls",
            )

        services = {key: s for key, s in self.services.items() if key != name}
        return Manifest(self.system, services, self.path)

    def _error(self, field: str, message: str) -> ManifestError:
        return ManifestError(message, self.path, None, field)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check the manifest file at *path*; raise ManifestError if wrong."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ManifestError(
            f"cannot read the manifest ({reason}); expected a readable TOML file",
            name,
        ) from exc

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            "expected UTF-8 text, got an invalid byte", name, line
        ) from exc
    return parse_manifest(text, name)


def parse_manifest(text: str, path: str = "<string>") -> Manifest:
    """Check the manifest *text*; *path* names it in error messages."""
    source = _Source(text, path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise source.syntax_error(exc) from None

    top = _Table(source, (), data, _Document)
    system = _system(top.child("system", SystemSpec))
    services = _services(top.child("services"), system)
    return Manifest(system, services, path)


@dataclass
class _Document:
    """The top-level tables, so that they are checked like any other table."""

    system: SystemSpec
    services: dict[str, Any] = field(default_factory=dict)


def _system(table: "_Table") -> SystemSpec:
    """Read [system]: a page size that is a power of two, a whole-page heap."""
    name = table.string("name", _NAME, f"a system name of {_NAME_CHARS}")
    page_size = table.size("page_size")
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise table.bad("page_size", 'a power of two from "4KiB" to "1GiB"')

    heap_size = table.size("heap_size")
    if heap_size < page_size or heap_size % page_size:
        pages = f"a whole number of pages of {format_size(page_size)}"
        raise table.bad("heap_size", pages)

    huge_pages = table.flag("huge_pages")
    if huge_pages and heap_size % HUGE_PAGE_SIZE:
        raise table.bad("heap_size", 'a multiple of "2MiB" with huge_pages = true')

    return SystemSpec(
        name=name, heap_size=heap_size, page_size=page_size, huge_pages=huge_pages
    )


def _services(table: "_Table", system: SystemSpec) -> dict[str, ServiceSpec]:
    """Read every [services.X] table, then check that each call has a callee."""
    services = {}
    for name in table.data:
        table.check_key(name, _NAME, f"a service name of {_NAME_CHARS}")
        service = table.child(name, ServiceSpec, skip=("name", "quota_pages"))
        services[name] = _service(service, system)

    def error(field: str, message: str) -> ManifestError:
        return table.source.error(tuple(field.split(".")), message)

    _raise_unknown_call(services, error)
    return services


def _service(table: "_Table", system: SystemSpec) -> ServiceSpec:
    """Read one [services.X] table, field group by field group."""
    return ServiceSpec(
        name=table.path[-1],
        entry=table.string("entry", _ENTRY, _ENTRY_EXPECTED),
        **_restart_fields(table),
        **_memory_fields(table, system),
        **_scheduling_fields(table),
        env=table.env("env"),
        calls=table.names("calls", _NAME, "service names"),
        idempotent=table.names("idempotent", _IDENT, "method names"),
        methods=_methods(table.child("methods")),
    )


def _restart_fields(table: "_Table") -> dict[str, Any]:
    """Restart policy, exponential backoff and the restart intensity limit."""
    initial = table.number("backoff_initial", "seconds")
    maximum = table.number("backoff_max", "seconds")
    if maximum < initial:
        expected = f"a number of seconds no less than backoff_initial ({initial})"
        raise table.bad("backoff_max", expected)

    return {
        "restart": table.choice("restart", RESTART_POLICIES),
        "backoff_initial": initial,
        "backoff_max": maximum,
        "max_restarts": table.whole("max_restarts", 0, 1000),
        "restart_window": table.number("restart_window", "seconds"),
    }


def _memory_fields(table: "_Table", system: SystemSpec) -> dict[str, Any]:
    """The memory quota, by default the whole heap, and its size in pages."""
    if "memory_quota" not in table.data:
        quota = system.heap_size
    else:
        quota = table.size("memory_quota")
    if not 1 <= quota <= system.heap_size:
        expected = f"a size from 1 byte to heap_size ({format_size(system.heap_size)})"
        raise table.bad("memory_quota", expected)

    return {
        "memory_quota": quota,
        "quota_pages": _ceil_div(quota, system.page_size),
    }


def _scheduling_fields(table: "_Table") -> dict[str, Any]:
    """Replicas, request scheduling inside a replica, and OS scheduling."""
    os_policy = table.choice("os_policy", OS_POLICIES)
    if os_policy == "other" and "rt_priority" in table.data:
        raise table.error(
            "rt_priority",
            'applies only to os_policy "fifo" or "rr"; expected no rt_priority'
            ' with os_policy "other"',
        )
    if os_policy != "other" and "rt_priority" not in table.data:
        raise table.error(
            "rt_priority",
            "missing; expected a whole number from 1 to 99"
            f' with os_policy "{os_policy}"',
        )

    return {
        "replicas": table.whole("replicas", 1, 64),
        "nice": table.whole("nice", -20, 19),
        "cpu_affinity": table.cpus("cpu_affinity"),
        "policy": table.choice("policy", POLICIES),
        "workers": table.whole("workers", 1, 256),
        "max_in_flight": table.whole("max_in_flight", 1, 1_000_000),
        "os_policy": os_policy,
        "rt_priority": 0 if os_policy == "other" else table.whole("rt_priority", 1, 99),
    }


def _methods(table: "_Table") -> Mapping[str, MethodSpec]:
    """Read the optional [services.X.methods.M] tables."""
    methods = {}
    for name in table.data:
        table.check_key(name, _IDENT, "a method name such as get")
        method = table.child(name, MethodSpec, skip=("name",))
        methods[name] = MethodSpec(
            name=name,
            priority=method.whole("priority", 0, 99),
            expected_ms=method.number("expected_ms", "milliseconds"),
            deadline_ms=method.number("deadline_ms", "milliseconds"),
        )
    return MappingProxyType(methods)


def _raise_unknown_call(
    services: Mapping[str, ServiceSpec], error: Callable[[str, str], ManifestError]
) -> None:
    """Raise error(field, message) for the first call to a missing service."""
    for spec in services.values():
        for callee in spec.calls:
            if callee not in services:
                raise error(
                    f"services.{spec.name}.calls", _not_one_of(callee, services)
                )


def _not_one_of(name: str, services: Iterable[str]) -> str:
    """Say that *name* is not a service of this manifest, suggesting a close one."""
    return f"expected names of services in this manifest, got {_show(name)}" + (
        _suggest(name, services)
    )


class _Table:
    """One TOML table of the manifest, read field by field.

    With a *spec* dataclass, the table may hold only that class's fields (minus
    *skip*) and absent fields take the class's defaults; without one, any key
    is allowed (the tables of services and of methods).
    """

    def __init__(
        self,
        source: "_Source",
        path: tuple[str, ...],
        data: dict[str, Any],
        spec: type | None = None,
        skip: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self.path = path
        self.data = data
        self.defaults: dict[str, Any] = {}
        if spec is not None:
            self.defaults = _defaults(spec, skip)
            self._reject_unknown()

    def error(self, key: str, message: str) -> ManifestError:
        """Return an error about field *key* of this table."""
        return self.source.error(self.path + (key,), message)

    def bad(self, key: str, expected: str) -> ManifestError:
        """Return an "expected ..., got ..." error about the value of *key*."""
        if key in self.data:
            got = _show(self.data[key])
        else:
            got = f"{_show(self.defaults[key])} (the default)"
        return self.error(key, f"expected {expected}, got {got}")

    def check_key(self, key: str, pattern: re.Pattern[str], expected: str) -> None:
        """Raise unless *key* itself, a name chosen by the user, fits *pattern*."""
        if not pattern.fullmatch(key):
            raise self.error(key, f"expected {expected}, got {_show(key)}")

    def child(
        self, key: str, spec: type | None = None, skip: tuple[str, ...] = ()
    ) -> "_Table":
        """Return the sub-table *key*, empty if absent and optional."""
        value = self._value(key, f"a table [{self._dotted(key)}]")
        if value is _ABSENT:
            value = {}
        if not isinstance(value, dict):
            raise self.bad(key, f"a table [{self._dotted(key)}]")
        return _Table(self.source, self.path + (key,), value, spec, skip)

    def string(self, key: str, pattern: re.Pattern[str], expected: str) -> str:
        """Return string field *key*, which must fit *pattern*."""
        value = self._value(key, expected)
        if value is _ABSENT:
            return self.defaults[key]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self.bad(key, expected)
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        """Return string field *key*, which must be one of *options*."""
        expected = "one of " + ", ".join(_show(option) for option in options)
        value = self._value(key, expected)
        if value is _ABSENT:
            return self.defaults[key]
        if value not in options:
            raise self.bad(key, expected)
        return value

    def whole(self, key: str, lo: int, hi: int) -> int:
        """Return integer field *key*, from *lo* to *hi* inclusive."""
        expected = f"a whole number from {lo} to {hi}"
        value = self._value(key, expected)
        if value is _ABSENT:
            return self.defaults[key]
        if not _is_int(value) or not lo <= value <= hi:
            raise self.bad(key, expected)
        return value

    def number(self, key: str, unit: str) -> float:
        """Return positive number field *key* in *unit*, or the field's default.

        The default may be None (the optional times of a method).
        """
        expected = f"a number of {unit} greater than 0"
        value = self._value(key, expected)
        if value is _ABSENT:
            return self.defaults[key]
        if not _is_number(value) or not 0 < value < math.inf:
            raise self.bad(key, expected)
        return float(value)

    def flag(self, key: str) -> bool:
        """Return boolean field *key*."""
        value = self._value(key, "true or false")
        if value is _ABSENT:
            return self.defaults[key]
        if not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def size(self, key: str) -> int:
        """Return size field *key* in bytes (an integer or "64MiB")."""
        value = self._value(key, EXPECTED_SIZE)
        if value is _ABSENT:
            return self.defaults[key]
        if not isinstance(value, int | str) or isinstance(value, bool):
            raise self.bad(key, EXPECTED_SIZE)
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def names(self, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
        """Return a list of distinct strings that each fit *pattern*."""
        return self._array(
            key,
            lambda item: isinstance(item, str) and bool(pattern.fullmatch(item)),
            f"a list of {what}, each listed once",
        )

    def cpus(self, key: str) -> tuple[int, ...]:
        """Return a list of distinct CPU ids."""
        return self._array(
            key,
            lambda item: _is_int(item) and 0 <= item <= MAX_CPU,
            f"a list of CPU ids from 0 to {MAX_CPU}, each listed once",
        )

    def env(self, key: str) -> Mapping[str, str]:
        """Return a table of environment variables whose values are strings."""
        table = self.child(key)
        for name, value in table.data.items():
            table.check_key(name, _IDENT, "an environment variable name")
            if not isinstance(value, str):
                raise table.bad(name, f"a string such as {_show(_show(value))}")
        return MappingProxyType(dict(table.data))

    def _array(self, key: str, is_item: Callable[[Any], bool], expected: str) -> Any:
        """Return list field *key* as a tuple of distinct items passing *is_item*."""
        value = self._value(key, expected)
        if value is _ABSENT:
            return self.defaults[key]
        if not isinstance(value, list) or not all(is_item(item) for item in value):
            raise self.bad(key, expected)
        if len(set(value)) != len(value):
            raise self.bad(key, expected)
        return tuple(value)

    def _value(self, key: str, expected: str) -> Any:
        """Return the raw value of *key*, or _ABSENT if absent but optional."""
        if key in self.data:
            return self.data[key]
        if self.defaults.get(key, _REQUIRED) is _REQUIRED:
            raise self.error(key, f"missing; expected {expected}")
        return _ABSENT

    def _reject_unknown(self) -> None:
        """Raise for the first key that is not a field of this table."""
        for key in self.data:
            if key not in self.defaults:
                known = sorted(self.defaults)
                raise self.error(
                    key,
                    f"unknown field {_show(key)}{_suggest(key, known)};"
                    f" expected one of {', '.join(known)}",
                )

    def _dotted(self, key: str) -> str:
        return ".".join(self.path + (key,))


class _Source:
    """The manifest's text and name, and the line where each key is written."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.lines, self.keys = _scan_keys(text)

    def line_of(self, key: tuple[str, ...]) -> int:
        """Line of *key*, else of its nearest written parent table, else 1."""
        while key and key not in self.lines:
            key = key[:-1]
        return self.lines.get(key, 1)

    def error(self, key: tuple[str, ...], message: str) -> ManifestError:
        """Return an error about *key*, located at its line."""
        return ManifestError(message, self.path, self.line_of(key), ".".join(key))

    def syntax_error(self, exc: tomllib.TOMLDecodeError) -> ManifestError:
        """Turn tomllib's "Reason (at line L, column C)" into a ManifestError."""
        match = _TOML_POSITION.fullmatch(str(exc))
        if match is None:
            return ManifestError(f"not valid TOML: {exc}", self.path)

        reason, line, column = match.groups()
        if line is None:
            at = "at the end of the file"
            line = str(len(self.text.rstrip().split("\n")))
        else:
            at = f"at column {column}"

        key = self.keys.get(int(line))
        message = f"not valid TOML: {reason[:1].lower()}{reason[1:]} {at}"
        return ManifestError(
            message, self.path, int(line), ".".join(key) if key else None
        )


_ABSENT = object()
_REQUIRED = object()
_TOML_POSITION = re.compile(
    r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", re.DOTALL
)
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_LINE = re.compile(rf"\s*\[\[?\s*({_KEY_PATH})\s*\]")
_KEY_LINE = re.compile(rf"\s*({_KEY_PATH})\s*=")


def _scan_keys(
    text: str,
) -> tuple[dict[tuple[str, ...], int], dict[int, tuple[str, ...]]]:
    """Map each key path written in *text* to its line, and each line to its key.

    A table header ``[a.b]`` and a key line ``c.d = ...`` are recorded, and so
    are the parent tables they imply, at their first line. This is a line
    scanner, not a TOML parser: it runs only to place messages, skips the inside
    of multi-line strings, and leaves keys inside inline tables to their parent.
    """
    lines: dict[tuple[str, ...], int] = {}
    keys: dict[int, tuple[str, ...]] = {}
    table: tuple[str, ...] = ()
    closing = ""
    for number, line in enumerate(text.split("\n"), start=1):
        if closing:
            closing = "" if closing in line else closing
            continue

        header = _HEADER_LINE.match(line)
        key = None if header else _KEY_LINE.match(line)
        if header:
            table = _split_key(header[1])
            keys[number] = table
        elif key:
            keys[number] = table + _split_key(key[1])
        if number in keys:
            for depth in range(1, len(keys[number])):
                lines.setdefault(keys[number][:depth], number)
            lines[keys[number]] = number
        closing = _opens_multiline_string(line)
    return lines, keys


def _split_key(text: str) -> tuple[str, ...]:
    """Split a dotted TOML key into its parts, unquoting quoted parts."""
    parts = []
    for part in re.findall(_KEY_PART, text):
        if part.startswith('"'):
            try:
                part = json.loads(part)
            except ValueError:
                part = part[1:-1]
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def _opens_multiline_string(line: str) -> str:
    """Return the delimiter of a multi-line string left open by *line*, or ""."""
    for delimiter in ('"""', "'''"):
        if line.count(delimiter) % 2:
            return delimiter
    return ""


def _defaults(spec: type, skip: tuple[str, ...]) -> dict[str, Any]:
    """Map each field of dataclass *spec* not in *skip* to its default or _REQUIRED."""
    defaults = {}
    for f in fields(spec):
        if f.name in skip:
            continue
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = _REQUIRED
    return defaults


def _suggest(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for a close match among *choices*, or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {_show(close[0])}?)" if close else ""


def _show(value: Any) -> str:
    """Write *value* the way TOML does, for messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _plain(value: Any) -> Any:
    """Turn specs, mappings and tuples into dicts and lists, for JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
