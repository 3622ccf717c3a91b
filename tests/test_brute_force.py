"""Failure counters and lock-outs for client secrets (pdp.service.brute_force), on every store kind."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from pdp.service.brute_force import FailureLimiter, LockoutSettings, source_key
from pdp.store import MemoryStore, RedisStore, SqliteStore, StoreUnavailable

REDIS_URL = "redis://127.0.0.1:6379/0"
SETTINGS = LockoutSettings(source_failures=3, client_failures=5, window=60, duration=30, max_duration=100)


def fail(limiter: FailureLimiter, times: int, source: str, client: str | None = "orders-api") -> float:
    locked = 0.0
    for _ in range(times):
        locked = max(locked, limiter.failed(source, client))
    return locked


def test_a_source_is_locked_out_after_its_failures():
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    assert fail(limiter, 2, "192.0.2.1") == 0 and limiter.locked_for("192.0.2.1", "orders-api") == 0
    assert fail(limiter, 1, "192.0.2.1") == 30
    assert 0 < limiter.locked_for("192.0.2.1", "orders-api") <= 30
    assert 0 < limiter.locked_for("192.0.2.1", None) <= 30  # the source is locked, whatever client it names
    assert limiter.locked_for("192.0.2.2", "billing-api") == 0


def test_a_client_guessed_at_from_many_sources_is_locked_out_everywhere():
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    for i in range(5):
        limiter.failed(f"198.51.100.{i}", "orders-api")  # one failure per source: no source limit is reached
    assert all(limiter.locked_for(f"198.51.100.{i}", None) == 0 for i in range(5))
    assert limiter.locked_for("203.0.113.9", "orders-api") > 0
    assert limiter.locked_for("203.0.113.9", "billing-api") == 0


def test_unknown_client_ids_never_lock_anyone_out_but_count_per_source():
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    for i in range(20):
        limiter.failed(f"198.51.100.{i}", None)
    assert limiter.locked_for("203.0.113.9", None) == 0
    assert limiter.locked_for("203.0.113.9", "orders-api") == 0
    fail(limiter, 3, "203.0.113.9", None)
    assert limiter.locked_for("203.0.113.9", None) > 0


def test_each_further_lockout_is_twice_as_long_up_to_the_maximum():
    lockouts: list[str] = []
    settings = LockoutSettings(source_failures=3, window=60, duration=0.05, max_duration=0.15)
    limiter = FailureLimiter(settings, MemoryStore(), on_lockout=lockouts.append)
    durations = [fail(limiter, 3, "192.0.2.7", None)]
    for _ in range(3):
        while limiter.locked_for("192.0.2.7", None) > 0:
            time.sleep(0.02)
        # the failures within the window still count: the next one locks the source out again, for longer
        durations.append(fail(limiter, 1, "192.0.2.7", None))
    assert durations == [0.05, 0.1, 0.15, 0.15]
    assert lockouts == ["source"] * 4


def test_a_lockout_ends_and_failures_are_forgotten_after_the_window():
    limiter = FailureLimiter(LockoutSettings(source_failures=2, window=1, duration=1, max_duration=1), MemoryStore())
    fail(limiter, 2, "192.0.2.9", None)
    assert limiter.locked_for("192.0.2.9", None) > 0
    time.sleep(1.1)
    assert limiter.locked_for("192.0.2.9", None) == 0
    assert fail(limiter, 1, "192.0.2.9", None) == 0


def test_ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4():
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1}", None)  # three addresses of one host's /64
    assert limiter.locked_for("2001:db8:1:2::ffff", None) > 0


def test_tracked_state_is_bounded_and_a_full_store_refuses():
    limiter = FailureLimiter(SETTINGS, MemoryStore(max_entries=100))
    with pytest.raises(StoreUnavailable):
        for i in range(200):
            limiter.failed(f"10.0.{i // 250}.{i % 250}", None)


@pytest.fixture
def prefix():
    value = f"pdp-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_replicas_share_failures_and_lockouts_through_redis(prefix):
    first = FailureLimiter(SETTINGS, RedisStore(REDIS_URL, prefix=prefix))
    second = FailureLimiter(SETTINGS, RedisStore(REDIS_URL, prefix=prefix))
    fail(first, 2, "192.0.2.1")
    assert fail(second, 1, "192.0.2.1") == 30
    assert 0 < first.locked_for("192.0.2.1", None) <= 30


def test_workers_share_failures_and_lockouts_through_sqlite(tmp_path):
    first = FailureLimiter(SETTINGS, SqliteStore(tmp_path / "state.sqlite3"))
    second = FailureLimiter(SETTINGS, SqliteStore(tmp_path / "state.sqlite3"))
    fail(first, 2, "192.0.2.1")
    assert fail(second, 1, "192.0.2.1") == 30
    assert 0 < first.locked_for("192.0.2.1", None) <= 30
