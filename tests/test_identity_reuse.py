"""pdp.certificates.identity and trust: what is kept between verifications (names by their DER, the CA
certificates' subjects, one verifier per bundle and second) changes no identity and no verdict."""

from __future__ import annotations

import time
import urllib.parse
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pdp import reasons
from pdp.certificates import identity
from pdp.certificates.identity import CertIdentity, extract_identity
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.devpki import Issued, make_ca, make_client
from pdp.errors import Denied


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca("reuse root")


def leaf_with_subject(ca: Issued, subject: x509.Name,
                      key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
                      ) -> tuple[x509.Certificate, bytes]:
    now = datetime.now(UTC).replace(microsecond=0)
    private = key or ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .sign(ca.key, hashes.SHA256()))
    return cert, cert.public_bytes(serialization.Encoding.DER)


def name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def test_names_read_from_the_der_are_the_certificates_own(root: Issued) -> None:
    long_subject = name((NameOID.ORGANIZATION_NAME, "o" * 60), (NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60),
                        (NameOID.COMMON_NAME, "c" * 60))  # over 127 bytes: a long-form DER length
    rsa_key = rsa.generate_private_key(65537, 2048)
    certs = [root.cert, make_client(root).cert, leaf_with_subject(root, long_subject)[0],
             leaf_with_subject(root, x509.Name([]), rsa_key)[0]]
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        assert identity._raw_names(der) == (cert.issuer.public_bytes(), cert.subject.public_bytes())


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x31\x00", b"\x30\x03\x02\x01\x00", b"\x30\x82\x10\x00\x30"])
def test_der_that_is_not_laid_out_as_a_certificate_has_no_raw_names(der: bytes) -> None:
    assert identity._raw_names(der) is None


def test_two_subjects_stay_two_identities_and_one_subject_reads_the_same(root: Issued) -> None:
    alice = name((NameOID.ORGANIZATION_NAME, "pdp dev"), (NameOID.COMMON_NAME, "alice"))
    bob = name((NameOID.ORGANIZATION_NAME, "pdp dev"), (NameOID.COMMON_NAME, "bob"))
    seen = []
    for subject in (alice, bob, alice, bob):
        cert, der = leaf_with_subject(root, subject)
        ident = extract_identity(cert, der, [cert, root.cert], "b")
        assert ident.subject == subject.rfc4514_string() and ident.issuer == root.cert.subject.rfc4514_string()
        assert ident.policy_view["subject"] == {"dn": subject.rfc4514_string(), "O": ["pdp dev"],
                                                "CN": [subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value]}
        assert ident.policy_view["chain"] == [subject.rfc4514_string(), root.cert.subject.rfc4514_string()]
        seen.append(ident.subject)
    assert seen[0] == seen[2] != seen[1] == seen[3]


def test_a_policy_view_changed_by_its_reader_does_not_reach_the_next_identity(root: Issued) -> None:
    subject = name((NameOID.COMMON_NAME, "shared"))
    cert, der = leaf_with_subject(root, subject)
    first = extract_identity(cert, der, [cert, root.cert], "b")
    first.policy_view["subject"]["CN"].append("intruder")
    first.policy_view["issuer"]["O"].append("intruder")
    cert2, der2 = leaf_with_subject(root, subject)
    second = extract_identity(cert2, der2, [cert2, root.cert], "b")
    assert second.policy_view["subject"]["CN"] == ["shared"]
    assert second.policy_view["issuer"]["O"] == ["pdp dev"]


def test_the_view_and_the_pem_are_built_once_and_are_exact(root: Issued) -> None:
    client = make_client(root)
    ident = extract_identity(client.cert, client.der, [client.cert, root.cert], "b")
    assert ident.policy_view is ident.policy_view
    assert ident.url_encoded_pem is ident.url_encoded_pem
    pem = client.cert.public_bytes(serialization.Encoding.PEM).decode()
    assert ident.url_encoded_pem == urllib.parse.quote(pem, safe="")


def test_an_identity_made_from_its_fields_has_an_empty_view() -> None:
    ident = CertIdentity(thumbprint="t", subject="CN=x", issuer="CN=y", serial="1", not_before=0.0,
                         not_after=1.0, spiffe_id=None, trust_domain=None, trust_bundle="b", dns=(), uris=(),
                         emails=(), ips=(), key_type="EC secp256r1", key_size=256)
    assert ident.policy_view == {} and ident.url_encoded_pem == ""


def test_the_name_table_stays_bounded(root: Issued) -> None:
    for n in range(1030):
        identity._dn(name((NameOID.COMMON_NAME, f"flood {n}")))
    assert len(identity._NAMES) <= 1024


# -- one verifier per bundle and second

def test_one_second_one_verdict_as_a_fresh_verifier_gives(root: Issued) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    inter = make_ca("reuse short intermediate", issuer=root, path_length=0, not_before=start, days=1)
    end = inter.cert.not_valid_after_utc.timestamp()
    verifier = ChainVerifier([TrustBundle(name="r", roots=(root.cert,))], max_cache_seconds=0.0)
    for moment in (end - 1.0, end - 0.5, end, end + 0.25, end + 0.75, end + 1.0, end + 0.5):
        leaf = make_client(inter, not_before=start, days=30)  # a new leaf each time: nothing cached
        fresh = PolicyBuilder().store(Store([root.cert])).time(datetime.fromtimestamp(moment, UTC)) \
            .build_client_verifier()
        try:
            fresh.verify(leaf.cert, [inter.cert])
            expected = None
        except VerificationError:
            expected = reasons.CERT_UNTRUSTED
        try:
            verifier.verify((leaf.der, inter.der), moment)
            got = None
        except Denied as denied:
            got = denied.reason
        assert got is expected, moment


def test_bundles_and_depths_do_not_share_a_verifier(root: Issued) -> None:
    other = make_ca("reuse other root")
    inter = make_ca("reuse intermediate", issuer=root, path_length=0)
    shared = TrustBundle(name="r", roots=(root.cert,))
    now = time.time()
    both = ChainVerifier([TrustBundle(name="o", roots=(other.cert,)), shared])
    assert both.verify((make_client(other).der,), now).trust_bundle == "o"
    assert both.verify((make_client(root).der,), now).trust_bundle == "r"
    shallow, deep = ChainVerifier([shared], max_chain_depth=0), ChainVerifier([shared], max_chain_depth=4)
    for _ in range(2):
        with pytest.raises(Denied) as info:
            shallow.verify((make_client(inter).der, inter.der), now)
        assert info.value.reason is reasons.CERT_UNTRUSTED
        assert deep.verify((make_client(inter).der, inter.der), now).trust_bundle == "r"
