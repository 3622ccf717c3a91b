"""Certificates that name their revocation sources, and a real HTTP server that serves them.

``leaf`` makes client certificates with CRL distribution points and an OCSP
responder in their Authority Information Access; ``crl_der`` and
``ocsp_response`` build CRLs and OCSP responses with ``cryptography``;
``RevocationServer`` serves both over real HTTP on a loopback port, counts the
requests per path, and can be told to be slow or to answer anything. The
``der_*`` helpers edit DER where a broken CA or responder sends what the
builders refuse to make; ``with_single_extension`` re-signs an OCSP response
with an extension in its SingleResponse.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from pdp.devpki import Issued, make_ca, new_key

Handler = Callable[[bytes], bytes]


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def leaf(ca: Issued, *, crl_urls: Iterable[str] = (), ocsp_urls: Iterable[str] = (), name: str = "client",
         ldap: bool = False) -> Issued:
    """A client certificate (SPIFFE ID spiffe://example.org/<name>) issued by ``ca``, naming the given sources."""
    key = new_key()
    start = _now() - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://example.org/{name}")]), critical=False)
    )
    points = [x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None) for u in crl_urls]
    if ldap:
        points.insert(0, x509.DistributionPoint(
            [x509.UniformResourceIdentifier("ldap://ldap.example.org/cn=ca?certificateRevocationList")],
            None, None, None))
    if points:
        builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
    access = [x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u))
              for u in ocsp_urls]
    if access:
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def responder(ca: Issued, *, ocsp_signing: bool = True, days: int = 30) -> Issued:
    """A delegated OCSP responder certificate issued by ``ca`` (with EKU id-kp-OCSPSigning unless told not)."""
    key = new_key()
    start = _now() - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocsp responder")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.OCSP_SIGNING if ocsp_signing else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def crl_der(ca: Issued, revoked: Iterable[Issued] = (), *, signer: Issued | None = None,
            last_update: datetime | None = None, lifetime: timedelta = timedelta(days=1),
            extensions: Iterable[x509.ExtensionType] = (), reason: x509.ReasonFlags | None = None) -> bytes:
    """A DER CRL naming ``ca`` as issuer, listing ``revoked`` (with ``reason`` if given), signed by ``signer``
    (``ca`` by default)."""
    start = last_update or _now() - timedelta(minutes=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(start)
               .next_update(start + lifetime))
    for cert in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(cert.cert.serial_number).revocation_date(start)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    for ext in extensions:
        builder = builder.add_extension(ext, critical=True)
    return builder.sign((signer or ca).key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def ocsp_response(cert: Issued, issuer: Issued, *, status: str = "good", signer: Issued | None = None,
                  include: Iterable[Issued] = (), this_update: datetime | None = None,
                  lifetime: timedelta | None = timedelta(hours=1), nonce: bytes | None = None,
                  by_key: bool = False, reason: x509.ReasonFlags | None = None) -> bytes:
    """A DER OCSP response about ``cert`` signed by ``signer`` (the issuer by default), carrying ``include``."""
    start = this_update or _now() - timedelta(minutes=1)
    cert_status = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
                   "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
    signer = signer or issuer
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert.cert, issuer=issuer.cert, algorithm=hashes.SHA1(), cert_status=cert_status,
        this_update=start, next_update=start + lifetime if lifetime is not None else None,
        revocation_time=start if status == "revoked" else None, revocation_reason=reason,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH if by_key else ocsp.OCSPResponderEncoding.NAME, signer.cert)
    certs = [c.cert for c in include]
    if certs:
        builder = builder.certificates(certs)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def request_nonce(body: bytes) -> bytes | None:
    try:
        return ocsp.load_der_ocsp_request(body).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


class RevocationServer:
    """A real HTTP server on a loopback port. ``routes[path]`` turns the request body into the answer (GET gets
    b""); ``delay`` holds every answer that long; ``requests[path]`` counts what was asked; ``bodies`` and
    ``content_types`` keep what POSTs sent."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.delay = 0.0
        self.requests: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.content_types: list[str] = []
        self._released = threading.Event()
        outer = self

        class Serve(BaseHTTPRequestHandler):
            def _answer(self, body: bytes) -> None:
                outer.requests[self.path] += 1
                if outer.delay and outer._released.wait(outer.delay):
                    return
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                data = route(body)
                self.send_response(200)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.bodies.append(body)
                outer.content_types.append(self.headers.get("content-type", ""))
                self._answer(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def total(self) -> int:
        return sum(self.requests.values())

    def __enter__(self) -> RevocationServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()  # a slow answer in progress ends now
        self.httpd.shutdown()
        self.httpd.server_close()


def small_pki() -> tuple[Issued, Issued]:
    """A root and an intermediate (path length 0) of their own, so tests cannot disturb one another's caches."""
    root = make_ca("revocation test root")
    return root, make_ca("revocation test intermediate", issuer=root, path_length=0)


def intermediate(root: Issued, *, crl_urls: Iterable[str] = (), name: str = "revocation test intermediate",
                 ) -> Issued:
    """An intermediate CA under ``root`` (path length 0) naming CRL distribution points of ``root``'s."""
    key = new_key()
    start = _now() - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
    )
    points = [x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None) for u in crl_urls]
    if points:
        builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
    return Issued(builder.sign(root.key, hashes.SHA256()), key)


# -- DER surgery


def der_span(data: bytes, off: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the DER element at ``off``."""
    off += 1
    length = data[off]
    off += 1
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[off:off + count], "big")
        off += count
    return off, off + length


def der_value(element: bytes) -> bytes:
    start, end = der_span(element, 0)
    return element[start:end]


def der_elements(value: bytes) -> list[bytes]:
    out: list[bytes] = []
    off = 0
    while off < len(value):
        _, end = der_span(value, off)
        out.append(value[off:end])
        off = end
    return out


def der_encode(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_sign(key: ec.EllipticCurvePrivateKey, tbs: bytes) -> bytes:
    """The BIT STRING of an ECDSA-SHA256 signature over ``tbs``."""
    return der_encode(0x03, b"\0" + key.sign(tbs, ec.ECDSA(hashes.SHA256())))


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return der_encode(0x06, bytes(body))


def with_single_extension(der: bytes, signer: Issued, oid: str, value: bytes, *, critical: bool) -> bytes:
    """The OCSP response ``der`` (one SingleResponse, signed by ``signer``) with an extension ``oid`` (its
    ``value`` DER) added to the SingleResponse's singleExtensions, signed again by ``signer``."""
    status, response_bytes = der_elements(der_value(der))
    response_type, basic = der_elements(der_value(der_value(response_bytes)))
    tbs, *rest = der_elements(der_value(der_value(basic)))
    fields = der_elements(der_value(tbs))
    at = next(i for i, f in enumerate(fields) if f[0] == 0x30)  # responses
    (single,) = der_elements(der_value(fields[at]))
    extension = der_encode(0x30, der_oid(oid) + (b"\x01\x01\xff" if critical else b"")
                           + der_encode(0x04, value))
    single = der_encode(0x30, der_value(single) + der_encode(0xA1, der_encode(0x30, extension)))
    new_tbs = der_encode(0x30, b"".join([*fields[:at], der_encode(0x30, single), *fields[at + 1:]]))
    assert isinstance(signer.key, ec.EllipticCurvePrivateKey)
    basic = der_encode(0x30, new_tbs + rest[0] + der_sign(signer.key, new_tbs) + b"".join(rest[2:]))
    return der_encode(0x30, status + der_encode(0xA0, der_encode(0x30, response_type + der_encode(0x04, basic))))
