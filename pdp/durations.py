"""Durations as people write them on a command line or in an admin request: ``90s``, ``15m``, ``1h``, ``7d``, ``2w``."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")
#: Longer than any certificate or token lives: past it a duration is a typo, not an intention.
MAX_SECONDS = 100 * 365 * 86400


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (a number with an optional unit s, m, h, d or w; a bare number is seconds).
    ``ValueError`` for anything else, zero, or more than a hundred years."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (such as 90s, 15m, 1h, 7d or 2w)")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"{text!r} is out of range (more than 0, at most 100 years)")
    return seconds
