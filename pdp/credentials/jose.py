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


#: base64url to the standard alphabet for ``binascii``; the standard alphabet's own '+', '/' and '=' become
#: a character it refuses, since base64url has none of them.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
#: The value of each base64url character (its last one must carry no stray bits).
_B64URL_VALUES = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; reject padding, foreign characters and non-canonical encodings."""
    rest = len(text) % 4
    if rest == 1:
        raise DecodeError("not base64url" if _B64URL.fullmatch(text) is None else "base64url has an impossible length")
    try:
        # strict_mode: any character outside the alphabet is an error, not skipped.
        standard = text.encode("ascii").translate(_TO_STANDARD) + b"=" * (-rest % 4)
        raw = binascii.a2b_base64(standard, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a character beyond ASCII (UnicodeEncodeError)
        raise DecodeError("not base64url") from exc
    # The last character of 2 (3) carries 4 (2) bits beyond the data: a canonical encoding has them zero.
    if rest and _B64URL_VALUES[text[-1]] & (0x0F if rest == 2 else 0x03):
        raise DecodeError("base64url is not canonical (stray trailing bits)")
    return raw


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # a name came twice: find the first repeat, for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError(f"duplicate member {key!r}")
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"number {text[:20]} is out of range")
    return value


#: One decoder for every call (``json.loads`` with options builds a new one each time).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_finite_float)

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
    if data.startswith("\ufeff"):  # as json.loads: a byte order mark is no JSON
        raise DecodeError("not valid JSON")
    try:
        value = _DECODER.decode(data)
    except DecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise DecodeError("not valid JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError("not a JSON object")
    if "\\u" in data and _SURROGATE_ESCAPE.search(data) and not unicode_text(value):
        raise DecodeError("a string holds a lone surrogate (\\ud800-\\udfff), which is no character")
    return value
