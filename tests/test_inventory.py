"""The client-identity inventory: recorded off the request path, merged in the store, bounded, listed by expiry.

The scale test records 50,000 distinct identities (``CertIdentity`` values; a smaller batch of real
certificates goes through the real verifier) into the shared Redis and into the in-memory store, and lists
the ones expiring within 7 days with ``pdp certs list``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL, check_request

from pdp.certificates.identity import CertIdentity
from pdp.certificates.inventory import (
    MAP,
    IdentityRecord,
    InventoryRecorder,
    expiring,
    expiry_buckets,
    forget_expired,
    read_expiries,
    read_records,
    write_records,
)
from pdp.devpki import make_client, new_key
from pdp.service.inventory_flusher import InventoryFlusher
from pdp.store import MemoryStore, RedisStore, StoreUnavailable, UnavailableStore

DAY = 86400.0
ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'
PDP = str(Path(sys.executable).parent / "pdp")


def _identity(i: int, now: float, *, days_left: float = 90.0) -> CertIdentity:
    return CertIdentity(thumbprint=f"{i:043d}", subject=f"CN=workload {i},O=pdp dev", issuer="CN=test intermediate",
                        serial=f"{i:x}", not_before=now - DAY, not_after=now + days_left * DAY,
                        spiffe_id=f"spiffe://example.org/ns/prod/sa/workload-{i}", trust_domain="example.org",
                        trust_bundle="example.org", dns=(), uris=(), emails=(), ips=(), key_type="EC secp256r1",
                        key_size=256)


# -- recording
def test_an_identity_is_queued_when_first_seen_and_then_at_most_once_per_interval():
    recorder = InventoryRecorder(interval=60.0)
    identity = _identity(1, 1000.0)
    recorder.seen(identity, 1000.0)
    recorder.seen(identity, 1030.0)
    (record,) = recorder.take()
    assert (record.first_seen, record.last_seen, record.spiffe_id) == (1000.0, 1000.0, identity.spiffe_id)
    recorder.seen(identity, 1059.0)
    assert recorder.take() == []
    recorder.seen(identity, 1061.0)
    assert [r.last_seen for r in recorder.take()] == [1061.0]


def test_the_queue_and_the_memory_of_what_was_queued_are_bounded():
    recorder = InventoryRecorder(max_pending=10, max_remembered=20)
    for i in range(50):
        recorder.seen(_identity(i, 0.0), 0.0)
    assert recorder.pending() == 10 and recorder.overflow == 40
    assert len(recorder._queued) <= 20


def test_a_repeat_costs_a_dictionary_lookup():
    recorder = InventoryRecorder()
    identity = _identity(1, 0.0)
    recorder.seen(identity, 0.0)
    started = time.perf_counter()
    for _ in range(20_000):
        recorder.seen(identity, 1.0)
    assert (time.perf_counter() - started) / 20_000 < 20e-6  # measured ~0.3 µs; generous for a loaded machine


# -- in the store
def test_records_merge_first_seen_kept_last_seen_advanced():
    store = MemoryStore()
    write_records(store, [IdentityRecord("t", None, "CN=a", "CN=ca", "b", 5000.0, 100.0, 100.0)],
                  max_identities=10)
    write_records(store, [IdentityRecord("t", None, "CN=a", "CN=ca", "b", 5000.0, 300.0, 300.0)],
                  max_identities=10)
    (record,) = read_records(store)
    assert (record.first_seen, record.last_seen, record.not_after) == (100.0, 300.0, 5000.0)


def test_beyond_max_identities_new_ones_are_dropped_and_counted_known_ones_still_updated():
    store = MemoryStore()
    recorder = InventoryRecorder()
    flusher = InventoryFlusher(store, recorder, max_identities=100, keep_expired=DAY)
    for i in range(150):
        recorder.seen(_identity(i, 0.0), 0.0)
    assert flusher.flush() == 100 and flusher.dropped == 50
    assert store.map_size(MAP) == 100
    recorder.seen(_identity(0, 0.0), 500.0)
    recorder.seen(_identity(149, 0.0), 500.0)
    assert flusher.flush() == 1 and flusher.dropped == 51
    assert {r.thumbprint: r.last_seen for r in read_records(store)}[f"{0:043d}"] == 500.0


def test_a_store_that_refuses_keeps_the_records_for_the_next_flush():
    recorder = InventoryRecorder()
    flusher = InventoryFlusher(UnavailableStore("down"), recorder, max_identities=100, keep_expired=DAY)
    recorder.seen(_identity(1, 0.0), 0.0)
    assert flusher.flush() == 0 and flusher.failures == 1 and recorder.pending() == 1
    flusher.store = MemoryStore()
    assert flusher.flush() == 1 and recorder.pending() == 0
    with pytest.raises(StoreUnavailable):
        UnavailableStore("down").map_items(MAP)


def test_long_expired_certificates_leave_the_inventory():
    store = MemoryStore()
    now = time.time()
    records = [IdentityRecord(f"t{d}", None, "CN=a", "CN=ca", "b", now + d * DAY, now, now) for d in (-30, -1, 5)]
    write_records(store, records, max_identities=10)
    assert forget_expired(store, keep_expired=7 * DAY, now=now) == 1
    assert sorted(r.thumbprint for r in read_records(store)) == ["t-1", "t5"]


def test_listing_and_buckets_by_days_to_expiry():
    now = 1_000_000.0
    records = [IdentityRecord(f"t{d}", None, "CN=a", "CN=ca", "b", now + d * DAY, now, now)
               for d in (40, -2, 0.5, 3, 10)]
    assert [r.thumbprint for r in expiring(records, now, 7 * DAY)] == ["t-2", "t0.5", "t3"]
    assert [r.thumbprint for r in expiring(records, now)] == ["t-2", "t0.5", "t3", "t10", "t40"]
    assert expiry_buckets([r.not_after for r in records], now) == \
        {"expired": 1, "lt_1d": 1, "lt_7d": 1, "lt_30d": 1, "ge_30d": 1}


def test_a_record_pdp_did_not_write_is_skipped():
    store = MemoryStore()
    write_records(store, [IdentityRecord("good", None, "CN=a", "CN=ca", "b", 10.0, 1.0, 1.0)], max_identities=5)
    store.map_set(MAP, {"bad1": b"x {}", "bad2": b"5 {\"d\": 1}, {}", "bad3": b"7 [1]"})
    assert [r.thumbprint for r in read_records(store)] == ["good"]


HUGE = b"9" * 400


@pytest.mark.parametrize("value", [
    HUGE + b' {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":0,"l":0}',
    b'1900000000 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":1e400,"l":0}',
    b'1900000000 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":NaN,"l":0}',
    b'1900000000 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":0,"l":' + HUGE + b"}",
    b'1900000000 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":true,"l":0}',
    b'-5 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":0,"l":0}',
    b"1900000000 " + b"[" * 100_000,
])
def test_a_record_no_time_holds_is_skipped_by_every_reader(value):
    store = MemoryStore()
    write_records(store, [IdentityRecord("good", None, "CN=a", "CN=ca", "b", 10.0, 1.0, 1.0)], max_identities=5)
    store.map_set(MAP, {"bad": value})
    assert [r.thumbprint for r in read_records(store)] == ["good"]
    assert [r.thumbprint for r in read_records(store, expiring_by=2e9)] == ["good"]
    assert len(read_expiries(store)) in (1, 2)  # a sound notAfter before a bad body still counts for the gauge
    assert all(x == x and x < 1e12 for x in read_expiries(store))
    write_records(store, [IdentityRecord("bad", None, "CN=a", "CN=ca", "b", 20.0, 2.0, 2.0)], max_identities=5)
    assert sorted(r.thumbprint for r in read_records(store)) == ["bad", "good"]  # a bad one is written over


def test_names_with_control_characters_are_shown_harmlessly():
    store = MemoryStore()
    store.map_set(MAP, {"t": rb'1900000000 {"s":"spiffe://x/\u001b[2K","d":"CN=\ud800","i":"\n","b":"z",'
                             b'"f":0,"l":0}', "t\x1b": b'1900000000 {"s":null,"d":"d","i":"i","b":"b","f":0,"l":0}'})
    (record,) = read_records(store)
    view = json.dumps(record.view(), allow_nan=False)
    assert record.thumbprint == "t" and view.isascii() and all(str(v).isprintable() for v in record.view().values())


# -- through the real verifier
def test_real_certificates_through_the_pipeline_are_recorded(make_pdp, tmp_path, pki):
    (tmp_path / "allow.rego").write_text(ALLOW_ALL)
    pdp = make_pdp(engine="regorus", policy_paths=[str(tmp_path / "allow.rego")])
    key = new_key()
    started = time.perf_counter()
    leaves = [make_client(pki.intermediate, spiffe_id=f"spiffe://example.org/batch/{i}", key=key, days=30 + i)
              for i in range(200)]
    per_leaf = (time.perf_counter() - started) / len(leaves)
    now = float(int(time.time()))  # the inventory keeps whole seconds
    for leaf in leaves:
        assert pdp.decide(check_request(chain=pki.chain(leaf), now=now)).allowed
    assert pdp.inventory is not None
    flusher = InventoryFlusher(pdp.store, pdp.inventory, max_identities=1000, keep_expired=DAY)
    assert flusher.flush() == 200
    records = {r.spiffe_id: r for r in read_records(pdp.store)}
    first = records["spiffe://example.org/batch/0"]
    assert (first.thumbprint, first.trust_bundle, first.first_seen) == (leaves[0].thumbprint, "example.org", now)
    assert first.not_after == leaves[0].cert.not_valid_after_utc.timestamp()
    assert first.issuer == pki.intermediate.cert.subject.rfc4514_string()
    pdp.decide(check_request(chain=pki.chain(leaves[0]), now=now + 61))
    flusher.flush()
    again = {r.spiffe_id: r for r in read_records(pdp.store)}["spiffe://example.org/batch/0"]
    assert (again.first_seen, again.last_seen) == (now, now + 61)
    assert expiring(read_records(pdp.store), now, 35 * DAY)[0].spiffe_id == "spiffe://example.org/batch/0"
    print(f"\n{per_leaf * 1e6:.0f} µs per leaf certificate (one reused EC key, signed by the test CA)")


# -- at scale
def _with_days_left(most: int) -> int:
    """How many of the 50,000 have at most ``most`` days left (``days_left`` is ``i % 60 - 1``)."""
    return sum(1 for i in range(50_000) if i % 60 - 1 <= most)


def _record_50k(store, now: float) -> tuple[float, float]:
    """Record 50,000 identities (notAfter spread over -1..59 days) through the recorder and the flusher;
    (bytes per identity the recorder keeps, seconds to flush)."""
    identities = [_identity(i, now, days_left=(i % 60) - 1) for i in range(50_000)]
    recorder = InventoryRecorder(max_pending=50_000)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for identity in identities:
        recorder.seen(identity, now)
    records = recorder.take()  # what the recorder keeps once its queue is written: the thumbprints it has seen
    del records
    per_identity = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")) / 50_000
    tracemalloc.stop()
    for identity in identities:
        recorder.seen(identity, now)  # seen before: nothing queued again
    assert recorder.pending() == 0
    recorder = InventoryRecorder(max_pending=50_000)
    for identity in identities:
        recorder.seen(identity, now)
    started = time.perf_counter()
    flusher = InventoryFlusher(store, recorder, max_identities=100_000, keep_expired=DAY)
    assert flusher.flush() == 50_000
    return per_identity, time.perf_counter() - started


def test_fifty_thousand_identities_in_redis_list_within_a_second(write_setup, tmp_path, prefix):
    now = time.time()
    store = RedisStore(REDIS_URL, prefix=prefix, timeout=5.0)
    in_process, flush_seconds = _record_50k(store, now)
    in_redis = redis.Redis.from_url(REDIS_URL).memory_usage(f"{prefix}{{{MAP}}}", samples=0) / 50_000
    started = time.perf_counter()
    listed = expiring(read_records(store, expiring_by=now + 7 * DAY), now, 7 * DAY)
    list_seconds = time.perf_counter() - started
    assert len(listed) == _with_days_left(7)
    assert in_process < 400 and in_redis < 600  # measured ~140 and ~275 bytes
    assert list_seconds < 2.0  # measured ~0.25 s idle; generous for a loaded machine

    config = write_setup(engine="regorus", extra=f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    started = time.perf_counter()
    result = subprocess.run([PDP, "certs", "list", "--expiring", "7d", "--json", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    command_seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert len(shown) == len(listed) and shown[0]["not_after"] <= shown[-1]["not_after"]
    table = subprocess.run([PDP, "certs", "list", "--expiring", "1d", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=False).stdout.splitlines()
    assert table[0].split()[:3] == ["NOT", "AFTER", "DAYS"] and len(table) == 1 + _with_days_left(1)
    print(f"\nredis: {in_redis:.0f} B/identity in Redis, {in_process:.0f} B/identity in process, flush "
          f"{flush_seconds:.2f} s, list --expiring 7d {list_seconds:.3f} s in process, "
          f"{command_seconds:.2f} s as `pdp certs list` (process start included)")


def test_fifty_thousand_identities_in_the_memory_store_list_within_a_second():
    now = time.time()
    store = MemoryStore()
    _, flush_seconds = _record_50k(store, now)
    items = store.map_items(MAP)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    again = MemoryStore()
    again.map_set(MAP, {bytes(k.encode()).decode(): bytes(bytearray(v)) for k, v in items.items()})  # copies
    in_store = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")) / 50_000
    tracemalloc.stop()
    assert in_store < 600  # measured ~370 bytes (the value, the thumbprint and the dictionary slot)
    started = time.perf_counter()
    listed = expiring(read_records(store, expiring_by=now + 7 * DAY), now, 7 * DAY)
    list_seconds = time.perf_counter() - started
    assert len(listed) == _with_days_left(7)
    assert list_seconds < 2.0
    started = time.perf_counter()
    counts = expiry_buckets(read_expiries(store), now)
    bucket_seconds = time.perf_counter() - started
    assert sum(counts.values()) == 50_000 and counts["expired"] == _with_days_left(0)
    assert counts["lt_1d"] == _with_days_left(1) - _with_days_left(0)
    flusher = InventoryFlusher(store, InventoryRecorder(), max_identities=100_000, keep_expired=DAY)
    assert flusher.expiry_counts() == counts and flusher.count() == 50_000
    print(f"\nmemory store: {in_store:.0f} B/identity, flush {flush_seconds:.2f} s, "
          f"list --expiring 7d {list_seconds:.3f} s, gauge buckets {bucket_seconds:.3f} s")
