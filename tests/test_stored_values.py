"""Values read back from the shared store: times that are times, text that is safe to show."""

from __future__ import annotations

import json

import pytest

from pdp.stored_values import MAX_UNIX_TIME, shown, unix_seconds, unix_time


@pytest.mark.parametrize("value", [0, 1_900_000_000, 1.5, MAX_UNIX_TIME])
def test_a_time_is_a_finite_number_in_range(value: float) -> None:
    assert unix_time(value) == float(value)


@pytest.mark.parametrize("raw", ["1e400", "-1e400", "NaN", "Infinity", "9" * 400, "-1", "true", '"5"', "null",
                                 str(MAX_UNIX_TIME + 1)])
def test_anything_else_is_a_value_error_never_an_overflow(raw: str) -> None:
    with pytest.raises(ValueError):
        unix_time(json.loads(raw))


@pytest.mark.parametrize("text", [b"", b"-5", b"1e9", b" 5", b"9" * 13, b"\xd9\xa3", str(MAX_UNIX_TIME + 1).encode()])
def test_whole_seconds_are_ascii_digits_in_range(text: bytes) -> None:
    with pytest.raises(ValueError):
        unix_seconds(text)
    assert unix_seconds(b"1900000000") == 1_900_000_000


def test_shown_text_is_printable_and_bounded() -> None:
    assert shown("plain text", 100) == "plain text"
    assert shown("a\nb\x1b[2K\ud800\u2028", 100) == "a\ufffdb\ufffd[2K\ufffd\ufffd"
    assert shown("x" * 50, 10) == "x" * 10
    json.dumps(shown("\ud800", 5)).encode("utf-8")
