"""Every replica enforces a revocation within a second, and keeps enforcing what it knows when the store breaks.

Replicas are real ``Service`` instances (the sync thread running) sharing a real Redis: the shared one
under a key prefix, or, for the tests that stop, pause or slow Redis, one of the test's own
(``redis_process.RedisProcess``). The workers of one machine share a SQLite file instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REDIS_URL, check_request
from redis_process import RedisProcess

from pdp.certificates.revocation_list import Revocation, read_revocations, remove_revocation, store_revocation
from pdp.config import Config, load_config
from pdp.service.revocation_sync import RevocationSync, initial_list
from pdp.service.server import Service
from pdp.store import SHARED_TABLE, MemoryStore, RedisStore, SqliteStore, Store

ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'


def _config(write_setup, tmp_path: Path, url: str = "", prefix: str = "pdp:") -> Config:
    policy = tmp_path / "allow.rego"
    policy.write_text(ALLOW_ALL)
    store = f'[store]\nurl = "{url}"\nprefix = "{prefix}"\ntimeout = 0.2\n' if url else ""
    return load_config(write_setup(engine="regorus", policy_paths=[str(policy)], extra=store))


@contextmanager
def _replica(config: Config, store: Store | None = None) -> Iterator[Service]:
    service = Service(config, store=store)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _until(predicate: Callable[[], bool], deadline: float = 10.0) -> float:
    """Seconds until ``predicate`` holds (polled every 10 ms); fails after ``deadline``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > deadline:
            raise AssertionError(f"not within {deadline} s")
        time.sleep(0.01)
    return time.monotonic() - started


def _reason(service: Service, leaf) -> str:
    return service.pdp.decide(check_request(chain=leaf)).reason


def _revoke(store: Store, thumbprint: str) -> None:
    store_revocation(store, Revocation("cert", thumbprint, "test", time.time()))


def test_revoked_on_one_replica_denied_on_the_other_within_a_second(write_setup, tmp_path, pki, prefix):
    config = _config(write_setup, tmp_path, REDIS_URL, prefix)
    with _replica(config) as first, _replica(config) as second:
        assert _reason(second, pki.chain()) == "allowed"
        _revoke(first.pdp.store, pki.client.thumbprint)
        elapsed = _until(lambda: _reason(second, pki.chain()) == "cert_revoked")
        assert elapsed < 1.0, f"took {elapsed:.3f} s"  # pub/sub: milliseconds; the version poll: ≤ 0.5 s
        assert _reason(second, pki.chain(pki.other)) == "allowed"
        assert remove_revocation(second.pdp.store, "cert", pki.client.thumbprint)
        assert _until(lambda: _reason(first, pki.chain()) == "allowed") < 1.0


def test_a_revocation_with_a_ttl_drops_out_on_every_replica(write_setup, tmp_path, pki, prefix):
    config = _config(write_setup, tmp_path, REDIS_URL, prefix)
    with _replica(config) as first, _replica(config) as second:
        now = time.time()
        store_revocation(first.pdp.store, Revocation("cert", pki.client.thumbprint, created=now, expires=now + 1.0))
        _until(lambda: _reason(second, pki.chain()) == "cert_revoked")
        for replica in (first, second):
            _until(lambda r=replica: _reason(r, pki.chain()) == "allowed")
        _until(lambda: first.pdp.store.map_size("revocations") == 0)  # and the store forgets it


def test_workers_sharing_a_sqlite_file_see_a_revocation_within_a_second(write_setup, tmp_path, pki):
    config = _config(write_setup, tmp_path)
    parent = SqliteStore(tmp_path / "state.sqlite3", table=SHARED_TABLE)
    stores = [SqliteStore(parent.path, table=SHARED_TABLE, create=False, identity=parent.file_identity())
              for _ in range(2)]
    try:
        with _replica(config, stores[0]) as first, _replica(config, stores[1]) as second:
            _revoke(first.pdp.store, pki.client.thumbprint)
            assert _until(lambda: _reason(second, pki.chain()) == "cert_revoked") < 1.0
    finally:
        for store in (*stores, parent):
            store.close()


def test_one_process_with_the_memory_store_enforces_at_once(write_setup, tmp_path, pki):
    with _replica(_config(write_setup, tmp_path)) as service:
        _revoke(service.pdp.store, pki.client.thumbprint)
        assert _until(lambda: _reason(service, pki.chain()) == "cert_revoked") < 1.0


# -- when Redis breaks
def test_redis_down_at_start_denies_credentials_until_the_list_is_read(write_setup, tmp_path, pki, issuer):
    redis = RedisProcess(tmp_path)  # its port, not started yet
    config = _config(write_setup, tmp_path, redis.url)
    with _replica(config) as service:
        decision = service.pdp.decide(check_request(chain=pki.chain()))
        assert (decision.allowed, decision.reason, decision.status) == (False, "store_unavailable", 503)
        assert service.pdp.decide(check_request()).allowed  # nothing presented, nothing revoked
        state = service.readiness()
        assert state["ready"] is False and state["revocations"]["loaded"] is False
        try:
            redis.start()
            _revoke(RedisStore(redis.url, prefix="pdp:"), pki.other.thumbprint)
            _until(lambda: service.revocation_sync.ready)
            assert _reason(service, pki.chain()) == "allowed"
            assert _reason(service, pki.chain(pki.other)) == "cert_revoked"
        finally:
            redis.stop()


def test_redis_lost_mid_traffic_decisions_go_on_from_the_local_copy_and_resume_after(write_setup, tmp_path, pki):
    redis = RedisProcess(tmp_path).start()
    writer = RedisStore(redis.url, prefix="pdp:")
    try:
        with _replica(_config(write_setup, tmp_path, redis.url)) as service:
            _revoke(writer, pki.other.thumbprint)
            _until(lambda: _reason(service, pki.chain(pki.other)) == "cert_revoked")
            redis.stop()
            _until(lambda: not service.revocation_sync.reachable)
            slowest = 0.0
            for i in range(200):
                leaf = pki.chain(pki.other) if i % 2 else pki.chain()
                started = time.monotonic()
                reason = _reason(service, leaf)
                slowest = max(slowest, time.monotonic() - started)
                assert reason == ("cert_revoked" if i % 2 else "allowed")
            assert slowest < 0.2  # never waits on the store (its timeout is 0.2 s)
            redis.start()  # the same port, empty: what was written before the restart is gone
            _revoke(writer, pki.client.thumbprint)
            _until(lambda: _reason(service, pki.chain()) == "cert_revoked")  # written after the restart: read
            # A store that forgot is not an unrevoke: the replica keeps what it enforced and writes it back.
            assert _reason(service, pki.chain(pki.other)) == "cert_revoked"
            assert f"cert:{pki.other.thumbprint}" in writer.map_items("revocations")
            assert service.readiness()["revocations"]["store_reachable"] is True
    finally:
        redis.stop()


def test_a_revocation_written_while_a_replica_was_cut_off_is_read_on_reconnect(tmp_path, pki):
    """However the store's version moved meanwhile, the first look after an outage reads the whole list."""
    redis = RedisProcess(tmp_path).start()
    try:
        store = RedisStore(redis.url, prefix="pdp:", timeout=0.2)
        _revoke(store, pki.other.thumbprint)
        revocations = initial_list(store)
        sync = RevocationSync(store, revocations)
        assert revocations.version != 0 and len(revocations) == 1
        redis.pause()  # cut off, its contents kept (a store that restarts empty: the tests below)
        assert sync.refresh() is False and len(revocations) == 1  # the copy in force stays
        redis.resume()
        writer = RedisStore(redis.url, prefix="pdp:")
        _revoke(writer, pki.client.thumbprint)
        redis.client().set("pdp:{revocations}:version", revocations.version)  # even at the very same version
        assert sync.refresh() is True
        assert sorted(e.value for e in revocations.entries(time.time())) == sorted([pki.client.thumbprint,
                                                                                   pki.other.thumbprint])
    finally:
        redis.stop()


@pytest.mark.parametrize("trouble", ["debug sleep", "sigstop"])
def test_a_slow_or_paused_redis_holds_up_no_decision(write_setup, tmp_path, pki, trouble):
    redis = RedisProcess(tmp_path).start()
    writer = RedisStore(redis.url, prefix="pdp:", timeout=5.0)
    try:
        with _replica(_config(write_setup, tmp_path, redis.url)) as service:
            _revoke(writer, pki.other.thumbprint)
            _until(lambda: _reason(service, pki.chain(pki.other)) == "cert_revoked")
            sleeper = redis.sleep(2.0) if trouble == "debug sleep" else None
            if sleeper is None:
                redis.pause()
            started = time.monotonic()
            assert service.revocation_sync.refresh() is False
            assert time.monotonic() - started < 1.5  # one store timeout (0.2 s), never the whole stall
            slowest = 0.0
            for _ in range(100):
                t = time.monotonic()
                assert _reason(service, pki.chain(pki.other)) == "cert_revoked"
                assert _reason(service, pki.chain()) == "allowed"
                slowest = max(slowest, time.monotonic() - t)
            assert slowest < 0.2
            if sleeper is not None:
                sleeper.join()
            else:
                redis.resume()
            _revoke(writer, pki.client.thumbprint)
            _until(lambda: _reason(service, pki.chain()) == "cert_revoked")
    finally:
        redis.stop()


# -- a store that lost the list is not an unrevoke
def test_a_version_gone_to_zero_keeps_the_list_and_writes_it_back(pki, caplog):
    """The store the list was read from is replaced by an empty one (what a Redis restart without persistence
    looks like to a replica): version 0 after a non-zero one."""
    before = MemoryStore()
    _revoke(before, pki.client.thumbprint)
    revocations = initial_list(before)
    empty = MemoryStore()
    sync = RevocationSync(empty, revocations)
    assert sync.refresh() is True
    assert [e.value for e in revocations.entries(time.time())] == [pki.client.thumbprint]
    assert [e.value for e in read_revocations(empty)[1]] == [pki.client.thumbprint]  # written back
    assert empty.map_version("revocations") != 0  # with a notice: every other replica reads it
    assert any(r.levelname == "ERROR" and "gone from the store" in r.getMessage() for r in caplog.records)


def test_a_lost_store_is_told_by_its_marker_even_after_a_revocation_written_since(pki):
    before = MemoryStore()
    _revoke(before, pki.client.thumbprint)
    revocations = initial_list(before)
    restarted = MemoryStore()
    for _ in range(2):  # the store's version is non-zero again (another than the one read), its marker gone
        _revoke(restarted, pki.other.thumbprint)
    assert restarted.map_version("revocations") not in (0, revocations.version)
    assert RevocationSync(restarted, revocations).refresh() is True
    both = sorted([pki.client.thumbprint, pki.other.thumbprint])
    assert sorted(e.value for e in revocations.entries(time.time())) == both
    assert sorted(e.value for e in read_revocations(restarted)[1]) == both


def test_an_unrevoke_is_an_unrevoke_not_a_lost_store(pki):
    store = MemoryStore()
    _revoke(store, pki.client.thumbprint)
    revocations = initial_list(store)
    sync = RevocationSync(store, revocations)
    assert remove_revocation(store, "cert", pki.client.thumbprint)
    assert sync.refresh() is True
    assert len(revocations) == 0 and read_revocations(store)[1] == []


def test_a_replica_starts_whatever_garbage_the_store_holds(pki):
    store = MemoryStore()
    _revoke(store, pki.client.thumbprint)
    store.map_set("revocations", {"cert:" + "B" * 43: b'{"expires": ' + b"9" * 400 + b"}",
                                  "token:x": b"[" * 100_000})
    revocations = initial_list(store)
    assert revocations.loaded and [e.value for e in revocations.entries(time.time())] == [pki.client.thumbprint]
