"""OPA's ``io.jwt.decode``, ``io.jwt.decode_verify`` and ``io.jwt.verify_*`` (RFC 7515, RFC 7519).

Signatures are checked with pyjwt's algorithm implementations over keys read
by ``cryptography``. Keys are given as OPA takes them: a PEM certificate, a
PEM public key, or a JWK / JWK Set as JSON text; HMAC secrets as text.

A token that cannot be read (no periods, bad base64, a JWE) is an error; a
signature or claim that does not check out is ``false``, as in OPA.
``io.jwt.decode_verify`` reads the clock when ``time`` is not among its
constraints, so it is listed as non-deterministic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWKError

from pdp.policy.builtins._types import BuiltinError, operand, string

_ALGORITHMS = {name: alg for name, alg in get_default_algorithms().items()
               if name in {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                           "ES256", "ES384", "ES512", "EdDSA"}}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_CONSTRAINTS = {"cert", "secret", "alg", "iss", "aud", "time"}


def _b64(segment: str) -> bytes:
    """Unpadded base64url, failing where Go's decoder fails (the offset of the first bad byte)."""
    stripped = segment.rstrip("=")
    good = _B64URL.match(stripped)
    end = good.end() if good else 0
    if end < len(stripped):
        raise ValueError(f"illegal base64 data at input byte {end}")
    if len(stripped) % 4 == 1:
        raise ValueError(f"illegal base64 data at input byte {len(stripped) - 1}")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from exc


def _json_object(name: str, what: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BuiltinError(name, f"JWT {what} could not be unmarshaled: {exc}") from exc
    if not isinstance(value, dict):
        raise BuiltinError(name, f"JWT {what} must be a JSON object")
    return value


class _Token:
    def __init__(self, name: str, text: str) -> None:
        if "." not in text:
            raise BuiltinError(name, "encoded JWT had no period separators")
        parts = text.split(".")
        if len(parts) != 3:
            raise BuiltinError(name, f"encoded JWT must have 3 sections, found {len(parts)}")
        self.signing_input = f"{parts[0]}.{parts[1]}".encode()
        try:
            header_raw = _b64(parts[0])
        except ValueError as exc:
            raise BuiltinError(name, f"JWT header had invalid encoding: {exc}") from exc
        self.header = _json_object(name, "header", header_raw)
        if "enc" in self.header:
            raise BuiltinError(name, "JWT is a JWE object, which is not supported")
        try:
            self.payload_raw = _b64(parts[1])
        except ValueError as exc:
            raise BuiltinError(name, f"JWT payload had invalid encoding: {exc}") from exc
        try:
            self.signature = _b64(parts[2])
        except ValueError as exc:
            raise BuiltinError(name, f"JWT signature had invalid encoding: {exc}") from exc

    @property
    def nested(self) -> bool:
        return self.header.get("cty") == "JWT"

    def inner(self) -> str:
        """The enclosed token of a nested JWT (its payload, bare or as a JSON string)."""
        text = self.payload_raw.decode("utf-8", "replace")
        if text.startswith('"'):
            try:
                value = json.loads(text)
            except ValueError:
                return text
            return value if isinstance(value, str) else text
        return text


def _unnest(name: str, text: str) -> _Token:
    token = _Token(name, text)
    while token.nested:
        token = _Token(name, token.inner())
    return token


def decode(jwt: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """[header, payload, signature as hex] of a JWS, without verifying it; nested JWTs are unwrapped."""
    name = "io.jwt.decode"
    token = _unnest(name, string(name, 1, jwt))
    return token.header, _json_object(name, "payload", token.payload_raw), token.signature.hex()


# --- keys ------------------------------------------------------------------------------------------

class _Key:
    def __init__(self, key: Any, kid: str | None = None, alg: str | None = None) -> None:
        self.key, self.kid, self.alg = key, kid, alg


def _keys(name: str, text: str) -> list[_Key]:
    """Public keys from a PEM certificate (chain), a PEM public key, or a JWK / JWK Set."""
    if text.startswith("-----BEGIN CERTIFICATE"):
        try:
            return [_Key(c.public_key()) for c in x509.load_pem_x509_certificates(text.encode())]
        except ValueError as exc:
            raise BuiltinError(name, f"failed to parse a PEM certificate: {exc}") from exc
    if text.startswith("-----BEGIN"):
        try:
            return [_Key(load_pem_public_key(text.encode()))]
        except (ValueError, TypeError) as exc:
            raise BuiltinError(name, f"failed to parse a PEM public key: {exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BuiltinError(name, "failed to parse a JWK key (set): not a certificate, a PEM key or JSON") from exc
    try:
        docs = doc["keys"] if isinstance(doc, dict) and "keys" in doc else [doc]
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise ValueError("keys must be a list of objects")
        jwks = [(PyJWK.from_dict(d), d) for d in docs]
    except (PyJWKError, ValueError, TypeError, KeyError) as exc:
        raise BuiltinError(name, f"failed to parse a JWK key (set): {exc}") from exc
    return [_Key(jwk.key, jwk.key_id, d.get("alg")) for jwk, d in jwks]


def _verify_with(alg: str, key: Any, token: _Token) -> bool:
    algorithm = _ALGORITHMS[alg]
    try:
        if alg.startswith("HS"):
            if not isinstance(key, bytes):
                return False
            return bool(algorithm.verify(token.signing_input, key, token.signature))
        return bool(algorithm.verify(token.signing_input, key, token.signature))
    except (TypeError, ValueError, AttributeError):  # a key of another type than the algorithm's
        return False


def _alg(name: str, token: _Token) -> str:
    alg = token.header.get("alg")
    if not isinstance(alg, str) or alg not in _ALGORITHMS:
        raise BuiltinError(name, f"unknown JWS algorithm: {alg}")
    return alg


def _verifier(alg: str) -> Callable[[Any, Any], bool]:
    name = f"io.jwt.verify_{alg.lower()}"

    def verify(jwt: Any, key: Any) -> bool:
        token = _Token(name, string(name, 1, jwt))
        material = string(name, 2, key)
        if token.header.get("alg") != alg:
            return False
        if alg.startswith("HS"):
            return _verify_with(alg, material.encode(), token)
        return any(_verify_with(alg, k.key, token) for k in _keys(name, material))

    verify.__name__ = f"verify_{alg.lower()}"
    return verify


VERIFIERS = {f"io.jwt.verify_{alg.lower()}": _verifier(alg) for alg in _ALGORITHMS}


# --- decode_verify -----------------------------------------------------------------------------------

def _number(value: Any) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def decode_verify(jwt: Any, constraints: Any) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """[valid, header, payload]: valid when the signature checks out against the ``cert`` keys or the
    ``secret``, and ``alg``, ``iss``, ``aud``, ``exp`` and ``nbf`` (against ``time``, ns) hold."""
    name = "io.jwt.decode_verify"
    text = string(name, 1, jwt)
    given = operand(name, 2, constraints, dict, "object")
    for key in given:
        if key not in _CONSTRAINTS:
            raise BuiltinError(name, f"unknown token validation constraint: {key}")
    for key in ("cert", "secret", "alg", "iss", "aud"):
        if key in given and not isinstance(given[key], str):
            raise BuiltinError(name, f"{key} constraint: must be a string")
    if ("cert" in given) == ("secret" in given):
        raise BuiltinError(name, "duplicate key constraints" if "cert" in given else "no key constraint")
    if "time" in given:
        if isinstance(given["time"], bool) or not isinstance(given["time"], int | float):
            raise BuiltinError(name, "time constraint: must be a number")
        now = _number(given["time"])
    else:
        now = Decimal(time.time_ns())
    keys = _keys(name, given["cert"]) if "cert" in given else None
    unverified: tuple[bool, dict[str, Any], dict[str, Any]] = (False, {}, {})

    token = _Token(name, text)
    while True:
        alg = _alg(name, token)
        if "crit" in token.header:  # no critical header extension is understood
            return unverified
        if keys is None:
            if not _verify_with(alg, given["secret"].encode(), token):
                return unverified
        else:
            kid = token.header.get("kid")
            chosen = [k for k in keys if kid is not None and k.kid == kid]
            candidates = chosen or [k for k in keys if k.alg in (None, alg)]
            if not any(_verify_with(alg, k.key, token) for k in candidates):
                return unverified
        if not token.nested:
            break
        token = _Token(name, token.inner())

    header = token.header
    payload = _json_object(name, "payload", token.payload_raw)
    if "alg" in given and given["alg"] != header.get("alg"):
        return unverified
    nanos = Decimal(1_000_000_000)
    if "exp" in payload:
        exp = payload["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise BuiltinError(name, "exp value must be a number")
        if now >= _number(exp) * nanos:
            return unverified
    if "nbf" in payload:
        nbf = payload["nbf"]
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            raise BuiltinError(name, "nbf value must be a number")
        if now < _number(nbf) * nanos:
            return unverified
    if "iss" in given and payload.get("iss") != given["iss"]:
        return unverified
    aud = payload.get("aud")
    if "aud" not in given:
        if "aud" in payload:
            return unverified
    elif not (aud == given["aud"] or (isinstance(aud, list) and given["aud"] in aud)):
        return unverified
    return True, header, payload
