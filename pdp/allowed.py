"""What an allow sends upstream and to the access log, made once per set of facts.

An allowed decision adds pdp's headers (the verified SPIFFE ID, certificate thumbprint, subject and
client id, the decision id) and the policy's, removes the ones a client must not pass (every
``x-pdp-*`` this decision does not set; the credentials), and carries the policy's response headers,
query changes and metadata. All of it except the decision id follows from the verified identity, the
verified token, the policy's outcome and which ``x-pdp-*`` headers the client sent: ``AllowedParts``
holds it for one such set, and the pipeline keeps the parts of recent sets (the same client with the
same token asking the same thing again gets the same objects from the certificate, token and decision
caches), so that a repeated allow costs the decision id and little else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pdp import reasons

if TYPE_CHECKING:
    from pdp.certificates.identity import CertIdentity
    from pdp.credentials.tokens import VerifiedToken
    from pdp.decision import Decision
    from pdp.pipeline import DecisionSettings
    from pdp.policy.result import PolicyOutcome

#: Headers named 'x-pdp-*' are pdp's to set: a client's own never reach the upstream. Spelt with '_' too
#: ('x_pdp_subject'): CGI, WSGI and Rack upstreams read '_' and '-' in a name alike.
_PDP_HEADER = re.compile(r"x[-_]pdp[-_]")
#: An id that reads the same in every rendering (no character JSON or a header would escape).
_PLAIN_ID = re.compile(r"[0-9A-Za-z-]+")
#: How many sets of facts keep their parts; past it, the parts are made again as they were at first.
KEPT = 1024
#: Stands for the decision id in a rendering kept for a set of facts (``AllowedParts.stand_in``): as long
#: as an id, and drawn at random when pdp starts, so that no request, token or policy can hold it.
ID_STAND_IN = str(uuid.UUID(bytes=os.urandom(16)))


def header_value(value: str) -> str:
    """A value every HTTP stack can carry: non-ASCII text (a 'sub' of 'Łukasz') and control characters
    (a CR/LF that would split the header) are percent-encoded, as UTF-8."""
    if value.isascii() and value.isprintable():
        return value
    return urllib.parse.quote(value, safe="".join(chr(c) for c in range(0x20, 0x7f)))


def client_pdp_headers(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The ``x-pdp-*`` header names the client sent itself."""
    if "pdp" not in "".join(headers):  # the usual request: no name to look at one by one
        return ()
    return tuple(n for n in headers if _PDP_HEADER.match(n))


def _put(headers: dict[str, str], name: str, value: Any) -> None:
    if name and isinstance(value, str) and value:
        headers[name] = header_value(value)


def facts_metadata(reason: str, identity: CertIdentity | None, token: VerifiedToken | None,
                   outcome: PolicyOutcome | None) -> dict[str, Any]:
    """A decision's metadata after its id (Envoy's dynamic metadata, for access logs): the reason, the
    verified identity and token (never credential material) and the policy's own."""
    meta: dict[str, Any] = {"reason": reason}
    if identity is not None:
        meta["spiffe_id"] = identity.spiffe_id
        meta["cert_thumbprint"] = identity.thumbprint
    if token is not None:
        meta["sub"] = token.claims.get("sub")
        meta["client_id"] = token.claims.get("client_id")
        meta["iss"] = token.issuer
        meta["jti"] = token.jti
    if outcome is not None and outcome.dynamic_metadata:
        meta["policy"] = dict(outcome.dynamic_metadata)
    return meta


class AllowedParts:
    """An allow's headers, removals, response headers, query changes and metadata for one identity, token,
    outcome and set of client ``x-pdp-*`` names; ``headers``/``metadata`` take the decision id."""

    __slots__ = (
        "headers_to_remove",
        "id_header",
        "identity",
        "metadata_rest",
        "more_headers",
        "more_response_headers",
        "outcome",
        "outcome_headers",
        "reason",
        "response_headers",
        "token",
        "upstream",
    )

    def __init__(self, settings: DecisionSettings, identity: CertIdentity | None, token: VerifiedToken | None,
                 outcome: PolicyOutcome, client_pdp: tuple[str, ...]) -> None:
        self.identity, self.token, self.outcome = identity, token, outcome
        names = settings.upstream
        upstream: dict[str, str] = {}
        if identity is not None:
            _put(upstream, names.spiffe_id, identity.spiffe_id)
            _put(upstream, names.cert_thumbprint, identity.thumbprint)
        if token is not None:
            _put(upstream, names.subject, token.claims.get("sub"))
            _put(upstream, names.client_id, token.claims.get("client_id"))
        #: pdp's headers before the decision id, the decision id's name, then the policy's own headers.
        self.upstream = upstream
        self.id_header = names.decision_id
        self.outcome_headers = {k: header_value(v) for k, v in outcome.headers.items()}
        sent = {**upstream, **({self.id_header: ""} if self.id_header else {}), **self.outcome_headers}
        # pdp's own header names never pass from the client: the ones this decision does not set are
        # removed (a client's 'x-pdp-subject' must not reach the upstream on a token without 'sub'), and
        # so is every 'x-pdp-*' the client sent (a policy may set 'x-pdp-tenant' on some requests only).
        remove = list(outcome.headers_to_remove)
        own = [*names.names(), *client_pdp]
        remove += [n for n in dict.fromkeys(own) if n not in sent and n not in remove]
        if settings.remove_authorization:
            remove += [h for h in ("authorization", "dpop") if h not in remove and h not in sent]
        self.headers_to_remove = tuple(remove)
        self.response_headers = {k: header_value(v) for k, v in outcome.response_headers.items()}
        self.more_headers = tuple((k, header_value(v)) for k, v in outcome.more_headers)
        self.more_response_headers = tuple((k, header_value(v)) for k, v in outcome.more_response_headers)
        self.reason = outcome.reason or reasons.ALLOWED.code
        self.metadata_rest = facts_metadata(self.reason, identity, token, outcome)

    def fits(self, identity: CertIdentity | None, token: VerifiedToken | None, outcome: PolicyOutcome) -> bool:
        return self.identity is identity and self.token is token and self.outcome is outcome

    def plain(self, decision: Decision) -> bool:
        """Whether ``decision`` is what these parts make with its own id, nothing in it changed since: a
        rendering of ``stand_in(decision)`` with the id put in place of ``ID_STAND_IN`` is its rendering."""
        d, decision_id, outcome = decision, decision.decision_id, self.outcome
        return (d.parts is self and d.allowed and d.status == 200 and d.reason == self.reason
                and d.message == "allowed" and not d.body and d.headers_to_remove is self.headers_to_remove
                and d.response_headers is self.response_headers and d.more_headers is self.more_headers
                and d.more_response_headers is self.more_response_headers and d.query_to_set is outcome.query_to_set
                and d.query_to_remove is outcome.query_to_remove and len(decision_id) == len(ID_STAND_IN)
                and _PLAIN_ID.fullmatch(decision_id) is not None and d.headers == self.headers(decision_id)
                and d.metadata == self.metadata(decision_id))

    def stand_in(self, decision: Decision) -> Decision:
        """``decision`` (``plain``) with ``ID_STAND_IN`` for its id, to be rendered once and kept."""
        return dataclasses.replace(decision, decision_id=ID_STAND_IN, headers=self.headers(ID_STAND_IN),
                                   metadata=self.metadata(ID_STAND_IN), parts=None)

    def headers(self, decision_id: str) -> dict[str, str]:
        upstream = self.upstream.copy()
        if self.id_header:
            upstream[self.id_header] = decision_id
        if self.outcome_headers:
            upstream.update(self.outcome_headers)
        return upstream

    def metadata(self, decision_id: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"decision_id": decision_id}
        meta.update(self.metadata_rest)
        return meta
