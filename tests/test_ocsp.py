"""OCSP (RFC 6960) against a real responder over HTTP: answers built with cryptography's OCSPResponseBuilder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp
from revocation_pki import (
    RevocationServer,
    leaf,
    ocsp_response,
    request_nonce,
    responder,
    small_pki,
    with_single_extension,
)
from servers import free_port

from pdp import reasons
from pdp.certificates.ocsp import build_request
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.revocation import RevocationPolicy
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.credentials.http_fetch import HttpFetch
from pdp.devpki import Issued, make_ca
from pdp.errors import Denied, NeedsNetwork

ROOT, INTER = small_pki()


@pytest.fixture
def server() -> Iterator[RevocationServer]:
    with RevocationServer() as s:
        yield s


Make = Callable[..., ChainVerifier]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[ChainVerifier] = []

    def build(mode: str = "hard", timeout: float = 2.0, **kw: object) -> ChainVerifier:
        policy = RevocationPolicy(mode=mode, timeout=timeout)
        verifier = ChainVerifier([TrustBundle("corp", (ROOT.cert,), revocation=policy)],
                                 revocation=OnlineRevocation(HttpFetch(timeout), **kw))  # type: ignore[arg-type]
        made.append(verifier)
        return verifier

    yield build
    for v in made:
        v.close()


def chain(cert: Issued) -> tuple[bytes, ...]:
    return (cert.der, INTER.der)


def reason(verifier: ChainVerifier, cert: Issued, now: float | None = None) -> str:
    try:
        verifier.verify(chain(cert), now or time.time())
    except Denied as exc:
        return exc.reason.code
    return "allowed"


def answering(cert: Issued, **kw: object) -> Callable[[bytes], bytes]:
    return lambda body: ocsp_response(cert, INTER, **kw)  # type: ignore[arg-type]


def test_a_good_answer_allows_and_is_asked_by_post_with_a_sha1_cert_id(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert)
    v = make()
    assert reason(v, cert) == "allowed"
    assert server.content_types == ["application/ocsp-request"]
    request = x509_ocsp.load_der_ocsp_request(server.bodies[0])
    assert request.serial_number == cert.cert.serial_number
    assert request.hash_algorithm.name == "sha1"


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_a_revoked_answer_is_cert_revoked_under_both_modes(server: RevocationServer, make: Make, mode: str) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert, status="revoked")
    assert reason(make(mode), cert) == "cert_revoked"


def test_an_answer_is_cached_in_process_until_next_update(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert, lifetime=timedelta(hours=1))
    v = make()
    now = time.time()
    assert reason(v, cert, now) == "allowed"
    v._cache.clear()  # the identity is forgotten; the OCSP answer is not
    assert reason(v, cert, now + 60) == "allowed"
    assert server.total() == 1
    # Past nextUpdate the cached answer no longer counts: asked again (and the responder's answer is stale now).
    assert reason(v, cert, now + 2 * 3600) == "cert_revocation_unknown"
    assert server.total() == 2


def test_a_cached_identity_is_not_kept_past_the_answers_next_update(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert, lifetime=timedelta(minutes=10))
    v = make()
    now = time.time()
    assert reason(v, cert, now) == "allowed"
    assert reason(v, cert, now + 60) == "allowed"  # from the identity cache
    assert server.total() == 1
    assert reason(v, cert, now + 3600) == "cert_revocation_unknown"  # not the cached identity


def failing(kind: str, server: RevocationServer) -> Issued:
    """A certificate whose responder fails as ``kind``."""
    if kind == "down":
        return leaf(INTER, ocsp_urls=[f"http://127.0.0.1:{free_port()}/ocsp"])
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    if kind == "garbage":
        server.routes["/ocsp"] = lambda body: b"\x30\x03\x0a\x01\x00 certainly not OCSP"
    elif kind == "wrong_key":
        impostor = make_ca("revocation test intermediate")  # the issuer's name, another key
        server.routes["/ocsp"] = answering(cert, signer=impostor)
    elif kind == "stale":
        old = datetime.now(UTC) - timedelta(hours=3)
        server.routes["/ocsp"] = answering(cert, this_update=old, lifetime=timedelta(hours=1))
    elif kind == "future":
        server.routes["/ocsp"] = answering(cert, this_update=datetime.now(UTC) + timedelta(hours=1))
    elif kind == "delegate_without_ocsp_signing":
        delegate = responder(INTER, ocsp_signing=False)
        server.routes["/ocsp"] = answering(cert, signer=delegate, include=[delegate])
    elif kind == "delegate_of_another_ca":
        delegate = responder(make_ca("some other CA"))
        server.routes["/ocsp"] = answering(cert, signer=delegate, include=[delegate])
    elif kind == "other_serial":
        other = leaf(INTER, name="someone-else")
        server.routes["/ocsp"] = lambda body: ocsp_response(other, INTER)
    elif kind == "unknown":
        server.routes["/ocsp"] = answering(cert, status="unknown")
    elif kind == "try_later":
        unsuccessful = x509_ocsp.OCSPResponseBuilder.build_unsuccessful(x509_ocsp.OCSPResponseStatus.TRY_LATER)
        server.routes["/ocsp"] = lambda body: unsuccessful.public_bytes(serialization.Encoding.DER)
    elif kind != "not_found":
        raise AssertionError(kind)
    return cert


#: Each way to fail, and the kind it is counted as.
FAILURES = {"down": "connect", "garbage": "malformed", "wrong_key": "signature", "stale": "stale", "future": "stale",
            "delegate_without_ocsp_signing": "signature", "delegate_of_another_ca": "signature",
            "other_serial": "mismatch", "unknown": "unknown_status", "try_later": "responder_error",
            "not_found": "status"}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failing_responder_is_cert_revocation_unknown_under_hard_fail(server: RevocationServer, make: Make,
                                                                        kind: str) -> None:
    cert = failing(kind, server)
    v = make("hard")
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.soft_fail_allows == 0
    assert v.revocation.stats.failures == {("ocsp", FAILURES[kind]): 1}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failing_responder_is_allowed_and_counted_under_soft_fail(server: RevocationServer, make: Make,
                                                                    kind: str) -> None:
    cert = failing(kind, server)
    v = make("soft")
    assert reason(v, cert) == "allowed"
    assert v.revocation.stats.soft_fail_allows == 1


def test_the_failure_kinds_are_counted_by_name(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert, status="unknown")
    v = make("soft")
    reason(v, cert)
    down = leaf(INTER, ocsp_urls=[f"http://127.0.0.1:{free_port()}/ocsp"])
    reason(v, down)
    assert v.revocation.stats.snapshot()["failures"] == {("ocsp", "unknown_status"): 1, ("ocsp", "connect"): 1}


def test_a_delegated_responder_with_ocsp_signing_may_answer(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    delegate = responder(INTER)
    server.routes["/ocsp"] = answering(cert, status="revoked", signer=delegate, include=[delegate], by_key=True)
    assert reason(make(), cert) == "cert_revoked"


def test_a_slow_responder_does_not_hold_the_decision_past_the_timeout(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert)
    server.delay = 30.0
    v = make("hard", timeout=0.5)
    started = time.monotonic()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert time.monotonic() - started < 10.0  # the responder would have taken 30 s
    assert v.revocation.stats.failures == {("ocsp", "timeout"): 1}


def test_a_failed_responder_is_not_asked_again_at_once_but_soon(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    v = make("soft", retry_after=2.0)
    assert reason(v, cert) == "allowed"  # 404: soft-failed
    assert server.total() == 1
    assert reason(v, cert) == "allowed"  # the identity is kept briefly, the responder not asked
    v._cache.clear()
    assert reason(v, cert) == "allowed"
    assert server.total() == 1  # failed recently: not asked again yet
    server.routes["/ocsp"] = answering(cert, status="revoked")
    deadline = time.monotonic() + 10
    while reason(v, cert) != "cert_revoked":  # the responder recovered: its answer is taken within moments
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_nonce_sent_must_come_back_unchanged(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, nonce=request_nonce(body))
    assert reason(make(send_nonce=True), cert) == "allowed"
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER, nonce=b"0123456789abcdef")
    assert reason(make(send_nonce=True), cert) == "cert_revocation_unknown"
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, INTER)  # a pre-signed answer leaves it out
    assert reason(make(send_nonce=True), cert) == "allowed"


def test_without_network_a_fetch_is_needs_network_and_a_cached_answer_is_not(server: RevocationServer,
                                                                             make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert)
    v = make()
    with pytest.raises(NeedsNetwork):
        v.verify(chain(cert), time.time(), network=False)
    assert server.total() == 0
    v.verify(chain(cert), time.time())
    v._cache.clear()
    assert v.verify(chain(cert), time.time(), network=False).spiffe_id == "spiffe://example.org/client"
    assert server.total() == 1


def test_an_untrusted_chain_never_makes_a_request(server: RevocationServer, make: Make) -> None:
    stranger_root = make_ca("stranger root")
    stranger = make_ca("stranger intermediate", issuer=stranger_root, path_length=0)
    cert = leaf(stranger, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: ocsp_response(cert, stranger)
    v = make()
    with pytest.raises(Denied) as err:
        v.verify((cert.der, stranger.der), time.time())
    assert err.value.reason is reasons.CERT_UNTRUSTED
    assert server.total() == 0


def test_ocsp_switched_off_asks_nobody(server: RevocationServer) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    policy = RevocationPolicy(ocsp=False)
    v = ChainVerifier([TrustBundle("corp", (ROOT.cert,), revocation=policy)],
                      revocation=OnlineRevocation(HttpFetch(1.0)))
    assert v.verify(chain(cert), time.time()).spiffe_id == "spiffe://example.org/client"
    assert server.total() == 0
    v.close()


def test_the_request_names_the_certificate_by_serial_and_issuer_hashes() -> None:
    cert = leaf(INTER, ocsp_urls=["http://ocsp.example/"])
    request = x509_ocsp.load_der_ocsp_request(build_request(cert.cert, INTER.cert, b"n" * 16))
    assert request.serial_number == cert.cert.serial_number
    expected = x509_ocsp.OCSPRequestBuilder().add_certificate(cert.cert, INTER.cert, request.hash_algorithm).build()
    assert (request.issuer_name_hash, request.issuer_key_hash) == (expected.issuer_name_hash,
                                                                    expected.issuer_key_hash)
    assert request_nonce(build_request(cert.cert, INTER.cert, b"n" * 16)) == b"n" * 16


# -- extensions, holds, stale revocations


#: An extension no implementation knows.
UNKNOWN_OID = "1.3.6.1.4.1.55555.7.2"


@pytest.mark.parametrize(("oid", "value", "critical", "expected"), [
    (UNKNOWN_OID, b"\x05\x00", True, "cert_revocation_unknown"),
    (UNKNOWN_OID, b"\x05\x00", False, "allowed"),
    ("2.5.29.21", b"\x0a\x01\x01", True, "allowed"),  # reasonCode (§4.4.5), understood: not in the way
])
def test_a_critical_single_extension_not_understood_makes_the_answer_unusable(
        server: RevocationServer, make: Make, oid: str, value: bytes, critical: bool, expected: str) -> None:
    """RFC 6960 §4.4: singleExtensions too; ``cryptography`` does not show them once there are several single
    responses, so they are read from the signed bytes."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = lambda body: with_single_extension(ocsp_response(cert, INTER), INTER, oid, value,
                                                                critical=critical)
    v = make()
    assert reason(v, cert) == expected
    if expected != "allowed":
        assert v.revocation.stats.failures == {("ocsp", "unsupported"): 1}


def test_a_current_hold_revokes_and_an_expired_one_leaves_the_status_unknown(server: RevocationServer,
                                                                              make: Make) -> None:
    """certificateHold is a suspension the CA may lift: revoked while the answer is current, no more than unknown
    once it is stale (unlike a revocation, which stays)."""
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    server.routes["/ocsp"] = answering(cert, status="revoked", reason=x509.ReasonFlags.certificate_hold)
    v = make("soft")
    now = time.time()
    assert reason(v, cert, now) == "cert_revoked"
    server.routes.clear()  # the responder now fails (404)
    assert reason(v, cert, now + 2 * 3600) == "allowed"  # soft: the hold is no longer known to hold
    assert v.revocation.stats.soft_fail_allows == 1


def test_an_expired_revocation_held_in_process_still_revokes(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    server.routes["/ocsp"] = answering(cert, status="revoked", reason=x509.ReasonFlags.key_compromise,
                                       this_update=start)
    v = make("soft")
    now = time.time()
    assert reason(v, cert, now) == "cert_revoked"
    # An older good answer that is still current two hours on (a lagging responder node): no rollback.
    server.routes["/ocsp"] = answering(cert, this_update=start - timedelta(minutes=10), lifetime=timedelta(days=1))
    assert reason(v, cert, now + 2 * 3600) == "cert_revoked"


def test_a_revoked_answer_already_past_its_next_update_still_revokes(server: RevocationServer, make: Make) -> None:
    cert = leaf(INTER, ocsp_urls=[server.url("/ocsp")])
    old = datetime.now(UTC) - timedelta(hours=3)
    server.routes["/ocsp"] = answering(cert, status="revoked", this_update=old, lifetime=timedelta(hours=1))
    v = make("soft")
    assert reason(v, cert) == "cert_revoked"
    assert reason(v, cert) == "cert_revoked"  # held in process, the responder not asked again
    assert server.total() == 1


def test_a_responder_url_with_userinfo_is_never_asked(server: RevocationServer, make: Make) -> None:
    url = server.url("/ocsp").replace("http://", "http://pdp:secret@")
    cert = leaf(INTER, ocsp_urls=[url])
    server.routes["/ocsp"] = answering(cert)
    v = make()
    assert reason(v, cert) == "cert_revocation_unknown"
    assert v.revocation.stats.failures == {("ocsp", "unsupported"): 1}
    assert server.total() == 0
