"""The shared store: in memory, and against the real Redis this machine (and CI) runs on 127.0.0.1:6379.

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import AUDIENCE, check_request
from servers import free_port

from pdp.devpki import DpopKey
from pdp.store import MemoryStore, RedisStore, SqliteStore, StoreUnavailable

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix():
    value = f"pdp-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


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
