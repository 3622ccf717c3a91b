"""Client certificate chains → a verified ``CertIdentity``.

Chains are validated by ``cryptography.x509.verification``'s client verifier
(signature, validity at the request's time, EKU ``clientAuth``, basic
constraints and path length) against one or more trust bundles. A bundle may
be pinned to a SPIFFE trust domain: it then vouches only for certificates
whose SPIFFE ID is in that domain, so one federated domain's CA cannot mint
identities for another.

Every certificate below the anchor is then checked for revocation
(``pdp.certificates.revocation``: CRL files, OCSP, CRL distribution points).

Verified chains are cached by the leaf's SHA-256, never past the earliest
``not_after`` in the verified chain nor past the revocation answers they were
checked against, so a returning client costs one hash.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from pdp import reasons
from pdp.cache import ExpiringCache
from pdp.certificates.identity import CertIdentity, extract_identity, read_sans, spiffe_of
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.certificates.pem import PemError, pem_to_der_chain
from pdp.certificates.revocation import RevocationPolicy, check_chain, load_crls
from pdp.errors import Denied, LoadError


@dataclass(frozen=True)
class TrustBundle:
    """Trust anchors (``roots``), optionally pinned to a SPIFFE trust domain, and ``intermediates``:
    CA certificates offered to path building but not trusted by themselves, for gateways that
    hand over only the client's leaf (Envoy's ``include_peer_certificate``)."""

    name: str
    roots: tuple[x509.Certificate, ...]
    trust_domain: str | None = None
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    require_crl: bool = False
    revocation: RevocationPolicy = field(default_factory=RevocationPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_store", Store(list(self.roots)))
        object.__setattr__(self, "_verifier", None)

    @property
    def store(self) -> Store:
        store: Store = object.__getattribute__(self, "_store")
        return store

    def client_verifier(self, when: datetime, max_depth: int) -> ClientVerifier:
        """The client verifier of this bundle at ``when`` (whole seconds: the verifier reads no finer time,
        so one verifier serves every chain verified within the same second)."""
        kept: tuple[datetime, int, ClientVerifier] | None = object.__getattribute__(self, "_verifier")
        if kept is not None and kept[0] == when and kept[1] == max_depth:
            return kept[2]
        verifier = (PolicyBuilder().store(self.store).time(when).max_chain_depth(max_depth)
                    .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
                    .build_client_verifier())
        object.__setattr__(self, "_verifier", (when, max_depth, verifier))
        return verifier

    def vouches_for(self, trust_domain: str | None) -> bool:
        return self.trust_domain is None or self.trust_domain == trust_domain


def load_certificates(path: Path, key: str) -> tuple[x509.Certificate, ...]:
    """A PEM file of certificates; errors name the setting ``key``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(key, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in pem_to_der_chain(data))
    except (PemError, ValueError) as exc:
        raise LoadError(key, f"{str(path)!r} is not a PEM list of certificates: {exc}") from exc


def load_bundle(path: Path, name: str, trust_domain: str | None, key: str,
                intermediates: Path | None = None, intermediates_key: str = "", crls: Sequence[Path] = (),
                crls_key: str = "", require_crl: bool = False,
                revocation: RevocationPolicy | None = None) -> TrustBundle:
    """Load a PEM file of root certificates (and optionally intermediates and CRLs)."""
    roots = load_certificates(path, key)
    extra = load_certificates(intermediates, intermediates_key) if intermediates else ()
    return TrustBundle(name=name, roots=roots, trust_domain=trust_domain, intermediates=extra,
                       crls=load_crls(crls, [*roots, *extra], crls_key), require_crl=require_crl,
                       revocation=revocation or RevocationPolicy())


# Web PKI rules for CAs; for the client leaf the same, except that a SAN is optional: many
# enterprise client certificates name their holder only in the subject DN.
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)


_NOT_AFTER: dict[int, tuple[x509.Certificate, float]] = {}


def _not_after(cert: x509.Certificate) -> float:
    """``not_valid_after`` of a CA certificate of a verified chain, as a timestamp: the bundle's own
    certificates come back in every chain, so each is read once (held here, so an id is not reused)."""
    kept = _NOT_AFTER.get(id(cert))
    if kept is None or kept[0] is not cert:
        if len(_NOT_AFTER) >= 1024:
            _NOT_AFTER.clear()
        kept = _NOT_AFTER[id(cert)] = (cert, cert.not_valid_after_utc.timestamp())
    return kept[1]


#: The largest leaf certificate kept in the cache by its DER (larger ones by their SHA-256).
_DER_KEY_MAX = 4096


class ChainVerifier:
    """Verifies client chains against ``bundles``. ``revocation`` asks OCSP responders and CRL distribution
    points (without one, a certificate that names them has its revocation status unknown); its refresher runs
    between ``start()`` and ``stop()``."""

    def __init__(self, bundles: list[TrustBundle], *, max_chain_depth: int = 4, cache_size: int = 10_000,
                 max_cache_seconds: float = 3600.0, revocation: OnlineRevocation | None = None) -> None:
        self.bundles = bundles
        self._max_depth = max_chain_depth
        self._max_cache = max_cache_seconds
        #: By the leaf's DER (hashing the bytes costs a fraction of a SHA-256, and none at all for the same
        #: bytes object again, which keeps its hash), or by its SHA-256 in hex when it is a large certificate.
        self._cache: ExpiringCache[bytes | str, CertIdentity] = ExpiringCache(cache_size)
        self.revocation = revocation or OnlineRevocation(None)
        # A newly kept answer that revokes a certificate must not wait for cached identities to expire. The
        # generation keeps a verification that was under way when it came from caching what it verified.
        self._generation = 0
        self._generation_lock = threading.Lock()
        self.revocation.on_change.append(self._forget_identities)

    def start(self) -> None:
        """Start renewing revocation answers in the background (a daemon thread)."""
        self.revocation.start()

    def stop(self) -> None:
        self.revocation.stop()

    def close(self) -> None:
        """Stop the refresher and close the revocation HTTP client."""
        self.revocation.close()

    def verify(self, chain: tuple[bytes, ...], now: float, *, network: bool = True) -> CertIdentity:
        """The verified identity of ``chain`` at ``now``. With ``network`` False, a check that would have to
        wait on the network raises ``NeedsNetwork`` instead, so the service can run it off the event loop."""
        if not chain:
            raise Denied(reasons.CERT_MALFORMED, "empty certificate chain")
        leaf = chain[0]
        # A digest key is text, never bytes: no leaf (32 bytes of anything) can stand for a large certificate.
        key: bytes | str = leaf if len(leaf) <= _DER_KEY_MAX else hashlib.sha256(leaf).hexdigest()
        cached = self._cache.get(key, now)
        if cached is not None and cached.not_before <= now:
            return cached
        generation = self._generation
        identity, expires = self._verify_uncached(chain, hashlib.sha256(leaf).digest(), now, network)
        with self._generation_lock:
            if generation == self._generation:
                self._cache.put(key, identity, min(expires, now + self._max_cache))
        return identity

    def _forget_identities(self) -> None:
        with self._generation_lock:
            self._generation += 1
            self._cache.clear()

    def _verify_uncached(self, chain: tuple[bytes, ...], digest: bytes, now: float,
                         network: bool) -> tuple[CertIdentity, float]:
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except Exception as exc:  # ValueError, InvalidVersion…: whatever the bytes, they are no certificate
            raise Denied(reasons.CERT_MALFORMED, f"not a DER X.509 certificate: {exc}") from exc
        leaf = certs[0]
        try:
            not_before = leaf.not_valid_before_utc.timestamp()
            not_after = leaf.not_valid_after_utc.timestamp()
            sans = read_sans(leaf)
        except (ValueError, x509.DuplicateExtension) as exc:  # extensions are only parsed on access
            raise Denied(reasons.CERT_MALFORMED, f"unparseable certificate extension: {exc}") from exc
        if now < not_before:
            raise Denied(reasons.CERT_NOT_YET_VALID, f"the client certificate is valid from {int(not_before)}")
        if now > not_after:  # RFC 5280 §4.1.2.5: notAfter itself is still within the validity period
            raise Denied(reasons.CERT_EXPIRED, f"the client certificate expired at {int(not_after)}")
        spiffe = spiffe_of(sans.uris)
        trust_domain = spiffe[1]
        bundles = [b for b in self.bundles if b.vouches_for(trust_domain)]
        if not bundles:
            raise Denied(reasons.CERT_UNTRUSTED,
                         f"no trust bundle is configured for trust domain {trust_domain!r}"
                         if trust_domain else "no trust bundle is configured")
        # The verifier judges validity in whole seconds (X.509 times have no finer ones): the same instant.
        when = datetime.fromtimestamp(now, UTC).replace(microsecond=0)
        errors: list[str] = []
        for bundle in bundles:
            verifier = bundle.client_verifier(when, self._max_depth)
            try:
                verified = verifier.verify(leaf, [*certs[1:], *bundle.intermediates])
            except VerificationError as exc:
                errors.append(f"{bundle.name}: {exc}")
                continue
            except Exception as exc:  # ValueError, or TypeError on a name the verifier cannot read
                raise Denied(reasons.CERT_MALFORMED, f"certificate could not be processed: {exc}") from exc
            revocation_until = check_chain(verified.chain, bundle.crls, now, require=bundle.require_crl,
                                           policy=bundle.revocation, online=self.revocation, network=network)
            try:
                identity = extract_identity(leaf, chain[0], verified.chain, bundle.name, sans=sans, spiffe=spiffe,
                                            digest=digest, validity=(not_before, not_after))
            except Denied:
                raise
            except Exception as exc:  # a CA signed what pdp cannot read (a key off its curve, a non-UTF-8 name)
                raise Denied(reasons.CERT_MALFORMED, f"the certificate's contents cannot be read: {exc}") from exc
            expires = min(not_after, *(_not_after(c) for c in verified.chain[1:]), revocation_until)
            return identity, expires
        raise Denied(reasons.CERT_UNTRUSTED, "; ".join(errors))

    def replace_bundles(self, bundles: list[TrustBundle]) -> None:
        """Put new trust bundles in force; identities verified under the old ones are forgotten."""
        self.bundles = bundles
        self._forget_identities()
