"""Envoy's external authorization service, gRPC v3 (``envoy.service.auth.v3.Authorization/Check``).

Speaks Envoy's own generated protos (``xds-protos``). The client certificate
comes from ``attributes.source.certificate`` (URL-encoded PEM, sent when the
listener has ``include_peer_certificate: true``); method, path with query,
host, scheme and headers from ``attributes.request.http``;
``context_extensions`` and ``metadata_context`` go to the policy as-is.

An allow is ``OK`` with an ``OkHttpResponse`` (headers to add upstream,
headers to remove, response headers, query parameters to set and to remove).
The request body (``with_request_body``: ``body``, or ``raw_body`` with
``pack_as_bytes``) goes to the policy as ``parsed_body``. A deny is ``UNAUTHENTICATED`` (401) or
``PERMISSION_DENIED`` (anything else) with a ``DeniedHttpResponse`` holding
the status, the ``WWW-Authenticate`` challenge and a small JSON body naming the
reason code. Every failure, even an internal one, is a deny answer, never an
RPC error that a ``failure_mode_allow: true`` gateway would let through.
``dynamic_metadata`` carries the decision id, the reason and the verified
identity for Envoy's access log.

Calls are decided on the ``grpc.aio`` server's event loop, one at a time: no
thread contends for the GIL. A decision that must wait on the network (a key
set, an introspection answer, an OCSP responder) waits in a thread pool, and
the loop answers other calls meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from pdp import reasons
from pdp.allowed import ID_STAND_IN, AllowedParts
from pdp.certificates.pem import read_pem_chain
from pdp.decision import Decision
from pdp.errors import NeedsNetwork
from pdp.pipeline import Pdp
from pdp.reasons import Reason
from pdp.request import CheckRequest
from pdp.request_reader import RawRequest, Via

log = logging.getLogger("pdp.envoy")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def to_raw_request(message: external_auth_pb2.CheckRequest, *, now: float) -> RawRequest:
    """Envoy's ``CheckRequest`` → the raw facts of the request it describes, for ``Pdp.check``."""
    attributes = message.attributes
    http = attributes.request.http
    # Envoy joins a repeated header with ',' in this map; with encode_raw_headers it sends header_map lines.
    lines = list(http.headers.items())
    if http.HasField("header_map"):
        lines += [(entry.key, entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value)
                  for entry in http.header_map.headers]
    source = attributes.source
    certificate = source.certificate
    chain, cert_error = _peer_chain(certificate) if certificate else ((), None)
    path = http.path
    if http.query and "?" not in path:
        path = f"{path}?{http.query}"
    extensions = attributes.context_extensions
    context: dict[str, Any] = {"context_extensions": dict(extensions) if extensions else {}}
    if attributes.HasField("metadata_context"):
        context["metadata_context"] = json_format.MessageToDict(attributes.metadata_context)
    if source.principal:
        context["source_principal"] = source.principal
    return RawRequest(
        via=Via.DOCUMENT,
        method=http.method,
        target=path,
        headers=tuple(lines),
        host=http.host or None,
        scheme=http.scheme,
        protocol=http.protocol or "HTTP/1.1",
        client_chain=chain,
        client_chain_error=cert_error,
        source_address=source.address.socket_address.address,
        time=now,
        context=MappingProxyType(context),
        # 'body' (with_request_body), or 'raw_body' with pack_as_bytes: the plugin reads them in this order.
        body=http.body or bytes(http.raw_body),
    )


@functools.lru_cache(maxsize=1024)
def _peer_chain(certificate: str) -> tuple[tuple[bytes, ...], str | None]:
    """``attributes.source.certificate`` (URL-encoded PEM) as DER, leaf first, or why it is unreadable.
    A returning client sends the same text with every request: it is decoded once (bounded)."""
    chain, error = read_pem_chain(urllib.parse.unquote(certificate))
    return chain, f"attributes.source.certificate: {error}" if error is not None else None


def _add_headers(options: Any, headers: Mapping[str, str]) -> None:
    """Headers to set, overwriting any of the same name, added in place to a repeated ``HeaderValueOption``."""
    for key, value in headers.items():
        option = options.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _OVERWRITE


def _append_headers(options: Any, lines: tuple[tuple[str, str], ...]) -> None:
    """Further lines of a header already set (a second ``set-cookie``), appended after it."""
    for key, value in lines:
        option = options.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _APPEND


def _set_metadata(meta: struct_pb2.Struct, decision: Decision) -> None:
    fields = meta.fields
    rest: dict[str, Any] = {}
    for key, value in decision.metadata.items():
        if isinstance(value, str):
            fields[key].string_value = value  # most members: set directly, not through Struct.update
        elif value is not None:
            rest[key] = value
    if rest:
        meta.update(rest)


def to_check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    """pdp's ``Decision`` → Envoy's ``CheckResponse`` (built in place: this is on every request's path)."""
    response = external_auth_pb2.CheckResponse()
    if decision.allowed:
        response.status.code = code_pb2.OK
        ok = response.ok_response
        _add_headers(ok.headers, decision.headers)
        _append_headers(ok.headers, decision.more_headers)
        ok.headers_to_remove.extend(decision.headers_to_remove)
        _add_headers(ok.response_headers_to_add, decision.response_headers)
        _append_headers(ok.response_headers_to_add, decision.more_response_headers)
        for key, value in decision.query_to_set:
            parameter = ok.query_parameters_to_set.add()
            parameter.key = key
            parameter.value = value
        ok.query_parameters_to_remove.extend(decision.query_to_remove)
    else:
        body, headers = decision.denial()
        response.status.code = code_pb2.UNAUTHENTICATED if decision.status == 401 else code_pb2.PERMISSION_DENIED
        response.status.message = decision.reason
        denied = response.denied_response
        denied.status.code = decision.status
        _add_headers(denied.headers, headers)
        _append_headers(denied.headers, decision.more_response_headers)
        denied.body = body
    _set_metadata(response.dynamic_metadata, decision)
    return response


#: Renderings of recent allows by their parts' id, as the bytes around the decision id (each holds its
#: parts: no id is reused while it is kept).
_RENDERED: dict[int, tuple[AllowedParts, list[bytes]]] = {}
_RENDERED_KEPT = 1024


def render(decision: Decision) -> bytes:
    """The serialized ``CheckResponse`` for ``decision``.

    An allow made from the same facts as one before, and unchanged since (``AllowedParts.plain``), is
    rendered once with a stand-in for its id; that rendering is kept, cut where the id goes, and each
    such decision is its pieces joined by its own id: the same bytes as rendering it whole, since an id
    is as long as the stand-in."""
    parts = decision.parts
    if parts is None or not parts.plain(decision):
        return _whole(decision)
    kept = _RENDERED.get(id(parts))
    if kept is None or kept[0] is not parts:
        kept = (parts, _whole(parts.stand_in(decision)).split(ID_STAND_IN.encode()))
        if len(_RENDERED) >= _RENDERED_KEPT:
            _RENDERED.clear()
        _RENDERED[id(parts)] = kept
    return decision.decision_id.encode().join(kept[1])


def _whole(decision: Decision) -> bytes:
    data: bytes = to_check_response(decision).SerializeToString()
    return data


class EnvoyAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The ``Authorization`` service. ``pdp`` is read on every call, so a swapped ``Pdp`` takes effect.

    ``check`` (``grpc.aio``) decides on the event loop's thread; a decision that must wait on the network
    is made in ``network`` (a thread pool), so that the loop goes on meanwhile. ``Check`` makes the whole
    decision in the calling thread."""

    def __init__(self, pdp: Callable[[], Pdp], *, network: Executor | None = None) -> None:
        self._pdp = pdp
        self._network = network

    def Check(self, request: external_auth_pb2.CheckRequest | Unreadable, context: Any) -> bytes:
        """The serialized ``CheckResponse`` (``render``), waiting on the network here if need be."""
        first = self._answer(request)
        return first if isinstance(first, bytes) else self._waited(first)

    async def check(self, request: external_auth_pb2.CheckRequest | Unreadable, context: Any) -> bytes:
        """``Check`` for ``grpc.aio``: a decision that must wait on the network waits in ``network``."""
        first = self._answer(request)
        if isinstance(first, bytes):
            return first
        remaining = context.time_remaining() if context is not None else None
        try:
            waiting = asyncio.get_running_loop().run_in_executor(self._network, self._waited, first)
            if remaining is None or remaining == float("inf"):
                return await waiting
            # A call that ends at its deadline is an RPC error, which a failure_mode_allow gateway lets
            # through: deny a little before it instead (the decision goes on in its thread, and is dropped).
            return await asyncio.wait_for(asyncio.shield(waiting), max(remaining - DEADLINE_MARGIN, remaining / 2))
        except TimeoutError:
            log.warning("no decision before the caller's deadline; denying")
            return self._refused(reasons.DECISION_TIMEOUT, "no decision before the caller's deadline", first)
        except Exception:  # the pool is shut (the listener stops): a deny all the same
            log.exception("Check failed; denying")
            return INTERNAL_ERROR_BYTES

    def _refused(self, reason: Reason, detail: str, request: CheckRequest) -> bytes:
        try:
            return render(self._pdp().refuse(reason, detail, request))
        except Exception:
            log.exception("Check failed; denying")
            return INTERNAL_ERROR_BYTES

    def _answer(self, request: external_auth_pb2.CheckRequest | Unreadable) -> bytes | CheckRequest:
        """The answer made without the network, or the request to decide once it may wait on it."""
        pdp = self._pdp()
        now = time.time()
        try:
            if isinstance(request, Unreadable):
                return render(pdp.refuse(request.reason, request.detail, CheckRequest(method="", path="", time=now)))
            try:
                raw = to_raw_request(request, now=now)
            except Exception as exc:  # a request we cannot read is a deny, never an RPC error
                log.warning("unreadable CheckRequest: %s", exc)
                return render(pdp.refuse(reasons.REQUEST_INVALID, "unreadable CheckRequest",
                                         CheckRequest(method="", path="", time=now)))
            try:
                return render(pdp.check(raw, network=False))
            except NeedsNetwork as exc:
                assert exc.request is not None
                return exc.request
        except Exception:
            log.exception("Check failed; denying")
            return INTERNAL_ERROR_BYTES

    def _waited(self, request: CheckRequest) -> bytes:
        try:
            return render(self._pdp().decide(request))
        except Exception:
            log.exception("Check failed; denying")
            return INTERNAL_ERROR_BYTES


#: How long before a call's deadline a decision still waiting on the network is given up for a deny.
DEADLINE_MARGIN = 0.05

#: The largest ``CheckRequest`` pdp reads; a larger one is denied unread (``request_too_large``). The
#: listener itself takes a message of any size, so that no size becomes an RPC error (grpcio's default
#: limit is 4 MiB) that a ``failure_mode_allow: true`` gateway would let through.
MAX_CHECK_REQUEST_BYTES = 64 * 1024 * 1024
#: No compressed message is taken (Envoy sends none): a few MiB of gzip would otherwise be inflated to any
#: size, before the caller gate and before ``read_message`` could refuse it.
SERVER_OPTIONS = (("grpc.max_receive_message_length", -1), ("grpc.compression_enabled_algorithms_bitset", 1))


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A ``CheckRequest`` that could not be read, in place of the message, so that it is denied."""

    reason: Reason
    detail: str


def read_message(data: bytes) -> external_auth_pb2.CheckRequest | Unreadable:
    """The request deserializer: a message, or why there is none (too large, not a CheckRequest)."""
    if len(data) > MAX_CHECK_REQUEST_BYTES:
        return Unreadable(reasons.REQUEST_TOO_LARGE, f"a CheckRequest of {len(data)} bytes")
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except Exception:
        return Unreadable(reasons.REQUEST_INVALID, "the CheckRequest is not a valid message")


def add_to_server(servicer: EnvoyAuthorization, server: grpc.aio.Server) -> None:
    """Register the ``Authorization`` service (``EnvoyAuthorization.check``), reading requests with
    ``read_message``."""
    handlers = {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.check, request_deserializer=read_message, response_serializer=_as_sent)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers),))
    server.add_registered_method_handlers(AUTHORIZATION_SERVICE, handlers)


def _as_sent(answer: bytes | external_auth_pb2.CheckResponse) -> bytes:
    """The response serializer: ``Check`` answers with bytes already (a subclass may answer a message)."""
    return answer if isinstance(answer, bytes) else answer.SerializeToString()


AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"

#: The answer when even rendering a decision failed: a deny, in the shape Envoy expects.
INTERNAL_ERROR_RESPONSE = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=reasons.INTERNAL_ERROR.code),
    denied_response=external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
        body=json.dumps({"reason": reasons.INTERNAL_ERROR.code}),
    ),
)
INTERNAL_ERROR_BYTES: bytes = INTERNAL_ERROR_RESPONSE.SerializeToString()
