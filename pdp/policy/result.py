"""Reading a policy's answer: a boolean, or an object in opa-envoy-plugin's result shape.

Object members: ``allowed`` (required boolean), ``headers``,
``response_headers_to_add`` (string maps), ``request_headers_to_remove``
(string list), ``http_status`` (integer, used on deny), ``body`` (string),
``dynamic_metadata`` (object), and pdp's ``reason`` (a reason code string).
Anything else in the answer is an error: a policy that answers in a shape
pdp does not understand is denied, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdp.policy.engine import Undefined

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_KNOWN = frozenset({"allowed", "headers", "response_headers_to_add", "request_headers_to_remove",
                    "http_status", "body", "dynamic_metadata", "reason"})


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


def _headers(value: Any, member: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyResultError(f"'{member}' is not an object")
    out: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str) or _HEADER_NAME.fullmatch(name) is None:
            raise PolicyResultError(f"'{member}' has an invalid header name {name!r}")
        if isinstance(v, list):
            if not all(isinstance(x, str) for x in v):
                raise PolicyResultError(f"'{member}.{name}' is not a list of strings")
            v = ", ".join(v)
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise PolicyResultError(f"'{member}.{name}' is not a string")
        text = str(v)
        if "\r" in text or "\n" in text or "\0" in text:
            raise PolicyResultError(f"'{member}.{name}' contains a control character")
        out[name.lower()] = text
    return out


def read_outcome(value: Any) -> PolicyOutcome:
    if isinstance(value, Undefined):
        return PolicyOutcome(allowed=False, reason=None)
    if isinstance(value, bool):
        return PolicyOutcome(allowed=value)
    if not isinstance(value, dict):
        raise PolicyResultError(f"the policy answered {type(value).__name__}, not a boolean or an object")
    unknown = set(value) - _KNOWN
    if unknown:
        raise PolicyResultError(f"unknown result members: {', '.join(sorted(unknown))}")
    allowed = value.get("allowed")
    if not isinstance(allowed, bool):
        raise PolicyResultError("'allowed' is missing or not a boolean")
    reason = value.get("reason")
    if reason is not None and (not isinstance(reason, str) or _REASON.fullmatch(reason) is None):
        raise PolicyResultError("'reason' must be a lower-case code like 'scope_missing'")
    status = value.get("http_status")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)
                               or not 200 <= status <= 599):
        raise PolicyResultError("'http_status' must be an integer from 200 to 599")
    remove = value.get("request_headers_to_remove", [])
    if not isinstance(remove, list) or not all(isinstance(h, str) and _HEADER_NAME.fullmatch(h) for h in remove):
        raise PolicyResultError("'request_headers_to_remove' must be a list of header names")
    body = value.get("body", "")
    if not isinstance(body, str):
        raise PolicyResultError("'body' must be a string")
    meta = value.get("dynamic_metadata", {})
    if not isinstance(meta, dict):
        raise PolicyResultError("'dynamic_metadata' must be an object")
    return PolicyOutcome(
        allowed=allowed, reason=reason, headers=_headers(value.get("headers"), "headers"),
        response_headers=_headers(value.get("response_headers_to_add"), "response_headers_to_add"),
        headers_to_remove=tuple(h.lower() for h in remove), http_status=status, body=body,
        dynamic_metadata=meta,
    )
