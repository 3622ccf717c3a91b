"""CRLs fetched from the distribution points certificates name (RFC 5280 §4.2.1.13), from a real HTTP server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from revocation_pki import (
    RevocationServer,
    crl_der,
    der_elements,
    der_encode,
    der_sign,
    der_value,
    intermediate,
    leaf,
    ocsp_response,
    small_pki,
)
from servers import free_port

from pdp.certificates.crl_distribution import distribution_point_urls
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.revocation import RevocationPolicy, load_crls
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.credentials.http_fetch import HttpFetch
from pdp.devpki import Issued, make_ca
from pdp.errors import Denied, LoadError, NeedsNetwork

ROOT, INTER = small_pki()

Make = Callable[..., ChainVerifier]


@pytest.fixture
def server() -> Iterator[RevocationServer]:
    with RevocationServer() as s:
        yield s


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[ChainVerifier] = []

    def build(mode: str = "hard", timeout: float = 2.0, *, crls: tuple[x509.CertificateRevocationList, ...] = (),
              policy: RevocationPolicy | None = None, **kw: object) -> ChainVerifier:
        policy = policy or RevocationPolicy(mode=mode, timeout=timeout)
        verifier = ChainVerifier([TrustBundle("corp", (ROOT.cert,), crls=crls, revocation=policy)],
                                 revocation=OnlineRevocation(HttpFetch(timeout), **kw))  # type: ignore[arg-type]
        made.append(verifier)
        return verifier

    yield build
    for v in made:
        v.close()


def reason(verifier: ChainVerifier, cert: Issued, now: float | None = None, inter: Issued = INTER) -> str:
    try:
        verifier.verify((cert.der, inter.der), now or time.time())
    except Denied as exc:
        return exc.reason.code
    return "allowed"


def serving(data: bytes) -> Callable[[bytes], bytes]:
    return lambda body: data


def undated_crl(ca: Issued, revoked: list[Issued], last_update: datetime) -> bytes:
    """A CRL of ``ca`` without ``nextUpdate`` (RFC 5280 §5.1.2.5 lets a non-conforming CA leave it out)."""
    tbs, algorithm, _ = der_elements(der_value(crl_der(ca, revoked, last_update=last_update)))
    fields = der_elements(der_value(tbs))
    new_tbs = der_encode(0x30, b"".join(fields[:4] + fields[5:]))  # without nextUpdate, the fifth
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    der = der_encode(0x30, new_tbs + algorithm + der_sign(ca.key, new_tbs))
    assert x509.load_der_x509_crl(der).next_update_utc is None
    return der


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_a_leaf_listed_in_its_distribution_points_crl_is_cert_revoked(server: RevocationServer, make: Make,
                                                                      mode: str) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
    assert reason(make(mode), cert) == "cert_revoked"


def test_one_fetch_of_a_crl_serves_every_certificate_of_its_issuer(server: RevocationServer, make: Make) -> None:
    url = server.url("/inter.crl")
    revoked, good, other = (leaf(INTER, crl_urls=[url], name=n) for n in ("gone", "good", "other"))
    server.routes["/inter.crl"] = serving(crl_der(INTER, [revoked]))
    v = make()
    assert [reason(v, c) for c in (good, revoked, other)] == ["allowed", "cert_revoked", "allowed"]
    assert server.requests == {"/inter.crl": 1}


def test_a_revoked_intermediate_is_found_in_the_roots_crl(server: RevocationServer, make: Make) -> None:
    inter = intermediate(ROOT, crl_urls=[server.url("/root.crl")], name="listed intermediate")
    cert = leaf(inter, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(inter))
    server.routes["/root.crl"] = serving(crl_der(ROOT, [inter]))
    assert reason(make(), cert, inter=inter) == "cert_revoked"
    server.routes["/root.crl"] = serving(crl_der(ROOT))
    assert reason(make(), cert, inter=inter) == "allowed"


def failing(kind: str, server: RevocationServer) -> Issued:
    """A certificate whose distribution point fails as ``kind``."""
    if kind == "down":
        return leaf(INTER, crl_urls=[f"http://127.0.0.1:{free_port()}/inter.crl"])
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    long_ago = datetime.now(UTC) - timedelta(days=3)
    data = {
        "garbage": b"-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
        "wrong_key": crl_der(INTER, signer=make_ca("revocation test intermediate")),  # the name, another key
        "another_issuers": crl_der(ROOT),
        "stale": crl_der(INTER, last_update=long_ago, lifetime=timedelta(days=1)),
        "future": crl_der(INTER, last_update=datetime.now(UTC) + timedelta(hours=2)),
        "delta": crl_der(INTER, extensions=[x509.DeltaCRLIndicator(1)]),
        "partitioned": crl_der(INTER, extensions=[x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(server.url("/inter.crl"))], relative_name=None,
            only_contains_user_certs=True, only_contains_ca_certs=False, only_some_reasons=None,
            indirect_crl=False, only_contains_attribute_certs=False)]),
        "too_large": crl_der(INTER, [leaf(INTER, name=f"n{i}") for i in range(100)]),
    }.get(kind)
    assert kind != "too_large" or len(data or b"") > 2048
    if data is not None:
        server.routes["/inter.crl"] = serving(data)
    elif kind != "not_found":
        raise AssertionError(kind)
    return cert


#: Each way to fail, and the kind it is counted as.
FAILURES = {"down": "connect", "garbage": "malformed", "wrong_key": "signature", "another_issuers": "mismatch",
            "stale": "stale", "future": "stale", "delta": "unsupported", "partitioned": "unsupported",
            "too_large": "too_large", "not_found": "status"}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failing_distribution_point_is_cert_revocation_unknown_under_hard_fail(server: RevocationServer,
                                                                                 make: Make, kind: str) -> None:
    cert = failing(kind, server)
    v = make(policy=RevocationPolicy(max_crl_bytes=2048))
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("crl", FAILURES[kind]): 1}
    assert v.revocation.stats.soft_fail_allows == 0


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failing_distribution_point_is_allowed_and_counted_under_soft_fail(server: RevocationServer,
                                                                             make: Make, kind: str) -> None:
    cert = failing(kind, server)
    v = make(policy=RevocationPolicy(mode="soft", max_crl_bytes=2048))
    assert reason(v, cert) == "allowed"
    assert v.revocation.stats.soft_fail_allows == 1


def test_a_slow_crl_server_does_not_hold_the_decision_past_the_timeout(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    server.delay = 30.0
    v = make("hard", timeout=0.5)
    started = time.monotonic()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert time.monotonic() - started < 10.0  # the server would have taken 30 s
    assert v.revocation.stats.failures == {("crl", "timeout"): 1}


def test_the_timeout_bounds_the_whole_chain_not_each_fetch(server: RevocationServer, make: Make) -> None:
    inter = intermediate(ROOT, crl_urls=[server.url("/root.crl")], name="slow intermediate")
    cert = leaf(inter, crl_urls=[server.url("/inter.crl")], ocsp_urls=[server.url("/ocsp")])
    server.delay = 30.0
    v = make("hard", timeout=1.0)
    started = time.monotonic()
    assert reason(v, cert, inter=inter) == "cert_revocation_unknown"
    # Three URLs, one budget: the first fetch spends it and the others are not even sent.
    assert time.monotonic() - started < 10.0
    assert server.total() == 1


def test_ldap_and_other_schemes_are_ignored(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ldap=True)
    assert distribution_point_urls(cert.cert) == ()
    assert reason(make(), cert) == "allowed"
    assert reason(make(policy=RevocationPolicy(require=True)), cert) == "cert_revocation_unknown"
    assert server.total() == 0


def test_distribution_points_switched_off_fetch_nothing(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
    assert reason(make(policy=RevocationPolicy(crl_distribution_points=False)), cert) == "allowed"
    assert server.total() == 0


def test_without_network_a_fetch_is_needs_network_and_a_cached_crl_is_not(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    v = make()
    with pytest.raises(NeedsNetwork):
        v.verify((cert.der, INTER.der), time.time(), network=False)
    assert server.total() == 0
    assert reason(v, cert) == "allowed"
    other = leaf(INTER, crl_urls=[server.url("/inter.crl")], name="other")
    assert v.verify((other.der, INTER.der), time.time(), network=False).spiffe_id == "spiffe://example.org/other"


def test_a_recent_failure_is_answered_without_network(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[f"http://127.0.0.1:{free_port()}/inter.crl"])
    v = make("hard")
    assert reason(v, cert) == "cert_revocation_unknown"
    with pytest.raises(Denied):  # not NeedsNetwork: the source failed moments ago, a thread would not help
        v.verify((cert.der, INTER.der), time.time(), network=False)


def test_a_cached_identity_is_not_kept_past_the_crls_next_update(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER, lifetime=timedelta(hours=1)))
    v = make()
    now = time.time()
    assert reason(v, cert, now) == "allowed"
    assert reason(v, cert, now + 2 * 3600) == "cert_revocation_unknown"  # the server's CRL is stale by then
    assert server.total() == 2


def test_ocsp_is_asked_first_and_a_crl_when_it_fails(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")], ocsp_urls=[f"http://127.0.0.1:{free_port()}/"])
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    v = make()
    assert reason(v, cert) == "allowed"
    assert v.revocation.stats.fetches == {"ocsp": 1, "crl": 1}
    answered = leaf(INTER, crl_urls=[server.url("/inter.crl")], ocsp_urls=[server.url("/ocsp")], name="answered")
    server.routes["/ocsp"] = lambda body: ocsp_response(answered, INTER)
    assert reason(make(), answered) == "allowed"
    assert server.requests == {"/inter.crl": 1, "/ocsp": 1}  # the first fresh answer ends the search


def test_a_revocation_held_in_memory_wins_over_a_good_answer(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")], ocsp_urls=[server.url("/ocsp")])
    other = leaf(INTER, crl_urls=[server.url("/inter.crl")], name="other")
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)  # the responder says good
    v = make()
    assert reason(v, other) == "allowed"  # the CRL, listing ``cert``, is now held
    assert reason(v, cert) == "cert_revoked"
    assert "/ocsp" not in server.requests


def test_a_fresh_crl_file_needs_no_fetch_and_a_stale_one_falls_back_to_the_network(server: RevocationServer,
                                                                                   make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    fresh = x509.load_der_x509_crl(crl_der(INTER))
    assert reason(make(crls=(fresh,)), cert) == "allowed"
    assert server.total() == 0
    stale = x509.load_der_x509_crl(crl_der(INTER, last_update=datetime.now(UTC) - timedelta(days=3)))
    assert reason(make(crls=(stale,)), cert) == "allowed"
    assert server.total() == 1
    server.routes.clear()
    assert reason(make(crls=(stale,)), cert) == "cert_revocation_unknown"


def test_the_number_of_crls_held_is_bounded(server: RevocationServer, make: Make) -> None:
    certs = []
    for i in range(3):
        server.routes[f"/{i}.crl"] = serving(crl_der(INTER))
        certs.append(leaf(INTER, crl_urls=[server.url(f"/{i}.crl")], name=f"c{i}"))
    v = make(crl_cache_size=2)
    for cert in certs:
        assert reason(v, cert) == "allowed"
    v._cache.clear()
    assert reason(v, certs[2]) == "allowed"
    assert reason(v, certs[0]) == "allowed"  # the least recently used was dropped: fetched again
    assert server.requests == {"/0.crl": 2, "/1.crl": 1, "/2.crl": 1}


def test_concurrent_requests_for_one_crl_share_one_fetch(server: RevocationServer, make: Make) -> None:
    url = server.url("/inter.crl")
    certs = [leaf(INTER, crl_urls=[url], name=f"c{i}") for i in range(8)]
    server.routes["/inter.crl"] = serving(crl_der(INTER, [certs[0]]))
    server.delay = 0.3
    v = make("hard", timeout=5.0)
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(lambda c: reason(v, c), certs))
    assert reasons == ["cert_revoked"] + ["allowed"] * 7
    assert server.requests == {"/inter.crl": 1}


# -- extensions, holds, stale lists, rollback


UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.7.3")


def test_a_crl_file_with_a_critical_extension_that_cannot_be_processed_is_refused_at_load(tmp_path: Path) -> None:
    """RFC 5280 §5.2 for CRL files as for fetched CRLs: refused where the operator sees it, at load."""
    path = tmp_path / "inter.crl"
    path.write_bytes(crl_der(INTER, extensions=[x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00")]))
    with pytest.raises(LoadError) as err:
        load_crls([path], [ROOT.cert, INTER.cert], "certificates.trust_bundles[0].crls")
    assert "1.3.6.1.4.1.55555.7.3" in str(err.value)


def test_a_crl_whose_entry_names_a_certificate_issuer_is_not_used(server: RevocationServer, make: Make) -> None:
    """An indirect CRL's entries may speak of another CA's certificates: refused, not read as the issuer's."""
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    start = datetime.now(UTC) - timedelta(minutes=1)
    entry = (x509.RevokedCertificateBuilder().serial_number(cert.cert.serial_number + 1).revocation_date(start)
             .add_extension(x509.CertificateIssuer([x509.DNSName("other.example")]), critical=True).build())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(INTER.cert.subject).last_update(start)
           .next_update(start + timedelta(days=1)).add_revoked_certificate(entry).sign(INTER.key, hashes.SHA256()))
    server.routes["/inter.crl"] = serving(crl.public_bytes(serialization.Encoding.DER))
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("crl", "unsupported"): 1}


@pytest.mark.parametrize(("hold", "expected"), [(False, "cert_revoked"), (True, "allowed")])
def test_a_stale_crl_file_revokes_what_it_lists_except_a_hold(make: Make, hold: bool, expected: str) -> None:
    cert = leaf(INTER)
    stale = x509.load_der_x509_crl(crl_der(INTER, [cert], last_update=datetime.now(UTC) - timedelta(days=3),
                                           reason=x509.ReasonFlags.certificate_hold if hold else None))
    v = make(crls=(stale,), policy=RevocationPolicy(mode="soft"))
    assert reason(v, cert) == expected  # soft: a stale hold is an unknown status, allowed
    current = x509.load_der_x509_crl(crl_der(INTER, [cert], reason=x509.ReasonFlags.certificate_hold))
    assert reason(make(crls=(current,), policy=RevocationPolicy(mode="soft")), cert) == "cert_revoked"


def test_a_crl_fetched_already_stale_still_revokes_what_it_lists(server: RevocationServer, make: Make) -> None:
    """The CA's publishing stalled and its distribution point serves the last CRL: it vouches for nobody, but the
    certificates it revokes stay revoked, also under soft fail."""
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url])
    other = leaf(INTER, crl_urls=[crl_url], name="other")
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert], last_update=datetime.now(UTC) - timedelta(days=3)))
    v = make("soft")
    assert reason(v, cert) == "cert_revoked"
    assert reason(v, other) == "allowed"  # soft: unknown
    assert v.revocation.stats.failures == {("crl", "stale"): 1}
    assert server.total() == 1  # the stale CRL is held, and its source not asked again at once


def test_an_older_crl_cannot_roll_back_a_revocation(server: RevocationServer, make: Make) -> None:
    """After the CRL revoking ``cert`` expires, a mirror serves an older CRL (still current: it was issued with a
    longer life) that does not list it: it is refused for every certificate, and ``cert`` stays revoked."""
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url])
    other = leaf(INTER, crl_urls=[crl_url], name="other")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert], last_update=start, lifetime=timedelta(hours=1)))
    v = make("hard")
    now = time.time()
    assert reason(v, cert, now) == "cert_revoked"
    server.routes["/inter.crl"] = serving(crl_der(INTER, last_update=start - timedelta(hours=1),
                                                  lifetime=timedelta(days=2)))
    later = now + 2 * 3600
    assert reason(v, other, later) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("crl", "stale"): 1}
    assert reason(v, cert, later) == "cert_revoked"


def test_an_undated_crl_is_used_only_briefly(server: RevocationServer, make: Make) -> None:
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url])
    now = time.time()
    clock = [now]  # the CA signs (a minute late) at the time the test says it is
    server.routes["/inter.crl"] = lambda body: undated_crl(INTER, [], datetime.fromtimestamp(clock[0] - 60, UTC))
    v = make(undated_ttl=30.0)
    assert reason(v, cert, now) == "allowed"
    assert reason(v, cert, now + 10) == "allowed"
    assert server.total() == 1
    clock[0] = now + 600
    assert reason(v, cert, now + 600) == "allowed"
    assert server.total() == 2
    server.routes["/inter.crl"] = lambda body: undated_crl(INTER, [], datetime.fromtimestamp(now, UTC))
    assert reason(v, cert, now + 1200) == "cert_revocation_unknown"  # 20 minutes old: replayed
