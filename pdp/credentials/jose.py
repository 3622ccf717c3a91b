"""Strict decoding helpers shared by JWS, JWK and certificate-header parsing.

RFC 7515 §2 base64url *without* padding, and JSON objects that refuse
duplicate member names (RFC 7515 §5.2 allows a parser to reject them, and a
token whose ``sub`` appears twice means different things to different
parsers: pdp refuses it).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class DecodeError(ValueError):
    """Input is not strict base64url or not a JSON object without duplicate members."""


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; reject padding, foreign characters and non-canonical encodings."""
    if _B64URL.fullmatch(text) is None:
        raise DecodeError("not base64url")
    if len(text) % 4 == 1:
        raise DecodeError("base64url has an impossible length")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex makes this unreachable
        raise DecodeError("not base64url") from exc
    if b64url_encode(raw) != text:
        raise DecodeError("base64url is not canonical (stray trailing bits)")
    return raw


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DecodeError(f"duplicate member {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"number {text[:20]} is out of range")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def unicode_text(value: Any) -> bool:
    """Whether every string in a JSON value is Unicode text: a lone surrogate, which a JSON escape can
    produce, is none, and would crash or confuse what reads it next (a policy engine, an encoder)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_object(data: bytes | str) -> dict[str, Any]:
    """Parse a JSON object, refusing duplicate members, NaN/Infinity, overflowing numbers,
    text that is not UTF-8 (RFC 8259 §8.1) and non-object values."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")  # strict: no BOM sniffing, no UTF-16/32, no lone surrogates
        except UnicodeDecodeError as exc:
            raise DecodeError("not UTF-8") from exc
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                           parse_float=_finite_float)
    except DecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise DecodeError("not valid JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError("not a JSON object")
    if "\\u" in data and _SURROGATE_ESCAPE.search(data) and not unicode_text(value):
        raise DecodeError("a string holds a lone surrogate (\\ud800-\\udfff), which is no character")
    return value
