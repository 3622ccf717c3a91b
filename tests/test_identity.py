"""pdp.certificates.identity.extract_identity: what a client certificate says about its holder."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import urllib.parse
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdp import reasons
from pdp.certificates.identity import CertIdentity, extract_identity
from pdp.devpki import Issued, make_ca, make_client
from pdp.errors import Denied

NOT_BEFORE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
NOT_AFTER = datetime(2031, 6, 7, 8, 9, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("identity CA")


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def build(ca: Issued, *, key=None, subject: x509.Name | None = None, sans: list[x509.GeneralName] | None = None,
          serial: int = 0x1F2E3D4C5B6A, not_before: datetime = NOT_BEFORE, not_after: datetime = NOT_AFTER
          ) -> tuple[x509.Certificate, bytes]:
    """A client certificate signed by ``ca``; ``sans=None`` leaves the SAN extension out."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return cert, cert.public_bytes(serialization.Encoding.DER)


def identity_of(cert: x509.Certificate, der: bytes, ca: Issued, bundle: str = "test-bundle") -> CertIdentity:
    return extract_identity(cert, der, [cert, ca.cert], bundle)


def independent_thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


# -- thumbprint

def test_thumbprint_is_base64url_sha256_of_der_without_padding(ca):
    cert, der = build(ca, sans=[x509.UniformResourceIdentifier("spiffe://example.org/a")])
    ident = identity_of(cert, der, ca)
    assert ident.thumbprint == independent_thumbprint(der)
    assert len(ident.thumbprint) == 43
    assert "=" not in ident.thumbprint and "+" not in ident.thumbprint and "/" not in ident.thumbprint
    assert base64.urlsafe_b64decode(ident.thumbprint + "=") == hashlib.sha256(der).digest()
    assert ident.policy_view["thumbprint"] == ident.thumbprint


def test_thumbprint_differs_per_certificate(ca):
    a, a_der = build(ca, serial=1)
    b, b_der = build(ca, serial=2)
    assert identity_of(a, a_der, ca).thumbprint != identity_of(b, b_der, ca).thumbprint


def test_thumbprint_of_devpki_client_matches(ca):
    leaf = make_client(ca)
    ident = identity_of(leaf.cert, leaf.der, ca)
    assert ident.thumbprint == independent_thumbprint(leaf.der) == leaf.thumbprint


# -- subject, issuer, serial, validity

@pytest.fixture(scope="module")
def rich(ca) -> tuple[x509.Certificate, bytes, CertIdentity]:
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme, Inc."),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "platform"),
        x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
    ])
    sans: list[x509.GeneralName] = [
        x509.DNSName("api.example.org"),
        x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/alice"),
        x509.RFC822Name("alice@example.org"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.DNSName("alice.example.org"),
        x509.UniformResourceIdentifier("https://example.org/alice"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.RFC822Name("ops@example.org"),
    ]
    cert, der = build(ca, subject=subject, sans=sans, serial=0x00ABCDEF0123456789)
    return cert, der, identity_of(cert, der, ca, "corp-bundle")


def test_subject_rfc4514_string(rich):
    _, _, ident = rich
    # RFC 4514 §2.1: RDNs in reverse order; §2.4: a "," in a value is escaped.
    assert ident.subject == r"CN=alice,OU=platform,OU=payments,O=Acme\, Inc.,C=DE"
    assert ident.policy_view["subject"]["dn"] == ident.subject


def test_subject_per_attribute_lists(rich):
    _, _, ident = rich
    subj = ident.policy_view["subject"]
    assert subj["CN"] == ["alice"]
    assert subj["O"] == ["Acme, Inc."]
    assert subj["OU"] == ["payments", "platform"]  # both values, in certificate order
    assert subj["C"] == ["DE"]
    assert set(subj) == {"dn", "CN", "O", "OU", "C"}


def test_unknown_attribute_is_keyed_by_dotted_oid(ca):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob"), x509.NameAttribute(NameOID.USER_ID, "b42")])
    cert, der = build(ca, subject=subject)
    subj = identity_of(cert, der, ca).policy_view["subject"]
    assert subj[NameOID.USER_ID.dotted_string] == ["b42"]
    assert subj["CN"] == ["bob"]


def test_issuer(rich, ca):
    _, _, ident = rich
    assert ident.issuer == "CN=identity CA,O=pdp dev"
    assert ident.issuer == ca.cert.subject.rfc4514_string()
    assert ident.policy_view["issuer"] == {"dn": ident.issuer, "O": ["pdp dev"], "CN": ["identity CA"]}


def test_serial_is_lower_case_hex_without_leading_zeros(rich):
    _, _, ident = rich
    assert ident.serial == "abcdef0123456789"
    assert int(ident.serial, 16) == 0xABCDEF0123456789
    assert ident.policy_view["serial"] == ident.serial


def test_serial_of_random_serial(ca):
    serial = x509.random_serial_number()
    cert, der = build(ca, serial=serial)
    ident = identity_of(cert, der, ca)
    assert ident.serial == format(serial, "x")
    assert ident.serial == ident.serial.lower()


def test_validity(rich):
    _, _, ident = rich
    assert ident.not_before == NOT_BEFORE.timestamp() == 1893553445.0
    assert ident.not_after == NOT_AFTER.timestamp()
    assert ident.policy_view["not_before"] == int(NOT_BEFORE.timestamp())
    assert ident.policy_view["not_after"] == int(NOT_AFTER.timestamp())


# -- SANs

def test_sans_by_type_in_order(rich):
    _, _, ident = rich
    assert ident.dns == ("api.example.org", "alice.example.org")
    assert ident.uris == ("spiffe://example.org/ns/prod/sa/alice", "https://example.org/alice")
    assert ident.emails == ("alice@example.org", "ops@example.org")
    assert ident.ips == ("192.0.2.7", "2001:db8::1")
    assert ident.policy_view["sans"] == {
        "dns": ["api.example.org", "alice.example.org"],
        "uri": ["spiffe://example.org/ns/prod/sa/alice", "https://example.org/alice"],
        "email": ["alice@example.org", "ops@example.org"],
        "ip": ["192.0.2.7", "2001:db8::1"],
    }


def test_spiffe_id_and_trust_domain(rich):
    _, _, ident = rich
    assert ident.spiffe_id == "spiffe://example.org/ns/prod/sa/alice"
    assert ident.trust_domain == "example.org"
    assert ident.policy_view["spiffe_id"] == ident.spiffe_id
    assert ident.policy_view["trust_domain"] == "example.org"


def test_trust_bundle_and_chain_in_view(rich, ca):
    cert, _, ident = rich
    assert ident.trust_bundle == "corp-bundle"
    assert ident.policy_view["trust_bundle"] == "corp-bundle"
    assert ident.policy_view["chain"] == [cert.subject.rfc4514_string(), ca.cert.subject.rfc4514_string()]
    assert ident.policy_view["present"] is True


def test_spiffe_id_among_other_uris(ca):
    cert, der = build(ca, sans=[x509.UniformResourceIdentifier("https://a.example"),
                                x509.UniformResourceIdentifier("spiffe://td.example/x"),
                                x509.UniformResourceIdentifier("urn:uuid:123")])
    ident = identity_of(cert, der, ca)
    assert (ident.spiffe_id, ident.trust_domain) == ("spiffe://td.example/x", "td.example")


def test_two_spiffe_uri_sans_are_refused(ca):
    cert, der = build(ca, sans=[x509.UniformResourceIdentifier("spiffe://example.org/a"),
                                x509.UniformResourceIdentifier("spiffe://example.org/b")])
    with pytest.raises(Denied) as err:
        identity_of(cert, der, ca)
    assert err.value.reason is reasons.CERT_SPIFFE_INVALID
    assert err.value.reason.code == "cert_spiffe_invalid"


def test_the_same_spiffe_id_twice_is_refused(ca):
    cert, der = build(ca, sans=[x509.UniformResourceIdentifier("spiffe://example.org/a"),
                                x509.UniformResourceIdentifier("spiffe://example.org/a")])
    with pytest.raises(Denied) as err:
        identity_of(cert, der, ca)
    assert err.value.reason is reasons.CERT_SPIFFE_INVALID


@pytest.mark.parametrize("uri", [
    "spiffe://Example.org/a",        # upper-case trust domain
    "spiffe://example.org:443/a",    # port
    "spiffe://example.org/a/",       # trailing slash
    "spiffe://example.org/a?b=c",    # query
    "spiffe://example.org/a/../b",   # dot-dot segment
    "spiffe://example.org/a%2Fb",    # percent-encoding
    "SPIFFE://example.org/a",        # upper-case scheme: looks like SPIFFE, is not valid
    "spiffe://",                     # no trust domain
])
def test_malformed_spiffe_uri_san_is_refused(ca, uri):
    cert, der = build(ca, sans=[x509.UniformResourceIdentifier(uri)])
    with pytest.raises(Denied) as err:
        identity_of(cert, der, ca)
    assert err.value.reason is reasons.CERT_SPIFFE_INVALID


def test_no_san_at_all_is_fine(ca):
    cert, der = build(ca, sans=None)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ident = identity_of(cert, der, ca)
    assert ident.spiffe_id is None
    assert ident.trust_domain is None
    assert ident.dns == ident.uris == ident.emails == ident.ips == ()
    assert ident.subject == "CN=leaf"
    assert ident.policy_view["sans"] == {"dns": [], "uri": [], "email": [], "ip": []}
    assert ident.policy_view["spiffe_id"] is None


def test_san_without_spiffe_uri(ca):
    cert, der = build(ca, sans=[x509.DNSName("svc.example.org"), x509.UniformResourceIdentifier("https://x.example")])
    ident = identity_of(cert, der, ca)
    assert ident.spiffe_id is None and ident.trust_domain is None
    assert ident.dns == ("svc.example.org",)


# -- key type and size

@pytest.mark.parametrize(("name", "key_type", "key_size"), [
    ("p256", "EC secp256r1", 256),
    ("p384", "EC secp384r1", 384),
    ("rsa2048", "RSA", 2048),
    ("ed25519", "Ed25519", 256),
])
def test_key_type_and_size(ca, keys, name, key_type, key_size):
    cert, der = build(ca, key=keys[name])
    ident = identity_of(cert, der, ca)
    assert (ident.key_type, ident.key_size) == (key_type, key_size)
    assert ident.policy_view["key"] == {"type": key_type, "size": key_size}


# -- url-encoded PEM (Envoy's attributes.source.certificate)

def test_url_encoded_pem_decodes_to_the_leaf_pem(rich):
    cert, der, ident = rich
    encoded = ident.url_encoded_pem
    assert "\n" not in encoded and " " not in encoded and "/" not in encoded and "+" not in encoded
    pem = urllib.parse.unquote(encoded)
    assert pem == cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER) == der


def test_url_encoded_pem_of_devpki_client(ca):
    leaf = make_client(ca)
    ident = identity_of(leaf.cert, leaf.der, ca)
    assert urllib.parse.unquote(ident.url_encoded_pem) == leaf.pem.decode()


def test_devpki_client_identity(ca):
    leaf = make_client(ca, spiffe_id="spiffe://example.org/demo/client", organizational_unit="team-a",
                       dns=("c.example.org",), emails=("c@example.org",),
                       not_before=datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    ident = identity_of(leaf.cert, leaf.der, ca)
    assert ident.subject == "CN=demo client,OU=team-a,O=pdp dev"
    assert ident.spiffe_id == "spiffe://example.org/demo/client"
    assert ident.dns == ("c.example.org",)
    assert ident.emails == ("c@example.org",)
    assert ident.uris == ("spiffe://example.org/demo/client",)
    assert ident.not_after - ident.not_before == 365 * 86400
