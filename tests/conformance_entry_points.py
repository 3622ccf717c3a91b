"""Each of pdp's entry points, driven the way its caller drives it, from a neutral ``Row``.

A translator turns a row into the bytes (or the message) one protocol carries and reads the answer
back into an ``Outcome``: allowed or not, the reason code, the status, and what the upstream would
receive. HTTP is written by hand over a socket — raw targets, repeated and mixed-case header lines
go out exactly as the row has them — from 127.0.0.1 (a trusted proxy in the test configuration) or
127.0.0.2 (anyone else). gRPC uses grpcio with Envoy's own protos, as Envoy fills them in.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from conformance_rows import (
    CHECK,
    ENVOY_HTTP,
    GATEWAY,
    GRPC_RAW,
    NGINX,
    TRAEFIK,
    Joined,
    Proof,
    Row,
    Token,
    Value,
)
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format
from google.rpc import code_pb2

from pdp.devpki import DpopKey, Issued

TRUSTED_PEER = "127.0.0.1"
UNTRUSTED_PEER = "127.0.0.2"
#: The names pdp gives its upstream headers (the defaults of ``[decision.upstream_headers]``).
UPSTREAM_NAMES = frozenset({"x-pdp-spiffe-id", "x-pdp-subject", "x-pdp-client-id", "x-pdp-cert-thumbprint",
                            "x-pdp-decision-id"})
UNREADABLE_PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@dataclass(frozen=True)
class Materials:
    """Certificates (each a chain, leaf first), tokens and DPoP keys the rows name."""

    chains: Mapping[str, tuple[Issued, ...]]
    tokens: Mapping[str, str]
    dpop_keys: Mapping[str, DpopKey]


@dataclass(frozen=True)
class Sent:
    """A row made concrete for one send: credentials minted, nothing else changed."""

    row: Row
    headers: tuple[tuple[str, str], ...]


def resolve(row: Row, materials: Materials) -> Sent:
    """The row's header values, with fresh DPoP proofs (one per call: a ``jti`` is never reused)."""
    path = row.target.split("?", 1)[0].split("#", 1)[0]

    def text(value: Value) -> str:
        if isinstance(value, Token):
            return f"{value.scheme}{value.separator}{materials.tokens[value.name]}{value.suffix}"
        if isinstance(value, Proof):
            key = materials.dpop_keys[value.key]
            return key.proof(value.htm or row.method.upper(), value.htu or f"https://{row.hosts[0]}{path}",
                             materials.tokens[value.token] if value.token else None)
        if isinstance(value, Joined):
            return value.separator.join(text(part) for part in value.parts)
        return value

    return Sent(row, tuple((name, text(value)) for name, value in row.headers))


@dataclass
class Outcome:
    allowed: bool
    reason: str
    status: int | None = None
    decision_id: str | None = None
    #: The header lines the upstream gets on an allow (None where the protocol says nothing about it).
    upstream: list[tuple[str, str]] | None = None

    @property
    def verdict(self) -> tuple[bool, str]:
        return self.allowed, self.reason


class DecisionRecords(logging.Handler):
    """pdp's decision log (``pdp.decisions``), by decision id: the reason behind an answer that names none."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, Any] | None = None
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc = json.loads(record.getMessage())
        except ValueError:
            return
        if isinstance(doc, dict) and "decision_id" in doc:
            with self._lock_records:
                self.records[doc["decision_id"]] = doc
                self.latest = doc


# -- certificate headers, in each format a proxy writes

def pem(chain: tuple[Issued, ...]) -> str:
    return b"".join(c.pem for c in chain).decode()


def xfcc_element(chain: tuple[Issued, ...], by: str | None = GATEWAY) -> str:
    """One element as Envoy writes it (set_current_client_cert_details: cert, chain, subject, uri)."""
    leaf = chain[0]
    parts = [f"By={by}"] if by else []
    parts += [f"Hash={hashlib.sha256(leaf.der).hexdigest()}",
              f'Cert="{urllib.parse.quote(leaf.pem.decode(), safe="")}"',
              f'Chain="{urllib.parse.quote(pem(chain), safe="")}"',
              'Subject="CN=demo client,O=pdp dev"']
    return ";".join(parts)


def xfcc_value(row: Row, materials: Materials, cert: str) -> str:
    chain = materials.chains[cert]
    form = row.cert_form
    if form == "garbage":
        return f'By={GATEWAY};Cert="{urllib.parse.quote(UNREADABLE_PEM, safe="")}"'
    if form == "no_by":
        return xfcc_element(chain, by=None)
    if form == "other_by":
        return xfcc_element(chain, by="spiffe://example.org/not-the-gateway")
    if form == "client_first":  # a client wrote an element of its own (By and all); the gateway appended its own
        return f"{xfcc_element(chain)},{xfcc_element(materials.chains[row.other_cert])}"
    return xfcc_element(chain)


def nginx_value(row: Row, materials: Materials, cert: str) -> str:
    """``$ssl_client_escaped_cert``: the leaf's PEM, URL-encoded."""
    text = UNREADABLE_PEM if row.cert_form == "garbage" else materials.chains[cert][0].pem.decode()
    return urllib.parse.quote(text, safe="")


def traefik_value(row: Row, materials: Materials, cert: str) -> str:
    """``X-Forwarded-Tls-Client-Cert``: the PEM body without delimiters or newlines, URL-encoded."""
    body = "AAAA" if row.cert_form == "garbage" else base64.b64encode(materials.chains[cert][0].der).decode()
    return urllib.parse.quote(body, safe="")


CertHeader = tuple[str, Callable[[Row, Materials, str], str]]
XFCC: CertHeader = ("x-forwarded-client-cert", xfcc_value)


def cert_lines(row: Row, materials: Materials, header: CertHeader) -> list[tuple[str, str]]:
    """The proxy's certificate header line(s); a repeated header first names ``row.other_cert``."""
    if row.cert is None:
        return []
    name, render = header
    lines = [(name, render(row, materials, row.cert))]
    if row.cert_lines > 1:
        lines = [(name, render(row, materials, row.other_cert))] * (row.cert_lines - 1) + lines
    return lines


def upstream_view(client: Iterable[tuple[str, str]], remove: Iterable[str],
                  add: Mapping[str, str]) -> list[tuple[str, str]]:
    """What the upstream receives: the client's lines less the removed names, plus pdp's headers (replacing)."""
    dropped = {n.lower() for n in remove} | {n.lower() for n in add}
    return [(n, v) for n, v in client if n.lower() not in dropped] + list(add.items())


# -- HTTP/1.1 over a socket

@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def exchange(port: int, head: list[str], *, peer: str = TRUSTED_PEER, body: bytes = b"",
             tls: ssl.SSLContext | None = None, timeout: float = 20.0) -> RawResponse:
    """Send one request exactly as written (request line and header lines) and read the whole answer."""
    data = ("\r\n".join([*head, "connection: close"]) + "\r\n\r\n").encode("latin-1") + body
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(peer, 0))
    sock: socket.socket = tls.wrap_socket(raw, server_hostname="api.test") if tls is not None else raw
    received = bytearray()
    with sock:
        try:
            sock.sendall(data)
        except OSError:  # the server may answer and close before it has read everything
            pass
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    return parse_response(bytes(received))


def parse_response(data: bytes) -> RawResponse:
    if not data:
        return RawResponse(0, [], b"")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = dechunk(body)
    return RawResponse(status, headers, body)


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


def json_body(response: RawResponse) -> dict[str, Any] | None:
    try:
        doc = json.loads(response.body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def transport_refusal(response: RawResponse) -> Outcome:
    """An answer that did not come from pdp (no decision id): the HTTP server refused the bytes itself."""
    return Outcome(False, f"transport:{response.status}", response.status)


# -- the entry points

class EntryPoint(abc.ABC):
    """One way into pdp: turns a row's neutral request into its protocol and the answer into an Outcome."""

    name = ""

    def __init__(self, materials: Materials, records: DecisionRecords) -> None:
        self.materials = materials
        self.records = records

    @abc.abstractmethod
    def send(self, sent: Sent) -> Outcome:
        """Send the request through this entry point; what came back."""

    def logged_reason(self, decision_id: str | None) -> str | None:
        record = self.records.records.get(decision_id or "")
        return None if record is None else str(record["reason"])


class CheckEndpoint(EntryPoint):
    """``POST /v1/check``: the request as a JSON document; a repeated header is a list value."""

    name = CHECK

    def __init__(self, materials: Materials, records: DecisionRecords, port: int) -> None:
        super().__init__(materials, records)
        self.port = port

    def document(self, sent: Sent) -> dict[str, Any]:
        row = sent.row
        headers: dict[str, Any] = {}
        lines = [("host", h) for h in row.hosts] + list(sent.headers)
        if row.cert is not None and not row.trusted:  # a client's own certificate header, passed along
            lines += cert_lines(row, self.materials, XFCC)
        for name, value in lines:
            if name in headers:
                previous = headers[name]
                headers[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
            else:
                headers[name] = value
        doc: dict[str, Any] = {"method": row.method, "path": row.target, "scheme": "https", "headers": headers}
        if len(row.hosts) == 1:
            doc["host"] = row.hosts[0]
        if row.cert is not None and row.trusted:
            doc["client_cert"] = UNREADABLE_PEM if row.cert_form == "garbage" else pem(self.materials.chains[row.cert])
        return doc

    def send(self, sent: Sent) -> Outcome:
        body = json.dumps(self.document(sent)).encode()
        response = exchange(self.port, ["POST /v1/check HTTP/1.1", "host: pdp.internal",
                                        "content-type: application/json", f"content-length: {len(body)}"],
                            body=body, peer=TRUSTED_PEER if sent.row.trusted else UNTRUSTED_PEER)
        doc = json_body(response)
        if doc is None or "reason" not in doc:
            return transport_refusal(response)
        outcome = Outcome(bool(doc["allowed"]), str(doc["reason"]), int(doc["status"]), doc.get("decision_id"))
        if outcome.allowed:
            outcome.upstream = upstream_view(client_lines(sent), doc.get("headers_to_remove", []),
                                             doc.get("headers", {}))
        return outcome


def client_lines(sent: Sent) -> list[tuple[str, str]]:
    """The lines of the original request, as the upstream would get them before pdp's changes."""
    return [("host", h) for h in sent.row.hosts] + list(sent.headers)


#: The original-request headers each gateway writes on its auth sub-request.
FAMILIES = {NGINX: ("x-original-uri", "x-original-method"),
            TRAEFIK: ("x-forwarded-uri", "x-forwarded-method", "x-forwarded-host", "x-forwarded-proto")}


class ExtAuthz(EntryPoint):
    """``/ext_authz``: the auth sub-request of Envoy ``http_service``, nginx ``auth_request`` or Traefik
    ``forwardAuth``, each with its own certificate header format."""

    prefix = "/ext_authz"

    def __init__(self, materials: Materials, records: DecisionRecords, port: int, name: str) -> None:
        super().__init__(materials, records)
        self.port = port
        self.name = name
        self.cert_header: CertHeader = {ENVOY_HTTP: XFCC, NGINX: ("ssl-client-cert", nginx_value),
                                        TRAEFIK: ("X-Forwarded-Tls-Client-Cert", traefik_value)}[name]

    def head(self, sent: Sent) -> list[str]:
        row = sent.row
        certs = cert_lines(row, self.materials, self.cert_header)
        hosts = [f"Host: {h}" for h in row.hosts]
        client = [f"{n}: {v}" for n, v in sent.headers]
        own = [f"{n}: {v}" for n, v in certs]
        if self.name == ENVOY_HTTP:
            # http_service: the prefix, then the original path and query; the original method and headers.
            return [f"{row.method} {self.prefix}{row.target} HTTP/1.1", *hosts, *client, *own]
        family = FAMILIES[self.name]
        # The gateway sets its own original-request headers, replacing any the client sent.
        client = [f"{n}: {v}" for n, v in sent.headers if n.lower() not in family]
        if self.name == NGINX:
            forwarded = [f"X-Original-URI: {row.target}", f"X-Original-Method: {row.method}"]
            if row.forwarded_twice:
                forwarded.append(f"X-Original-URI: {row.forwarded_twice}")
        else:
            forwarded = [f"X-Forwarded-Method: {row.method}", "X-Forwarded-Proto: https",
                         *(f"X-Forwarded-Host: {h}" for h in row.hosts), f"X-Forwarded-Uri: {row.target}"]
            if row.forwarded_twice:
                forwarded.append(f"X-Forwarded-Uri: {row.forwarded_twice}")
            hosts = ["Host: pdp.internal:8181"]  # forwardAuth calls the auth address; the original host is forwarded
        if not row.trusted:
            # Anyone else talks to pdp directly: the target on the request line (read Envoy-style, since
            # the forwarded headers it adds are not believed), with the client's Host.
            return [f"{row.method} {self.prefix}{row.target} HTTP/1.1", *(f"Host: {h}" for h in row.hosts),
                    *client, *forwarded, *own]
        return [f"GET {self.prefix} HTTP/1.1", *hosts, *client, *forwarded, *own]

    def send(self, sent: Sent) -> Outcome:
        response = exchange(self.port, self.head(sent), peer=TRUSTED_PEER if sent.row.trusted else UNTRUSTED_PEER)
        decision_id = response.header("x-pdp-decision-id")
        if decision_id is None:
            return transport_refusal(response)
        logged = self.logged_reason(decision_id)
        if response.status == 200:
            outcome = Outcome(True, logged or "?", 200, decision_id)
            add = {k.lower(): v for k, v in response.headers if k.lower() in UPSTREAM_NAMES}
            remove = (response.header("x-envoy-auth-headers-to-remove") or "").split(",")
            outcome.upstream = upstream_view(client_lines(sent), [r.strip() for r in remove if r.strip()], add)
            return outcome
        doc = json_body(response)
        reason = str(doc["reason"]) if doc and "reason" in doc else response.header("x-pdp-reason") or logged or "?"
        return Outcome(False, reason, response.status, decision_id)


class EnvoyGrpc(EntryPoint):
    """Envoy's gRPC ext_authz ``Check``: headers joined per name (``http.headers``, Envoy's default) or one
    ``header_map`` entry per line (``encode_raw_headers: true``); the client's leaf in
    ``attributes.source.certificate`` (``include_peer_certificate: true``)."""

    def __init__(self, materials: Materials, records: DecisionRecords, port: int, name: str) -> None:
        super().__init__(materials, records)
        self.name = name
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def message(self, sent: Sent) -> external_auth_pb2.CheckRequest:
        row = sent.row
        authority = ",".join(row.hosts)  # Envoy keeps one :authority; repeated Host values are joined
        lines = [(":authority", authority), (":method", row.method), (":path", row.target), (":scheme", "https"),
                 *((n.lower(), v) for n, v in sent.headers)]
        if row.cert is not None and not row.trusted:
            lines += cert_lines(row, self.materials, XFCC)
        http = attribute_context_pb2.AttributeContext.HttpRequest(
            id="1", method=row.method, path=row.target, host=authority, scheme="https", protocol="HTTP/1.1")
        if self.name == GRPC_RAW:
            http.header_map.headers.extend(base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1"))
                                           for k, v in lines)
        else:
            joined: dict[str, str] = {}
            for k, v in lines:
                joined[k] = f"{joined[k]},{v}" if k in joined else v
            http.headers.update(joined)
        source = attribute_context_pb2.AttributeContext.Peer(address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=TRUSTED_PEER if row.trusted else UNTRUSTED_PEER,
                                                     port_value=51000)))
        if row.cert is not None and row.trusted:
            leaf = UNREADABLE_PEM if row.cert_form == "garbage" else self.materials.chains[row.cert][0].pem.decode()
            source.certificate = urllib.parse.quote(leaf, safe="")
        return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
            source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))

    def send(self, sent: Sent) -> Outcome:
        try:
            response = self.stub.Check(self.message(sent), timeout=30)
        except grpc.RpcError as exc:
            return Outcome(False, f"rpc:{exc.code().name}")
        meta = json_format.MessageToDict(response.dynamic_metadata)
        decision_id = meta.get("decision_id")
        if response.status.code == code_pb2.OK:
            ok = response.ok_response
            outcome = Outcome(True, str(meta.get("reason")), 200, decision_id)
            outcome.upstream = upstream_view(client_lines(sent), ok.headers_to_remove,
                                             {o.header.key: o.header.value for o in ok.headers})
            return outcome
        denied = response.denied_response
        try:
            reason = str(json.loads(denied.body)["reason"])
        except (ValueError, KeyError):
            reason = str(meta.get("reason"))
        return Outcome(False, reason, denied.status.code, decision_id)


class Middleware(EntryPoint):
    """``PdpMiddleware`` in front of a small Starlette app under uvicorn (TLS, so the scheme is https). The
    app echoes, in a response header, the reason pdp allowed with and the header lines it received."""

    def __init__(self, materials: Materials, records: DecisionRecords, port: int, name: str,
                 tls: ssl.SSLContext) -> None:
        super().__init__(materials, records)
        self.port = port
        self.name = name
        self.tls = tls

    def send(self, sent: Sent) -> Outcome:
        row = sent.row
        head = [f"{row.method} {row.target} HTTP/1.1", *(f"Host: {h}" for h in row.hosts),
                *(f"{n}: {v}" for n, v in sent.headers),
                *(f"{n}: {v}" for n, v in cert_lines(row, self.materials, XFCC))]
        response = exchange(self.port, head, peer=TRUSTED_PEER if row.trusted else UNTRUSTED_PEER, tls=self.tls)
        echo = response.header("x-echo")
        if echo is not None:
            doc = json.loads(base64.urlsafe_b64decode(echo))
            return Outcome(True, str(doc["reason"]), response.status, doc["decision_id"],
                           [(k, v) for k, v in doc["headers"]])
        body = json_body(response)
        if body is None and row.method.upper() == "HEAD" and response.header("content-type") == "application/json":
            # The answer to HEAD has no body: the reason is in the decision just logged (one request at a time).
            latest = self.records.latest or {}
            body = {"reason": latest.get("reason"), "decision_id": latest.get("decision_id")}
        if body is None or "reason" not in body:
            return transport_refusal(response)
        return Outcome(False, str(body["reason"]), response.status, body.get("decision_id"))


async def echo_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The upstream behind the middleware: what pdp decided, and every header line the app received."""
    state = scope.get("state", {}).get("pdp")
    doc = {"reason": state.decision.reason if state else None, "decision_id": state.decision_id if state else None,
           "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]}
    value = base64.urlsafe_b64encode(json.dumps(doc).encode())
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-echo", value), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)
