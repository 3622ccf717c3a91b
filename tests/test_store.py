"""The shared store: in memory, and against the real Redis this machine (and CI) runs on 127.0.0.1:6379.

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import AUDIENCE, REDIS_URL, check_request
from servers import free_port

from pdp.devpki import DpopKey
from pdp.store import MemoryStore, RedisStore, SqliteStore, StoreUnavailable


def test_memory_store_remembers_until_expiry():
    store = MemoryStore()
    assert store.remember("a", 0.2) is True
    assert store.remember("a", 0.2) is False
    time.sleep(0.25)
    assert store.remember("a", 0.2) is True


def test_memory_store_full_of_live_entries_fails_closed():
    store = MemoryStore(max_entries=2)
    store.remember("a", 60)
    store.remember("b", 60)
    with pytest.raises(StoreUnavailable):
        store.remember("c", 60)


def test_redis_store_remembers_once_with_expiry(prefix):
    store = RedisStore(REDIS_URL, prefix=prefix)
    assert store.remember("k", 0.3) is True
    assert store.remember("k", 0.3) is False
    ttl = redis.Redis.from_url(REDIS_URL).pttl(prefix + "k")
    assert 0 < ttl <= 300
    time.sleep(0.4)
    assert store.remember("k", 0.3) is True


def test_redis_store_down_raises_store_unavailable():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        store.remember("k", 1)


def _replica(make_pdp, prefix: str, url: str = REDIS_URL):
    return make_pdp(extra=f'[store]\nurl = "{url}"\nprefix = "{prefix}"\n')


def test_a_dpop_proof_replayed_at_another_replica_is_refused(make_pdp, pki, issuer, prefix):
    first, second = _replica(make_pdp, prefix), _replica(make_pdp, prefix)
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    proof = key.proof("GET", "https://api.test/orders", token)
    request = check_request(chain=pki.chain(), headers={"authorization": f"DPoP {token}", "dpop": proof})
    assert first.decide(request).allowed
    replay = second.decide(request)
    assert (replay.allowed, replay.reason) == (False, "dpop_proof_invalid")


def test_redis_down_denies_dpop_requests_with_store_unavailable(make_pdp, pki, issuer, prefix):
    pdp = _replica(make_pdp, prefix, url=f"redis://127.0.0.1:{free_port()}/0")
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    request = check_request(chain=pki.chain(), headers={
        "authorization": f"DPoP {token}", "dpop": key.proof("GET", "https://api.test/orders", token)})
    decision = pdp.decide(request)
    assert (decision.allowed, decision.reason, decision.status) == (False, "store_unavailable", 503)


# -- ttl, counters, and the SQLite store the workers of one `pdp serve --workers N` share


def test_ttl_tells_how_long_a_key_has_left_in_memory_and_in_redis(prefix):
    for store in (MemoryStore(), RedisStore(REDIS_URL, prefix=prefix)):
        assert store.ttl("absent") == 0
        store.remember("seen", 30)
        store.count("counted", 30)
        assert 25 < store.ttl("seen") <= 30 and 25 < store.ttl("counted") <= 30


def test_memory_store_counts_toward_its_bound():
    store = MemoryStore(max_entries=2)
    store.count("a", 60)
    store.remember("b", 60)
    assert store.count("a", 60) == 2  # an existing counter needs no room
    with pytest.raises(StoreUnavailable):
        store.count("c", 60)


def test_sqlite_store_remembers_counts_and_expires(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    assert store.remember("k", 0.3) is True
    assert store.remember("k", 0.3) is False
    assert [store.count("n", 0.3) for _ in range(3)] == [1, 2, 3]
    assert 0 < store.ttl("k") <= 0.3 and store.ttl("absent") == 0
    time.sleep(0.4)
    assert store.remember("k", 0.3) is True  # an expired key is taken over
    assert store.count("n", 0.3) == 1  # an expired counter starts again
    store.close()


def test_sqlite_store_full_of_live_entries_fails_closed(tmp_path):
    class Watchful(SqliteStore):
        SWEEP_INTERVAL = 0.0  # look at the fill level on every call, not every two seconds

    store = Watchful(tmp_path / "state.sqlite3", max_entries=2)
    store.remember("a", 60)
    store.count("b", 60)
    with pytest.raises(StoreUnavailable):
        store.remember("c", 60)
    assert store.remember("a", 60) is False and store.count("b", 60) == 2  # keys that exist still work


def test_sqlite_store_that_cannot_open_its_file_raises_store_unavailable(tmp_path):
    with pytest.raises(StoreUnavailable):
        SqliteStore(tmp_path / "missing-folder" / "state.sqlite3")


def _remember_all(path: str, keys: list[str], out: Any) -> None:
    store = SqliteStore(Path(path))
    out.put([k for k in keys if store.remember(k, 60)])


def test_sqlite_store_remembers_each_key_once_across_processes(tmp_path):
    """Four processes race to remember the same 300 keys: each key is fresh to exactly one of them."""
    path = tmp_path / "state.sqlite3"
    SqliteStore(path).close()
    keys = [f"jti-{i}" for i in range(300)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_remember_all, args=(str(path), keys, out)) for _ in range(4)]
    for p in procs:
        p.start()
    fresh = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    won = [k for winners in fresh for k in winners]
    assert sorted(won) == sorted(keys)


# -- what the lock-out counters and the DPoP quota need: probes, take-backs, resets, and how full a store is


def _stores(tmp_path: Path, prefix: str) -> list[Any]:
    return [MemoryStore(), SqliteStore(tmp_path / "state.sqlite3"), RedisStore(REDIS_URL, prefix=prefix)]


def test_count_without_keeping_uncount_and_forget_on_every_store(tmp_path, prefix):
    for store in _stores(tmp_path, prefix):
        assert store.count("n", 30, keep=False) == 1  # what an increment would give ...
        assert store.count("n", 30, keep=False) == 1  # ... left as it was
        assert [store.count("n", 30) for _ in range(3)] == [1, 2, 3]
        assert store.count("n", 30, keep=False) == 4 and store.count("n", 30) == 4
        store.uncount("n")
        assert store.count("n", 30, keep=False) == 4
        for _ in range(6):
            store.uncount("n")  # never below zero
        assert store.count("n", 30) == 1
        store.uncount("absent")  # nothing to take back: no key made
        assert store.ttl("absent") == 0
        store.remember("seen", 30)
        store.forget("n")
        store.forget("seen")
        assert store.ttl("n") == 0 and store.ttl("seen") == 0
        assert store.count("n", 30) == 1 and store.remember("seen", 30) is True, type(store).__name__


def test_a_full_store_refuses_a_count_it_would_not_keep_as_one_it_would():
    store = MemoryStore(max_entries=2)
    store.count("a", 60)
    store.remember("b", 60)
    assert store.count("a", 60, keep=False) == 2  # an existing counter needs no room
    for keep in (True, False):
        with pytest.raises(StoreUnavailable):
            store.count("c", 60, keep=keep)


def test_load_is_the_share_of_a_bounded_store_in_use(tmp_path):
    from own_redis import fill, own_redis

    memory = MemoryStore(max_entries=4)
    assert memory.load() == 0
    memory.remember("a", 60)
    memory.count("b", 60)
    assert memory.load() == 0.5

    class Watchful(SqliteStore):
        SWEEP_INTERVAL = 0.0

    sqlite = Watchful(tmp_path / "state.sqlite3", max_entries=4)
    sqlite.remember("a", 60)
    sqlite.count("b", 60)
    sqlite.remember("c", 60)  # the sweep before it counted two rows
    assert sqlite.load() == 0.5
    with own_redis(tmp_path, maxmemory="4mb") as url:
        redis_store = RedisStore(url)
        assert 0 < (redis_store.load() or 0) < 0.5
        fill(url)
        time.sleep(RedisStore.LOAD_INTERVAL)
        assert (redis_store.load() or 0) >= 1
    assert RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2).load() is None  # cannot tell


def test_sqlite_tables_are_stores_with_bounds_of_their_own(tmp_path):
    class Watchful(SqliteStore):
        SWEEP_INTERVAL = 0.0

    path = tmp_path / "state.sqlite3"
    replay = Watchful(path, table="state", max_entries=2)
    lockout = Watchful(path, table="lockout", max_entries=2)
    replay.remember("a", 60)
    replay.remember("b", 60)
    with pytest.raises(StoreUnavailable):
        replay.remember("c", 60)
    assert lockout.count("a", 60) == 1 and lockout.count("b", 60) == 1  # the same keys, another table


def test_a_worker_never_creates_a_store_of_its_own_when_the_parents_is_gone(tmp_path):
    path = tmp_path / "state.sqlite3"
    parent = SqliteStore(path)
    identity = parent.file_identity()
    worker = SqliteStore(path, create=False, identity=identity)
    assert worker.remember("jti", 60) is True
    parent.close()
    worker.close()
    for leftover in tmp_path.iterdir():
        leftover.unlink()  # e.g. a temp-folder cleaner
    with pytest.raises(StoreUnavailable):
        SqliteStore(path, create=False, identity=identity)
    with pytest.raises(StoreUnavailable):
        SqliteStore(path, create=False)  # without an identity too: mode=rw never creates the file
    assert list(tmp_path.iterdir()) == []


def test_a_worker_refuses_a_store_replaced_under_it(tmp_path):
    class Watchful(SqliteStore):
        SWEEP_INTERVAL = 0.0

    path = tmp_path / "state.sqlite3"
    parent = SqliteStore(path)
    identity = parent.file_identity()
    worker = Watchful(path, create=False, identity=identity)
    assert worker.remember("jti", 60) is True
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    SqliteStore(path).close()  # another file of the same name, empty: the jti would be fresh there
    other = SqliteStore(path)  # (kept open, so its WAL files are there as the parent's were)
    with pytest.raises(StoreUnavailable):
        worker.remember("jti", 60)
    with pytest.raises(StoreUnavailable):
        Watchful(path, create=False, identity=identity)
    other.close()
    parent.close()


def test_put_get_keeps_a_value_until_it_expires_on_every_store(tmp_path, prefix):
    for store in _stores(tmp_path, prefix):
        name = type(store).__name__
        assert store.get("v") is None, name
        store.put("v", b"\x00first", 30)
        assert store.get("v") == b"\x00first", name
        store.put("v", b"second", 30)  # replaced, not added
        assert store.get("v") == b"second" and 0 < store.ttl("v") <= 30, name
        store.put("short", b"x", 0.05)
        time.sleep(0.15)
        assert store.get("short") is None, name
        store.forget("v")
        assert store.get("v") is None and store.ttl("v") == 0, name


def test_values_count_toward_a_memory_stores_bound():
    store = MemoryStore(max_entries=2)
    store.put("a", b"1", 60)
    store.remember("b", 60)
    store.put("a", b"2", 60)  # replacing needs no room
    with pytest.raises(StoreUnavailable):
        store.put("c", b"3", 60)
    assert store.get("a") == b"2"
