"""The policy's ``input`` document: opa-envoy-plugin's shape plus what pdp verified.

``input.attributes.request.http`` / ``input.attributes.source`` /
``input.parsed_path`` / ``input.parsed_query`` are laid out as Envoy's
ext_authz plugin for OPA lays them out, for every adapter, so a policy written
for that plugin runs unchanged. pdp adds ``input.cert``, ``input.token``,
``input.binding`` and ``input.path`` (the path without its query string).

``input.version`` is the plugin's (``{"ext_authz": "v3", "encoding": "protojson"}``), and
``input.parsed_body`` / ``input.truncated_body`` are always there, as the plugin sets them: the body
parsed by its ``content-type`` (JSON; ``application/x-www-form-urlencoded`` as lists of values;
``multipart/form-data`` as lists of values by part name, a JSON part as its JSON value: see
``pdp.policy.multipart_body``; a gRPC message by the descriptors of ``policy.proto_descriptor``: see
``pdp.policy.grpc_body``), null when there is no body, no content type or another one (gRPC payloads
without descriptors), and null with ``truncated_body`` true when
``content-length`` says the body was cut (Envoy's ``with_request_body.max_request_bytes``). A body that
does not parse is a malformed request, as there.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from typing import Any

from pdp import reasons
from pdp.certificates.identity import CertIdentity
from pdp.credentials.tokens import VerifiedToken
from pdp.errors import Denied
from pdp.policy.grpc_body import GrpcBodyError, GrpcMessages, read_grpc_body
from pdp.policy.multipart_body import MultipartError, read_form
from pdp.request import CheckRequest

NO_CERT: dict[str, Any] = {"present": False}
NO_TOKEN: dict[str, Any] = {"present": False}
#: What the plugin says for an ext_authz v3 request (``envoyauth/request.go``): pdp's document is that one.
VERSION: dict[str, str] = {"ext_authz": "v3", "encoding": "protojson"}

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_INT64 = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = (1 << 63) - 1


def parse_path(path: str) -> tuple[list[str], dict[str, list[str]]]:
    """``/a/b?x=1&x=2`` → (["a", "b"], {"x": ["1", "2"]}), as opa-envoy-plugin's parsed_path/parsed_query.

    Like the plugin: the path is percent-decoded, leading slashes are dropped and
    the rest is split on ``/``, so ``/`` gives ``[""]`` and ``/a/`` ``["a", ""]``.
    """
    raw_path, _, query = path.partition("?")
    raw_path = raw_path.split("#", 1)[0]
    segments = (urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path).lstrip("/").split("/")
    parsed_query: dict[str, list[str]] = {}
    if query:
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            parsed_query.setdefault(key, []).append(value)
    return segments, parsed_query


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_value(text: str) -> Any:
    return _clean(json.loads(text, parse_constant=_no_constant))


def _clean(value: Any) -> Any:
    """A lone UTF-16 surrogate (``"\\ud800"``) becomes U+FFFD, as Go's JSON decoder makes it."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if not value.isascii() else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _content_length(value: str) -> int:
    """``content-length`` as the plugin reads it (Go's ``strconv.ParseInt(v, 10, 64)``): a sign, then ASCII
    digits only, within int64. Python's ``int()`` also takes spaces, ``_`` and other scripts' digits."""
    if not _INT64.fullmatch(value):
        raise Denied(reasons.REQUEST_INVALID, "content-length is not a number")
    # Leading zeros are Go's too; without them, more than 19 digits is out of range (and int() never meets
    # its 4300-digit limit).
    digits = value[1:] if value[0] in "+-" else value
    digits = digits.lstrip("0") or "0"
    declared = (-1 if value[0] == "-" else 1) * (int(digits, 10) if len(digits) <= 19 else _INT64_MAX + 2)
    if not -_INT64_MAX - 1 <= declared <= _INT64_MAX:
        raise Denied(reasons.REQUEST_INVALID, "content-length is out of range")
    return declared


def parse_body(headers: Any, body: str | bytes, *, grpc: GrpcMessages | None = None,
               parsed_path: list[str] | None = None) -> tuple[Any, bool]:
    """(parsed_body, truncated_body) as opa-envoy-plugin computes them; ``Denied`` (``request_invalid``)
    for a body its content type says it is and it is not, or an unreadable ``content-length``. A gRPC
    body is read with ``grpc``'s descriptors (none: not read) as the message ``parsed_path`` names."""
    content_type = headers.get("content-type")
    if content_type is None:
        return None, False
    # The plugin's order: a content type naming two of these is read as the first.
    if "application/json" in content_type:
        kind = "json"
    elif "application/grpc" in content_type:
        # The plugin reads only Envoy's raw_body (pack_as_bytes) here: a text body is no gRPC message.
        if grpc is None or not isinstance(body, bytes) or not body:
            return None, False
        try:
            return read_grpc_body(body, parsed_path or [], grpc)
        except GrpcBodyError as exc:
            raise Denied(reasons.REQUEST_INVALID, f"the body is not the gRPC message its path names: {exc}") \
                from None
    elif "application/x-www-form-urlencoded" in content_type:
        kind = "form"
    elif "multipart/form-data" in content_type:
        kind = "multipart"
    else:
        return None, False
    if not body:
        return None, False
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    length = headers.get("content-length")
    if length is not None:
        declared = _content_length(length)
        size = len(body) if isinstance(body, bytes) else len(text.encode("utf-8", "surrogatepass"))
        if declared != -1 and declared > size:
            return None, True
    if kind == "json":
        try:
            return _json_value(text), False
        except (ValueError, RecursionError):
            raise Denied(reasons.REQUEST_INVALID, "the body is not the JSON its content-type says") from None
    if kind == "multipart":
        # Bytes as Go reads them: a text body as UTF-8, a lone surrogate as U+FFFD as in the JSON case.
        payload = body if isinstance(body, bytes) else _LONE_SURROGATE.sub("\ufffd", body).encode("utf-8")
        try:
            return read_form(_LONE_SURROGATE.sub("\ufffd", content_type), payload, _json_value), False
        except MultipartError as exc:
            raise Denied(reasons.REQUEST_INVALID, f"the body is not the multipart form its content-type says: {exc}") \
                from None
    if ";" in text or _BAD_ESCAPE.search(text):
        raise Denied(reasons.REQUEST_INVALID, "the body is not the form its content-type says")
    form: dict[str, list[str]] = {}
    for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        form.setdefault(key, []).append(value)
    return form, False


def build_input(request: CheckRequest, identity: CertIdentity | None, token: VerifiedToken | None,
                binding: dict[str, Any], grpc: GrpcMessages | None = None) -> dict[str, Any]:
    """The ``input`` document; ``grpc``: the descriptors gRPC bodies are read with (``policy.proto_descriptor``)."""
    path_only = request.path.partition("?")[0].partition("#")[0]
    parsed_path, parsed_query = parse_path(request.path)
    source: dict[str, Any] = {"address": {"socketAddress": {"address": request.source_address}}}
    if identity is not None:
        source["principal"] = identity.spiffe_id or identity.subject
        source["certificate"] = identity.url_encoded_pem
    http: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "host": request.host,
        "scheme": request.scheme,
        "protocol": request.protocol,
        "headers": dict(request.headers),
    }
    parsed_body: Any = None
    truncated = False
    if request.body:
        # As protojson renders the CheckRequest: 'body' text, or 'rawBody' as base64.
        if isinstance(request.body, str):
            http["body"] = request.body
        else:
            http["rawBody"] = base64.b64encode(request.body).decode("ascii")
        parsed_body, truncated = parse_body(request.headers, request.body, grpc=grpc, parsed_path=parsed_path)
    doc: dict[str, Any] = {
        "attributes": {
            "request": {"http": http},
            "source": source,
            "contextExtensions": dict(request.context.get("context_extensions") or {}),
            "metadataContext": request.context.get("metadata_context", {}),
        },
        "path": path_only,
        "parsed_path": parsed_path,
        "parsed_query": parsed_query,
        "parsed_body": parsed_body,
        "truncated_body": truncated,
        "version": dict(VERSION),
        "cert": identity.policy_view if identity is not None else NO_CERT,
        "token": token.policy_view if token is not None else NO_TOKEN,
        "binding": binding,
    }
    return doc
