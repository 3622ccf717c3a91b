"""The one reading of a request: the raw facts any entry point received → a ``CheckRequest``.

Every adapter (``/v1/check``, Envoy gRPC, HTTP ext_authz for Envoy, nginx and
Traefik, the ASGI middleware) only translates its protocol into a
``RawRequest`` — the method, the raw (never decoded) target, the header list
with its repeats, the host, scheme and peer it saw, a certificate chain the
protocol carries — and hands it here. Every rule about reading a request
lives in this module and nowhere else, so that no entry point can read a
request differently from another (a rule kept by one adapter only is a way
around it through the others):

- header names are case-insensitive; repeated headers are joined with ``,``
  as Envoy joins them, and a *singleton* — ``Authorization``, ``DPoP``,
  ``Host``/``:authority``, a single-valued certificate header, the gateway's
  original-request headers — that arrives twice, or holds two values joined
  by a proxy, is refused: which one a proxy, pdp and the upstream each read is
  not something to guess (RFC 9110 §5.3, RFC 6750 §2.1, RFC 9449 §4.3);
- the method is a token (RFC 9110 §5.6.2), compared upper-cased;
- the target is the raw path and query as received; an auth sub-request's
  prefix is taken off it without decoding anything (the path normal form is
  then checked by the pipeline, the same for all);
- a certificate header and the gateway's original-request headers are read
  only from a trusted proxy (by address, or by the identity in its TLS
  certificate), only in the configured format and family; anyone else's are
  ignored and reported.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pdp import reasons
from pdp.errors import Denied
from pdp.frozen import fast_init
from pdp.request import CheckRequest

if TYPE_CHECKING:
    from pdp.adapters.cert_headers import CertificateHeaders

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A second credential after a comma: an auth-scheme token, whitespace, then something (RFC 9110 §11.4).
#: Auth-params of one credential ('realm="x"') have '=' right after their name, so they never match.
_SECOND_CREDENTIAL = re.compile(r",\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]+\S")
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"})

#: The original-request headers each gateway sets on its auth sub-request (method, target, host, scheme).
FORWARDED: dict[str, tuple[str, str, str | None, str | None]] = {
    "nginx": ("x-original-method", "x-original-uri", None, None),
    "traefik": ("x-forwarded-method", "x-forwarded-uri", "x-forwarded-host", "x-forwarded-proto"),
}
#: Certificate header formats whose value is one certificate (a list format may legitimately hold ',').
_SINGLE_VALUED_FORMATS = frozenset({"rfc9440", "nginx", "alb"})


class Via(enum.Enum):
    """How the request reached pdp, which decides where its certificate may come from."""

    #: The caller describes the request (``/v1/check``, Envoy gRPC): the chain it names is the client's.
    DOCUMENT = "document"
    #: A gateway's auth sub-request (HTTP ext_authz): the client's chain only in a trusted proxy's header.
    SUBREQUEST = "subrequest"
    #: The request itself (the ASGI middleware): the TLS peer's chain, or a trusted proxy's header.
    DIRECT = "direct"


@fast_init
@dataclass(frozen=True, slots=True)
class RawRequest:
    """What an entry point received, untouched: nothing decoded, nothing merged, nothing believed yet.

    ``headers`` keeps every header line in order with its repeats (names in any case); a protocol that
    hands headers already joined (Envoy gRPC ``http.headers``, a JSON string) passes one pair per name.
    ``host`` is the protocol's own host field, when it has one. ``client_chain`` is the chain the protocol
    carries: the TLS peer's (``DIRECT``) or the one the document names (``DOCUMENT``), DER, leaf first.
    ``caller_names`` are the identities in the TLS certificate of whoever sent this to pdp.
    """

    via: Via
    method: str
    target: str
    time: float
    headers: tuple[tuple[str, str], ...] = ()
    host: str | None = None
    scheme: str = ""
    peer_address: str = ""
    source_address: str | None = None
    client_chain: tuple[bytes, ...] = ()
    client_chain_error: str | None = None
    caller_names: frozenset[str] = frozenset()
    protocol: str = "HTTP/1.1"
    context: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: The request body as far as the protocol carries it (text, or raw bytes), passed on as it is.
    body: str | bytes = ""


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]``: the auth sub-request endpoint and the proxies whose headers are believed."""

    ext_authz_prefix: str = "/ext_authz"
    forwarded_request: str = "envoy"
    certificate_headers: CertificateHeaders | None = None


UntrustedHeader = Callable[[str, str], None]  # (header name, peer address)


class RequestReader:
    """Turns a ``RawRequest`` into a ``CheckRequest`` or refuses it (``Denied``: ``request_invalid``)."""

    def __init__(self, gateway: GatewaySettings | None = None, *, on_untrusted: UntrustedHeader | None = None) -> None:
        self.gateway = gateway or GatewaySettings()
        self.on_untrusted = on_untrusted
        certs = self.gateway.certificate_headers
        # One value each: a second line, or a second value joined in by a proxy, is refused.
        single = {"authorization", "dpop", "host", ":authority"}
        if certs is not None and certs.format in _SINGLE_VALUED_FORMATS:
            single.add(certs.header)
        self._single_valued = frozenset(single)
        family = FORWARDED.get(self.gateway.forwarded_request)
        #: The gateway's original-request headers: one line each (a target may itself hold ',').
        self._family: frozenset[str] = frozenset(h for h in family if h) if family else frozenset()
        #: The certificate header: one line (a list format such as XFCC holds its elements in that line;
        #: two lines would let an upstream that reads the first see another certificate than pdp).
        self._certificate_line: frozenset[str] = frozenset({certs.header}) if certs is not None else frozenset()

    def trusts(self, peer: str, caller_names: frozenset[str]) -> bool:
        certs = self.gateway.certificate_headers
        return certs is not None and certs.trusts(peer, caller_names)

    def read(self, raw: RawRequest) -> CheckRequest:
        trusted = self.trusts(raw.peer_address, raw.caller_names)
        subrequest = raw.via is Via.SUBREQUEST
        forwarded = subrequest and trusted and bool(self._family)
        single_line = (self._family if forwarded else frozenset()) | self._certificate_line
        headers = _headers(raw.headers, self._single_valued, single_line)
        method, target = raw.method, raw.target
        host = raw.host if raw.host is not None else headers.get("host", headers.get(":authority", ""))
        if raw.host is None and "host" in headers and ":authority" in headers \
                and headers["host"] != headers[":authority"]:
            raise Denied(reasons.REQUEST_INVALID, "Host and :authority name different hosts")
        scheme = raw.scheme or "https"
        if subrequest:
            target = _strip_prefix(target, self.gateway.ext_authz_prefix)
            scheme = "https"
        if forwarded:
            method_h, uri_h, host_h, proto_h = FORWARDED[self.gateway.forwarded_request]
            # The gateway names the original request: without its target (or with an empty one) there is
            # nothing to judge, and the sub-request's own path is not the client's. nginx's sub-request
            # keeps the original method, so only there may the method header be left out.
            if not headers.get(uri_h):
                raise Denied(reasons.REQUEST_INVALID, f"the gateway sent no {uri_h}")
            if method_h in headers or self.gateway.forwarded_request != "nginx":
                method = headers.get(method_h, "")
            target = headers[uri_h]
            if host_h and host_h in headers:
                host = headers[host_h]
            if proto_h and proto_h in headers:
                scheme = headers[proto_h]
        scheme = scheme.lower()
        if not _TOKEN.fullmatch(method):
            raise Denied(reasons.REQUEST_INVALID, "the method is not an HTTP token")
        if scheme not in ("http", "https"):
            raise Denied(reasons.REQUEST_INVALID, "the scheme is not http or https")
        chain, chain_error = self._certificate(raw, headers, trusted)
        if subrequest:  # the sub-request's own framing, not the original request's
            headers = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        return CheckRequest(
            method=method.upper(), path=target, host=host, scheme=scheme, headers=MappingProxyType(headers),
            client_cert_chain=chain, client_cert_error=chain_error,
            source_address=raw.source_address if raw.source_address is not None else raw.peer_address,
            time=raw.time, protocol=raw.protocol, context=raw.context, body=raw.body,
            query_rewritable=not subrequest,
        )

    def _certificate(self, raw: RawRequest, headers: Mapping[str, str],
                     trusted: bool) -> tuple[tuple[bytes, ...], str | None]:
        """The client's chain: from the document, from a trusted proxy's header, or from the TLS peer."""
        if raw.via is Via.DOCUMENT:
            return raw.client_chain, raw.client_chain_error
        certs = self.gateway.certificate_headers
        if certs is not None and certs.header in headers:
            if not trusted:
                if self.on_untrusted is not None:
                    self.on_untrusted(certs.header, raw.peer_address)
            else:
                found = certs.parse(headers)
                return found.chain, found.error
        if raw.via is Via.SUBREQUEST or (certs is not None and raw.caller_names & certs.identities):
            # The TLS peer is the gateway: its certificate names the proxy, not the client.
            return (), None
        return raw.client_chain, raw.client_chain_error


def _headers(lines: tuple[tuple[str, str], ...], single_valued: frozenset[str],
             single_line: frozenset[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, value in lines:
        name = raw_name.lower()
        if name in headers:
            if name in single_valued or name in single_line:
                raise Denied(reasons.REQUEST_INVALID, f"more than one {name} header")
            headers[name] = f"{headers[name]},{value}"
        else:
            headers[name] = value
    # A proxy that joined repeats before us (Envoy's gRPC headers map) leaves two values in one.
    authorization = headers.get("authorization")
    if authorization is not None and _SECOND_CREDENTIAL.search(authorization):
        raise Denied(reasons.REQUEST_INVALID, "more than one credential in Authorization")
    for name in single_valued:
        if name != "authorization" and "," in headers.get(name, ""):
            raise Denied(reasons.REQUEST_INVALID, f"more than one value in {name}")
    return headers


def _strip_prefix(target: str, prefix: str) -> str:
    """The original target behind an auth sub-request: the part after the prefix, as received. Anything
    else (Envoy sends ``OPTIONS *`` as ``/ext_authz*``) names no request pdp could judge."""
    if target == prefix or target.startswith(prefix + "?"):
        return "/" + target[len(prefix):]
    if target.startswith(prefix + "/"):
        return target[len(prefix):]
    raise Denied(reasons.REQUEST_INVALID, "the sub-request's target is not under the authorization prefix")
