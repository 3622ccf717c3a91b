"""HTTP ext_authz: Envoy's ``http_service``, nginx ``auth_request`` and Traefik ``forwardAuth``.

Any method, any path under a configured prefix. Envoy keeps the original
method and appends the original path to the prefix; nginx and Traefik send
the original request in ``X-Original-URI`` / ``X-Original-Method`` and
``X-Forwarded-Method`` / ``X-Forwarded-Uri`` / ``X-Forwarded-Host`` /
``X-Forwarded-Proto``. Only the configured gateway's family is read
(``gateway.forwarded_request``), and like certificate headers only from a
trusted proxy: nginx passes client headers through, so a client's own
``X-Forwarded-Uri`` must mean nothing behind nginx.

The answer: 200 to allow, with the upstream headers as response headers (the
proxy copies them upstream) and ``x-envoy-auth-headers-to-remove`` naming the
headers to strip; the decision's status to deny, with ``WWW-Authenticate`` and
a small JSON body naming the reason code.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pdp.adapters.cert_headers import CertificateHeaders

from pdp.decision import Decision
from pdp.request import CheckRequest

_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


#: The original-request headers each gateway sets (overwriting any a client sent); only the configured
#: gateway's family is read, so a client cannot smuggle the other family past it.
FORWARDED = {
    "nginx": ("x-original-method", "x-original-uri", None, None),
    "traefik": ("x-forwarded-method", "x-forwarded-uri", "x-forwarded-host", "x-forwarded-proto"),
}


def to_check_request(*, method: str, path: str, query: str, headers: Mapping[str, str], peer: str,
                     prefix: str, certificates: CertificateHeaders | None, trusted: bool, now: float,
                     caller_names: frozenset[str] = frozenset(),
                     forwarded: str = "envoy") -> tuple[CheckRequest, bool]:
    """The original request behind an auth sub-request; also whether a certificate header was ignored."""
    original_path = path[len(prefix):] if path.startswith(prefix) else path
    original_path = original_path or "/"
    if query:
        original_path = f"{original_path}?{query}"
    host = headers.get("host", "")
    scheme = "https"
    family = FORWARDED.get(forwarded)
    if trusted and family is not None:
        method_h, uri_h, host_h, proto_h = family
        method = headers.get(method_h) or method
        original_path = headers.get(uri_h) or original_path
        host = headers.get(host_h, host) if host_h else host
        scheme = headers.get(proto_h, scheme) if proto_h else scheme
    chain: tuple[bytes, ...] = ()
    cert_error: str | None = None
    ignored = False
    if certificates is not None:
        found = certificates.read(peer, headers, caller_names)
        chain, cert_error, ignored = found.chain, found.error, found.untrusted
    clean = {k: v for k, v in headers.items() if k not in _HOP_HEADERS}
    request = CheckRequest(method=method.upper(), path=original_path, host=host, scheme=scheme,
                           headers=MappingProxyType(clean), client_cert_chain=chain, client_cert_error=cert_error,
                           source_address=peer, time=now)
    return request, ignored


def render(decision: Decision) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the answer to the proxy."""
    headers: dict[str, str] = {"x-pdp-decision-id": decision.decision_id}
    if decision.allowed:
        headers.update(decision.headers)
        if decision.headers_to_remove:
            headers["x-envoy-auth-headers-to-remove"] = ",".join(decision.headers_to_remove)
        headers.update(decision.response_headers)
        return 200, headers, b""
    body, denial_headers = decision.denial()
    headers.update(denial_headers)
    return decision.status, headers, body.encode()
