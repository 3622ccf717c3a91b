"""Credentials out of a recorded input document (``log.include_input``), the rest kept as it was.

What is a credential, by name (compared case-insensitively, after percent-decoding, ``+`` read as a
space, surrounding spaces dropped):

- **headers**: ``CREDENTIAL_HEADERS``, any name containing one of ``CREDENTIAL_HEADER_PARTS``
  (``x-forwarded-access-token``, ``x-api-key``, ``x-amz-signature``...), and the names of
  ``log.redact_headers``. A header value holding a URL (``:path``, ``referer``, ``x-original-uri``)
  has its query redacted as the request's is.
- **query and form parameters, JSON members**: ``CREDENTIAL_NAMES`` (RFC 6749/6750/7523/7636/8693
  and OpenID Connect parameter names, and the usual password and API key names), or any name
  containing one of ``CREDENTIAL_NAME_PARTS``. In ``http.path`` the query is split on ``&`` and
  ``;`` (servers differ: some read ``;`` as ``&``); only a credential's value is replaced, every
  other byte of the path stays. ``parsed_query`` and ``parsed_body`` are walked the same way,
  ``parsed_body`` recursively (to ``MAX_DEPTH``; deeper, a member is replaced whole).
- **raw bodies** (``http.body``, ``http.rawBody``) are never recorded: ``parsed_body`` (redacted) is
  what a policy reads of a JSON or form body.

A redacted value is ``"[REDACTED]"``; the verified facts (``input.token``, ``input.cert``) stay.
OPA leaves this to a decision log ``mask`` policy; here it is not optional.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"

#: Request headers that carry credentials, by exact name.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "dpop"})
#: A header whose name contains one of these carries a credential too.
CREDENTIAL_HEADER_PARTS = ("token", "secret", "password", "auth", "cookie", "session", "api-key", "apikey",
                           "api_key", "signature")
#: Parameter and member names that are credentials: RFC 6749 (``code``, ``client_secret``, ``password``,
#: ``refresh_token``), RFC 6750 (``access_token``), RFC 7523 (``assertion``, ``client_assertion``),
#: RFC 7636 (``code_verifier``), RFC 8628 (``device_code``), RFC 8693 (``subject_token``,
#: ``actor_token``), OpenID Connect (``id_token``, ``id_token_hint``), and the usual others.
CREDENTIAL_NAMES = frozenset({
    "access_token", "refresh_token", "id_token", "id_token_hint", "token", "password", "passwd", "pwd",
    "client_secret", "assertion", "client_assertion", "code", "code_verifier", "device_code", "user_code",
    "subject_token", "actor_token", "secret", "api_key", "apikey", "sig", "signature", "session", "sessionid",
    "session_id", "otp", "totp", "private_key", "credential", "credentials"})
#: A parameter or member whose name contains one of these is a credential too.
CREDENTIAL_NAME_PARTS = ("token", "secret", "password", "passwd", "apikey", "api_key", "api-key", "signature",
                         "session", "credential", "private_key")
#: How deep ``parsed_body`` is walked; a member deeper than this is replaced whole.
MAX_DEPTH = 32

_SEPARATORS = re.compile(r"([&;])")


def is_credential_name(name: str) -> bool:
    """Whether a parameter or member named ``name`` (as decoded) holds a credential."""
    folded = name.strip().lower()
    return folded in CREDENTIAL_NAMES or any(part in folded for part in CREDENTIAL_NAME_PARTS)


def is_credential_header(name: str, extra: frozenset[str] = frozenset()) -> bool:
    folded = name.lower()
    return folded in CREDENTIAL_HEADERS or folded in extra or any(part in folded for part in CREDENTIAL_HEADER_PARTS)


def _decoded(raw: str) -> str:
    return urllib.parse.unquote_plus(raw, errors="replace")


def holds_credential(text: str) -> bool:
    """Whether ``text`` (a decoded value) is itself a query holding a credential parameter
    (``a=1;access_token=...``, ``https://x/cb?code=...``)."""
    if "=" not in text:
        return False
    query = text.split("?", 1)[1] if "?" in text else text
    for piece in _SEPARATORS.split(query):
        name, eq, _ = piece.partition("=")
        if eq and is_credential_name(_decoded(name)):
            return True
    return False


def redact_query(target: str) -> str:
    """``target`` (a path with a query, or a URL) with the value of every credential parameter replaced;
    every other byte kept (``?q=access_token&flag`` stays as it is)."""
    head, sep, query = target.partition("?")
    if not sep or "=" not in query:
        return target
    query, hash_, fragment = query.partition("#")
    pieces = _SEPARATORS.split(query)
    changed = False
    for i in range(0, len(pieces), 2):  # the odd ones are the separators
        name, eq, value = pieces[i].partition("=")
        if eq and value != REDACTED and (is_credential_name(_decoded(name)) or holds_credential(_decoded(value))):
            pieces[i] = f"{name}={REDACTED}"
            changed = True
    return head + "?" + "".join(pieces) + hash_ + fragment if changed else target


def redact_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """``parsed_query`` (name → list of values) with credential values replaced."""
    out: dict[str, Any] = {}
    for name, values in params.items():
        if is_credential_name(str(name)):
            out[name] = [REDACTED] * len(values) if isinstance(values, list) else REDACTED
        elif isinstance(values, list):
            out[name] = [REDACTED if isinstance(v, str) and holds_credential(v) else v for v in values]
        else:
            out[name] = values
    return out


def redact_members(value: Any, depth: int = 0) -> Any:
    """A parsed body (JSON or form) with every credential member replaced, at any depth."""
    if depth > MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for name, member in value.items():
            if is_credential_name(str(name)):
                out[name] = [REDACTED] * len(member) if isinstance(member, list) and \
                    all(isinstance(v, str) for v in member) else REDACTED
            else:
                out[name] = redact_members(member, depth + 1)
        return out
    if isinstance(value, list):
        return [redact_members(v, depth + 1) for v in value]
    if isinstance(value, str) and holds_credential(value):
        return REDACTED
    return value


def redact_headers(headers: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    names = frozenset(n.lower() for n in extra)
    out: dict[str, Any] = {}
    for name, value in headers.items():
        if is_credential_header(str(name), names):
            out[name] = REDACTED
        elif isinstance(value, str) and "?" in value:
            out[name] = redact_query(value)
        else:
            out[name] = value
    return out


def redacted_input(doc: Mapping[str, Any], extra_headers: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of an input document without credentials (this module's docstring says which)."""
    out = dict(doc)
    attributes = dict(out.get("attributes") or {})
    request = dict(attributes.get("request") or {})
    http = dict(request.get("http") or {})
    headers = http.get("headers")
    if isinstance(headers, Mapping):
        http["headers"] = redact_headers(headers, extra_headers)
    path = http.get("path")
    if isinstance(path, str):
        http["path"] = redact_query(path)
    for name in ("body", "rawBody"):
        if name in http:
            http[name] = REDACTED
    if isinstance(out.get("path"), str):
        out["path"] = redact_query(out["path"])
    query = out.get("parsed_query")
    if isinstance(query, Mapping):
        out["parsed_query"] = redact_parameters(query)
    if out.get("parsed_body") is not None:
        out["parsed_body"] = redact_members(out["parsed_body"])
    request["http"] = http
    attributes["request"] = request
    out["attributes"] = attributes
    return out
