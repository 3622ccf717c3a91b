"""ASGI middleware: the decision in process, in front of any ASGI app (Starlette, FastAPI, ...).

Each HTTP request (and each websocket handshake) becomes a ``CheckRequest``;
no network hop. On allow the request goes on with the decision's upstream
headers set, the headers it removes gone, the query parameters the policy
sets or removes changed in ``scope["query_string"]``, the policy's response
headers added to the app's response, and ``scope["state"]["pdp"]`` (so
``request.state.pdp``) holding a ``PdpState``: the certificate identity, the
token's claims and the decision id. On deny the middleware answers itself:
the decision's status, ``WWW-Authenticate`` and a small JSON body naming the
reason code; a denied websocket is refused at the handshake. Other scope
types (lifespan) pass through.

The client certificate comes from the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``) where the server
provides it, or from a trusted proxy's header (``[gateway]``, read by the
``Pdp``'s one reader, as on every entry point). Proxies are trusted by
``scope["client"]`` or by their TLS certificate: run the server without
proxy-header rewriting (uvicorn ``proxy_headers=False``), or a local caller's
``X-Forwarded-For`` could claim a trusted proxy's address.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from pdp.certificates.identity import CertIdentity
from pdp.certificates.pem import read_pem_chain
from pdp.decision import Decision
from pdp.errors import NeedsNetwork
from pdp.pipeline import Pdp
from pdp.request_reader import RawRequest, Via
from pdp.service.listener_tls import caller_names

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["PdpMiddleware", "PdpState", "scope_to_raw"]


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

    Build it from a ``Pdp`` (``pdp.build_pdp(...)``, made once) or from a config file path: either way
    the request is read by the ``Pdp``'s one reader, with every ``[gateway]`` setting of its config.
    """

    def __init__(self, app: ASGIApp, *, pdp: Pdp | None = None, config: str | Path | None = None) -> None:
        if (pdp is None) == (config is None):
            raise ValueError("give PdpMiddleware exactly one of pdp= or config=")
        if pdp is None:
            from pdp.assemble import build_pdp
            from pdp.config import load_config

            pdp = build_pdp(load_config(Path(str(config))))
        self.app = app
        self.pdp = pdp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        tls = (scope.get("extensions") or {}).get("tls") or {}
        raw = scope_to_raw(scope, via=Via.DIRECT, now=time.time(), caller_names=caller_names(
            tls.get("client_cert_der")))
        try:
            decision = self.pdp.check(raw, network=False)
        except NeedsNetwork as exc:
            assert exc.request is not None
            decision = await run_in_threadpool(self.pdp.decide, exc.request)
        if decision.allowed:
            scope.setdefault("state", {})["pdp"] = PdpState(
                decision_id=decision.decision_id, identity=decision.identity,
                claims=decision.token.claims if decision.token else None, decision=decision)
            scope["headers"] = _rewrite_headers(scope["headers"], decision)
            if decision.query_to_set or decision.query_to_remove:
                scope["query_string"] = _rewrite_query(bytes(scope.get("query_string", b"")), decision)
            if scope["type"] == "http" and (decision.response_headers or decision.more_response_headers):
                send = _adding_response_headers(send, decision)
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _deny_http(decision, send)
        else:
            await _deny_websocket(scope, decision, receive, send)


def scope_to_raw(scope: Scope, *, via: Via, now: float, caller_names: frozenset[str] = frozenset()) -> RawRequest:
    """An ASGI request as received: the raw path (never the decoded one) and query, the header lines with
    their repeats, the peer, and the TLS peer's chain (``scope["extensions"]["tls"]``) if any."""
    chain: tuple[bytes, ...] = ()
    chain_error: str | None = None
    tls = (scope.get("extensions") or {}).get("tls") or {}
    if tls.get("client_cert_chain"):
        chain, error = read_pem_chain("".join(tls["client_cert_chain"]))
        chain_error = f"TLS extension: {error}" if error is not None else None
    raw_path = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode()
    target = bytes(raw_path).decode("latin-1")
    if scope.get("query_string"):
        target = f"{target}?{bytes(scope['query_string']).decode('latin-1')}"
    raw_scheme = str(scope.get("scheme", "http"))
    client = scope.get("client")
    return RawRequest(
        via=via, method=scope.get("method", "GET"), target=target,
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])),
        scheme={"ws": "http", "wss": "https"}.get(raw_scheme, raw_scheme), peer_address=client[0] if client else "",
        client_chain=chain, client_chain_error=chain_error, caller_names=caller_names, time=now,
        protocol=f"HTTP/{scope.get('http_version', '1.1')}",
    )


def _rewrite_headers(raw: list[tuple[bytes, bytes]], decision: Decision) -> list[tuple[bytes, bytes]]:
    drop = set(decision.headers_to_remove) | set(decision.headers)
    kept = [(k, v) for k, v in raw if k.decode("latin-1").lower() not in drop]
    return kept + [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in (*decision.headers.items(), *decision.more_headers)]


def _rewrite_query(query: bytes, decision: Decision) -> bytes:
    """The query with the policy's changes, as Envoy makes them: parameters named in
    ``query_parameters_to_set`` replaced by the policy's values, then those in ``_remove`` taken out.
    Names are compared decoded; the parameters left alone keep their bytes as the client sent them."""
    removed = set(decision.query_to_remove)
    replaced = {k for k, _ in decision.query_to_set} | removed
    kept = [part for part in query.split(b"&")
            if part and urllib.parse.unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) not in replaced]
    added = [f"{urllib.parse.quote_plus(k)}={urllib.parse.quote_plus(v)}".encode("ascii")
             for k, v in decision.query_to_set if k not in removed]
    return b"&".join(kept + added)


def _adding_response_headers(send: Send, decision: Decision) -> Send:
    """``send`` with the policy's ``response_headers_to_add`` set on the app's response."""
    names = {k.encode("latin-1") for k in decision.response_headers if k != "set-cookie"}  # cookies add up
    lines = [(k.encode("latin-1"), v.encode("latin-1"))
             for k, v in (*decision.response_headers.items(), *decision.more_response_headers)]

    async def adding(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if bytes(k).lower() not in names]
            message = {**message, "headers": kept + lines}
        await send(message)

    return adding


def _denial(decision: Decision) -> tuple[list[tuple[bytes, bytes]], bytes]:
    text, headers = decision.denial()
    body = text.encode()
    headers["content-length"] = str(len(body))
    return [(k.encode("latin-1"), v.encode("latin-1"))
            for k, v in (*headers.items(), *decision.more_response_headers)], body


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
