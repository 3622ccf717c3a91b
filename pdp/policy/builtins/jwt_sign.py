"""OPA's ``io.jwt.encode_sign`` and ``io.jwt.encode_sign_raw``: a JWS in compact serialization (RFC 7515 §7.1).

``io.jwt.encode_sign_raw`` takes the protected header, the payload and the JWK
as text and signs exactly those bytes; ``io.jwt.encode_sign`` takes them as
values and writes each as Go's ``encoding/json`` does for OPA (members sorted,
no spaces, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped), so that both give
OPA's bytes. The key is the first of a JWK or JWK Set (RFC 7517); the
algorithm is the header's ``alg``, one of OPA's: HS256/384/512 (an ``oct``
key), RS* and PS* (an RSA private key), ES256/384/512 (an EC private key on
P-256/P-384/P-521), EdDSA (an Ed25519 private key). A payload must be JSON
unless the header's ``typ`` is present and not ``JWT``.

ECDSA and RSA-PSS signatures are randomized, so the builtins are listed as
non-deterministic (``pdp.policy.decision_cache.NONDETERMINISTIC``), as OPA
lists them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from pdp.credentials.jose import b64url_encode
from pdp.policy.builtins._types import BuiltinError, rego_order, string, type_name
from pdp.policy.builtins.jwt import ALGORITHMS

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
def _plain(value: Any, what: str) -> Any:
    """``value`` as Go's ``ast.JSON`` gives it: sets become arrays in Rego's order; object keys must be
    strings."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, member in value.items():
            if not isinstance(key, str):
                raise ValueError(f"failed to prepare JWT {what} for marshalling: object key must be a string, "
                                 f"not {type_name(key)}")
            out[key] = _plain(member, what)
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, what) for v in value]
    if isinstance(value, set | frozenset):
        return [_plain(v, what) for v in sorted(value, key=rego_order)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"failed to prepare JWT {what} for marshalling: {value} is not a JSON number")
    return value


def go_json(value: Any, what: str) -> bytes:
    """Go's ``json.Marshal`` of ``ast.JSON(value)``."""
    text = json.dumps(_plain(value, what), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in _HTML.items():  # these never occur outside strings in JSON text
        text = text.replace(char, escape)
    return text.encode()


def _json_error(exc: json.JSONDecodeError) -> str:
    """A JSON syntax error worded as Go words it."""
    if exc.pos >= len(exc.doc):
        return "unexpected end of JSON input"
    return f"invalid character {exc.doc[exc.pos]!r} at offset {exc.pos}"


def _strict_json(raw: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def _header_string(header: bytes, member: str) -> str:
    """The string member of the header, or ValueError saying why it cannot be had."""
    if not header.strip():
        raise ValueError("cannot parse JSON: cannot parse empty string")
    try:
        doc = _strict_json(header)
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot parse JSON: {_json_error(exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse JSON: {exc}") from exc
    if not isinstance(doc, dict) or member not in doc:
        raise ValueError(f"no {member!r} member: unsupported signature algorithm" if member == "alg"
                         else f"no {member!r} member")
    value = doc[member]
    if not isinstance(value, str):
        raise ValueError(f"{member!r} must be a string")
    return value


def _first_key(jwk_text: bytes) -> Any:
    """The private (or secret) key of the first JWK of a JWK or JWK Set."""
    try:
        doc = _strict_json(jwk_text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"failed to parse JWK: {_json_error(exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"failed to parse JWK: {exc}") from exc
    if isinstance(doc, dict) and "keys" in doc:
        keys = doc["keys"]
        if not isinstance(keys, list):
            raise ValueError("failed to parse JWK set: keys must be an array")
        if not keys:
            raise ValueError("no keys found in JWK set")
        doc = keys[0]
    if not isinstance(doc, dict):
        raise ValueError("failed to parse JWK: a key must be a JSON object")
    # The key's own "alg" does not choose the algorithm (the header does), and an "alg" pyjwt does not
    # know must not stop a key OPA would use.
    material = {k: v for k, v in doc.items() if k != "alg"}
    try:
        return PyJWK.from_dict(material).key
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"failed to parse JWK: {exc}") from exc


def _check_key(alg: str, key: Any) -> None:
    if alg.startswith("HS"):
        ok, want = isinstance(key, bytes), "an oct (secret) key"
    elif alg.startswith(("RS", "PS")):
        ok, want = isinstance(key, rsa.RSAPrivateKey), "an RSA private key"
    elif alg in _CURVES:
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _CURVES[alg])
        want = f"an EC private key on {_CURVES[alg].name}"
    else:
        ok, want = isinstance(key, ed25519.Ed25519PrivateKey), "an Ed25519 private key"
    if not ok:
        raise ValueError(f"failed to sign payload: {alg} needs {want}")


def _encode_sign(header: bytes, payload: bytes, jwk: bytes) -> str:
    """OPA's ``commonBuiltinJWTEncodeSign``, in its order of checks."""
    key = _first_key(jwk)
    try:
        alg = _header_string(header, "alg")
    except ValueError as exc:
        raise ValueError(f"missing or invalid 'alg' header: {exc}") from exc
    algorithm = ALGORITHMS.get(alg)
    if algorithm is None:
        raise ValueError(f"unknown JWS algorithm: {alg}")
    try:
        typ: str | None = _header_string(header, "typ")
    except ValueError:
        typ = None
    if typ is None or typ == "JWT":
        try:
            _strict_json(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("type is JWT but payload is not JSON") from exc
    _check_key(alg, key)
    signing_input = f"{b64url_encode(header)}.{b64url_encode(payload)}"
    signature = algorithm.sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url_encode(signature)}"


def encode_sign(headers: Any, payload: Any, key: Any) -> str:
    """A JWS of ``payload`` under the protected header ``headers``, signed with the JWK ``key`` (values)."""
    name = "io.jwt.encode_sign"
    try:
        return _encode_sign(go_json(headers, "headers"), go_json(payload, "payload"), go_json(key, "signature"))
    except ValueError as exc:
        raise BuiltinError(name, str(exc)) from exc


def encode_sign_raw(headers: Any, payload: Any, key: Any) -> str:
    """A JWS of the text ``payload`` under the header text ``headers``, signed with the JWK text ``key``."""
    name = "io.jwt.encode_sign_raw"
    jwk = string(name, 3, key)  # OPA reads the key operand first
    header_text, payload_text = string(name, 1, headers), string(name, 2, payload)
    try:
        return _encode_sign(header_text.encode(), payload_text.encode(), jwk.encode())
    except ValueError as exc:
        raise BuiltinError(name, str(exc)) from exc
