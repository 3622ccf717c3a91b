"""Until when a revocation answer speaks (RFC 5280 §5.1.2.4, §5.1.2.5; RFC 6960 §4.2.2.1)."""

from __future__ import annotations

from pdp.certificates.freshness import LEEWAY, issued_in_future, vouches_until

NOW = 1_800_000_000.0


def test_a_dated_answer_vouches_until_its_next_update() -> None:
    assert vouches_until(NOW - 60, NOW + 3600, NOW, 60.0) == NOW + 3600
    assert vouches_until(NOW - 7200, NOW - 3600, NOW, 60.0) < NOW  # stale already


def test_an_undated_answer_vouches_briefly_after_it_is_obtained() -> None:
    assert vouches_until(NOW - 10, None, NOW, 60.0) == NOW + 60


def test_an_undated_answer_obtained_old_vouches_for_nothing() -> None:
    """Replayed a month on, it is stale the moment it arrives; just within the skew allowed, it still counts."""
    assert vouches_until(NOW - 30 * 86400, None, NOW, 60.0) < NOW
    assert vouches_until(NOW - 60 - LEEWAY + 1, None, NOW, 60.0) == NOW + 1
    assert vouches_until(NOW - 60 - LEEWAY - 1, None, NOW, 60.0) < NOW


def test_an_answer_from_the_future_is_recognised_beyond_the_skew_allowed() -> None:
    assert not issued_in_future(NOW + LEEWAY, NOW)
    assert issued_in_future(NOW + LEEWAY + 1, NOW)
