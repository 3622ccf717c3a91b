"""OCSP (RFC 6960): requests for a certificate's status and verification of the responder's answer.

Sans-I/O: this module builds the DER request and judges the DER response; the
caller (``pdp.certificates.online_revocation``) carries them over HTTP (§A.1:
POST, ``application/ocsp-request``) and caches the answers.

- **certID hash: SHA-1.** RFC 6960 §4.1.1 lets the requester choose, but the
  responders deployed today (the CA/Browser Forum baseline requires only SHA-1
  support, and several CAs index their pre-signed answers by it) answer
  SHA-1 certIDs and may refuse others with ``unauthorized``. The hash only
  names the certificate asked about; the answer's integrity rests on its
  signature. A response is matched with the algorithm it itself names.
- **Who may answer** (§4.2.2.2): the certificate's issuing CA itself, or a
  delegated responder whose certificate was issued directly by that CA, carries
  EKU ``id-kp-OCSPSigning`` and is valid at the time of checking. The responder
  is named in ``responderID`` (by name or by key hash) and must be that
  signer. A delegated responder's own revocation status is not checked (the
  ``id-pkix-ocsp-nocheck`` convention).
- **Freshness** (§4.2.2.1): ``thisUpdate`` may not lie in the future (beyond
  ``freshness.LEEWAY`` of clock skew). Until when an answer vouches (its
  ``nextUpdate``; without one, "newer information is always available", only
  briefly) is ``pdp.certificates.freshness``'s rule, applied by the caller: a
  stale ``good`` vouches for nothing, a stale ``revoked`` still revokes
  (except ``certificateHold``).
- **Nonce** (§4.4.1): optional. Sent, and echoed, it must match; responders that
  serve pre-signed answers leave it out, which is accepted.
- **Extensions** (§4.4): a critical response or single extension this module
  does not know makes the whole response unusable (kind ``unsupported``).
- **Several SingleResponses about the certificate**: any ``revoked`` makes it
  revoked; otherwise any ``unknown`` makes it unknown; only when every one says
  ``good`` is it good (until the earliest of their ``nextUpdate``).
- ``good`` is good, ``revoked`` is ``cert_revoked``; ``unknown`` and every
  failure above leave the status unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    CRLEntryExtensionOID,
    ExtendedKeyUsageOID,
    OCSPExtensionOID,
    SignatureAlgorithmOID,
)

from pdp.certificates.freshness import issued_in_future

#: Response extensions understood here (§4.4): the nonce, and the extended revoked definition (§4.4.8: a
#: certificate never issued may be answered ``revoked``, which is still ``revoked``).
_KNOWN_RESPONSE_EXTENSIONS = frozenset((OCSPExtensionOID.NONCE.dotted_string, "1.3.6.1.5.5.7.48.1.9"))

#: Single extensions understood here: the CRL entry extensions (§4.4.5) reason and invalidity date, the CRL
#: reference (§4.4.2) and the archive cutoff (§4.4.4); none changes which certificate an answer is about.
_KNOWN_SINGLE_EXTENSIONS = frozenset((CRLEntryExtensionOID.CRL_REASON.dotted_string,
                                      CRLEntryExtensionOID.INVALIDITY_DATE.dotted_string,
                                      "1.3.6.1.5.5.7.48.1.3", "1.3.6.1.5.5.7.48.1.6"))

REQUEST_TYPE = "application/ocsp-request"
RESPONSE_TYPE = "application/ocsp-response"


class OcspError(ValueError):
    """The answer cannot vouch for the certificate; ``kind`` names why (for the failure counters)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OcspAnswer:
    """A verified answer: ``revoked`` (``on_hold``: with reason certificateHold) or good, made at ``this_update``,
    promised until ``next_update`` (None: no promise)."""

    revoked: bool
    this_update: float
    next_update: float | None
    on_hold: bool = False


def ocsp_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """The http(s) OCSP responder URLs of the certificate's Authority Information Access (RFC 5280 §4.2.2.1)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(d.access_location.value for d in aia
                 if d.access_method == AuthorityInformationAccessOID.OCSP
                 and isinstance(d.access_location, x509.UniformResourceIdentifier)
                 and d.access_location.value.lower().startswith(("http://", "https://")))


def build_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None) -> bytes:
    """The DER OCSPRequest for ``cert`` (a SHA-1 certID, see the module docstring), with ``nonce`` if given."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def verify_response(data: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: float,
                    nonce: bytes | None = None) -> OcspAnswer:
    """Judge the DER OCSPResponse ``data`` about ``cert`` (issued by ``issuer``) at ``now``; raise ``OcspError``
    unless it is a properly signed ``good`` or ``revoked`` for exactly that certificate, not made in the future.
    Whether it is still current is for ``pdp.certificates.freshness`` to say."""
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response: {exc}", "malformed") from exc
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"the responder answered {response.response_status.name}", "responder_error")
    try:
        _check_signature(response, issuer, now)
        _check_extensions(response)
        singles = _singles_about(response, cert, issuer)
        if nonce is not None:
            _check_nonce(response, nonce)
        answers = [(s.certificate_status, s.this_update_utc.timestamp(),
                    s.next_update_utc.timestamp() if s.next_update_utc is not None else None,
                    s.certificate_status == ocsp.OCSPCertStatus.REVOKED
                    and s.revocation_reason == x509.ReasonFlags.certificate_hold) for s in singles]
    except OcspError:
        raise
    except (ValueError, TypeError, x509.DuplicateExtension) as exc:  # fields are parsed on access
        raise OcspError(f"unreadable OCSP response: {exc}", "malformed") from exc
    if any(issued_in_future(this_update, now) for _, this_update, _, _ in answers):
        raise OcspError("the OCSP answer's thisUpdate lies in the future", "stale")
    revoked = [a for a in answers if a[0] == ocsp.OCSPCertStatus.REVOKED]
    if revoked:
        # A responder that says revoked once has said it, whatever else it says: the newest such statement,
        # a permanent revocation rather than a hold when it made both.
        _, this_update, next_update, on_hold = max(revoked, key=lambda a: (not a[3], a[1]))
        return OcspAnswer(True, this_update, next_update, on_hold)
    if any(a[0] == ocsp.OCSPCertStatus.UNKNOWN for a in answers):
        raise OcspError("the responder does not know the certificate", "unknown_status")
    # Every one says good: good as long as all of them vouch (the oldest, undated if any is).
    next_updates = [a[2] for a in answers]
    return OcspAnswer(False, min(a[1] for a in answers),
                      None if None in next_updates else min(n for n in next_updates if n is not None))


def _singles_about(response: ocsp.OCSPResponse, cert: x509.Certificate,
                   issuer: x509.Certificate) -> list[ocsp.OCSPSingleResponse]:
    """The answers about ``cert``: its serial, its issuer's name hash and key hash (§4.1.1), each hashed with the
    algorithm the answer names."""
    found: list[ocsp.OCSPSingleResponse] = []
    for single in response.responses:
        if single.serial_number != cert.serial_number:
            continue
        try:
            expected = (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, single.hash_algorithm).build())
        except (ValueError, TypeError):  # an algorithm a certID may not use
            continue
        if (single.issuer_name_hash, single.issuer_key_hash) == (expected.issuer_name_hash,
                                                                  expected.issuer_key_hash):
            found.append(single)
    if not found:
        raise OcspError(f"the OCSP response is not about certificate {format(cert.serial_number, 'x')} of "
                        f"{issuer.subject.rfc4514_string()}", "mismatch")
    return found


def _check_extensions(response: ocsp.OCSPResponse) -> None:
    """§4.4: a critical extension that is not understood forbids using the response."""
    for ext in response.extensions:
        if ext.critical and ext.oid.dotted_string not in _KNOWN_RESPONSE_EXTENSIONS:
            raise OcspError(f"the OCSP response carries a critical extension {ext.oid.dotted_string} that cannot "
                            "be processed", "unsupported")
    # ``cryptography`` shows a single response's extensions only when there is one single response: read them
    # from the signed bytes.
    for oid in _critical_single_extensions(response.tbs_response_bytes):
        if oid not in _KNOWN_SINGLE_EXTENSIONS:
            raise OcspError(f"an OCSP single response carries a critical extension {oid} that cannot be "
                            "processed", "unsupported")


def _critical_single_extensions(tbs: bytes) -> list[str]:
    """The dotted OIDs of the critical ``singleExtensions`` of every SingleResponse in the DER ResponseData ``tbs``
    (§4.2.1: ResponseData ::= SEQUENCE { [0] version, responderID, producedAt, responses SEQUENCE OF
    SingleResponse, [1] responseExtensions }; SingleResponse ::= SEQUENCE { certID, certStatus, thisUpdate,
    [0] nextUpdate, [1] singleExtensions })."""
    try:
        fields = _der_children(_der_value(tbs))
        responses = next(f for f in fields if f[0] == 0x30)  # the one universal SEQUENCE of ResponseData
        found: list[str] = []
        for single in _der_children(_der_value(responses)):
            for part in _der_children(_der_value(single))[3:]:  # after certID, certStatus, thisUpdate
                if part[0] != 0xA1:
                    continue
                for ext in _der_children(_der_value(_der_value(part))):
                    oid, *rest = _der_children(_der_value(ext))
                    if oid[0] != 0x06:
                        raise ValueError("an extension without its OID")
                    if len(rest) == 2 and rest[0][0] == 0x01 and _der_value(rest[0]) != b"\x00":
                        found.append(_dotted(_der_value(oid)))
        return found
    except (ValueError, IndexError, StopIteration) as exc:
        raise OcspError(f"unreadable OCSP single response: {exc}", "malformed") from exc


def _der_span(data: bytes, off: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the DER element at ``off`` (definite lengths only)."""
    off += 1
    first = data[off]
    off += 1
    if first & 0x80:
        count = first & 0x7F
        if not 0 < count <= 4 or off + count > len(data):
            raise ValueError("a DER length that cannot be read")
        length = int.from_bytes(data[off:off + count], "big")
        off += count
    else:
        length = first
    if off + length > len(data):
        raise ValueError("a DER element longer than what holds it")
    return off, off + length


def _der_value(element: bytes) -> bytes:
    start, end = _der_span(element, 0)
    return element[start:end]


def _der_children(value: bytes) -> list[bytes]:
    out: list[bytes] = []
    off = 0
    while off < len(value):
        _, end = _der_span(value, off)
        out.append(value[off:end])
        off = end
    return out


def _dotted(oid: bytes) -> str:
    """An OBJECT IDENTIFIER's content octets as a dotted string (X.690 §8.19)."""
    arcs: list[int] = []
    value = 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs or value:
        raise ValueError("an OID that cannot be read")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _check_nonce(response: ocsp.OCSPResponse, nonce: bytes) -> None:
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return
    if echoed != nonce:
        raise OcspError("the OCSP response echoes another nonce", "mismatch")


def _check_signature(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> None:
    """Signed by the issuing CA, or by a responder that CA delegated to (§4.2.2.2), named in responderID."""
    if _names(response, issuer) and _signature_valid(response, issuer):
        return
    for candidate in response.certificates:
        if not (_names(response, candidate) and _signature_valid(response, candidate)):
            continue
        problem = _delegation_problem(candidate, issuer, now)
        if problem:
            raise OcspError(f"the OCSP responder {candidate.subject.rfc4514_string()} {problem}", "signature")
        return
    raise OcspError("the OCSP response is signed neither by the issuing CA nor by a responder it delegated to",
                    "signature")


def _delegation_problem(responder: x509.Certificate, issuer: x509.Certificate, now: float) -> str:
    """Why ``responder`` may not answer for ``issuer``'s certificates; "" when it may."""
    try:
        responder.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return "is not certified by the issuing CA"
    try:
        usages = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "lacks id-kp-OCSPSigning"
    if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
        return "lacks id-kp-OCSPSigning"
    if not responder.not_valid_before_utc.timestamp() <= now <= responder.not_valid_after_utc.timestamp():
        return "is not valid now"
    return ""


def _names(response: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    """Whether responderID (§4.2.2.3: byName, or byKey: the SHA-1 of the public key's BIT STRING) is ``signer``."""
    if response.responder_name is not None:
        return response.responder_name == signer.subject
    try:
        key_hash = x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
    except (ValueError, TypeError):
        return False
    return response.responder_key_hash == key_hash


def _signature_valid(response: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    data, signature = response.tbs_response_bytes, response.signature
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            if response.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
                return False  # its parameters are not exposed: refused rather than guessed
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) and algorithm is None:
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
