"""The shared store: in memory, and against the real Redis this machine (and CI) runs on 127.0.0.1:6379.

Each test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from conftest import AUDIENCE, check_request
from servers import free_port

from pdp.devpki import DpopKey
from pdp.store import MemoryStore, RedisStore, StoreUnavailable

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
