"""OPA's ``crypto.x509.parse_certificates``: certificates as Go's ``x509.Certificate`` reads in JSON.

The input is PEM, base64 of PEM, or base64 of DER (one or more certificates
concatenated), as OPA takes it. The members are those of Go's structure that
policies read (Subject, Issuer, validity, SANs, key usages, basic
constraints, raw fields in base64); the public key itself and a serial
number beyond 64 bits, which the engine cannot carry as a number, are left out.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    SignatureAlgorithmOID,
)

from pdp.policy.builtins._types import BuiltinError, string

_NAME = "crypto.x509.parse_certificates"

# Go's crypto/x509 enumerations.
_SIGNATURE_ALGORITHMS = {
    SignatureAlgorithmOID.RSA_WITH_MD5: 2, SignatureAlgorithmOID.RSA_WITH_SHA1: 3,
    SignatureAlgorithmOID.RSA_WITH_SHA256: 4, SignatureAlgorithmOID.RSA_WITH_SHA384: 5,
    SignatureAlgorithmOID.RSA_WITH_SHA512: 6, SignatureAlgorithmOID.DSA_WITH_SHA1: 7,
    SignatureAlgorithmOID.DSA_WITH_SHA256: 8, SignatureAlgorithmOID.ECDSA_WITH_SHA1: 9,
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: 10, SignatureAlgorithmOID.ECDSA_WITH_SHA384: 11,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: 12, SignatureAlgorithmOID.ED25519: 16,
}
_EXT_KEY_USAGES = {
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: 0, ExtendedKeyUsageOID.SERVER_AUTH: 1,
    ExtendedKeyUsageOID.CLIENT_AUTH: 2, ExtendedKeyUsageOID.CODE_SIGNING: 3,
    ExtendedKeyUsageOID.EMAIL_PROTECTION: 4, ExtendedKeyUsageOID.TIME_STAMPING: 8,
    ExtendedKeyUsageOID.OCSP_SIGNING: 9,
}
_NAME_LISTS = (("Country", NameOID.COUNTRY_NAME), ("Organization", NameOID.ORGANIZATION_NAME),
               ("OrganizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME), ("Locality", NameOID.LOCALITY_NAME),
               ("Province", NameOID.STATE_OR_PROVINCE_NAME), ("StreetAddress", NameOID.STREET_ADDRESS),
               ("PostalCode", NameOID.POSTAL_CODE))
_U64 = 2**64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _or_null(items: list[Any]) -> list[Any] | None:
    """Go marshals an empty slice of a parsed certificate as null."""
    return items or None


def _name(name: x509.Name) -> dict[str, Any]:
    def values(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in name.get_attributes_for_oid(oid)]

    doc: dict[str, Any] = {key: _or_null(values(oid)) for key, oid in _NAME_LISTS}
    serial = values(NameOID.SERIAL_NUMBER)
    common = values(NameOID.COMMON_NAME)
    doc["SerialNumber"] = serial[-1] if serial else ""
    doc["CommonName"] = common[-1] if common else ""
    doc["Names"] = _or_null([{"Type": [int(p) for p in a.oid.dotted_string.split(".")], "Value": str(a.value)}
                             for a in name])
    doc["ExtraNames"] = None
    return doc


def _public_key_algorithm(cert: x509.Certificate) -> int:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return 1
    if isinstance(key, dsa.DSAPublicKey):
        return 2
    if isinstance(key, ec.EllipticCurvePublicKey):
        return 3
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 4
    return 0


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(usage: x509.KeyUsage | None) -> int:
    if usage is None:
        return 0
    bits = [usage.digital_signature, usage.content_commitment, usage.key_encipherment, usage.data_encipherment,
            usage.key_agreement, usage.key_cert_sign, usage.crl_sign,
            usage.key_agreement and usage.encipher_only, usage.key_agreement and usage.decipher_only]
    return sum(1 << i for i, bit in enumerate(bits) if bit)


def _document(cert: x509.Certificate) -> dict[str, Any]:
    san = _extension(cert, x509.SubjectAlternativeName)
    basic = _extension(cert, x509.BasicConstraints)
    eku = _extension(cert, x509.ExtendedKeyUsage)
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    aki = _extension(cert, x509.AuthorityKeyIdentifier)
    aia = _extension(cert, x509.AuthorityInformationAccess)
    crl = _extension(cert, x509.CRLDistributionPoints)
    uris = [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] if san else []
    doc: dict[str, Any] = {
        "Raw": _b64(cert.public_bytes(Encoding.DER)),
        "RawTBSCertificate": _b64(cert.tbs_certificate_bytes),
        "RawSubjectPublicKeyInfo": _b64(cert.public_key().public_bytes(Encoding.DER,
                                                                        PublicFormat.SubjectPublicKeyInfo)),
        "RawSubject": _b64(cert.subject.public_bytes()),
        "RawIssuer": _b64(cert.issuer.public_bytes()),
        "Signature": _b64(cert.signature),
        "SignatureAlgorithm": _SIGNATURE_ALGORITHMS.get(cert.signature_algorithm_oid, 0),
        "PublicKeyAlgorithm": _public_key_algorithm(cert),
        "Version": cert.version.value + 1,
        "Issuer": _name(cert.issuer),
        "Subject": _name(cert.subject),
        "NotBefore": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "NotAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "KeyUsage": _key_usage(_extension(cert, x509.KeyUsage)),
        "ExtKeyUsage": _or_null([_EXT_KEY_USAGES[u] for u in eku if u in _EXT_KEY_USAGES]) if eku else None,
        "BasicConstraintsValid": basic is not None,
        "IsCA": bool(basic and basic.ca),
        "MaxPathLen": (basic.path_length if basic and basic.path_length is not None else -1) if basic else 0,
        "MaxPathLenZero": bool(basic and basic.path_length == 0),
        "SubjectKeyId": _b64(ski.digest) if ski else None,
        "AuthorityKeyId": _b64(aki.key_identifier) if aki and aki.key_identifier else None,
        "OCSPServer": _or_null([str(d.access_location.value) for d in aia
                                if d.access_method == AuthorityInformationAccessOID.OCSP]) if aia else None,
        "IssuingCertificateURL": _or_null([str(d.access_location.value) for d in aia
                                           if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS])
        if aia else None,
        "DNSNames": _or_null(san.get_values_for_type(x509.DNSName)) if san else None,
        "EmailAddresses": _or_null(san.get_values_for_type(x509.RFC822Name)) if san else None,
        "IPAddresses": _or_null([str(a) for a in san.get_values_for_type(x509.IPAddress)]) if san else None,
        "URIStrings": _or_null(uris),
        "CRLDistributionPoints": _or_null([str(n.value) for p in crl for n in (p.full_name or [])
                                           if isinstance(n, x509.UniformResourceIdentifier)]) if crl else None,
    }
    if 0 <= cert.serial_number < _U64:
        doc["SerialNumber"] = cert.serial_number
    return doc


def _from_pem(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BuiltinError(_NAME, f"failed to extract a certificate from PEM: {exc}") from exc


def parse_certificates(certs: Any) -> list[dict[str, Any]]:
    """Every certificate in ``certs`` (PEM, base64 PEM or base64 DER)."""
    text = string(_NAME, 1, certs)
    if text.startswith("-----BEGIN"):
        parsed = _from_pem(text.encode())
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BuiltinError(_NAME, f"illegal base64 data: {exc}") from exc
        if raw.startswith(b"-----BEGIN"):
            parsed = _from_pem(raw)
        else:
            parsed = _from_der(raw)
    return [_document(c) for c in parsed]


def _from_der(raw: bytes) -> list[x509.Certificate]:
    """One or more DER certificates back to back, as Go's ``x509.ParseCertificates`` reads them."""
    out: list[x509.Certificate] = []
    while raw:
        length = _der_length(raw)
        try:
            out.append(x509.load_der_x509_certificate(raw[:length]))
        except ValueError as exc:
            raise BuiltinError(_NAME, "x509: malformed certificate") from exc
        raw = raw[length:]
    if not out:
        raise BuiltinError(_NAME, "x509: malformed certificate")
    return out


def _der_length(raw: bytes) -> int:
    """The length of the DER SEQUENCE at the start of ``raw`` (tag, length and contents)."""
    if len(raw) < 2 or raw[0] != 0x30:
        raise BuiltinError(_NAME, "x509: malformed certificate")
    first = raw[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(raw) < 2 + count:
        raise BuiltinError(_NAME, "x509: malformed certificate")
    return 2 + count + int.from_bytes(raw[2:2 + count], "big")
