"""pdp.certificates.trust: client certificate chains verified against trust bundles, with a cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pdp import reasons
from pdp.certificates.identity import CertIdentity
from pdp.certificates.trust import ChainVerifier, TrustBundle, load_bundle
from pdp.devpki import Issued, make_ca, make_client
from pdp.errors import Denied, LoadError
from pdp.reasons import Reason

DAY = 86400.0


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Pki:
    root: Issued
    inter: Issued            # path_length=0
    leaf: Issued             # spiffe://example.org/svc/a, via inter
    evil_leaf: Issued        # spiffe://evil.example/svc/x, same CA
    plain_leaf: Issued       # no SPIFFE ID, no SAN at all
    other_root: Issued
    other_inter: Issued
    other_leaf: Issued       # spiffe://other.example/svc/b, via other_inter

    def chain(self, leaf: Issued | None = None) -> tuple[bytes, ...]:
        return ((leaf or self.leaf).der, self.inter.der)


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = make_ca("trust root A")
    inter = make_ca("trust intermediate A", issuer=root, path_length=0)
    other_root = make_ca("trust root B")
    other_inter = make_ca("trust intermediate B", issuer=other_root, path_length=0)
    return Pki(
        root=root,
        inter=inter,
        leaf=make_client(inter, spiffe_id="spiffe://example.org/svc/a"),
        evil_leaf=make_client(inter, spiffe_id="spiffe://evil.example/svc/x"),
        plain_leaf=make_client(inter, spiffe_id=None),
        other_root=other_root,
        other_inter=other_inter,
        other_leaf=make_client(other_inter, spiffe_id="spiffe://other.example/svc/b"),
    )


def bundle(name: str, *roots: Issued, trust_domain: str | None = None) -> TrustBundle:
    return TrustBundle(name=name, roots=tuple(r.cert for r in roots), trust_domain=trust_domain)


def denied(verifier: ChainVerifier, chain: tuple[bytes, ...], now: float | None = None) -> Reason:
    with pytest.raises(Denied) as err:
        verifier.verify(chain, time.time() if now is None else now)
    return err.value.reason


def not_after(issued: Issued) -> float:
    return issued.cert.not_valid_after_utc.timestamp()


def not_before(issued: Issued) -> float:
    return issued.cert.not_valid_before_utc.timestamp()


# -- a good chain

def test_leaf_and_intermediate_verify_against_the_root(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    ident = v.verify(pki.chain(), time.time())
    assert isinstance(ident, CertIdentity)
    assert ident.trust_bundle == "corp"
    assert ident.spiffe_id == "spiffe://example.org/svc/a"
    assert ident.trust_domain == "example.org"
    assert ident.thumbprint == pki.leaf.thumbprint
    assert ident.policy_view["chain"] == [
        pki.leaf.cert.subject.rfc4514_string(),
        pki.inter.cert.subject.rfc4514_string(),
        pki.root.cert.subject.rfc4514_string(),
    ]


def test_leaf_without_the_intermediate_is_untrusted(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.leaf.der,)) is reasons.CERT_UNTRUSTED


def test_root_in_the_presented_chain_is_harmless(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert v.verify((pki.leaf.der, pki.inter.der, pki.root.der), time.time()).trust_bundle == "corp"


def test_leaf_directly_under_the_root(pki):
    leaf = make_client(pki.root, spiffe_id="spiffe://example.org/direct")
    v = ChainVerifier([bundle("corp", pki.root)])
    assert v.verify((leaf.der,), time.time()).spiffe_id == "spiffe://example.org/direct"


def test_leaf_without_san_verifies_under_an_unpinned_bundle(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    ident = v.verify(pki.chain(pki.plain_leaf), time.time())
    assert ident.spiffe_id is None and ident.trust_domain is None
    assert ident.subject == "CN=demo client,O=pdp dev"


# -- validity

def test_expired_leaf(pki):
    leaf = make_client(pki.inter, not_before=_now() - timedelta(days=10), days=1)
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, pki.chain(leaf)) is reasons.CERT_EXPIRED


def test_leaf_checked_at_the_request_time(pki):
    v = ChainVerifier([bundle("corp", pki.root)], cache_size=0)
    assert v.verify(pki.chain(), not_after(pki.leaf) - 1).spiffe_id == "spiffe://example.org/svc/a"
    assert denied(v, pki.chain(), not_after(pki.leaf) + 1) is reasons.CERT_EXPIRED
    assert denied(v, pki.chain(), not_after(pki.leaf) + 400 * DAY) is reasons.CERT_EXPIRED


def test_not_after_is_inclusive(pki):
    v = ChainVerifier([bundle("corp", pki.root)], cache_size=0)
    assert v.verify(pki.chain(), not_after(pki.leaf)).spiffe_id == "spiffe://example.org/svc/a"


def test_not_yet_valid_leaf(pki):
    leaf = make_client(pki.inter, not_before=_now() + timedelta(days=1))
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, pki.chain(leaf)) is reasons.CERT_NOT_YET_VALID
    # and valid once its time has come
    assert v.verify(pki.chain(leaf), not_before(leaf) + 1).trust_bundle == "corp"


def test_not_before_is_inclusive(pki):
    v = ChainVerifier([bundle("corp", pki.root)], cache_size=0)
    assert v.verify(pki.chain(), not_before(pki.leaf)).trust_bundle == "corp"
    assert denied(v, pki.chain(), not_before(pki.leaf) - 1) is reasons.CERT_NOT_YET_VALID


def test_expired_intermediate_is_denied(pki):
    inter = make_ca("expired intermediate", issuer=pki.root, path_length=0,
                    not_before=_now() - timedelta(days=30), days=1)
    leaf = make_client(inter)  # the leaf itself is valid now
    assert not_after(leaf) > time.time() > not_after(inter)
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (leaf.der, inter.der)) is reasons.CERT_UNTRUSTED


def test_not_yet_valid_intermediate_is_denied(pki):
    inter = make_ca("future intermediate", issuer=pki.root, path_length=0, not_before=_now() + timedelta(days=2))
    leaf = make_client(inter)
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (leaf.der, inter.der)) is reasons.CERT_UNTRUSTED


def test_expired_root_is_denied(pki):
    root = make_ca("expired root", not_before=_now() - timedelta(days=30), days=1)
    leaf = make_client(root)
    v = ChainVerifier([bundle("old", root)])
    assert denied(v, (leaf.der,)) is reasons.CERT_UNTRUSTED


# -- trust

def test_unknown_ca_is_untrusted(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.other_leaf.der, pki.other_inter.der)) is reasons.CERT_UNTRUSTED


def test_self_signed_leaf_is_untrusted(pki):
    selfsigned = make_ca("self")
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (selfsigned.der,)) is reasons.CERT_UNTRUSTED


def test_intermediate_with_forged_issuer_name_is_untrusted(pki):
    # A CA with the same name as the real intermediate, but another key.
    fake_inter = make_ca("trust intermediate A", issuer=make_ca("trust root A"), path_length=0)
    leaf = make_client(fake_inter, spiffe_id="spiffe://example.org/svc/a")
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (leaf.der, fake_inter.der)) is reasons.CERT_UNTRUSTED
    assert denied(v, (leaf.der, pki.inter.der)) is reasons.CERT_UNTRUSTED


def test_server_auth_only_leaf_is_untrusted(pki):
    leaf = make_client(pki.inter, client_auth=False)
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH not in eku
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, pki.chain(leaf)) is reasons.CERT_UNTRUSTED


def test_ca_certificate_as_leaf_is_untrusted(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.inter.der,)) is reasons.CERT_UNTRUSTED


def test_path_length_violation_is_untrusted(pki):
    # root -> inter (path_length=0) -> sub-CA -> leaf: the intermediate may not issue a CA.
    sub = make_ca("sub CA", issuer=pki.inter)
    leaf = make_client(sub)
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (leaf.der, sub.der, pki.inter.der)) is reasons.CERT_UNTRUSTED


def test_same_shape_without_path_length_limit_verifies(pki):
    # control for the test above: only the path length makes the difference
    inter = make_ca("unlimited intermediate", issuer=pki.root)
    sub = make_ca("sub CA", issuer=inter)
    leaf = make_client(sub)
    v = ChainVerifier([bundle("corp", pki.root)])
    assert v.verify((leaf.der, sub.der, inter.der), time.time()).trust_bundle == "corp"


@pytest.fixture(scope="module")
def deep(pki) -> tuple[Issued, tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]:
    """A root and chains with zero, one and two intermediates below it."""
    root = make_ca("deep root")
    i1 = make_ca("deep i1", issuer=root)
    i2 = make_ca("deep i2", issuer=i1)
    return (root, (make_client(root).der,), (make_client(i1).der, i1.der),
            (make_client(i2).der, i2.der, i1.der))


@pytest.mark.parametrize(("depth", "accepted"), [(0, 1), (1, 2), (2, 3), (4, 3)])
def test_max_chain_depth_is_honoured(deep, depth, accepted):
    root, *chains = deep
    v = ChainVerifier([bundle("deep", root)], max_chain_depth=depth)
    for n, chain in enumerate(chains, start=1):  # n intermediates + 1 leaf certificates presented
        if n <= accepted:
            assert v.verify(chain, time.time()).trust_bundle == "deep", n
        else:
            assert denied(v, chain) is reasons.CERT_UNTRUSTED, n


# -- malformed input

def test_empty_chain_is_malformed(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, ()) is reasons.CERT_MALFORMED


@pytest.mark.parametrize("chain", [
    (b"not a certificate",),
    (b"",),
    (b"\x30\x82\x01\x00" + b"\x00" * 10,),
], ids=["text", "empty", "truncated-sequence"])
def test_garbage_der_is_malformed(pki, chain):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, chain) is reasons.CERT_MALFORMED


def test_garbage_intermediate_is_malformed(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.leaf.der, b"garbage")) is reasons.CERT_MALFORMED


def test_truncated_leaf_der_is_malformed(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.leaf.der[:-20], pki.inter.der)) is reasons.CERT_MALFORMED


def test_pem_instead_of_der_is_malformed(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (pki.leaf.pem, pki.inter.der)) is reasons.CERT_MALFORMED


def test_leaf_with_a_malformed_san_extension_is_malformed(pki):
    # A SAN extension whose value is not a GeneralNames SEQUENCE (parsed only on access).
    key = pki.leaf.key
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad san")]))
        .issuer_name(pki.inter.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - timedelta(minutes=5)).not_valid_after(_now() + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x02hi"),
                       critical=False)
        .sign(pki.inter.key, hashes.SHA256())
    )
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (cert.public_bytes(serialization.Encoding.DER), pki.inter.der)) is reasons.CERT_MALFORMED


def test_leaf_with_a_duplicated_extension_is_malformed(pki):
    leaf = make_client(pki.inter, dns=("dup.example.org",))
    # Turn the ExtendedKeyUsage OID (2.5.29.37) into a second SubjectAlternativeName OID (2.5.29.17).
    eku_oid, san_oid = bytes.fromhex("0603551d25"), bytes.fromhex("0603551d11")
    assert leaf.der.count(eku_oid) == 1
    bad = leaf.der.replace(eku_oid, san_oid)
    with pytest.raises(x509.DuplicateExtension):
        x509.load_der_x509_certificate(bad).extensions  # noqa: B018
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, (bad, pki.inter.der)) is reasons.CERT_MALFORMED


def test_leaf_with_two_spiffe_ids_is_spiffe_invalid(pki):
    leaf = make_client(pki.inter, spiffe_id="spiffe://example.org/a", uris=("spiffe://example.org/b",))
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, pki.chain(leaf)) is reasons.CERT_SPIFFE_INVALID


def test_leaf_with_malformed_spiffe_id_is_spiffe_invalid(pki):
    leaf = make_client(pki.inter, spiffe_id="spiffe://Example.org/a")
    v = ChainVerifier([bundle("corp", pki.root)])
    assert denied(v, pki.chain(leaf)) is reasons.CERT_SPIFFE_INVALID


# -- several bundles

def test_several_bundles_name_the_one_that_verified(pki):
    v = ChainVerifier([bundle("bundle-a", pki.root), bundle("bundle-b", pki.other_root)])
    assert v.verify(pki.chain(), time.time()).trust_bundle == "bundle-a"
    assert v.verify((pki.other_leaf.der, pki.other_inter.der), time.time()).trust_bundle == "bundle-b"
    # order of the bundles does not matter
    v = ChainVerifier([bundle("bundle-b", pki.other_root), bundle("bundle-a", pki.root)])
    assert v.verify(pki.chain(), time.time()).trust_bundle == "bundle-a"
    assert v.verify((pki.other_leaf.der, pki.other_inter.der), time.time()).trust_bundle == "bundle-b"


def test_several_bundles_still_refuse_a_stranger(pki):
    stranger_root = make_ca("stranger")
    v = ChainVerifier([bundle("bundle-a", pki.root), bundle("bundle-b", pki.other_root)])
    assert denied(v, (make_client(stranger_root).der,)) is reasons.CERT_UNTRUSTED


def test_one_bundle_with_two_roots(pki):
    v = ChainVerifier([bundle("both", pki.root, pki.other_root)])
    assert v.verify(pki.chain(), time.time()).trust_bundle == "both"
    assert v.verify((pki.other_leaf.der, pki.other_inter.der), time.time()).trust_bundle == "both"


def test_no_bundles_trusts_nothing(pki):
    v = ChainVerifier([])
    assert denied(v, pki.chain()) is reasons.CERT_UNTRUSTED


# -- trust-domain pinning

def test_pinned_bundle_vouches_for_its_trust_domain(pki):
    v = ChainVerifier([bundle("example.org", pki.root, trust_domain="example.org")])
    ident = v.verify(pki.chain(), time.time())
    assert ident.trust_bundle == "example.org"
    assert ident.trust_domain == "example.org"


def test_pinned_bundle_does_not_vouch_for_another_trust_domain(pki):
    # The CA signed it, but the bundle speaks only for example.org.
    v = ChainVerifier([bundle("example.org", pki.root, trust_domain="example.org")])
    assert denied(v, pki.chain(pki.evil_leaf)) is reasons.CERT_UNTRUSTED


def test_pinned_bundle_does_not_vouch_for_a_leaf_without_spiffe_id(pki):
    v = ChainVerifier([bundle("example.org", pki.root, trust_domain="example.org")])
    assert denied(v, pki.chain(pki.plain_leaf)) is reasons.CERT_UNTRUSTED


def test_pinning_compares_the_exact_trust_domain(pki):
    sub = make_client(pki.inter, spiffe_id="spiffe://sub.example.org/x")
    suffix = make_client(pki.inter, spiffe_id="spiffe://example.org.evil/x")
    v = ChainVerifier([bundle("example.org", pki.root, trust_domain="example.org")])
    assert denied(v, pki.chain(sub)) is reasons.CERT_UNTRUSTED
    assert denied(v, pki.chain(suffix)) is reasons.CERT_UNTRUSTED


def test_unpinned_bundle_vouches_for_any_trust_domain(pki):
    v = ChainVerifier([bundle("any", pki.root)])
    assert v.verify(pki.chain(pki.evil_leaf), time.time()).trust_domain == "evil.example"
    assert v.verify(pki.chain(pki.plain_leaf), time.time()).spiffe_id is None
    assert v.verify(pki.chain(), time.time()).trust_domain == "example.org"


def test_pinned_and_unpinned_bundles_together(pki):
    # evil.example is pinned to root B only; root A's bundle is pinned to example.org.
    v = ChainVerifier([bundle("a", pki.root, trust_domain="example.org"),
                       bundle("evil", pki.other_root, trust_domain="evil.example")])
    assert v.verify(pki.chain(), time.time()).trust_bundle == "a"
    assert denied(v, pki.chain(pki.evil_leaf)) is reasons.CERT_UNTRUSTED
    # an unpinned bundle with another root does not help a leaf from root A either
    v = ChainVerifier([bundle("a", pki.root, trust_domain="example.org"), bundle("b", pki.other_root)])
    assert denied(v, pki.chain(pki.evil_leaf)) is reasons.CERT_UNTRUSTED
    assert v.verify((pki.other_leaf.der, pki.other_inter.der), time.time()).trust_bundle == "b"


def test_vouches_for(pki):
    pinned = TrustBundle("p", (pki.root.cert,), trust_domain="example.org")
    unpinned = TrustBundle("u", (pki.root.cert,))
    assert pinned.vouches_for("example.org")
    assert not pinned.vouches_for("evil.example")
    assert not pinned.vouches_for(None)
    assert unpinned.vouches_for("anything") and unpinned.vouches_for(None)


# -- the cache

def test_second_verify_returns_the_identical_object(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    now = time.time()
    first = v.verify(pki.chain(), now)
    assert v.verify(pki.chain(), now + 1) is first


def test_cache_size_zero_verifies_every_time(pki):
    v = ChainVerifier([bundle("corp", pki.root)], cache_size=0)
    now = time.time()
    first = v.verify(pki.chain(), now)
    second = v.verify(pki.chain(), now)
    assert second is not first
    assert second == first


def test_cache_is_per_leaf(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    now = time.time()
    a = v.verify(pki.chain(), now)
    b = v.verify(pki.chain(pki.evil_leaf), now)
    assert a.spiffe_id != b.spiffe_id
    assert v.verify(pki.chain(), now) is a
    assert v.verify(pki.chain(pki.evil_leaf), now) is b


def test_cache_never_serves_past_the_leaf_not_after(pki):
    v = ChainVerifier([bundle("corp", pki.root)], max_cache_seconds=1000 * DAY)
    before = not_after(pki.leaf) - 10
    assert v.verify(pki.chain(), before).spiffe_id == "spiffe://example.org/svc/a"
    assert v.verify(pki.chain(), before + 5).spiffe_id == "spiffe://example.org/svc/a"
    assert denied(v, pki.chain(), not_after(pki.leaf) + 1) is reasons.CERT_EXPIRED


def test_cache_never_serves_past_the_intermediate_not_after(pki):
    # The intermediate expires long before the leaf: the cached identity must die with it.
    start = _now() - timedelta(minutes=5)
    inter = make_ca("short intermediate", issuer=pki.root, path_length=0, not_before=start, days=2)
    leaf = make_client(inter, not_before=start, days=365)
    chain = (leaf.der, inter.der)
    v = ChainVerifier([bundle("corp", pki.root)], max_cache_seconds=1000 * DAY)
    first = v.verify(chain, time.time())
    assert v.verify(chain, not_after(inter) - 1) is first
    assert denied(v, chain, not_after(inter) + 1) is reasons.CERT_UNTRUSTED


def test_cache_never_serves_past_the_root_not_after(pki):
    start = _now() - timedelta(minutes=5)
    root = make_ca("short root", not_before=start, days=3)
    leaf = make_client(root, not_before=start, days=365)
    v = ChainVerifier([bundle("short", root)], max_cache_seconds=1000 * DAY)
    first = v.verify((leaf.der,), time.time())
    assert v.verify((leaf.der,), not_after(root) - 1) is first
    assert denied(v, (leaf.der,), not_after(root) + 1) is reasons.CERT_UNTRUSTED


def test_cache_never_serves_before_the_leaf_not_before(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    v.verify(pki.chain(), time.time())
    assert denied(v, pki.chain(), not_before(pki.leaf) - 1) is reasons.CERT_NOT_YET_VALID


def test_cache_entries_live_at_most_max_cache_seconds(pki):
    v = ChainVerifier([bundle("corp", pki.root)], max_cache_seconds=60)
    now = time.time()
    first = v.verify(pki.chain(), now)
    assert v.verify(pki.chain(), now + 59) is first
    again = v.verify(pki.chain(), now + 61)
    assert again is not first
    assert again == first


def test_replace_bundles_forgets_what_the_old_bundles_verified(pki):
    v = ChainVerifier([bundle("old", pki.root)])
    now = time.time()
    assert v.verify(pki.chain(), now).trust_bundle == "old"
    v.replace_bundles([bundle("new", pki.other_root)])
    assert v.bundles[0].name == "new"
    assert denied(v, pki.chain(), now + 1) is reasons.CERT_UNTRUSTED
    assert v.verify((pki.other_leaf.der, pki.other_inter.der), now + 1).trust_bundle == "new"


def test_replace_bundles_clears_the_cache_even_for_the_same_root(pki):
    v = ChainVerifier([bundle("v1", pki.root)])
    now = time.time()
    first = v.verify(pki.chain(), now)
    v.replace_bundles([bundle("v2", pki.root)])
    second = v.verify(pki.chain(), now)
    assert second is not first
    assert second.trust_bundle == "v2"


def test_replace_bundles_applies_new_pinning(pki):
    v = ChainVerifier([bundle("any", pki.root)])
    now = time.time()
    assert v.verify(pki.chain(pki.evil_leaf), now).trust_domain == "evil.example"
    v.replace_bundles([bundle("pinned", pki.root, trust_domain="example.org")])
    assert denied(v, pki.chain(pki.evil_leaf), now) is reasons.CERT_UNTRUSTED


def test_failures_are_not_cached(pki):
    v = ChainVerifier([bundle("corp", pki.root)])
    future = make_client(pki.inter, not_before=_now() + timedelta(days=1))
    assert denied(v, pki.chain(future)) is reasons.CERT_NOT_YET_VALID
    assert v.verify(pki.chain(future), not_before(future) + 1).trust_bundle == "corp"


# -- load_bundle

def test_load_bundle_reads_a_pem_list(tmp_path: Path, pki):
    path = tmp_path / "roots.pem"
    path.write_bytes(pki.root.pem + pki.other_root.pem)
    b = load_bundle(path, "corp", "example.org", "certificates.trust_bundles[0].file")
    assert b.name == "corp"
    assert b.trust_domain == "example.org"
    assert b.roots == (pki.root.cert, pki.other_root.cert)
    v = ChainVerifier([b])
    assert v.verify(pki.chain(), time.time()).trust_bundle == "corp"


def test_load_bundle_missing_file(tmp_path: Path):
    key = "certificates.trust_bundles[3].file"
    with pytest.raises(LoadError) as err:
        load_bundle(tmp_path / "nope.pem", "corp", None, key)
    assert err.value.key == key
    assert "nope.pem" in err.value.message


def test_load_bundle_directory_instead_of_file(tmp_path: Path):
    with pytest.raises(LoadError) as err:
        load_bundle(tmp_path, "corp", None, "my.key")
    assert err.value.key == "my.key"


@pytest.mark.parametrize("content", [
    b"",
    b"this is not PEM\n",
    b"\x00\x01\x02binary",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",  # base64, but not a certificate
], ids=["empty", "text", "binary", "not-a-certificate"])
def test_load_bundle_non_pem_file(tmp_path: Path, content: bytes):
    path = tmp_path / "roots.pem"
    path.write_bytes(content)
    key = "certificates.trust_bundles[1].file"
    with pytest.raises(LoadError) as err:
        load_bundle(path, "corp", None, key)
    assert err.value.key == key


def test_load_bundle_der_file(tmp_path: Path, pki):
    path = tmp_path / "root.der"
    path.write_bytes(pki.root.der)
    with pytest.raises(LoadError) as err:
        load_bundle(path, "corp", None, "k")
    assert err.value.key == "k"


def test_load_bundle_refuses_a_private_key(tmp_path: Path, pki):
    path = tmp_path / "roots.pem"
    path.write_bytes(pki.root.pem + pki.root.key_pem)
    with pytest.raises(LoadError) as err:
        load_bundle(path, "corp", None, "certificates.trust_bundles[0].file")
    assert err.value.key == "certificates.trust_bundles[0].file"


# -- certificates found by fuzz/fuzz_der.py: any DER is a deny with a reason, never an exception


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _signed_as_is(tbs: bytes, ca: Issued) -> bytes:
    """A certificate over exactly ``tbs``, signed by ``ca`` (ECDSA, SHA-256): what a CA would sign if
    asked, and no builder would write."""
    from cryptography.hazmat.primitives.asymmetric import ec

    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


def test_certificate_with_an_unknown_version_is_malformed(pki):
    der = bytearray(pki.leaf.der)
    at = der.index(b"\xa0\x03\x02\x01\x02")  # version [0] INTEGER 2 (v3)
    der[at + 4] = 5
    assert denied(ChainVerifier([bundle("a", pki.root)]), (bytes(der), pki.inter.der)) is reasons.CERT_MALFORMED


def test_ca_certificate_as_leaf_with_a_bit_string_name_is_denied(pki):
    # A CN that is a BIT STRING: cryptography's verifier raises TypeError naming such a certificate.
    name = b"trust intermediate A"
    der = pki.inter.der.replace(b"\x0c" + bytes([len(name)]) + name, b"\x03" + bytes([len(name)]) + b"\x00" + name[1:])
    assert der != pki.inter.der
    assert denied(ChainVerifier([bundle("a", pki.root)]), (der,)) in (reasons.CERT_MALFORMED, reasons.CERT_UNTRUSTED)


def test_signed_certificate_with_a_public_key_off_its_curve_is_malformed(pki):
    tbs = bytearray(pki.leaf.cert.tbs_certificate_bytes)
    tbs[tbs.index(b"\x03\x42\x00\x04") + 4 + 63] ^= 1  # the last byte of the P-256 point's y
    leaf = _signed_as_is(bytes(tbs), pki.inter)
    assert denied(ChainVerifier([bundle("a", pki.root)]), (leaf, pki.inter.der)) is reasons.CERT_MALFORMED


def test_signed_certificate_with_an_unknown_key_algorithm_is_malformed(pki):
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
    tbs = pki.leaf.cert.tbs_certificate_bytes.replace(ec_public_key, ec_public_key[:-1] + b"\x09")
    leaf = _signed_as_is(tbs, pki.inter)
    assert denied(ChainVerifier([bundle("a", pki.root)]), (leaf, pki.inter.der)) is reasons.CERT_MALFORMED


def test_signed_certificate_with_a_subject_that_is_not_utf8_is_malformed(pki):
    tbs = pki.leaf.cert.tbs_certificate_bytes.replace(b"\x0c\x0bdemo client", b"\x0c\x0bdemo\xffclient")
    leaf = _signed_as_is(tbs, pki.inter)
    assert denied(ChainVerifier([bundle("a", pki.root)]), (leaf, pki.inter.der)) is reasons.CERT_MALFORMED


def test_a_chain_that_is_a_large_certificates_digest_is_not_taken_for_it(pki: Pki) -> None:
    """A large leaf is cached by its SHA-256, a small one by its DER: 32 bytes that are the large leaf's
    digest are no certificate, never the identity cached for it."""
    import hashlib

    large = make_client(pki.inter, spiffe_id="spiffe://example.org/admin/ops",
                        dns=tuple(f"host-{i}.internal.example.org" for i in range(250)))
    assert len(large.der) > 4096
    verifier = ChainVerifier([bundle("a", pki.root)])
    assert verifier.verify(pki.chain(large), time.time()).spiffe_id == "spiffe://example.org/admin/ops"
    for digest in (hashlib.sha256(large.der).digest(), hashlib.sha256(large.der).hexdigest().encode()):
        assert denied(verifier, (digest, pki.inter.der)) is reasons.CERT_MALFORMED
    assert verifier.verify(pki.chain(large), time.time()).spiffe_id == "spiffe://example.org/admin/ops"
