"""What a verified client certificate says about its holder.

Everything the policy may want, extracted once per certificate: the RFC 8705
thumbprint, subject and issuer (RFC 4514 strings and per-attribute lists),
serial, validity, SANs by type, the SPIFFE ID and trust domain (exactly one
``spiffe://`` URI SAN, or none), and the key type and size. Everything that
reads the certificate is done at once, so a certificate pdp cannot read is
refused when it is verified; the policy's view and the URL-encoded PEM are
assembled from those parts the first time a decision asks for them.
"""

from __future__ import annotations

import binascii
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from pdp import reasons
from pdp.certificates.spiffe import SpiffeIdError, is_spiffe_uri, parse_spiffe_id
from pdp.credentials.jose import b64url_encode
from pdp.credentials.rfc8705 import thumbprint
from pdp.errors import Denied

_ATTRIBUTES = {
    NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
    NameOID.DOMAIN_COMPONENT: "DC", NameOID.SERIAL_NUMBER: "serialNumber", NameOID.EMAIL_ADDRESS: "emailAddress",
}


@dataclass(frozen=True, slots=True)
class _Parts:
    """What the policy view is assembled from besides the identity's own fields."""

    leaf: x509.Certificate
    subject_attributes: dict[str, list[str]]
    issuer_attributes: dict[str, list[str]]
    chain: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CertIdentity:
    thumbprint: str
    subject: str
    issuer: str
    serial: str
    not_before: float
    not_after: float
    spiffe_id: str | None
    trust_domain: str | None
    trust_bundle: str
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    ips: tuple[str, ...]
    key_type: str
    key_size: int
    _parts: _Parts | None = field(repr=False, compare=False, default=None)
    _view: dict[str, Any] | None = field(init=False, repr=False, compare=False, default=None)
    _pem: str | None = field(init=False, repr=False, compare=False, default=None)

    @property
    def policy_view(self) -> dict[str, Any]:
        """The ``input.cert`` document for the policy, built once per certificate."""
        view = self._view
        if view is None:
            view = self._build_view()
            object.__setattr__(self, "_view", view)
        return view

    @property
    def url_encoded_pem(self) -> str:
        """The leaf as URL-encoded PEM, as Envoy puts it in ``attributes.source.certificate``."""
        pem = self._pem
        if pem is None:
            pem = "" if self._parts is None else url_encoded_pem(self._parts.leaf)
            object.__setattr__(self, "_pem", pem)
        return pem

    def _build_view(self) -> dict[str, Any]:
        parts = self._parts
        if parts is None:
            return {}
        return {
            "present": True,
            "thumbprint": self.thumbprint,
            "subject": {"dn": self.subject, **{k: list(v) for k, v in parts.subject_attributes.items()}},
            "issuer": {"dn": self.issuer, **{k: list(v) for k, v in parts.issuer_attributes.items()}},
            "serial": self.serial,
            "not_before": int(self.not_before),
            "not_after": int(self.not_after),
            "spiffe_id": self.spiffe_id,
            "trust_domain": self.trust_domain,
            "trust_bundle": self.trust_bundle,
            "sans": {"dns": list(self.dns), "uri": list(self.uris), "email": list(self.emails),
                     "ip": list(self.ips)},
            "key": {"type": self.key_type, "size": self.key_size},
            "chain": [self.subject, *parts.chain],
        }


@dataclass(frozen=True, slots=True)
class Sans:
    """The subject alternative names of a certificate, by type, each in the order written."""

    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


def read_sans(cert: x509.Certificate) -> Sans:
    """The certificate's SANs (none without the extension); raises what reading its extensions raises
    (``ValueError``, ``x509.DuplicateExtension``)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Sans()
    dns: list[str] = []
    uris: list[str] = []
    emails: list[str] = []
    ips: list[str] = []
    for name in san:  # one pass instead of one per type
        if isinstance(name, x509.DNSName):
            dns.append(name.value)
        elif isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        elif isinstance(name, x509.RFC822Name):
            emails.append(name.value)
        elif isinstance(name, x509.IPAddress):
            ips.append(str(name.value))
    return Sans(tuple(dns), tuple(uris), tuple(emails), tuple(ips))


#: What a PEM holds besides letters, digits and '-', and its percent-encoding.
_PEM_QUOTED = (("+", "%2B"), ("/", "%2F"), ("=", "%3D"), ("\n", "%0A"), (" ", "%20"), ("\r", "%0D"))
_PEM_TEXT = re.compile(r"[A-Za-z0-9+/=\n\r -]*")


def url_quote_pem(pem: str) -> str:
    """``urllib.parse.quote(pem, safe="")``, a few ``str.replace`` calls for a PEM's characters: quoting a
    PEM character by character cost more than verifying the chain it came in."""
    if _PEM_TEXT.fullmatch(pem) is None:
        return urllib.parse.quote(pem, safe="")
    for char, quoted in _PEM_QUOTED:
        pem = pem.replace(char, quoted)
    return pem


def url_encoded_pem(cert: x509.Certificate) -> str:
    """``url_quote_pem`` of the certificate's PEM (RFC 7468: base64 in lines of 64), written at once from its
    DER: the PEM holds only base64, '-', spaces and line breaks, so quoting is three replacements."""
    b64 = binascii.b2a_base64(cert.public_bytes(serialization.Encoding.DER), newline=False).decode("ascii")
    body = "%0A".join([b64[i:i + 64] for i in range(0, len(b64), 64)])
    body = body.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return f"-----BEGIN%20CERTIFICATE-----%0A{body}%0A-----END%20CERTIFICATE-----%0A"


_NAMES: dict[bytes, tuple[str, dict[str, list[str]]]] = {}


def _dn(name: x509.Name) -> tuple[str, dict[str, list[str]]]:
    """A name's RFC 4514 string and attributes, kept by its DER: an issuer's name repeats in every
    certificate it signed, and a CA's subject in every chain (bounded: a flood starts the list again)."""
    return _dn_by_der(name.public_bytes(), lambda: name)


def _dn_by_der(der: bytes, name: Callable[[], x509.Name]) -> tuple[str, dict[str, list[str]]]:
    kept = _NAMES.get(der)
    if kept is None:
        if len(_NAMES) >= 1024:
            _NAMES.clear()
        parsed = name()
        kept = _NAMES[der] = (parsed.rfc4514_string(), _name_attributes(parsed))
    return kept


def _raw_names(der: bytes) -> tuple[bytes, bytes] | None:
    """The issuer and subject of a certificate's DER as written (RFC 5280 §4.1: TBSCertificate is version,
    serialNumber, signature, issuer, validity, subject), with no ``Name`` objects built; None if the DER is
    not laid out so (the caller then reads the names the slow way)."""
    ends: list[int] = []
    try:
        if der[0] != 0x30:
            return None
        pos = 0
        # Certificate, TBSCertificate (entered), [0] version (skipped when there), serialNumber, signature,
        # issuer, validity, subject (each skipped, its end kept).
        for tag in (0x30, 0x30, 0xA0, 0x02, 0x30, 0x30, 0x30, 0x30):
            if der[pos] != tag:
                if tag == 0xA0:
                    continue
                return None
            length = der[pos + 1]
            start = pos + 2
            if length & 0x80:
                count = length & 0x7F
                length = int.from_bytes(der[start:start + count], "big")
                start += count
            end = start + length
            if tag == 0x30 and len(ends) < 2:  # the two outer sequences: go inside
                if not ends and end != len(der):
                    return None
                ends.append(end)
                pos = start
            else:
                ends.append(end)
                pos = end
    except IndexError:
        return None
    # ends: certificate, tbs, [version], serial, signature, issuer, validity, subject
    issuer_end, validity_end, subject_end = ends[-3], ends[-2], ends[-1]
    issuer_start = ends[-4]
    return der[issuer_start:issuer_end], der[validity_end:subject_end]


_CA_SUBJECTS: dict[int, tuple[x509.Certificate, str]] = {}


def ca_subject(cert: x509.Certificate) -> str:
    """The RFC 4514 subject of a CA certificate of a verified chain: the same objects (a bundle's roots and
    intermediates) come back in every chain, so each is read once (held here, so an id is not reused)."""
    kept = _CA_SUBJECTS.get(id(cert))
    if kept is None or kept[0] is not cert:
        if len(_CA_SUBJECTS) >= 1024:
            _CA_SUBJECTS.clear()
        kept = _CA_SUBJECTS[id(cert)] = (cert, _dn(cert.subject)[0])
    return kept[1]


def _name_attributes(name: x509.Name) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for attr in name:
        label = _ATTRIBUTES.get(attr.oid, attr.oid.dotted_string)
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        out.setdefault(label, []).append(value)
    return out


def _key_info(cert: x509.Certificate) -> tuple[str, int]:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__, 0


def _timestamp(value: datetime) -> float:
    return value.timestamp()


def spiffe_of(uris: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(SPIFFE ID, trust domain) from the URI SANs; raise ``Denied`` on a bad or repeated SPIFFE ID."""
    spiffe = [u for u in uris if is_spiffe_uri(u)]
    if not spiffe:
        return None, None
    if len(spiffe) > 1:
        raise Denied(reasons.CERT_SPIFFE_INVALID, f"{len(spiffe)} SPIFFE IDs in one certificate (one allowed)")
    kept = _SPIFFE_IDS.get(spiffe[0])
    if kept is None:
        try:
            sid = parse_spiffe_id(spiffe[0])
        except SpiffeIdError as exc:
            raise Denied(reasons.CERT_SPIFFE_INVALID, str(exc)) from exc
        if len(_SPIFFE_IDS) >= 1024:
            _SPIFFE_IDS.clear()
        kept = _SPIFFE_IDS[spiffe[0]] = (str(sid), sid.trust_domain)
    return kept


#: Valid SPIFFE IDs already parsed, by their URI: a workload's renewed certificates repeat its ID (bounded).
_SPIFFE_IDS: dict[str, tuple[str, str]] = {}


def extract_identity(leaf: x509.Certificate, leaf_der: bytes, chain: list[x509.Certificate],
                     trust_bundle: str, *, sans: Sans | None = None,
                     spiffe: tuple[str | None, str | None] | None = None, digest: bytes | None = None,
                     validity: tuple[float, float] | None = None) -> CertIdentity:
    """The identity of ``leaf`` (whose DER is ``leaf_der``) verified as ``chain`` under ``trust_bundle``.
    ``sans``, ``spiffe`` (``spiffe_of`` its URIs), ``digest`` (the SHA-256 of ``leaf_der``) and ``validity``
    (its not-before and not-after timestamps), when the caller already has them."""
    if sans is None:
        sans = read_sans(leaf)
    spiffe_id, trust_domain = spiffe_of(sans.uris) if spiffe is None else spiffe
    key_type, key_size = _key_info(leaf)
    tp = thumbprint(leaf_der) if digest is None else b64url_encode(digest)  # RFC 8705 §3.1: x5t#S256
    raw = _raw_names(leaf_der)
    if raw is None:
        subject, subject_attributes = leaf.subject.rfc4514_string(), _name_attributes(leaf.subject)
        issuer, issuer_attributes = _dn(leaf.issuer)
    else:
        # Kept by their DER, as written: a returning client's renewed certificate repeats its subject.
        subject, subject_attributes = _dn_by_der(raw[1], lambda: leaf.subject)
        issuer, issuer_attributes = _dn_by_der(raw[0], lambda: leaf.issuer)
    serial = format(leaf.serial_number, "x")
    if validity is None:
        validity = _timestamp(leaf.not_valid_before_utc), _timestamp(leaf.not_valid_after_utc)
    not_before, not_after = validity
    parts = _Parts(leaf, subject_attributes, issuer_attributes, tuple(ca_subject(c) for c in chain[1:]))
    return CertIdentity(
        thumbprint=tp, subject=subject, issuer=issuer, serial=serial, not_before=not_before,
        not_after=not_after, spiffe_id=spiffe_id, trust_domain=trust_domain, trust_bundle=trust_bundle,
        dns=sans.dns, uris=sans.uris, emails=sans.emails, ips=sans.ips, key_type=key_type, key_size=key_size,
        _parts=parts,
    )
