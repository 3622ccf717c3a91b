"""TLS on pdp's own listeners: the gateways that ask for decisions are authenticated too.

Both listeners can require a client certificate from a configured CA and then
admit only an allowlist of caller identities: SPIFFE IDs (or other URI SANs),
``dns:NAME`` for DNS SANs. A caller outside the list, or whose certificate is
on pdp's own revocation list (by thumbprint or SPIFFE ID), is refused (HTTP
403, gRPC ``PERMISSION_DENIED``) before any decision is made: a revoked
gateway asks for no decision, a revoked trusted proxy is not believed, a
revoked admin administers nothing. ``caller_refusal`` is that one rule, for
the HTTP gate, the gRPC gate and the admin endpoints.

uvicorn does not publish the peer certificate to the application, so
``tls_protocol`` gives it an HTTP protocol class that adds the ASGI TLS
extension (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings)
to every request on a TLS connection.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pdp.service.coalescing import CoalescingH11Protocol

if TYPE_CHECKING:
    from pdp.certificates.revocation_list import RevocationList

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: This replica's revocation list as it is now (the service's; looked up at each call).
Revocations = Callable[[], "RevocationList"]


@dataclass(frozen=True)
class ListenerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None
    allowed_callers: tuple[str, ...] = ()


def caller_identities(cert: x509.Certificate) -> frozenset[str]:
    """The names a caller's certificate gives it: URI SANs as they are, DNS SANs as ``dns:NAME``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset([*san.get_values_for_type(x509.UniformResourceIdentifier),
                      *(f"dns:{d.lower()}" for d in san.get_values_for_type(x509.DNSName))])


def caller_names(cert_der: bytes | None) -> frozenset[str]:
    """``caller_identities`` of a DER certificate; empty when there is none or it is unreadable."""
    if not cert_der:
        return frozenset()
    try:
        return caller_identities(x509.load_der_x509_certificate(cert_der))
    except ValueError:
        return frozenset()


def identity_key(name: str) -> str:
    """How an allowlist entry compares: DNS names case-insensitively, URIs (SPIFFE IDs) exactly."""
    return name.lower() if name[:4].lower() == "dns:" else name


def caller_allowed(allowed: tuple[str, ...], cert_der: bytes | None) -> bool:
    """Whether a listener with this allowlist admits a caller presenting ``cert_der`` (empty list: anyone)."""
    if not allowed:
        return True
    names = caller_names(cert_der)
    return any(identity_key(a) in names for a in allowed)


def caller_refusal(allowed: tuple[str, ...], cert_der: bytes | None, revocations: RevocationList | None,
                   now: float) -> tuple[str, str] | None:
    """Why pdp's listener refuses a caller presenting ``cert_der``: ``(code, message)``, or None to admit it.
    Outside ``allowed`` (empty: anyone), or its certificate on ``revocations`` (``caller_revoked``)."""
    if not caller_allowed(allowed, cert_der):
        return "caller_not_allowed", "this caller may not ask pdp for decisions"
    if revocations is not None and revocations.caller_revocation(cert_der, now) is not None:
        return "caller_revoked", "this caller's certificate is on pdp's revocation list"
    return None


def uvicorn_ssl_options(tls: ListenerTls) -> dict[str, Any]:
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        options.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def tls_protocol(base: type[Any]) -> type[Any]:
    """A subclass of a uvicorn HTTP protocol that adds the ASGI TLS extension to each request's scope."""

    class TlsExtensionProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                der = ssl_object.getpeercert(binary_form=True)
                app: ASGIApp = self.app  # type: ignore[has-type]
                self.app = _with_tls_scope(app, der, ssl_object.version(), ssl_object.cipher())

    TlsExtensionProtocol.__name__ = f"Tls{base.__name__}"
    return TlsExtensionProtocol


def _module_level(cls: type[Any], name: str) -> type[Any]:
    """Name a generated class after its module attribute, so it pickles by reference (uvicorn workers)."""
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    return cls


TlsH11Protocol = _module_level(tls_protocol(CoalescingH11Protocol), "TlsH11Protocol")
try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # no websocket library installed: HTTP only
    TlsWebSocketProtocol: type[Any] | None = None
else:
    TlsWebSocketProtocol = _module_level(tls_protocol(WebSocketsSansIOProtocol), "TlsWebSocketProtocol")


def tls_protocols() -> dict[str, type[Any]]:
    """uvicorn ``http=`` and ``ws=`` protocol classes that publish the ASGI TLS extension (websockets
    only when a websocket library is installed: a handshake moves the connection to that protocol)."""
    protocols: dict[str, type[Any]] = {"http": TlsH11Protocol}
    if TlsWebSocketProtocol is not None:
        protocols["ws"] = TlsWebSocketProtocol
    return protocols


def _with_tls_scope(app: ASGIApp, der: bytes | None, version: str | None, cipher: Any) -> ASGIApp:
    pem = (x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
           if der else None)
    extension = {"client_cert_chain": [pem] if pem else [], "client_cert_der": der, "tls_version": version,
                 "cipher_suite": cipher[0] if cipher else None, "client_cert_error": None}

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = extension
        await app(scope, receive, send)

    return wrapped


def caller_gate(app: ASGIApp, allowed: tuple[str, ...], revocations: Revocations | None = None) -> ASGIApp:
    """Refuse (403) HTTP requests from callers ``caller_refusal`` refuses, before the app sees them."""
    if not allowed and revocations is None:
        return app

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            tls = scope.get("extensions", {}).get("tls") or {}
            refusal = caller_refusal(allowed, tls.get("client_cert_der"),
                                     revocations() if revocations is not None else None, time.time())
            if refusal is not None:
                body = json.dumps({"allowed": False, "reason": refusal[0], "message": refusal[1]}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return gate
