"""Byte sizes as people write them: ``"64MiB"`` to 67108864 and back.

The manifest reads sizes with :func:`parse_size`; output that must read back the
same (JSON, a rewritten manifest) uses :func:`format_size`, and output meant for
people (the CLI) uses :func:`human_size`. Units are binary only: ``KiB`` is 1024
bytes. Decimal units such as ``MB`` are refused rather than guessed.
"""

import re
from fractions import Fraction

UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_BY_LOWER = {unit.lower(): factor for unit, factor in UNITS.items()}
EXPECTED_SIZE = 'a size in bytes such as 65536 or "64MiB" (units B, KiB, MiB, GiB, TiB)'


def parse_size(value: int | str) -> int:
    """Return the number of bytes that *value* names.

    *value* is a whole number of bytes or a string of a number and a unit:
    ``"4KiB"``, ``"1.5 GiB"``, ``"512"``. Unit names ignore case. Raises
    ``ValueError`` whose message says what was expected and what was given; a
    size that is negative or not a whole number of bytes is refused.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected {EXPECTED_SIZE}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {EXPECTED_SIZE}, got {value}")
        return value

    match = _SIZE.fullmatch(value)
    factor = _BY_LOWER.get(match.group(2).lower() or "b") if match else None
    if match is None or factor is None:
        raise ValueError(f'expected {EXPECTED_SIZE}, got "{value}"')

    size = Fraction(match.group(1)) * factor
    if size.denominator != 1:
        raise ValueError(f'expected a whole number of bytes, got "{value}"')
    return int(size)


def format_size(size: int) -> str:
    """Return *size* exactly, in the largest unit that divides it: ``"64MiB"``.

    ``parse_size(format_size(n)) == n`` for every ``n >= 0``.
    """
    for unit, factor in reversed(UNITS.items()):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def human_size(size: int) -> str:
    """Return *size* rounded to one decimal for people to read: ``"1.5 MiB"``."""
    for unit, factor in reversed(UNITS.items()):
        if size >= factor and factor > 1:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
