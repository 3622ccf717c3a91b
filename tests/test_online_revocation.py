"""Revocation answers shared between replicas through the store, renewed in the background, and seen end to end."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import REDIS_URL, SetupWriter, bound_token, check_request
from revocation_pki import RevocationServer, crl_der, leaf, ocsp_response, small_pki
from servers import free_port, serve_pdp

from pdp.assemble import build_pdp
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.revocation import RevocationPolicy
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.config import load_config
from pdp.credentials.http_fetch import HttpFetch
from pdp.decision import Decision
from pdp.devpki import Issued, TokenIssuer, make_ca
from pdp.errors import ConfigError, Denied
from pdp.pipeline import Pdp
from pdp.store import MemoryStore, RedisStore, SqliteStore, Store

ROOT, INTER = small_pki()


@pytest.fixture
def server() -> Iterator[RevocationServer]:
    with RevocationServer() as s:
        yield s


Replica = Callable[..., ChainVerifier]


@pytest.fixture
def replica() -> Iterator[Replica]:
    made: list[ChainVerifier] = []

    def build(store: Store | None = None, mode: str = "hard", **kw: object) -> ChainVerifier:
        verifier = ChainVerifier([TrustBundle("corp", (ROOT.cert,), revocation=RevocationPolicy(mode=mode))],
                                 revocation=OnlineRevocation(HttpFetch(2.0), store, **kw))  # type: ignore[arg-type]
        made.append(verifier)
        return verifier

    yield build
    for v in made:
        v.close()


def reason(verifier: ChainVerifier, cert: Issued, now: float | None = None, *, network: bool = True) -> str:
    try:
        verifier.verify((cert.der, INTER.der), now or time.time(), network=network)
    except Denied as exc:
        return exc.reason.code
    return "allowed"


def crl_key(url: str) -> str:
    return "crl:" + hashlib.sha256(url.encode()).hexdigest()


def test_a_second_replica_serves_from_the_first_ones_fetches_through_redis(server: RevocationServer,
                                                                           replica: Replica, prefix: str) -> None:
    crl_url, ocsp_url = server.url("/inter.crl"), server.url("/ocsp")
    by_crl = leaf(INTER, crl_urls=[crl_url], name="by-crl")
    revoked = leaf(INTER, crl_urls=[crl_url], name="revoked")
    by_ocsp = leaf(INTER, ocsp_urls=[ocsp_url], name="by-ocsp")
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [revoked])
    server.routes["/ocsp"] = lambda body: ocsp_response(by_ocsp, INTER)
    first = replica(RedisStore(REDIS_URL, prefix=prefix))
    second = replica(RedisStore(REDIS_URL, prefix=prefix))
    assert [reason(first, c) for c in (by_crl, revoked, by_ocsp)] == ["allowed", "cert_revoked", "allowed"]
    assert server.requests == {"/inter.crl": 1, "/ocsp": 1}
    assert [reason(second, c) for c in (by_crl, revoked, by_ocsp)] == ["allowed", "cert_revoked", "allowed"]
    assert server.requests == {"/inter.crl": 1, "/ocsp": 1}  # the second replica asked nobody
    assert second.revocation.stats.store_hits == {"crl": 1, "ocsp": 1}
    assert second.revocation.stats.fetches == {}
    assert 0 < RedisStore(REDIS_URL, prefix=prefix).ttl(crl_key(crl_url)) <= 86400  # kept until nextUpdate


def test_worker_processes_share_answers_through_the_sqlite_store(server: RevocationServer, replica: Replica,
                                                                 tmp_path: Path) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [cert])
    stores = [SqliteStore(tmp_path / "shared.db"), SqliteStore(tmp_path / "shared.db", create=False)]
    try:
        assert [reason(replica(store), cert) for store in stores] == ["cert_revoked", "cert_revoked"]
    finally:
        for store in stores:
            store.close()
    assert server.total() == 1


def test_the_store_is_trusted_no_more_than_the_network(server: RevocationServer, replica: Replica) -> None:
    crl_url, ocsp_url = server.url("/inter.crl"), server.url("/ocsp")
    good = leaf(INTER, crl_urls=[crl_url], name="good")
    revoked = leaf(INTER, ocsp_urls=[ocsp_url], name="revoked")
    server.routes["/inter.crl"] = lambda body: crl_der(INTER)
    server.routes["/ocsp"] = lambda body: ocsp_response(revoked, INTER, status="revoked")
    store = MemoryStore()
    first = replica(store)
    reason(first, good)
    reason(first, revoked)
    assert server.total() == 2
    # Someone with write access to the store swaps in answers signed by another key with the CA's name.
    impostor = make_ca("revocation test intermediate")
    store.put(crl_key(crl_url), crl_der(INTER, [good], signer=impostor), 3600)
    ocsp_keys = [k for k in store._values if k.startswith("ocsp:")]
    assert len(ocsp_keys) == 1
    store.put(ocsp_keys[0], ocsp_response(revoked, INTER, signer=impostor), 3600)
    second = replica(store)
    assert reason(second, good) == "allowed"  # the forged CRL revokes nothing
    assert reason(second, revoked) == "cert_revoked"  # the forged OCSP answer vouches for nobody
    assert second.revocation.stats.store_hits == {}
    assert server.total() == 4  # both were fetched again from the network


def test_a_stale_answer_in_the_store_is_fetched_again(server: RevocationServer, replica: Replica) -> None:
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url])
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [cert])
    store = MemoryStore()
    store.put(crl_key(crl_url), crl_der(INTER, last_update=datetime.now(UTC) - timedelta(days=3)), 3600)
    assert reason(replica(store), cert) == "cert_revoked"
    assert server.total() == 1


def test_a_store_that_does_not_answer_leaves_the_network(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [cert])
    v = replica(RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))
    assert reason(v, cert) == "cert_revoked"
    assert v.revocation.stats.failures == {("crl", "store"): 2}  # the read and the write


def test_the_refresher_renews_an_answer_before_its_next_update(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, this_update=start, lifetime=timedelta(hours=1))
    v = replica()
    now = start.timestamp() + 60
    assert reason(v, cert, now) == "allowed"
    assert v.revocation.refresh_due(now + 60) == 0  # not due yet
    renewed = start + timedelta(minutes=45)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, status="revoked", this_update=renewed,
                                                        lifetime=timedelta(hours=1))
    assert v.revocation.refresh_due(now + 50 * 60) == 1
    assert v.revocation.stats.refreshes == {"ocsp": 1}
    # The renewed answer revokes: the identity verified under the old one is forgotten at once.
    assert reason(v, cert, now + 50 * 60, network=False) == "cert_revoked"
    assert server.total() == 2


def test_the_refresher_leaves_answers_nobody_uses(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, lifetime=timedelta(hours=1))
    v = replica(recent_use=60.0)
    now = time.time()
    reason(v, cert, now)
    assert v.revocation.refresh_due(now + 55 * 60) == 0
    assert server.total() == 1


def test_a_renewed_crl_revoking_more_takes_effect_at_once(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, last_update=start, lifetime=timedelta(hours=1))
    v = replica()
    now = start.timestamp() + 60
    assert reason(v, cert, now) == "allowed"
    later = start + timedelta(minutes=50)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [cert], last_update=later, lifetime=timedelta(hours=1))
    assert v.revocation.refresh_due(later.timestamp()) == 1
    assert reason(v, cert, later.timestamp() + 1, network=False) == "cert_revoked"


def test_a_replica_refreshing_takes_a_newer_answer_another_put_in_the_store(server: RevocationServer,
                                                                            replica: Replica) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, last_update=start, lifetime=timedelta(hours=1))
    store = MemoryStore()
    first, second = replica(store), replica(store)
    now = start.timestamp() + 60
    reason(first, cert, now)
    reason(second, cert, now)
    assert server.total() == 1
    later = start + timedelta(minutes=50)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, last_update=later, lifetime=timedelta(hours=1))
    assert first.revocation.refresh_due(later.timestamp()) == 1
    assert second.revocation.refresh_due(later.timestamp()) == 1
    assert server.total() == 2  # the second replica renewed from the first one's fetch
    assert second.revocation.stats.store_hits == {"crl": 2}


def test_the_refresher_thread_starts_and_stops(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    # An answer that has lived most of its time is due at once (no retry delay here).
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=50)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, this_update=old, lifetime=timedelta(hours=1))
    v = replica(refresh_interval=0.05, refresh_retry=0.0)
    assert reason(v, cert) == "allowed"
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, lifetime=timedelta(hours=1))
    v.start()
    v.start()  # a second start is a no-op
    deadline = time.monotonic() + 10
    while v.revocation.stats.refreshes.get("ocsp", 0) < 1:
        assert time.monotonic() < deadline, "the refresher did not renew the answer"
        time.sleep(0.05)
    thread = v.revocation._thread
    assert thread is not None and thread.daemon
    v.stop()
    assert not thread.is_alive()
    seen = server.total()
    time.sleep(0.3)
    assert server.total() == seen  # stopped: it asks nobody any more


# -- end to end


def write_config(write_setup: SetupWriter, tmp_path: Path, bundle_extra: str) -> Path:
    path = write_setup()
    (tmp_path / "ca.pem").write_bytes(ROOT.pem)
    (tmp_path / "intermediates.pem").write_bytes(INTER.pem)
    path.write_text(path.read_text().replace('trust_domain = "example.org"',
                                             'trust_domain = "example.org"\n' + bundle_extra, 1))
    return path


@pytest.mark.parametrize("engine", ["regorus"])
def test_the_decision_carries_the_revocation_reasons(server: RevocationServer, write_setup: SetupWriter,
                                                     tmp_path: Path, issuer: TokenIssuer, engine: str) -> None:
    revoked = leaf(INTER, ocsp_urls=[server.url("/ocsp")], name="demo/client")
    unknown = leaf(INTER, crl_urls=[f"http://127.0.0.1:{free_port()}/inter.crl"], name="demo/client")
    good = leaf(INTER, crl_urls=[server.url("/inter.crl")], name="demo/client")
    server.routes["/ocsp"] = lambda body: ocsp_response(revoked, INTER, status="revoked")
    server.routes["/inter.crl"] = lambda body: crl_der(INTER)

    def decide(pdp: Pdp, cert: Issued) -> Decision:
        return pdp.decide(check_request(chain=(cert.der,), token=bound_token(issuer, cert)))

    hard = build_pdp(load_config(write_config(write_setup, tmp_path, 'revocation_timeout = 1.0')), probe=False)
    try:
        assert [(d.allowed, d.reason, d.status) for d in (decide(hard, c) for c in (revoked, unknown, good))] == [
            (False, "cert_revoked", 403), (False, "cert_revocation_unknown", 403), (True, "allowed", 200)]
    finally:
        hard.close()
    soft = build_pdp(load_config(write_config(write_setup, tmp_path, 'revocation = "soft"')), probe=False)
    try:
        assert [decide(soft, c).reason for c in (revoked, unknown)] == ["cert_revoked", "allowed"]
        assert soft.certificates.revocation.stats.soft_fail_allows == 1
    finally:
        soft.close()


def test_two_assembled_replicas_share_one_fetch_through_redis(server: RevocationServer,
                                                              write_setup: SetupWriter, tmp_path: Path,
                                                              issuer: TokenIssuer, prefix: str) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")], ocsp_urls=[server.url("/ocsp")], name="demo/client")
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, status="revoked")
    config = load_config(write_config(write_setup, tmp_path, ""))
    replicas = [build_pdp(config, probe=False, store=RedisStore(REDIS_URL, prefix=prefix)) for _ in range(2)]
    try:
        reasons = [p.decide(check_request(chain=(cert.der,), token=bound_token(issuer, cert))).reason
                   for p in replicas]
    finally:
        for p in replicas:
            p.close()
    assert reasons == ["cert_revoked", "cert_revoked"]
    assert server.requests == {"/ocsp": 1}


def test_the_service_fetches_off_the_event_loop_and_denies_a_revoked_certificate(server: RevocationServer,
                                                                                 write_setup: SetupWriter,
                                                                                 tmp_path: Path,
                                                                                 issuer: TokenIssuer) -> None:
    revoked = leaf(INTER, ocsp_urls=[server.url("/ocsp")], name="demo/client")
    server.routes["/ocsp"] = lambda body: ocsp_response(revoked, INTER, status="revoked")
    config = load_config(write_config(write_setup, tmp_path, ""))
    doc = {"method": "GET", "path": "/orders", "client_cert": (revoked.pem + INTER.pem).decode(),
           "headers": {"authorization": f"Bearer {bound_token(issuer, revoked)}"}}
    with serve_pdp(config) as (url, _):
        answer = httpx.post(f"{url}/v1/check", json=doc).json()
    assert (answer["allowed"], answer["reason"]) == (False, "cert_revoked")
    assert server.requests == {"/ocsp": 1}


@pytest.mark.parametrize(("line", "key"), [
    ('revocation = "sometimes"', "revocation"),
    ("revocation_timeout = 0", "revocation_timeout"),
    ("max_crl_bytes = 10", "max_crl_bytes"),
    ('ocsp = "yes"', "ocsp"),
])
def test_a_bad_revocation_setting_names_its_key(write_setup: SetupWriter, tmp_path: Path, line: str,
                                                key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(write_setup, tmp_path, line))
    assert err.value.key == f"certificates.trust_bundles[0].{key}"


def test_the_revocation_settings_reach_the_bundle(write_setup: SetupWriter, tmp_path: Path) -> None:
    text = ('revocation = "soft"\nocsp = false\ncrl_distribution_points = false\nrequire_revocation = true\n'
            "revocation_timeout = 0.5\nmax_crl_bytes = 65536")
    pdp = build_pdp(load_config(write_config(write_setup, tmp_path, text)), probe=False)
    try:
        assert pdp.certificates.bundles[0].revocation == RevocationPolicy(
            mode="soft", ocsp=False, crl_distribution_points=False, require=True, timeout=0.5, max_crl_bytes=65536)
    finally:
        pdp.close()


def test_only_an_answer_revoking_something_new_forgets_the_cached_identities(server: RevocationServer,
                                                                            replica: Replica) -> None:
    """Learning a revocation clears the verified identities (one of them may be the certificate revoked); a renewal
    that revokes nothing new leaves them, so renewals do not cost every client a fresh verification."""
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url])
    other = leaf(INTER, crl_urls=[crl_url], name="other")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [other], last_update=start, lifetime=timedelta(hours=1))
    v = replica()
    changes: list[float] = []
    v.revocation.on_change.append(lambda: changes.append(time.monotonic()))
    now = start.timestamp() + 60
    assert reason(v, cert, now) == "allowed"
    assert len(changes) == 1  # the first CRL held: ``other`` is news
    later = start + timedelta(minutes=50)
    server.routes["/inter.crl"] = lambda body: crl_der(INTER, [other], last_update=later, lifetime=timedelta(hours=1))
    assert v.revocation.refresh_due(later.timestamp()) == 1
    assert len(changes) == 1  # renewed, nothing new revoked
    assert reason(v, cert, later.timestamp(), network=False) == "allowed"


def test_the_refresher_leaves_a_source_a_request_is_fetching(server: RevocationServer, replica: Replica) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, this_update=start, lifetime=timedelta(hours=1))
    v = replica()
    now = start.timestamp() + 60
    assert reason(v, cert, now) == "allowed"
    (key,) = v.revocation._entries["ocsp"]
    v.revocation._inflight[key] = threading.Event()  # as a request does while it fetches
    assert v.revocation.refresh_due(now + 50 * 60) == 0
    assert server.total() == 1
    del v.revocation._inflight[key]
    assert v.revocation.refresh_due(now + 50 * 60) == 0  # asked now, but the responder has nothing newer
    assert server.total() == 2
