"""``CheckRequest``: the one question every adapter asks the core.

Adapters translate their protocol (Envoy ext_authz, the JSON check endpoint,
ASGI, introspection) into this value; the core never sees the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pdp.frozen import fast_init

_EMPTY: Mapping[str, str] = MappingProxyType({})


@fast_init
@dataclass(frozen=True, slots=True)
class CheckRequest:
    """An HTTP request to decide on.

    ``headers`` has lower-case names; repeated headers are joined with ``,`` as
    Envoy does. ``client_cert_chain`` is the peer's chain as DER, leaf first, or
    empty when the connection presented no certificate. ``client_cert_error``
    is set by an adapter that received certificate bytes it could not decode,
    so that the core denies with ``cert_malformed`` instead of treating the
    request as having no certificate. ``time`` is the Unix time the request is
    judged at. ``body`` is the request body as far as the protocol carries it (Envoy's
    ``with_request_body``, the check document's ``body``): text, or bytes when the protocol hands raw
    bytes (Envoy's ``raw_body``, ``pack_as_bytes``); empty when none was sent.
    """

    method: str
    path: str
    time: float
    host: str = ""
    scheme: str = "https"
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    client_cert_chain: tuple[bytes, ...] = ()
    client_cert_error: str | None = None
    source_address: str = ""
    protocol: str = "HTTP/1.1"
    body: str | bytes = ""
    #: Whether the entry point can change the query string sent upstream (a proxy's auth sub-request
    #: cannot): a policy that changes it on one that cannot is a ``policy_error`` deny.
    query_rewritable: bool = True
    #: Adapter-specific facts passed to the policy as-is (Envoy context extensions, metadata...).
    context: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
