"""ASGI middleware: the decision in process, in front of any ASGI app (Starlette, FastAPI, ...).

Each HTTP request (and each websocket handshake) becomes a ``CheckRequest``;
no network hop. On allow the request goes on with the decision's upstream
headers set, the headers it removes gone, and ``scope["state"]["pdp"]`` (so
``request.state.pdp``) holding a ``PdpState``: the certificate identity, the
token's claims and the decision id. On deny the middleware answers itself:
the decision's status, ``WWW-Authenticate`` and a small JSON body naming the
reason code; a denied websocket is refused at the handshake. Other scope
types (lifespan) pass through.

The client certificate comes from the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``) where the server
provides it, else from a trusted proxy's header (``CertificateHeaders``).
Proxies are trusted by ``scope["client"]``: run the server without
proxy-header rewriting (uvicorn ``proxy_headers=False``), or a local caller's
``X-Forwarded-For`` could claim a trusted proxy's address.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pdp.adapters.cert_headers import CertificateHeaders
from starlette.concurrency import run_in_threadpool

from pdp.certificates.identity import CertIdentity
from pdp.certificates.pem import PemError, pem_to_der_chain
from pdp.decision import Decision
from pdp.errors import NeedsNetwork
from pdp.pipeline import Pdp
from pdp.request import CheckRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["PdpMiddleware", "PdpState"]


@dataclass(frozen=True)
class PdpState:
    """What the middleware verified, for the app: ``request.state.pdp``."""

    decision_id: str
    identity: CertIdentity | None
    claims: dict[str, Any] | None
    decision: Decision

    @property
    def spiffe_id(self) -> str | None:
        return self.identity.spiffe_id if self.identity else None

    @property
    def subject(self) -> str | None:
        sub = (self.claims or {}).get("sub")
        return sub if isinstance(sub, str) else None


class PdpMiddleware:
    """Decide on every request in process; answer denies, pass allows on with the verified identity.

    Build it from a ``Pdp`` (``pdp.build_pdp(...)``, made once) or from a config file path.
    """

    def __init__(self, app: ASGIApp, *, pdp: Pdp | None = None, config: str | Path | None = None,
                 certificate_headers: CertificateHeaders | None = None) -> None:
        if (pdp is None) == (config is None):
            raise ValueError("give PdpMiddleware exactly one of pdp= or config=")
        if pdp is None:
            from pdp.adapters.cert_headers import CertificateHeaders as Headers

            from pdp.assemble import build_pdp
            from pdp.config import load_config

            cfg = load_config(Path(str(config)))
            pdp = build_pdp(cfg)
            gw = cfg.gateway
            if certificate_headers is None and gw.cert_header:
                certificate_headers = Headers(gw.cert_header, gw.trusted_proxies,
                                              header=gw.cert_header_name or None, xfcc_element=gw.xfcc_element)
        self.app = app
        self.pdp = pdp
        self.certificate_headers = certificate_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = self._check_request(scope)
        try:
            decision = self.pdp.decide(request, network=False)
        except NeedsNetwork:
            decision = await run_in_threadpool(self.pdp.decide, request)
        if decision.allowed:
            scope.setdefault("state", {})["pdp"] = PdpState(
                decision_id=decision.decision_id, identity=decision.identity,
                claims=decision.token.claims if decision.token else None, decision=decision)
            scope["headers"] = _rewrite_headers(scope["headers"], decision)
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _deny_http(decision, send)
        else:
            await _deny_websocket(scope, decision, receive, send)

    def _check_request(self, scope: Scope) -> CheckRequest:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        client = scope.get("client")
        peer = client[0] if client else ""
        chain: tuple[bytes, ...] = ()
        cert_error: str | None = None
        tls = (scope.get("extensions") or {}).get("tls") or {}
        if tls.get("client_cert_chain"):
            try:
                chain = pem_to_der_chain("".join(tls["client_cert_chain"]))
            except PemError as exc:
                cert_error = f"TLS extension: {exc}"
        elif self.certificate_headers is not None:
            found = self.certificate_headers.read(peer, headers)
            chain, cert_error = found.chain, found.error
        path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
        if scope.get("query_string"):
            path = f"{path}?{scope['query_string'].decode('latin-1')}"
        raw_scheme = str(scope.get("scheme", "http"))
        scheme = {"ws": "http", "wss": "https"}.get(raw_scheme, raw_scheme)
        return CheckRequest(
            method=scope.get("method", "GET"), path=path, host=headers.get("host", ""), scheme=scheme,
            headers=MappingProxyType(headers), client_cert_chain=chain, client_cert_error=cert_error,
            source_address=peer, time=time.time(), protocol=f"HTTP/{scope.get('http_version', '1.1')}",
        )


def _rewrite_headers(raw: list[tuple[bytes, bytes]], decision: Decision) -> list[tuple[bytes, bytes]]:
    drop = set(decision.headers_to_remove) | set(decision.headers)
    kept = [(k, v) for k, v in raw if k.decode("latin-1").lower() not in drop]
    return kept + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in decision.headers.items()]


def _denial(decision: Decision) -> tuple[list[tuple[bytes, bytes]], bytes]:
    text, headers = decision.denial()
    body = text.encode()
    headers["content-length"] = str(len(body))
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()], body


async def _deny_http(decision: Decision, send: Send) -> None:
    headers, body = _denial(decision)
    await send({"type": "http.response.start", "status": decision.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _deny_websocket(scope: Scope, decision: Decision, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers, body = _denial(decision)
        await send({"type": "websocket.http.response.start", "status": decision.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": decision.reason})
