"""OPA's ``io.jwt.decode``, ``io.jwt.decode_verify`` and ``io.jwt.verify_*`` (RFC 7515, RFC 7519).

Signatures are checked with pyjwt's algorithm implementations over keys read
by ``cryptography``. Keys are given as OPA takes them: one PEM certificate or
one PEM public key (anything after that block is refused, so a chain never
makes its CA's key trusted), or a JWK / JWK Set as JSON text; HMAC secrets as
text, where ``io.jwt.decode_verify`` counts an empty ``secret`` as no key.

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
from cryptography.hazmat.primitives.serialization import load_der_public_key
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from pdp.policy.builtins._types import BuiltinError, operand, string

ALGORITHMS = {name: alg for name, alg in get_default_algorithms().items()
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


def _pem_line(data: str) -> tuple[str, str]:
    """Go's ``pem.getLine``: the first line without its end of line and trailing blanks, and the rest."""
    i = data.find("\n")
    if i < 0:
        return data.rstrip(" \t"), ""
    j = i + 1
    if i > 0 and data[i - 1] == "\r":
        i -= 1
    return data[:i].rstrip(" \t"), data[j:]


def _pem_decode(data: str) -> tuple[str, bytes, str] | None:
    """Go's ``pem.Decode``: the type and bytes of the first PEM block, and the text after it; or None."""
    start, end, dashes = "\n-----BEGIN ", "\n-----END ", "-----"
    rest = data
    while True:
        if rest.startswith(start[1:]):
            rest = rest[len(start) - 1:]
        elif start in rest:
            rest = rest[rest.index(start) + len(start):]
        else:
            return None
        type_line, rest = _pem_line(rest)
        if not type_line.endswith(dashes):
            continue
        type_line = type_line[:-len(dashes)]
        headers = False
        while rest:  # "Key: value" header lines
            line, after = _pem_line(rest)
            key, colon, _ = line.partition(":")
            if not colon or not key:
                break
            headers, rest = True, after
        if not rest:
            return None
        if not headers and rest.startswith(end[1:]):
            end_index, trailer_index = 0, len(end) - 1
        else:
            end_index = rest.find(end)
            trailer_index = end_index + len(end)
        if end_index < 0:
            continue
        trailer_len = len(type_line) + len(dashes)
        trailer = rest[trailer_index:trailer_index + trailer_len]
        if len(trailer) < trailer_len or not trailer.startswith(type_line) or not trailer.endswith(dashes):
            continue
        if _pem_line(rest[trailer_index + trailer_len:])[0]:
            continue
        try:
            raw = base64.b64decode(re.sub(r"[ \t\r\n]", "", rest[:end_index]), validate=True)
        except (binascii.Error, ValueError):
            continue
        return type_line, raw, _pem_line(rest[end_index + len(end) - 1:])[1]


def _keys(name: str, text: str) -> list[_Key]:
    """Public keys as OPA reads them (``getKeysFromCertOrJWK``): the key of one PEM certificate, one PEM
    public key, or the keys of a JWK / JWK Set (those of an algorithm OPA does not know left out)."""
    block = _pem_decode(text)
    if block is not None:
        block_type, der, rest = block
        if rest:
            raise BuiltinError(name, "extra data after a PEM certificate block")
        if block_type == "CERTIFICATE":
            try:
                return [_Key(x509.load_der_x509_certificate(der).public_key())]
            except ValueError as exc:
                raise BuiltinError(name, f"failed to parse a PEM certificate: {exc}") from exc
        if block_type == "PUBLIC KEY":
            try:
                return [_Key(load_der_public_key(der))]
            except (ValueError, TypeError) as exc:
                raise BuiltinError(name, f"failed to parse a PEM public key: {exc}") from exc
        raise BuiltinError(name, "failed to extract a Key from the PEM certificate")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BuiltinError(name, "failed to parse a JWK key (set): not a certificate, a PEM key or JSON") from exc
    try:
        docs = doc["keys"] if isinstance(doc, dict) and "keys" in doc else [doc]
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise ValueError("keys must be a list of objects")
        docs = [d for d in docs if not isinstance(d.get("alg"), str) or d["alg"] in ALGORITHMS]
        jwks = [(PyJWK.from_dict(d), d) for d in docs]
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise BuiltinError(name, f"failed to parse a JWK key (set): {exc}") from exc
    return [_Key(jwk.key, jwk.key_id, d.get("alg")) for jwk, d in jwks]


def _verify_with(alg: str, key: Any, token: _Token) -> bool:
    """Whether ``key`` signed ``token`` under ``alg``; an unknown algorithm or a key of another type is no."""
    algorithm = ALGORITHMS.get(alg)
    if algorithm is None or (alg.startswith("HS") and not isinstance(key, bytes)):
        return False
    try:
        return bool(algorithm.verify(token.signing_input, key, token.signature))
    except (TypeError, ValueError, AttributeError):  # a key of another type than the algorithm's
        return False


class _Header:
    """The JOSE header fields OPA reads (``parseTokenHeader``); one of them of the wrong type is an error."""

    def __init__(self, name: str, header: dict[str, Any]) -> None:
        self.alg = self.kid = self.cty = ""
        crit: set[str] = set()
        unknown: list[str] = []
        for key, value in header.items():
            if key in ("alg", "kid", "typ", "cty"):
                if not isinstance(value, str):
                    raise BuiltinError(name, f"{key}: must be a string")
                if key != "typ":
                    setattr(self, key, value)
            elif key == "crit":
                if not isinstance(value, list):
                    raise BuiltinError(name, "crit: must be a list")
                for item in value:  # OPA stops at the first member that is not a string
                    if not isinstance(item, str):
                        break
                    crit.add(item)
                if not crit:
                    raise BuiltinError(name, "crit: must be a nonempty list")
            else:
                unknown.append(key)
        #: RFC 7515: ``alg`` is required, and a critical parameter that is not understood makes it invalid.
        self.valid = self.alg != "" and not any(u in crit for u in unknown)


def _signed_by(keys: list[_Key], header: _Header, token: _Token) -> bool:
    """OPA's choice of key: the first whose ``kid`` is the token's, else any whose ``alg`` fits."""
    if header.kid:
        for k in keys:
            if k.kid == header.kid:
                return _verify_with(header.alg, k.key, token)
    return any(_verify_with(header.alg, k.key, token) for k in keys if k.alg in (None, "", header.alg))


def _verifier(alg: str) -> Callable[[Any, Any], bool]:
    name = f"io.jwt.verify_{alg.lower()}"

    def verify(jwt: Any, key: Any) -> bool:
        token = _Token(name, string(name, 1, jwt))
        material = string(name, 2, key)
        if token.header.get("alg") != alg:
            return False
        if alg.startswith("HS"):
            return _verify_with(alg, material.encode(), token)
        return _signed_by(_keys(name, material), _Header(name, token.header), token)

    verify.__name__ = f"verify_{alg.lower()}"
    return verify


VERIFIERS = {f"io.jwt.verify_{alg.lower()}": _verifier(alg) for alg in ALGORITHMS}


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
    keys = _keys(name, given["cert"]) if "cert" in given else None
    secret = given.get("secret", "")
    if keys is not None and secret:
        raise BuiltinError(name, "duplicate key constraints")
    if keys is None and not secret:  # OPA counts an empty secret as no key at all
        raise BuiltinError(name, "no key constraint")
    if "time" in given:
        if isinstance(given["time"], bool) or not isinstance(given["time"], int | float):
            raise BuiltinError(name, "token time constraint: must be a number")
        now = _number(given["time"])
        if now < 0:
            raise BuiltinError(name, "token time constraint: must not be negative")
    else:
        now = Decimal(time.time_ns())
    unverified: tuple[bool, dict[str, Any], dict[str, Any]] = (False, {}, {})

    token = _Token(name, text)
    while True:
        header = _Header(name, token.header)
        if not header.valid:
            return unverified
        if "alg" in given and given["alg"] and given["alg"] != header.alg:
            return unverified
        if keys is None:
            if not _verify_with(header.alg, secret.encode(), token):
                return unverified
        elif not _signed_by(keys, header, token):
            return unverified
        if header.cty.lower() != "jwt":
            break
        # A nested JWT: its payload, as it stands, is the enclosed token (OPA does not unquote it here).
        token = _Token(name, token.payload_raw.decode("utf-8", "replace"))

    header_doc = token.header
    payload = _json_object(name, "payload", token.payload_raw)
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
    if given.get("iss") and payload.get("iss") != given["iss"]:  # an empty constraint is none, as in OPA
        return unverified
    audience = given.get("aud", "")
    if "aud" in payload:  # checked even without the constraint: then only "" is the audience
        aud = payload["aud"]
        if not (aud == audience if isinstance(aud, str) else isinstance(aud, list) and audience in aud):
            return unverified
    elif audience:
        return unverified
    return True, header_doc, payload
