"""What a verified client certificate says about its holder.

Everything the policy may want, extracted once per certificate: the RFC 8705
thumbprint, subject and issuer (RFC 4514 strings and per-attribute lists),
serial, validity, SANs by type, the SPIFFE ID and trust domain (exactly one
``spiffe://`` URI SAN, or none), and the key type and size.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from pdp import reasons
from pdp.certificates.spiffe import SpiffeIdError, is_spiffe_uri, parse_spiffe_id
from pdp.credentials.rfc8705 import thumbprint
from pdp.errors import Denied

_ATTRIBUTES = {
    NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
    NameOID.DOMAIN_COMPONENT: "DC", NameOID.SERIAL_NUMBER: "serialNumber", NameOID.EMAIL_ADDRESS: "emailAddress",
}


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
    #: The ``input.cert`` document for the policy, built once per certificate.
    policy_view: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    #: The leaf as URL-encoded PEM, as Envoy puts it in ``attributes.source.certificate``.
    url_encoded_pem: str = field(repr=False, compare=False, default="")


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


_NAMES: dict[bytes, tuple[str, dict[str, list[str]]]] = {}


def _dn(name: x509.Name) -> tuple[str, dict[str, list[str]]]:
    """A name's RFC 4514 string and attributes, kept by its DER: an issuer's name repeats in every
    certificate it signed, and a CA's subject in every chain (bounded: a flood starts the list again)."""
    der = name.public_bytes()
    kept = _NAMES.get(der)
    if kept is None:
        if len(_NAMES) >= 1024:
            _NAMES.clear()
        kept = _NAMES[der] = (name.rfc4514_string(), _name_attributes(name))
    return kept


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
    try:
        sid = parse_spiffe_id(spiffe[0])
    except SpiffeIdError as exc:
        raise Denied(reasons.CERT_SPIFFE_INVALID, str(exc)) from exc
    return str(sid), sid.trust_domain


def extract_identity(leaf: x509.Certificate, leaf_der: bytes, chain: list[x509.Certificate],
                     trust_bundle: str) -> CertIdentity:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    dns = tuple(san.get_values_for_type(x509.DNSName))
    uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    emails = tuple(san.get_values_for_type(x509.RFC822Name))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    spiffe_id, trust_domain = spiffe_of(uris)
    key_type, key_size = _key_info(leaf)
    tp = thumbprint(leaf_der)
    subject = leaf.subject.rfc4514_string()
    issuer, issuer_attributes = _dn(leaf.issuer)
    serial = format(leaf.serial_number, "x")
    not_before = _timestamp(leaf.not_valid_before_utc)
    not_after = _timestamp(leaf.not_valid_after_utc)
    view = {
        "present": True,
        "thumbprint": tp,
        "subject": {"dn": subject, **_name_attributes(leaf.subject)},
        "issuer": {"dn": issuer, **{k: list(v) for k, v in issuer_attributes.items()}},
        "serial": serial,
        "not_before": int(not_before),
        "not_after": int(not_after),
        "spiffe_id": spiffe_id,
        "trust_domain": trust_domain,
        "trust_bundle": trust_bundle,
        "sans": {"dns": list(dns), "uri": list(uris), "email": list(emails), "ip": list(ips)},
        "key": {"type": key_type, "size": key_size},
        "chain": [subject, *(_dn(c.subject)[0] for c in chain[1:])],
    }
    pem = leaf.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return CertIdentity(
        thumbprint=tp, subject=subject, issuer=issuer, serial=serial, not_before=not_before,
        not_after=not_after, spiffe_id=spiffe_id, trust_domain=trust_domain, trust_bundle=trust_bundle,
        dns=dns, uris=uris, emails=emails, ips=ips, key_type=key_type, key_size=key_size,
        policy_view=view, url_encoded_pem=url_quote_pem(pem),
    )
