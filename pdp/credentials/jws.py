"""Compact JWS verification (RFC 7515) against keys pdp was configured with.

Explicit is safe: the caller names the algorithms it accepts, keys come only
from a configured key set (``jwk``, ``jku``, ``x5u`` and ``x5c`` in the header
are ignored), ``none`` and HMAC algorithms do not exist here, a key is used
only with algorithms of its own type and curve, and a ``crit`` header is
refused because pdp understands no extensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, get_default_algorithms

from pdp.credentials.jose import DecodeError, b64url_decode, json_object
from pdp.credentials.jwks import JsonWebKey, KeySet

_PYJWT_ALGS = get_default_algorithms()

#: alg -> (kty, crv) of the keys that may verify it.
ASYMMETRIC_ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"),
}

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

MAX_TOKEN_LENGTH = 16 * 1024


class JwsError(ValueError):
    """Why a compact JWS was refused; ``kind`` is one of the class attributes below."""

    MALFORMED = "malformed"
    ALGORITHM = "algorithm"
    KEY_UNKNOWN = "key_unknown"
    SIGNATURE = "signature"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ParsedJws:
    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


def parse_compact(token: str) -> ParsedJws:
    """Split and decode a compact JWS; verify nothing yet."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise JwsError(JwsError.MALFORMED, f"longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) == 5:
        raise JwsError(JwsError.MALFORMED, "an encrypted token (JWE) is not accepted")
    if len(parts) != 3:
        raise JwsError(JwsError.MALFORMED, "not a compact JWS (needs three dot-separated parts)")
    try:
        header = json_object(b64url_decode(parts[0]))
        payload = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
    except DecodeError as exc:
        raise JwsError(JwsError.MALFORMED, str(exc)) from exc
    if "crit" in header:
        raise JwsError(JwsError.MALFORMED, "'crit' header parameters are not understood")
    if header.get("b64", True) is not True:
        raise JwsError(JwsError.MALFORMED, "unencoded payloads (b64=false) are not accepted")
    return ParsedJws(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _key_fits(key: JsonWebKey, alg: str) -> bool:
    kty, crv = ASYMMETRIC_ALGORITHMS[alg]
    if key.alg is not None and key.alg != alg:
        return False
    if kty == "RSA":
        return isinstance(key.key, rsa.RSAPublicKey)
    if kty == "EC":
        return isinstance(key.key, ec.EllipticCurvePublicKey) and _CURVE_NAMES.get(key.key.curve.name) == crv
    if crv == "Ed25519":
        return isinstance(key.key, ed25519.Ed25519PublicKey)
    return isinstance(key.key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def _algorithm(alg: str) -> Algorithm:
    name = "EdDSA" if alg == "Ed25519" else alg
    return _PYJWT_ALGS[name]


def verify(parsed: ParsedJws, keys: KeySet, algorithms: frozenset[str]) -> JsonWebKey:
    """Check the signature with a key from ``keys``; return the key that verified it."""
    alg = parsed.header.get("alg")
    if not isinstance(alg, str):
        raise JwsError(JwsError.MALFORMED, "the header has no 'alg'")
    if alg not in algorithms or alg not in ASYMMETRIC_ALGORITHMS:
        raise JwsError(JwsError.ALGORITHM, f"algorithm {alg!r} is not allowed")
    kid = parsed.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwsError(JwsError.MALFORMED, "'kid' is not a string")
    candidates = [k for k in keys.candidates(kid) if _key_fits(k, alg)]
    if not candidates:
        raise JwsError(JwsError.KEY_UNKNOWN, f"no {alg} key with kid {kid!r}")
    algorithm = _algorithm(alg)
    for key in candidates:
        if _verifies(algorithm, parsed, key):
            return key
    raise JwsError(JwsError.SIGNATURE, "signature verification failed")


def _verifies(algorithm: Algorithm, parsed: ParsedJws, key: JsonWebKey) -> bool:
    try:
        return bool(algorithm.verify(parsed.signing_input, key.key, parsed.signature))
    except (InvalidSignature, ValueError, TypeError):  # e.g. a signature of the wrong length
        return False
