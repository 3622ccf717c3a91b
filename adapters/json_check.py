"""pdp's own JSON check protocol (``POST /v1/check``).

Request document::

    {"method": "GET", "path": "/orders?id=1", "host": "api.example.org",
     "scheme": "https", "headers": {"authorization": "Bearer ..."},
     "client_cert": "-----BEGIN CERTIFICATE-----\\n...", "source_address": "10.0.0.7"}

``client_cert`` is the client's chain as PEM, leaf first. ``body`` (optional,
a string) is the request body, as Envoy's ``with_request_body`` sends it: the
policy sees it parsed (``input.parsed_body``) by the request's content type.
The answer is the decision: ``allowed``, ``status``, ``reason``, ``message``,
``decision_id``, the upstream ``headers``, ``headers_to_remove``,
``response_headers``, ``body``, the query changes the policy asks for
(``query_parameters_to_set``, an object of value lists, and
``query_parameters_to_remove``) when there are any, further lines of a header
that cannot be joined (``more_headers``, ``more_response_headers``: pairs)
when there are any, and the ``explanation`` (the step trace).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pdp.allowed import ID_STAND_IN, AllowedParts
from pdp.certificates.pem import read_pem_chain
from pdp.decision import Decision, Step
from pdp.request_reader import RawRequest, Via

_FIELDS = frozenset({"method", "path", "host", "scheme", "headers", "client_cert", "source_address",
                     "protocol", "body"})


class RequestDocumentError(ValueError):
    """The request document is not in the shape above."""


def _string(doc: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str):
        raise RequestDocumentError(f"'{name}' must be a string")
    return value


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    """The document's headers as lines: a list value is that header repeated, as received."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestDocumentError("'headers' must be an object")
    lines: list[tuple[str, str]] = []
    for name, v in value.items():
        values = (v or [""]) if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in values):
            raise RequestDocumentError(f"header {name[:64]!r} must be a string or a list of strings")
        lines += [(name, x) for x in values]
    return tuple(lines)


def parse_request(doc: Any, *, now: float, peer_address: str = "") -> RawRequest:
    """The request the document describes, as raw facts for ``Pdp.check`` (``RequestReader``)."""
    if not isinstance(doc, dict):
        raise RequestDocumentError("the request document must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise RequestDocumentError(f"unknown fields: {', '.join(sorted(repr(str(u)[:32]) for u in unknown))}")
    chain: tuple[bytes, ...] = ()
    cert_error: str | None = None
    pem = doc.get("client_cert")
    if pem is not None:
        if not isinstance(pem, str):
            raise RequestDocumentError("'client_cert' must be a PEM string")
        if pem.strip():
            chain, cert_error = read_pem_chain(pem)
    return RawRequest(
        via=Via.DOCUMENT,
        method=_string(doc, "method"),
        target=_string(doc, "path"),
        headers=_headers(doc.get("headers")),
        host=_string(doc, "host") if "host" in doc else None,
        scheme=_string(doc, "scheme", "https"),
        protocol=_string(doc, "protocol", "HTTP/1.1"),
        client_chain=chain,
        client_chain_error=cert_error,
        peer_address=peer_address,
        source_address=_string(doc, "source_address", peer_address),
        time=now,
        body=_string(doc, "body", ""),
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
    if decision.query_to_set:
        to_set: dict[str, list[str]] = {}
        for key, value in decision.query_to_set:
            to_set.setdefault(key, []).append(value)
        out["query_parameters_to_set"] = to_set
    if decision.query_to_remove:
        out["query_parameters_to_remove"] = list(decision.query_to_remove)
    if decision.more_headers:
        out["more_headers"] = [list(p) for p in decision.more_headers]
    if decision.more_response_headers:
        out["more_response_headers"] = [list(p) for p in decision.more_response_headers]
    if explain:
        out["explanation"] = decision.explanation()
    return out


def document(content: Any) -> bytes:
    """An answer document as ASCII JSON: whatever text a refusal quotes (a lone surrogate in a member name
    of the request document), the answer can always be written."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


#: Answers of recent allows by their parts' id: the parts, the steps, the text around the decision id.
_KEPT: dict[int, tuple[AllowedParts, tuple[Step, ...], list[bytes]]] = {}
_KEPT_MAX = 1024


def answer(decision: Decision) -> bytes:
    """``document(render(decision))``. An allow made from the same facts as one before and unchanged since
    (``AllowedParts.plain``), with the same steps, is the text kept for it with its own id put in place of
    the stand-in: the same bytes, since an id is as long as the stand-in and needs no escaping."""
    parts = decision.parts
    if parts is None or not parts.plain(decision):
        return document(render(decision))
    kept = _KEPT.get(id(parts))
    if kept is None or kept[0] is not parts or kept[1] != decision.steps:
        kept = (parts, decision.steps, document(render(parts.stand_in(decision))).split(ID_STAND_IN.encode()))
        if len(_KEPT) >= _KEPT_MAX:
            _KEPT.clear()
        _KEPT[id(parts)] = kept
    return decision.decision_id.encode().join(kept[2])
