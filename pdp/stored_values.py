"""Values read back from the shared store, checked before they are believed or shown.

Whoever can write to the store (Redis, the workers' SQLite file) can put
anything in pdp's maps: a number no float holds (``float()`` of a 400-digit
JSON integer raises ``OverflowError``, which is no ``ValueError``), ``1e400``
(infinity), a lone surrogate that no response can encode, or control
characters that rewrite a terminal or forge a log line. Each reader turns
such a value into a ``ValueError`` (the entry is skipped) or into plain text,
so that no listing, metric or decision fails on the store's contents.
"""

from __future__ import annotations

import math

#: The latest time read from the store: 9999-12-31T23:59:59Z, the last second a date can show.
MAX_UNIX_TIME = 253_402_300_799


def unix_time(value: object) -> float:
    """``value`` as a Unix time: a finite JSON number from 0 to ``MAX_UNIX_TIME``; ``ValueError`` for
    anything else (a bool, a string, NaN, infinity, an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a time is a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError("a time out of range") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_UNIX_TIME:
        raise ValueError("a time out of range")
    return seconds


def unix_seconds(text: bytes) -> int:
    """A whole number of seconds written as ASCII digits (``b"1900000000"``), within ``MAX_UNIX_TIME``."""
    if not 0 < len(text) <= 12 or not text.isdigit():
        raise ValueError("a time is 1 to 12 digits")
    seconds = int(text)
    if seconds > MAX_UNIX_TIME:
        raise ValueError("a time out of range")
    return seconds


def shown(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, each one that is not printable (control characters, lone
    surrogates, line and paragraph separators) replaced by U+FFFD: safe in a terminal, a log line and JSON."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "\ufffd" for c in text)
