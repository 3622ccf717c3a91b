"""Reading a policy's answer: a boolean, or an object in opa-envoy-plugin's result shape.

Read as opa-envoy-plugin reads it (``envoyauth/response.go``), member by member:

- ``allowed`` (required boolean);
- ``headers``: an object, or a list of objects whose headers are all taken; a value is a string or a
  list of strings (the header with each value). Added upstream on an allow, sent to the client on a deny;
- ``response_headers_to_add`` (same shape): sent to the client on an allow (pdp: on a deny too);
- ``request_headers_to_remove``, ``query_parameters_to_remove``: lists of strings (allow only);
- ``query_parameters_to_set``: an object of strings or lists of strings (allow only);
- ``http_status`` (an integer status) and ``body`` (a string): read on a deny only;
- ``dynamic_metadata`` (an object, nested at most ``MAX_METADATA_DEPTH`` levels, numbers finite: what
  Envoy's protobuf parser reads in a ``CheckResponse``);
- pdp's ``reason`` (a reason code string);
- pdp's ``scope``, read on a deny only: the scope the request needs, a space-separated string or a list
  of strings, which goes into the RFC 6750 §3 challenge (``WWW-Authenticate: Bearer
  error="insufficient_scope", scope="read write"``). Words that are not RFC 6749 §3.3 scope-tokens (a
  quote, a backslash, a control character) are dropped; a member of another type is an error.

A member the plugin does not read for this verdict is not looked at (a malformed ``body`` on an allow
is no error there either). Other members are ignored, as the plugin ignores them: they cannot change the
verdict. A member of the wrong type is an error, and an error is a deny (``policy_error``), never a guess.
Header values are strings: a number is an error, as in the plugin. Several values of one header are
joined with ``", "`` (RFC 9110 §5.3), except ``set-cookie``, whose further values are kept apart
(``more_response_headers``): a cookie cannot share a line with another.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdp.credentials.rfc6750 import scope_tokens
from pdp.policy.engine import PolicyEngine, Undefined

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The deepest ``dynamic_metadata`` read (the object itself is level 1). Each level of an object is three
#: levels of protobuf messages in a ``CheckResponse`` (``Value``, ``Struct``, the map entry), under the
#: response's own and the ``policy`` member it goes in: 32 levels already reach protobuf's limit of 100.
MAX_METADATA_DEPTH = 24
#: Headers that frame an HTTP message or its connection (RFC 9110 §7.6.1, §8.6; RFC 9112 §6.1): a policy
#: that set one would make pdp's own answer, or the request Envoy sends upstream, mean another length or
#: another connection than the bytes carry (a broken answer, or a request smuggled past the upstream).
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                             "te", "trailer", "proxy-connection"})
#: Header names whose values cannot be joined into one line.
_UNJOINABLE = frozenset({"set-cookie"})


class PolicyResultError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    allowed: bool
    reason: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    headers_to_remove: tuple[str, ...] = ()
    http_status: int | None = None
    body: str = ""
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)
    #: ``query_parameters_to_set`` as (name, value) pairs, in order; a name with several values repeats.
    query_to_set: tuple[tuple[str, str], ...] = ()
    query_to_remove: tuple[str, ...] = ()
    #: Further values of an unjoinable header (``set-cookie``) in ``headers`` / ``response_headers_to_add``.
    more_headers: tuple[tuple[str, str], ...] = ()
    more_response_headers: tuple[tuple[str, str], ...] = ()
    #: On a deny, the scope the request needs (RFC 6749 scope-tokens, space-separated) for the challenge.
    scope: str | None = None


def _header_pairs(value: Any, member: str) -> list[tuple[str, str]]:
    """``headers``-shaped member → (lower-case name, value) pairs, every value of every object, in order."""
    if value is None:
        return []
    objects = value if isinstance(value, list) else [value]
    pairs: list[tuple[str, str]] = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise PolicyResultError(f"'{member}' is not an object or a list of objects")
        for name, v in obj.items():
            if not isinstance(name, str) or _HEADER_NAME.fullmatch(name) is None:
                raise PolicyResultError(f"'{member}' has an invalid header name {name!r}")
            if name.lower() in FRAMING_HEADERS:
                raise PolicyResultError(f"'{member}' sets {name.lower()!r}, which frames the message: the HTTP "
                                        "stacks on the way set it, never a policy")
            if isinstance(v, list):
                if not all(isinstance(x, str) for x in v):
                    raise PolicyResultError(f"'{member}.{name}' is not a list of strings")
                values = v
            elif isinstance(v, str):
                values = [v]
            else:
                raise PolicyResultError(f"'{member}.{name}' is not a string")
            for text in values:
                if "\r" in text or "\n" in text or "\0" in text:
                    raise PolicyResultError(f"'{member}.{name}' contains a control character")
                pairs.append((name.lower(), text))
    return pairs


def _headers(value: Any, member: str) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """One value per name (several joined with ', '), and the further values of unjoinable names."""
    out: dict[str, list[str]] = {}
    for name, text in _header_pairs(value, member):
        out.setdefault(name, []).append(text)
    more = tuple((n, v) for n, vs in out.items() if n in _UNJOINABLE for v in vs[1:])
    return {n: vs[0] if n in _UNJOINABLE else ", ".join(vs) for n, vs in out.items()}, more


def _strings(value: Any, member: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PolicyResultError(f"'{member}' must be a list of strings")
    return tuple(value)


def _query_to_set(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise PolicyResultError("'query_parameters_to_set' must be an object")
    pairs: list[tuple[str, str]] = []
    for name, v in value.items():
        if isinstance(v, str):
            pairs.append((name, v))
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            pairs += [(name, x) for x in v]
        else:
            raise PolicyResultError(f"'query_parameters_to_set.{name}' must be a string or a list of strings")
    return tuple(pairs)


def _scope(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        tokens = scope_tokens(value)
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        tokens = scope_tokens(value)
    else:
        raise PolicyResultError("'scope' must be a string or a list of strings")
    return " ".join(tokens) or None


def _check_metadata(meta: dict[str, Any]) -> None:
    """Refuse metadata Envoy might not read: nested deeper than ``MAX_METADATA_DEPTH`` (protobuf parsers stop
    at 100 levels of messages, and each level of a ``Struct`` is two or three), or holding a number that is
    not finite (no JSON, no ``Struct`` value). Iterative: a policy's deep value cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyResultError("'dynamic_metadata' holds a number that is not finite")
        if isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise PolicyResultError(f"'dynamic_metadata' is nested deeper than {MAX_METADATA_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def read_outcome(value: Any) -> PolicyOutcome:
    if isinstance(value, Undefined):
        return PolicyOutcome(allowed=False, reason=None)
    if isinstance(value, bool):
        return PolicyOutcome(allowed=value)
    if not isinstance(value, dict):
        raise PolicyResultError(f"the policy answered {type(value).__name__}, not a boolean or an object")
    allowed = value.get("allowed")
    if not isinstance(allowed, bool):
        raise PolicyResultError("'allowed' is missing or not a boolean")
    reason = value.get("reason")
    if reason is not None and (not isinstance(reason, str) or _REASON.fullmatch(reason) is None):
        raise PolicyResultError("'reason' must be a lower-case code like 'scope_missing'")
    meta = value.get("dynamic_metadata", {})
    if not isinstance(meta, dict):
        raise PolicyResultError("'dynamic_metadata' must be an object")
    _check_metadata(meta)
    headers, more_headers = _headers(value.get("headers"), "headers")
    response_headers, more_response = _headers(value.get("response_headers_to_add"), "response_headers_to_add")
    if allowed:
        remove = _strings(value.get("request_headers_to_remove"), "request_headers_to_remove")
        if not all(_HEADER_NAME.fullmatch(h) for h in remove):
            raise PolicyResultError("'request_headers_to_remove' must be a list of header names")
        return PolicyOutcome(
            allowed=True, reason=reason, headers=headers, response_headers=response_headers,
            headers_to_remove=tuple(h.lower() for h in remove), dynamic_metadata=meta,
            query_to_set=_query_to_set(value.get("query_parameters_to_set")),
            query_to_remove=_strings(value.get("query_parameters_to_remove"), "query_parameters_to_remove"),
            more_headers=more_headers, more_response_headers=more_response,
        )
    status = value.get("http_status")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)
                               or not 200 <= status <= 599):
        raise PolicyResultError("'http_status' must be an integer from 200 to 599")
    body = value.get("body", "")
    if not isinstance(body, str):
        raise PolicyResultError("'body' must be a string")
    return PolicyOutcome(
        allowed=False, reason=reason, headers=headers, response_headers=response_headers, http_status=status,
        body=body, dynamic_metadata=meta, more_headers=more_headers, more_response_headers=more_response,
        scope=_scope(value.get("scope")),
    )


def decided_outcome(engine: PolicyEngine, doc: dict[str, Any]) -> tuple[PolicyOutcome, bool]:
    """The policy's outcome for the input ``doc``, as the policy step takes it: from the engine's decision
    cache when the same facts were decided before, else evaluated, read and kept; and whether it came
    from the cache. Raises what evaluating and reading raise (``PolicyEvalError``, ``PolicyResultError``)."""
    cache = engine.decisions
    if cache is None:
        return read_outcome(engine.evaluate(doc)), False
    key = cache.key(doc)
    outcome: PolicyOutcome | None = cache.get(key)
    if outcome is not None:
        return outcome, True
    outcome = read_outcome(engine.evaluate(doc))
    cache.put(key, outcome)
    return outcome, False
