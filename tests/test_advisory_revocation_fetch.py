"""Network revocation checking attacked the way a hostile or broken responder, CA mirror, network or store would.

Each test is named after the attack it guards against. Responders and CRL
servers are real HTTP servers on loopback ports (``revocation_pki``), or raw
sockets where a server must misbehave below HTTP (trickling, redirecting,
compressing). Where ``cryptography``'s builders refuse to make an answer a
broken responder would send (several SingleResponses, a CRL without
``nextUpdate``), the DER is edited and signed again with the CA's real key.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from revocation_pki import RevocationServer, crl_der, intermediate, leaf, ocsp_response, responder, small_pki
from revocation_pki import der_elements as _elements
from revocation_pki import der_encode as _encode
from revocation_pki import der_sign as _sign
from revocation_pki import der_value as _value

from pdp.certificates.crl_distribution import distribution_point_urls
from pdp.certificates.ocsp import ocsp_urls
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.revocation import RevocationPolicy
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.credentials.http_fetch import FetchError, HttpFetch
from pdp.devpki import Issued, make_ca, new_key
from pdp.errors import Denied, NeedsNetwork
from pdp.store import MemoryStore, RedisStore, Store

ROOT, INTER = small_pki()

#: An extension no implementation knows; marked critical it forbids using what carries it.
UNKNOWN_OID = ObjectIdentifier("1.3.6.1.4.1.55555.7.1")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def server() -> Iterator[RevocationServer]:
    with RevocationServer() as s:
        yield s


Make = Callable[..., ChainVerifier]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[ChainVerifier] = []

    def build(mode: str = "hard", timeout: float = 2.0, *, store: Store | None = None,
              policy: RevocationPolicy | None = None, trust_domain: str | None = None,
              crls: tuple[x509.CertificateRevocationList, ...] = (), **kw: object) -> ChainVerifier:
        policy = policy or RevocationPolicy(mode=mode, timeout=timeout)
        verifier = ChainVerifier([TrustBundle("corp", (ROOT.cert,), trust_domain=trust_domain, crls=crls,
                                              revocation=policy)],
                                 revocation=OnlineRevocation(HttpFetch(timeout), store, **kw))  # type: ignore[arg-type]
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


def crl_key(url: str) -> str:
    return "crl:" + hashlib.sha256(url.encode()).hexdigest()


# -- DER surgery: what a broken responder or CA sends and the builders refuse to make


def undated_crl(ca: Issued, revoked: list[Issued], last_update: datetime) -> bytes:
    """A CRL of ``ca`` without ``nextUpdate`` (RFC 5280 §5.1.2.5 lets a non-conforming CA leave it out)."""
    tbs, algorithm, _ = _elements(_value(crl_der(ca, revoked, last_update=last_update)))
    fields = _elements(_value(tbs))
    assert fields[4][0] in (0x17, 0x18)  # version, signature, issuer, thisUpdate, nextUpdate
    new_tbs = _encode(0x30, b"".join(fields[:4] + fields[5:]))
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    der = _encode(0x30, new_tbs + algorithm + _sign(ca.key, new_tbs))
    assert x509.load_der_x509_crl(der).next_update_utc is None
    return der


def ocsp_with_singles(answers: list[bytes], signer: Issued) -> bytes:
    """One OCSP response holding the SingleResponses of every one of ``answers`` (all signed by ``signer``, whose
    responderID they share), in that order, signed again by ``signer``."""
    def parts(der: bytes) -> tuple[bytes, bytes, list[bytes], list[bytes]]:
        status, response_bytes = _elements(_value(der))
        response_type, basic = _elements(_value(_value(response_bytes)))
        tbs, *rest = _elements(_value(_value(basic)))
        return status, response_type, _elements(_value(tbs)), rest

    status, response_type, fields, rest = parts(answers[0])
    at = next(i for i, f in enumerate(fields) if f[0] == 0x30)  # responses: the one SEQUENCE of ResponseData
    singles = b"".join(s for a in answers for s in _elements(_value(parts(a)[2][at])))
    tbs = _encode(0x30, b"".join([*fields[:at], _encode(0x30, singles), *fields[at + 1:]]))
    assert isinstance(signer.key, ec.EllipticCurvePrivateKey)
    basic = _encode(0x30, tbs + rest[0] + _sign(signer.key, tbs) + b"".join(rest[2:]))
    der = _encode(0x30, status + _encode(0xA0, _encode(0x30, response_type + _encode(0x04, basic))))
    assert len(list(x509_ocsp.load_der_ocsp_response(der).responses)) == len(answers)
    return der


def ocsp_raw(cert: x509.Certificate, issuer: x509.Certificate, signer: Issued, *, status: str = "good",
             algorithm: hashes.HashAlgorithm | None = None, this_update: datetime | None = None,
             lifetime: timedelta | None = timedelta(hours=1), responder_cert: x509.Certificate | None = None,
             include: tuple[x509.Certificate, ...] = (), critical: bool = False) -> bytes:
    """An OCSP response with every field chosen: the certID's issuer and hash, the responderID, a critical
    extension nobody knows."""
    start = this_update or _now() - timedelta(minutes=1)
    builder = x509_ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=issuer, algorithm=algorithm or hashes.SHA1(),
        cert_status=x509_ocsp.OCSPCertStatus.REVOKED if status == "revoked" else x509_ocsp.OCSPCertStatus.GOOD,
        this_update=start, next_update=start + lifetime if lifetime is not None else None,
        revocation_time=start if status == "revoked" else None, revocation_reason=None,
    ).responder_id(x509_ocsp.OCSPResponderEncoding.NAME, responder_cert or signer.cert)
    if include:
        builder = builder.certificates(list(include))
    if critical:
        builder = builder.add_extension(x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00"), critical=True)
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def delegate(ca: Issued, not_before: datetime, not_after: datetime, name: str = "ocsp responder") -> Issued:
    """A delegated responder certificate of ``ca`` (EKU id-kp-OCSPSigning) valid only in the given window."""
    key = new_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(cert, key)


# -- OCSP: who may answer


@pytest.mark.parametrize("window", ["expired", "not_yet_valid"])
def test_ocsp_delegated_responder_outside_its_validity_is_refused(server: RevocationServer, make: Make,
                                                                  window: str) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    now = _now()
    if window == "expired":
        signer = delegate(INTER, now - timedelta(days=10), now - timedelta(days=1))
    else:
        signer = delegate(INTER, now + timedelta(days=1), now + timedelta(days=10))
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, signer=signer, include=[signer])
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "signature"): 1}


@pytest.mark.parametrize("sibling_name", ["sibling intermediate", "revocation test intermediate"])
def test_ocsp_delegated_responder_of_a_sibling_intermediate_is_refused(server: RevocationServer, make: Make,
                                                                       sibling_name: str) -> None:
    """A responder certified (with id-kp-OCSPSigning) by another CA under the same root, even one that bears the
    issuing CA's very name, may not answer for the issuing CA's certificates."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    sibling = make_ca(sibling_name, issuer=ROOT, path_length=0)
    signer = responder(sibling)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, signer=signer, include=[signer])
    assert reason(make(), cert) == "cert_revocation_unknown"


def test_ocsp_responder_id_naming_the_ca_but_signed_by_a_delegate_is_refused(server: RevocationServer,
                                                                             make: Make) -> None:
    """responderID must name the key that signed (§4.2.2.3): a delegate may not hide behind the CA's name."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    signer = responder(INTER)
    server.routes["/ocsp"] = lambda body: ocsp_raw(cert.cert, INTER.cert, signer, responder_cert=INTER.cert,
                                                    include=(signer.cert,))
    assert reason(make(), cert) == "cert_revocation_unknown"


# -- OCSP: what the answer is about


def test_ocsp_good_for_another_serial_and_revoked_for_ours_is_revoked(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    other = leaf(INTER, name="other")
    server.routes["/ocsp"] = lambda body: ocsp_with_singles(
        [ocsp_response(other, INTER), ocsp_response(cert, INTER, status="revoked")], INTER)
    assert reason(make(), cert) == "cert_revoked"


def test_ocsp_only_good_for_other_serials_is_not_good(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    others = [leaf(INTER, name=f"other{i}") for i in range(2)]
    server.routes["/ocsp"] = lambda body: ocsp_with_singles([ocsp_response(o, INTER) for o in others], INTER)
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "mismatch"): 1}


def test_ocsp_good_and_revoked_for_ours_in_one_response_is_not_good(server: RevocationServer, make: Make) -> None:
    """A responder contradicting itself about one certificate, in one signed response, has not said it is good."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_with_singles(
        [ocsp_response(cert, INTER), ocsp_response(cert, INTER, status="revoked")], INTER)
    assert reason(make(), cert) in ("cert_revoked", "cert_revocation_unknown")


def test_ocsp_good_and_unknown_for_ours_in_one_response_is_unknown(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_with_singles(
        [ocsp_response(cert, INTER), ocsp_response(cert, INTER, status="unknown")], INTER)
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "unknown_status"): 1}


def test_ocsp_cert_id_hashed_with_sha256_is_matched(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_raw(cert.cert, INTER.cert, INTER, status="revoked",
                                                    algorithm=hashes.SHA256())
    assert reason(make(), cert) == "cert_revoked"


def test_ocsp_right_serial_but_issuer_key_hash_of_another_key_with_the_same_name_is_not_ours(server: RevocationServer,
                                                                                             make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    namesake = make_ca("revocation test intermediate")  # INTER's name, another key
    assert namesake.cert.subject == INTER.cert.subject
    server.routes["/ocsp"] = lambda body: ocsp_raw(cert.cert, namesake.cert, INTER)
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "mismatch"): 1}


def test_ocsp_response_with_an_unknown_critical_extension_is_not_used(server: RevocationServer, make: Make) -> None:
    """RFC 6960 §4.4: unrecognized extensions are ignored *unless* critical; one that is cannot be ignored."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_raw(cert.cert, INTER.cert, INTER, critical=True)
    assert reason(make(), cert) == "cert_revocation_unknown"


# -- OCSP: freshness and replay


def test_ocsp_undated_good_answer_signed_long_ago_is_not_good(server: RevocationServer, make: Make) -> None:
    """An answer without nextUpdate is good only at the moment it was made (§4.2.2.1). Replayed a month later —
    by a man in the middle of the plain-HTTP exchange, after the certificate was revoked — it vouches for
    nothing."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    month_ago = _now() - timedelta(days=30)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, this_update=month_ago, lifetime=None)
    assert reason(make(), cert) == "cert_revocation_unknown"


def test_ocsp_undated_good_answer_signed_long_ago_is_not_taken_from_the_store(server: RevocationServer,
                                                                              make: Make) -> None:
    """The same replay through the shared store: whoever can write it (or a replica that once fetched it) keeps
    handing out a month-old undated ``good`` while the responder says ``revoked``."""
    url = server.url("/ocsp")
    cert = leaf(INTER, ocsp_urls=[url])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, status="revoked")
    store = MemoryStore()
    key = "ocsp:" + hashlib.sha256(b"\0".join((url.encode(), hashlib.sha256(INTER.der).digest(),
                                                str(cert.cert.serial_number).encode()))).hexdigest()
    store.put(key, ocsp_response(cert, INTER, this_update=_now() - timedelta(days=30), lifetime=None), 3600)
    v = make(store=store)
    assert reason(v, cert) == "cert_revoked"
    assert v.revocation.stats.store_hits == {}


def test_ocsp_undated_answer_is_kept_only_briefly(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    now = time.time()
    clock = [now]  # the responder signs (a minute late) at the time the test says it is
    server.routes["/ocsp"] = lambda body: ocsp_response(
        cert, INTER, this_update=datetime.fromtimestamp(clock[0] - 60, UTC), lifetime=None)
    v = make(undated_ttl=30.0)
    assert reason(v, cert, now) == "allowed"
    assert reason(v, cert, now + 10) == "allowed"
    assert server.total() == 1
    clock[0] = now + 600
    assert reason(v, cert, now + 600) == "allowed"  # neither the identity nor the answer was kept that long
    assert server.total() == 2


# -- CRL: what may be used


def test_crl_with_an_unknown_critical_extension_is_not_used(server: RevocationServer, make: Make) -> None:
    """RFC 5280 §5.2: a CRL with a critical extension the application cannot process MUST NOT be used."""
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER, extensions=[x509.UnrecognizedExtension(UNKNOWN_OID,
                                                                                               b"\x05\x00")]))
    assert reason(make(), cert) == "cert_revocation_unknown"


def test_crl_with_an_unknown_critical_entry_extension_is_not_used(server: RevocationServer, make: Make) -> None:
    """RFC 5280 §5.3: a critical CRL entry extension the application cannot process forbids using the CRL for
    *any* certificate."""
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    start = _now() - timedelta(minutes=1)
    entry = (x509.RevokedCertificateBuilder().serial_number(cert.cert.serial_number + 1).revocation_date(start)
             .add_extension(x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00"), critical=True).build())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(INTER.cert.subject).last_update(start)
           .next_update(start + timedelta(days=1)).add_revoked_certificate(entry).sign(INTER.key, hashes.SHA256()))
    server.routes["/inter.crl"] = serving(crl.public_bytes(serialization.Encoding.DER))
    assert reason(make(), cert) == "cert_revocation_unknown"


def test_crl_without_next_update_signed_long_ago_is_not_used(server: RevocationServer, make: Make) -> None:
    """A CRL without nextUpdate replayed (from a stale mirror, or by a man in the middle) long after it was made,
    from before the certificate was revoked, must not vouch for it."""
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(undated_crl(INTER, [], _now() - timedelta(days=30)))
    assert reason(make(), cert) == "cert_revocation_unknown"


def test_crl_of_another_issuer_listing_our_serial_does_not_revoke(server: RevocationServer, make: Make) -> None:
    """The root's CRL lists a serial equal to the leaf's: it speaks of the root's certificates, not the leaf."""
    inter = intermediate(ROOT, crl_urls=[server.url("/root.crl")], name="serial clash intermediate")
    cert = leaf(inter, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(inter))
    server.routes["/root.crl"] = serving(crl_der(ROOT, [cert]))  # cert's serial, in the root's CRL
    assert reason(make(), cert, inter=inter) == "allowed"


def test_crl_of_the_intermediate_served_for_the_root_is_not_used(server: RevocationServer, make: Make) -> None:
    """The intermediate's distribution point serves the intermediate's own CRL (leaf-level) instead of the
    root's: it cannot vouch for the intermediate."""
    inter = intermediate(ROOT, crl_urls=[server.url("/inter.crl")], name="confused intermediate")
    cert = leaf(inter, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(inter))
    v = make()
    assert reason(v, cert, inter=inter) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("crl", "mismatch"): 1}


# -- the shared store: trusted no more than the network


def test_store_value_over_the_size_limit_is_not_used(server: RevocationServer, make: Make) -> None:
    """``max_crl_bytes`` bounds what a CRL may cost; a value in the store (another replica with a larger limit,
    or anyone with write access) must be held to it as much as the network's answer."""
    url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[url])
    big = crl_der(INTER, [leaf(INTER, name=f"n{i}") for i in range(100)])
    assert len(big) > 2048
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    store = MemoryStore()
    store.put(crl_key(url), big, 3600)
    v = make(store=store, policy=RevocationPolicy(max_crl_bytes=2048))
    assert reason(v, cert) == "allowed"
    assert v.revocation.stats.store_hits == {}
    assert server.total() == 1


@pytest.mark.parametrize("value", ["garbage", "foreign", "huge_garbage"])
def test_store_value_garbage_or_foreign_falls_back_to_the_network(server: RevocationServer, make: Make,
                                                                  value: str) -> None:
    url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[url])
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
    store = MemoryStore()
    store.put(crl_key(url), {"garbage": b"\x30\x82\xff\xff nonsense", "foreign": crl_der(ROOT),
                             "huge_garbage": b"\x30" * (8 * 1024 * 1024)}[value], 3600)
    v = make(store=store)
    assert reason(v, cert) == "cert_revoked"
    assert v.revocation.stats.store_hits == {}
    assert server.total() == 1


# -- what a known revocation is worth


def test_a_revocation_learned_on_the_request_path_ends_a_cached_identity(server: RevocationServer, make: Make) -> None:
    """The process comes to hold a fresh CRL listing a certificate whose identity it verified earlier (by OCSP):
    the certificate is revoked now, as it would be without the identity cache, not an hour later."""
    crl_url = server.url("/inter.crl")
    cert = leaf(INTER, crl_urls=[crl_url], ocsp_urls=[server.url("/ocsp")], name="cached")
    other = leaf(INTER, crl_urls=[crl_url], name="other")
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)
    v = make()
    now = time.time()
    assert reason(v, cert, now) == "allowed"  # by OCSP; the CRL was not needed
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
    assert reason(v, other, now + 5) == "allowed"  # fetches the CRL, which lists ``cert``
    assert reason(v, cert, now + 10) == "cert_revoked"


def test_a_source_never_asked_is_not_marked_failed(server: RevocationServer, make: Make) -> None:
    """A slow OCSP responder spends the chain's budget, so the CRL distribution point is not asked: that must not
    count as the distribution point failing, or the next request (the responder now skipped for ``retry_after``)
    skips it too, and under soft fail a certificate its CRL revokes is allowed again and again."""
    with RevocationServer() as slow:
        cert = leaf(INTER, ocsp_urls=[slow.url("/ocsp")], crl_urls=[server.url("/inter.crl")])
        slow.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)
        slow.delay = 30.0
        server.routes["/inter.crl"] = serving(crl_der(INTER, [cert]))
        v = make("soft", timeout=0.5, retry_after=30.0)
        assert reason(v, cert) == "allowed"  # soft: the responder timed out, nothing else was asked
        v._cache.clear()  # the soft-failed identity is kept ``retry_after``: look again as a new request would
        assert reason(v, cert) == "cert_revoked"  # the responder is skipped now: the CRL is asked, and revokes
        assert server.total() == 1


def test_a_stale_crl_file_listing_the_certificate_still_revokes_it_under_soft_fail(make: Make) -> None:
    """A CRL past its nextUpdate cannot vouch that a certificate is *not* revoked, but a serial it lists was
    revoked by the CA (RFC 5280 §3.3: a revoked certificate stays revoked). When the CA's CRL publishing stalls,
    ``revocation = "soft"`` must not let every certificate the last CRL revoked back in."""
    cert = leaf(INTER)
    stale = x509.load_der_x509_crl(crl_der(INTER, [cert], last_update=_now() - timedelta(days=3)))
    v = make(crls=(stale,), policy=RevocationPolicy(mode="soft"))
    assert reason(v, cert) == "cert_revoked"


def test_an_expired_revoked_answer_still_revokes_under_soft_fail(server: RevocationServer, make: Make) -> None:
    """The same for a fetched CRL: once its nextUpdate passes and its server is down (or blocked by whoever wants
    the certificate back), the revocation it carried must not turn into a soft-failed allow."""
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.routes["/inter.crl"] = serving(crl_der(INTER, [cert], lifetime=timedelta(hours=1)))
    v = make("soft")
    now = time.time()
    assert reason(v, cert, now) == "cert_revoked"
    server.routes.clear()  # the distribution point now fails (404)
    assert reason(v, cert, now + 2 * 3600) == "cert_revoked"


def test_a_known_revocation_survives_a_failing_responder_in_hard_mode(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, status="revoked")
    v = make("hard", retry_after=0.0)
    assert reason(v, cert) == "cert_revoked"
    server.routes.clear()  # the responder now fails (404)
    for _ in range(3):
        assert reason(v, cert) == "cert_revoked"


def test_concurrent_requests_sharing_a_failing_fetch_are_all_refused_in_hard_mode(server: RevocationServer,
                                                                                  make: Make) -> None:
    cert = leaf(INTER, crl_urls=[server.url("/inter.crl")])
    server.delay = 0.3  # then 404
    v = make("hard", timeout=5.0)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda _: reason(v, cert), range(6)))
    assert outcomes == ["cert_revocation_unknown"] * 6
    assert server.total() == 1


def test_the_refresher_does_not_overwrite_a_newer_revoked_answer_with_an_older_good_one(server: RevocationServer,
                                                                                        make: Make) -> None:
    """A slow renewal started before the answer expired returns an older ``good`` after a request fetched a newer
    ``revoked``: the newer answer must stay."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    start = _now() - timedelta(minutes=1)
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, this_update=start, lifetime=timedelta(hours=1))
    v = make("hard", timeout=5.0)
    assert reason(v, cert, start.timestamp() + 60) == "allowed"
    gate = threading.Event()
    calls = itertools.count()

    def lagging(body: bytes) -> bytes:
        if next(calls) == 0:  # the refresher's request: a lagging node, answering late with an older answer
            gate.wait(10)
            return ocsp_response(cert, INTER, this_update=start + timedelta(minutes=50), lifetime=timedelta(hours=1))
        return ocsp_response(cert, INTER, status="revoked", this_update=start + timedelta(minutes=60),
                             lifetime=timedelta(hours=1))

    server.routes["/ocsp"] = lagging
    later = start.timestamp() + 65 * 60  # the first answer has expired
    refresher = threading.Thread(target=v.revocation.refresh_due, args=(later,))
    refresher.start()
    deadline = time.monotonic() + 10
    while server.total() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert reason(v, cert, later) == "cert_revoked"  # fetched on the request path while the renewal waits
    gate.set()
    refresher.join(10)
    assert reason(v, cert, later + 1) == "cert_revoked"


# -- where requests go


def test_non_http_revocation_urls_are_never_fetched(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=["file:///etc/passwd", "ftp://127.0.0.1/ocsp", "gopher://127.0.0.1:6379/_FLUSHALL"],
                crl_urls=["file:///etc/shadow", "ldaps://ldap.example.org/cn=ca"])
    assert ocsp_urls(cert.cert) == () and distribution_point_urls(cert.cert) == ()
    assert reason(make(), cert) == "allowed"


@pytest.mark.parametrize("why", ["expired", "other_trust_domain"])
def test_a_chain_that_does_not_verify_never_makes_a_request(server: RevocationServer, make: Make, why: str) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")], crl_urls=[server.url("/inter.crl")])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)
    server.routes["/inter.crl"] = serving(crl_der(INTER))
    if why == "expired":
        v, now = make(), cert.cert.not_valid_after_utc.timestamp() + 60
    else:
        v, now = make(trust_domain="elsewhere.org"), time.time()
    assert reason(v, cert, now) in ("cert_expired", "cert_untrusted")
    assert server.total() == 0


# -- HTTP: a hostile server


class RawServer:
    """A loopback TCP server that answers every connection with ``script(conn, stop)``, each in its own thread."""

    def __init__(self, script: Callable[[socket.socket, threading.Event], None]) -> None:
        self.script = script
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/ocsp"
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2.0)
            try:
                conn.recv(65536)
                self.script(conn, self.stop)
            except OSError:
                pass

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def drip(data: bytes, interval: float, limit: float) -> Callable[[socket.socket, threading.Event], None]:
    """Send ``data`` one byte at a time, each well within a read timeout, for at most ``limit`` seconds."""
    def script(conn: socket.socket, stop: threading.Event) -> None:
        ends = time.monotonic() + limit
        for byte in data:
            if stop.wait(interval) or time.monotonic() > ends:
                return
            conn.sendall(bytes([byte]))
    return script


def test_http_slowloris_headers_do_not_hold_past_the_timeout(make: Make) -> None:
    """Headers trickled a byte at a time, each byte within the per-read timeout: the whole fetch must still end
    at the revocation timeout, not when the server tires."""
    head = b"HTTP/1.1 200 OK\r\n" + b"x-slow: " + b"a" * 4000 + b"\r\ncontent-length: 0\r\n\r\n"
    with RawServer(drip(head, 0.05, 6.0)) as raw:
        cert = leaf(INTER, ocsp_urls=[raw.url])
        v = make("hard", timeout=0.5)
        started = time.monotonic()
        assert reason(v, cert) == "cert_revocation_unknown"
        assert time.monotonic() - started < 3.0  # the server trickles for 6 s


def test_http_slowloris_body_does_not_hold_past_the_timeout(make: Make) -> None:
    body = b"\x30" * 4000
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        drip(body, 0.05, 6.0)(conn, stop)

    with RawServer(script) as raw:
        cert = leaf(INTER, ocsp_urls=[raw.url])
        v = make("hard", timeout=0.5)
        started = time.monotonic()
        assert reason(v, cert) == "cert_revocation_unknown"
        assert time.monotonic() - started < 3.0
        assert v.revocation.stats.failures == {("ocsp", "timeout"): 1}


def test_ocsp_huge_response_is_refused_without_reading_it_all(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER) + b"\0" * (8 * 1024 * 1024)
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "too_large"): 1}


def test_without_network_a_store_that_hangs_is_not_touched_on_the_event_loop(server: RevocationServer,
                                                                             make: Make) -> None:
    """``verify(network=False)`` runs on the event loop: an answer not held in process is ``NeedsNetwork`` at
    once, before any store read (a Redis that accepts and never answers would hold the loop)."""
    def hang(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait(10)

    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    with RawServer(hang) as redis_like:
        port = redis_like.sock.getsockname()[1]
        v = make(store=RedisStore(f"redis://127.0.0.1:{port}/0", timeout=5.0))
        started = time.monotonic()
        with pytest.raises(NeedsNetwork):
            v.verify((cert.der, INTER.der), time.time(), network=False)
        assert time.monotonic() - started < 1.0
        assert redis_like.connections == 0
    assert server.total() == 0


def test_http_redirect_to_another_host_is_not_followed(server: RevocationServer, make: Make) -> None:
    target = server.url("/ocsp")

    def redirect(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: %s\r\ncontent-length: 0\r\n\r\n" % target.encode())

    with RawServer(redirect) as raw:
        cert = leaf(INTER, ocsp_urls=[raw.url])
        server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)
        v = make()
        assert reason(v, cert) == "cert_revocation_unknown"
        assert v.revocation.stats.failures == {("ocsp", "status"): 1}
        assert server.total() == 0


def test_http_compressed_answer_cannot_expand_far_past_the_size_limit() -> None:
    """A responder answering ``content-encoding: gzip`` (which the client invites) with 128 KiB that inflate to
    128 MiB: the size limit must bound the memory spent, not only what is returned."""
    compressed = gzip.compress(b"\0" * (128 * 1024 * 1024), compresslevel=9)
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(compressed)

    def bomb(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head + compressed)

    with RawServer(bomb) as raw:
        fetch = HttpFetch(2.0)
        tracemalloc.start()
        try:
            with pytest.raises(FetchError):
                fetch.post(raw.url, b"", content_type="application/ocsp-request", accept="application/ocsp-response",
                           timeout=2.0, max_bytes=64 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            fetch.close()
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held for a 64 KiB limit"
