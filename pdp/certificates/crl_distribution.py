"""CRLs named by a certificate's CRL distribution points (RFC 5280 §4.2.1.13) and checks of any CRL (§5, §6.3).

Sans-I/O: this module finds the URLs and judges the bytes fetched from them;
``pdp.certificates.online_revocation`` fetches, caches and shares them.

- **Which points count**: a distribution point whose ``fullName`` holds an
  ``http://`` or ``https://`` URI (§4.2.1.13: HTTP serves a DER CRL). LDAP and
  other schemes are ignored, as are points limited to some ``reasons`` or
  naming a ``cRLIssuer`` (an indirect CRL): neither can vouch alone that a
  certificate is not revoked.
- **Which CRLs count**: a complete CRL issued and signed by the certificate's
  issuing CA, as found in the verified chain; never one signed by another key
  with the same name. Delta CRLs (``DeltaCRLIndicator``) and partitioned ones
  (``IssuingDistributionPoint``) cover only part of the revocations and are
  refused, as for CRL files. So is a CRL with a critical extension (§5.2) or a
  critical entry extension (§5.3) this module does not know, and one whose
  entries name a ``certificateIssuer`` (an indirect CRL, whose entries may speak
  of another CA's certificates): kind ``unsupported``. ``thisUpdate`` may not
  lie in the future (beyond ``freshness.LEEWAY``); until when the CRL vouches is
  ``pdp.certificates.freshness``'s rule, applied by the caller.
- **What a listed serial means**: revoked, even once the CRL is stale (a
  revoked certificate stays revoked); an entry with reason ``certificateHold``
  counts only while the CRL is current, as the CA may release the hold.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from pdp.certificates.freshness import issued_in_future

CRL_TYPES = "application/pkix-crl, application/x-pkcs7-crl;q=0.5, */*;q=0.1"

CRL = x509.CertificateRevocationList

#: CRL extensions (§5.2) that change nothing about which certificates a complete CRL revokes; the delta and
#: partitioning ones are refused by ``partial_crl``.
_KNOWN_CRL_EXTENSIONS = frozenset((ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.ISSUER_ALTERNATIVE_NAME,
                                   ExtensionOID.CRL_NUMBER, ExtensionOID.FRESHEST_CRL,
                                   ExtensionOID.AUTHORITY_INFORMATION_ACCESS))

#: CRL entry extensions (§5.3) understood here: the reason (``certificateHold`` matters) and the invalidity date.
_KNOWN_ENTRY_EXTENSIONS = frozenset((CRLEntryExtensionOID.CRL_REASON, CRLEntryExtensionOID.INVALIDITY_DATE))


class CrlError(ValueError):
    """The CRL cannot vouch for the certificate; ``kind`` names why (for the failure counters)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def distribution_point_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """The http(s) URLs of the certificate's complete, direct CRLs (see the module docstring)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    urls: list[str] = []
    for point in points:
        if point.full_name is None or point.reasons is not None or point.crl_issuer is not None:
            continue
        urls += [n.value for n in point.full_name if isinstance(n, x509.UniformResourceIdentifier)
                 and n.value.lower().startswith(("http://", "https://"))]
    return tuple(dict.fromkeys(urls))


def partial_crl(crl: CRL) -> str:
    """The name of the extension that makes ``crl`` a delta or partitioned CRL; "" for a complete one."""
    for ext in (x509.DeltaCRLIndicator, x509.IssuingDistributionPoint):
        try:
            crl.extensions.get_extension_for_class(ext)
        except x509.ExtensionNotFound:
            continue
        return ext.__name__
    return ""


def signed_by(crl: CRL, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def parse_crl(data: bytes) -> CRL:
    """A CRL from DER (what §4.2.1.13 says HTTP serves) or, leniently, PEM; ``CrlError`` otherwise."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"not a CRL: {exc}", "malformed") from exc


def unsupported_extension(crl: CRL) -> str:
    """The dotted OID of a critical CRL extension this module cannot process (§5.2: such a CRL MUST NOT be used);
    "" when there is none."""
    for ext in crl.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRL_EXTENSIONS:
            return str(ext.oid.dotted_string)
    return ""


def verify_crl(crl: CRL, issuer: x509.Certificate, now: float) -> tuple[float, float | None]:
    """Check that ``crl`` is a complete CRL of ``issuer``, signed by it and not made in the future at ``now``;
    return its ``(thisUpdate, nextUpdate)`` (nextUpdate None when absent); ``CrlError`` otherwise. Whether it is
    still current is for ``pdp.certificates.freshness`` to say."""
    try:
        if crl.issuer != issuer.subject:
            raise CrlError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by "
                           f"{issuer.subject.rfc4514_string()}", "mismatch")
        partial = partial_crl(crl)
        if partial:
            raise CrlError(f"delta and partitioned CRLs ({partial}) are not supported", "unsupported")
        unknown = unsupported_extension(crl)
        if unknown:
            raise CrlError(f"the CRL carries a critical extension {unknown} that cannot be processed", "unsupported")
        if not signed_by(crl, issuer):
            raise CrlError(f"the CRL is not signed by {issuer.subject.rfc4514_string()}", "signature")
        this_update = crl.last_update_utc.timestamp()
        next_update = crl.next_update_utc.timestamp() if crl.next_update_utc is not None else None
    except CrlError:
        raise
    except (ValueError, TypeError, x509.DuplicateExtension) as exc:  # extensions are parsed on access
        raise CrlError(f"unreadable CRL: {exc}", "malformed") from exc
    if issued_in_future(this_update, now):
        raise CrlError("the CRL's thisUpdate lies in the future", "stale")
    return this_update, next_update


def listing(crl: CRL, cert: x509.Certificate) -> x509.RevokedCertificate | None:
    """The entry of ``crl`` that revokes ``cert``, if any."""
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number)


def on_hold(entry: x509.RevokedCertificate) -> bool:
    """Whether the entry's reason is ``certificateHold`` (§5.3.1): a suspension the CA may lift."""
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return False
    return reason == x509.ReasonFlags.certificate_hold


def read_entries(crl: CRL) -> tuple[frozenset[int], frozenset[int]]:
    """The serials ``crl`` revokes and those it holds (``certificateHold``), as sets (``CertificateRevocationList``
    looks one up by a linear scan); ``CrlError`` for an entry that cannot be processed (§5.3), which forbids
    using the CRL for any certificate."""
    revoked: set[int] = set()
    held: set[int] = set()
    try:
        for entry in crl:
            hold = False
            for ext in entry.extensions:  # parsed on each access: once per entry
                if ext.oid == CRLEntryExtensionOID.CERTIFICATE_ISSUER:
                    raise CrlError("indirect CRLs (an entry names a certificateIssuer) are not supported",
                                   "unsupported")
                if ext.critical and ext.oid not in _KNOWN_ENTRY_EXTENSIONS:
                    raise CrlError(f"a CRL entry carries a critical extension {ext.oid.dotted_string} that cannot "
                                   "be processed", "unsupported")
                if isinstance(ext.value, x509.CRLReason):
                    hold = ext.value.reason == x509.ReasonFlags.certificate_hold
            (held if hold else revoked).add(entry.serial_number)
    except CrlError:
        raise
    except (ValueError, TypeError, x509.DuplicateExtension) as exc:  # entries are parsed on access
        raise CrlError(f"unreadable CRL entry: {exc}", "malformed") from exc
    return frozenset(revoked), frozenset(held)
