"""pdp's own JSON check protocol (``POST /v1/check``).

Request document::

    {"method": "GET", "path": "/orders?id=1", "host": "api.example.org",
     "scheme": "https", "headers": {"authorization": "Bearer ..."},
     "client_cert": "-----BEGIN CERTIFICATE-----\\n...", "source_address": "10.0.0.7"}

``client_cert`` is the client's chain as PEM, leaf first. The answer is the
decision: ``allowed``, ``status``, ``reason``, ``message``, ``decision_id``,
the upstream ``headers``, ``headers_to_remove``, ``response_headers``,
``body`` and the ``explanation`` (the step trace).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pdp.certificates.pem import PemError, pem_to_der_chain
from pdp.decision import Decision
from pdp.request import CheckRequest

_FIELDS = frozenset({"method", "path", "host", "scheme", "headers", "client_cert", "source_address",
                     "protocol"})


class RequestDocumentError(ValueError):
    """The request document is not in the shape above."""


def _string(doc: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str):
        raise RequestDocumentError(f"'{name}' must be a string")
    return value


def _headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestDocumentError("'headers' must be an object")
    headers: dict[str, str] = {}
    for name, v in value.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = ",".join(v)
        if not isinstance(v, str):
            raise RequestDocumentError(f"header {name[:64]!r} must be a string or a list of strings")
        key = name.lower()
        headers[key] = f"{headers[key]},{v}" if key in headers else v
    return headers


def parse_request(doc: Any, *, now: float, peer_address: str = "") -> CheckRequest:
    if not isinstance(doc, dict):
        raise RequestDocumentError("the request document must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise RequestDocumentError(f"unknown fields: {', '.join(sorted(str(u)[:32] for u in unknown))}")
    headers = _headers(doc.get("headers"))
    host = _string(doc, "host", headers.get(":authority", headers.get("host", "")))
    chain: tuple[bytes, ...] = ()
    cert_error: str | None = None
    pem = doc.get("client_cert")
    if pem is not None:
        if not isinstance(pem, str):
            raise RequestDocumentError("'client_cert' must be a PEM string")
        if pem.strip():
            try:
                chain = pem_to_der_chain(pem)
            except PemError as exc:
                cert_error = str(exc)
    return CheckRequest(
        method=_string(doc, "method").upper(),
        path=_string(doc, "path"),
        host=host,
        scheme=_string(doc, "scheme", "https"),
        protocol=_string(doc, "protocol", "HTTP/1.1"),
        headers=MappingProxyType(headers),
        client_cert_chain=chain,
        client_cert_error=cert_error,
        source_address=_string(doc, "source_address", peer_address),
        time=now,
    )


def render(decision: Decision, explain: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "allowed": decision.allowed,
        "status": decision.status,
        "reason": decision.reason,
        "message": decision.message,
        "decision_id": decision.decision_id,
        "headers": dict(decision.headers),
        "headers_to_remove": list(decision.headers_to_remove),
        "response_headers": dict(decision.response_headers),
        "metadata": dict(decision.metadata),
    }
    if decision.body:
        out["body"] = decision.body
    if explain:
        out["explanation"] = decision.explanation()
    return out
