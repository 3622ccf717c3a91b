"""pdp.cache.ExpiringCache: per-entry expiry, LRU eviction, counters."""

from __future__ import annotations

import threading

import pytest

from pdp.cache import ExpiringCache


def test_get_before_expiry_returns_the_value():
    c: ExpiringCache[str, object] = ExpiringCache(10)
    value = object()
    c.put("k", value, expires=100.0)
    assert c.get("k", 0.0) is value
    assert c.get("k", 99.999) is value


def test_expires_at_the_given_time():
    c: ExpiringCache[str, str] = ExpiringCache(10)
    c.put("k", "v", expires=100.0)
    assert c.get("k", 100.0) is None  # expiry is the first moment the entry is gone
    assert len(c) == 0                # and an expired entry is dropped when met
    assert c.get("k", 50.0) is None   # gone for good, even if time goes back


def test_each_entry_has_its_own_expiry():
    c: ExpiringCache[str, str] = ExpiringCache(10)
    c.put("short", "s", expires=10.0)
    c.put("long", "l", expires=1000.0)
    assert c.get("short", 20.0) is None
    assert c.get("long", 20.0) == "l"
    assert c.get("long", 1000.0) is None


def test_put_replaces_value_and_expiry():
    c: ExpiringCache[str, str] = ExpiringCache(10)
    c.put("k", "old", expires=10.0)
    c.put("k", "new", expires=100.0)
    assert len(c) == 1
    assert c.get("k", 50.0) == "new"
    c.put("k", "shorter", expires=20.0)
    assert c.get("k", 30.0) is None


def test_missing_key():
    c: ExpiringCache[str, str] = ExpiringCache(10)
    assert c.get("nope", 0.0) is None


def test_lru_eviction_at_max_size():
    c: ExpiringCache[int, str] = ExpiringCache(3)
    for i in range(3):
        c.put(i, f"v{i}", expires=100.0)
    assert len(c) == 3
    c.put(3, "v3", expires=100.0)          # evicts 0, the least recently used
    assert len(c) == 3
    assert c.get(0, 0.0) is None
    assert [c.get(i, 0.0) for i in (1, 2, 3)] == ["v1", "v2", "v3"]


def test_get_refreshes_recency():
    c: ExpiringCache[str, str] = ExpiringCache(2)
    c.put("a", "A", expires=100.0)
    c.put("b", "B", expires=100.0)
    assert c.get("a", 0.0) == "A"          # a is now the most recently used
    c.put("c", "C", expires=100.0)         # so b goes
    assert c.get("b", 0.0) is None
    assert c.get("a", 0.0) == "A"
    assert c.get("c", 0.0) == "C"


def test_put_of_an_existing_key_refreshes_recency():
    c: ExpiringCache[str, str] = ExpiringCache(2)
    c.put("a", "A", expires=100.0)
    c.put("b", "B", expires=100.0)
    c.put("a", "A2", expires=100.0)
    c.put("c", "C", expires=100.0)
    assert c.get("b", 0.0) is None
    assert c.get("a", 0.0) == "A2"


def test_size_one():
    c: ExpiringCache[str, str] = ExpiringCache(1)
    c.put("a", "A", expires=100.0)
    c.put("b", "B", expires=100.0)
    assert len(c) == 1
    assert c.get("a", 0.0) is None
    assert c.get("b", 0.0) == "B"


@pytest.mark.parametrize("size", [0, -1])
def test_non_positive_max_entries_stores_nothing(size):
    c: ExpiringCache[str, str] = ExpiringCache(size)
    c.put("k", "v", expires=100.0)
    assert len(c) == 0
    assert c.get("k", 0.0) is None


def test_hit_and_miss_counters():
    c: ExpiringCache[str, str] = ExpiringCache(2)
    assert (c.hits, c.misses) == (0, 0)
    c.get("a", 0.0)                        # miss: absent
    assert (c.hits, c.misses) == (0, 1)
    c.put("a", "A", expires=10.0)
    assert (c.hits, c.misses) == (0, 1)    # put counts nothing
    c.get("a", 0.0)                        # hit
    c.get("a", 5.0)                        # hit
    assert (c.hits, c.misses) == (2, 1)
    c.get("a", 10.0)                       # miss: expired
    assert (c.hits, c.misses) == (2, 2)
    c.get("a", 0.0)                        # miss: dropped when it expired
    assert (c.hits, c.misses) == (2, 3)


def test_counters_with_eviction_and_zero_size():
    c: ExpiringCache[int, int] = ExpiringCache(1)
    c.put(1, 1, expires=10.0)
    c.put(2, 2, expires=10.0)
    assert c.get(1, 0.0) is None and c.get(2, 0.0) == 2
    assert (c.hits, c.misses) == (1, 1)
    z: ExpiringCache[int, int] = ExpiringCache(0)
    z.put(1, 1, expires=10.0)
    assert z.get(1, 0.0) is None
    assert (z.hits, z.misses) == (0, 1)


def test_clear():
    c: ExpiringCache[int, int] = ExpiringCache(10)
    for i in range(5):
        c.put(i, i, expires=10.0)
    c.clear()
    assert len(c) == 0
    assert all(c.get(i, 0.0) is None for i in range(5))
    c.put(1, 1, expires=10.0)              # usable after clearing
    assert c.get(1, 0.0) == 1


def test_expiry_boundary_with_floats():
    c: ExpiringCache[str, str] = ExpiringCache(10)
    c.put("k", "v", expires=1.5)
    assert c.get("k", 1.4999999) == "v"
    assert c.get("k", 1.5) is None


def test_bounded_under_concurrent_use():
    c: ExpiringCache[int, int] = ExpiringCache(50)
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(2000):
                c.put(base * 10_000 + i, i, expires=100.0)
                c.get(base * 10_000 + i // 2, 0.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c) == 50
    assert c.hits + c.misses == 8 * 2000
