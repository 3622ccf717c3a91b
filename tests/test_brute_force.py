"""Failure counters and lock-outs for client secrets (pdp.service.brute_force), on every store kind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from conftest import REDIS_URL
from own_redis import fill, own_redis

from pdp.service.brute_force import FailureLimiter, Locked, LockoutSettings, source_key
from pdp.store import MemoryStore, RedisStore, SqliteStore, Store, StoreUnavailable

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
    for ok in (False, True):  # while locked, a right secret is refused as a wrong one is
        with pytest.raises(Locked):
            limiter.attempt("192.0.2.1", "orders-api", ok=ok)


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


def _until_unlocked(limiter: FailureLimiter, source: str) -> None:
    while limiter.locked_for(source, None) > 0:
        time.sleep(0.02)


def test_each_further_lockout_is_twice_as_long_and_costs_the_full_limit_again():
    lockouts: list[str] = []
    settings = LockoutSettings(source_failures=3, window=60, duration=0.05, max_duration=0.15)
    limiter = FailureLimiter(settings, MemoryStore(), on_lockout=lockouts.append)
    durations = [fail(limiter, 3, "192.0.2.7", None)]
    for _ in range(3):
        _until_unlocked(limiter, "192.0.2.7")
        # the count started again at the lock-out: one failure after it does not lock again, three do
        assert fail(limiter, 2, "192.0.2.7", None) == 0 and limiter.locked_for("192.0.2.7", None) == 0
        durations.append(fail(limiter, 1, "192.0.2.7", None))
    assert durations == [0.05, 0.1, 0.15, 0.15]
    assert lockouts == ["source"] * 4


def test_attempts_during_a_lockout_count_for_nothing():
    settings = LockoutSettings(source_failures=3, window=60, duration=0.2, max_duration=0.2)
    limiter = FailureLimiter(settings, MemoryStore())
    fail(limiter, 3, "192.0.2.8", None)
    for _ in range(20):
        with pytest.raises(Locked):
            limiter.failed("192.0.2.8", None)
    _until_unlocked(limiter, "192.0.2.8")
    assert fail(limiter, 2, "192.0.2.8", None) == 0  # the 20 refused ones did not bring the next lock-out nearer


def test_a_lockout_ends_and_failures_are_forgotten_after_the_window():
    limiter = FailureLimiter(LockoutSettings(source_failures=2, window=1, duration=1, max_duration=1), MemoryStore())
    fail(limiter, 2, "192.0.2.9", None)
    assert limiter.locked_for("192.0.2.9", None) > 0
    time.sleep(1.1)
    assert limiter.locked_for("192.0.2.9", None) == 0
    assert fail(limiter, 1, "192.0.2.9", None) == 0


def test_a_right_secret_neither_counts_nor_takes_a_count_it_did_not_keep():
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    fail(limiter, 2, "192.0.2.10")
    for _ in range(10):
        assert limiter.attempt("192.0.2.10", "orders-api", ok=True) == 0
    assert fail(limiter, 1, "192.0.2.10") == 30  # still two failures before: the third locks


def test_a_client_is_not_locked_out_at_a_source_it_authenticated_from():
    """A stranger who locks a client out does not lock it out where it is known: a right secret from a
    source marks the (client, source) pair, and a marked pair is held only by its source's lock-out."""
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    limiter.attempt("192.0.2.20", "orders-api", ok=True)  # the client, from its usual address
    for i in range(5):
        limiter.failed(f"198.51.100.{i}", "orders-api")  # a stranger, from five addresses
    assert limiter.locked_for("203.0.113.1", "orders-api") > 0  # an address the client was not seen at
    with pytest.raises(Locked):
        limiter.attempt("203.0.113.1", "orders-api", ok=True)
    assert limiter.locked_for("192.0.2.20", "orders-api") == 0
    assert limiter.attempt("192.0.2.20", "orders-api", ok=True) == 0
    assert limiter.attempt("192.0.2.20", "orders-api", ok=True) == 0
    fail(limiter, 3, "192.0.2.20")  # but a guesser at that address is still held by the source's limit
    with pytest.raises(Locked):
        limiter.attempt("192.0.2.20", "orders-api", ok=True)


def test_ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4():
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1}", None)  # three addresses of one host's /64
    assert limiter.locked_for("2001:db8:1:2::ffff", None) > 0


@pytest.mark.parametrize("address", [
    "::ffff:0:192.0.2.1",  # SIIT, IPv4-translated (RFC 6145)
    "64:ff9b::192.0.2.1",  # NAT64 well-known prefix (RFC 6052)
    "2002:c000:201::1",  # 6to4 (RFC 3056): 65536 /64s per IPv4 host
    "2001:0:4136:e378:8000:63bf:3fff:fdfe",  # Teredo: the /64 is the server's; the client is 192.0.2.1
])
def test_ipv4_embedded_in_ipv6_is_counted_as_its_ipv4_address(address):
    ipv4 = "192.0.2.1"
    assert source_key(address) == ipv4
    limiter = FailureLimiter(SETTINGS, MemoryStore())
    fail(limiter, 2, ipv4, None)
    assert fail(limiter, 1, address, None) == 30
    assert limiter.locked_for(ipv4, None) > 0
    other = "64:ff9b::192.0.2.2"  # another IPv4 host behind the same NAT64 gateway is another source
    assert source_key(other) == "192.0.2.2" and limiter.locked_for(other, None) == 0


def test_tracked_state_is_bounded_and_a_full_store_refuses():
    limiter = FailureLimiter(SETTINGS, MemoryStore(max_entries=100))
    with pytest.raises(StoreUnavailable):
        for i in range(200):
            limiter.failed(f"10.0.{i // 250}.{i % 250}", None)


def _full_limiter(store: Store) -> FailureLimiter:
    """A limiter whose store holds as many keys as it can: nothing new fits."""
    limiter = FailureLimiter(SETTINGS, store)
    try:
        for i in range(100_000):
            limiter.failed(f"10.{i // 62500}.{i // 250 % 250}.{i % 250}", None)
    except StoreUnavailable:
        return limiter
    raise AssertionError("the store never filled up")


def _answers(limiter: FailureLimiter, source: str) -> set[str]:
    """What a right and a wrong secret get from ``source``."""
    answers = set()
    for ok in (True, False):
        try:
            limiter.attempt(source, "orders-api", ok=ok)
            answers.add("200" if ok else "401")
        except StoreUnavailable:
            answers.add("503")
        except Locked:
            answers.add("429")
    return answers


def test_a_full_store_refuses_a_right_secret_as_it_refuses_a_wrong_one(tmp_path):
    class Watchful(SqliteStore):
        SWEEP_INTERVAL = 0.0

    for store in (MemoryStore(max_entries=100), Watchful(tmp_path / "s.sqlite3", max_entries=100)):
        limiter = _full_limiter(store)
        assert _answers(limiter, "192.0.2.30") == {"503"}


def test_redis_at_maxmemory_refuses_a_right_secret_as_it_refuses_a_wrong_one(tmp_path):
    with own_redis(tmp_path) as url:
        limiter = FailureLimiter(SETTINGS, RedisStore(url, timeout=1.0))
        assert _answers(limiter, "192.0.2.31") == {"200", "401"}
        fill(url)
        # a source and a client already counted: Redis refuses every increment at maxmemory (noeviction)
        assert _answers(limiter, "192.0.2.31") == {"503"}
        assert _answers(limiter, "192.0.2.32") == {"503"}


def _concurrently(attempt: Callable[[], None], threads: int, each: int) -> list[str]:
    """Run ``attempt`` from ``threads`` threads released together; what each call did."""
    results: list[str] = []
    barrier = threading.Barrier(threads)

    def run() -> None:
        barrier.wait()
        for _ in range(each):
            try:
                attempt()
                results.append("answered")
            except Locked:
                results.append("locked")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return results




@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_wrong_guesses_from_several_workers_stay_within_the_limit(kind, tmp_path, prefix):
    """The value the increment gives decides, and the lock is read after it: however many guesses race,
    no more than the limit are answered before the lock-out (the rest are refused as locked out)."""
    settings = LockoutSettings(source_failures=10, client_failures=1000, window=60, duration=30)
    SqliteStore(tmp_path / "state.sqlite3").close()

    def make() -> Store:
        if kind == "sqlite":
            return SqliteStore(tmp_path / "state.sqlite3", create=False)
        return RedisStore(REDIS_URL, prefix=prefix, timeout=2.0)

    limiters = [FailureLimiter(settings, make()) for _ in range(4)]  # one store connection per "worker"
    turn = iter(range(1_000_000))

    def guess() -> None:
        limiters[next(turn) % 4].failed("192.0.2.40", "orders-api")

    results = _concurrently(guess, threads=16, each=5)
    assert len(results) == 80
    assert 1 <= results.count("answered") <= 10, results.count("answered")


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
