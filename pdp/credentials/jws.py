"""Compact JWS verification (RFC 7515) against keys pdp was configured with.

Explicit is safe: the caller names the algorithms it accepts, keys come only
from a configured key set (``jwk``, ``jku``, ``x5u`` and ``x5c`` in the header
are ignored), ``none`` and HMAC algorithms do not exist here, a key is used
only with algorithms of its own type and curve, and a ``crit`` header is
refused because pdp understands no extensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pdp.credentials.jose import DecodeError, b64url_decode, json_object
from pdp.credentials.jwks import JsonWebKey, KeySet, PublicKey

#: alg -> (kty, crv) of the keys that may verify it.
ASYMMETRIC_ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"),
}

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

MAX_TOKEN_LENGTH = 16 * 1024

#: Headers already decoded, by their base64url text: an issuer puts the same header on every token.
_HEADERS: dict[str, dict[str, Any]] = {}
_MAX_HEADERS = 256
_MAX_HEADER_TEXT = 1024


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
        header = _header(parts[0])
        payload = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
    except DecodeError as exc:
        raise JwsError(JwsError.MALFORMED, str(exc)) from exc
    if "crit" in header:
        raise JwsError(JwsError.MALFORMED, "'crit' header parameters are not understood")
    if header.get("b64", True) is not True:
        raise JwsError(JwsError.MALFORMED, "unencoded payloads (b64=false) are not accepted")
    return ParsedJws(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _header(text: str) -> dict[str, Any]:
    """The decoded header (a copy: the caller may keep it); a text once decoded is not decoded again."""
    kept = _HEADERS.get(text)
    if kept is None:
        kept = json_object(b64url_decode(text))
        if len(text) <= _MAX_HEADER_TEXT:  # bounded: a flood of made-up headers starts the table again
            if len(_HEADERS) >= _MAX_HEADERS:
                _HEADERS.clear()
            _HEADERS[text] = kept
    return dict(kept)


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


#: A signature check: (signing input, signature) -> True, or an exception.
Check = Callable[[bytes, bytes], bool]

_HASHES: dict[str, hashes.HashAlgorithm] = {"256": hashes.SHA256(), "384": hashes.SHA384(),
                                            "512": hashes.SHA512()}


def _check(key: PublicKey, alg: str) -> Check:
    """The RFC 7518 §3 / RFC 8037 §3.1 verification of ``alg`` with ``key`` (which fits it), its parameters
    built once per key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        # §3.4: the signature is R and S, each as long as the curve's order, not DER.
        size = (key.curve.key_size + 7) // 8
        ecdsa = ec.ECDSA(_HASHES[alg[2:]])

        def check_ec(message: bytes, signature: bytes) -> bool:
            if len(signature) != 2 * size:
                return False
            r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), message, ecdsa)
            return True

        return check_ec
    if isinstance(key, rsa.RSAPublicKey):
        digest = _HASHES[alg[2:]]
        # §3.5: PSS with MGF1 over the same hash, and a salt as long as the hash.
        pad: padding.AsymmetricPadding = (padding.PKCS1v15() if alg.startswith("RS") else
                                          padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size))

        def check_rsa(message: bytes, signature: bytes) -> bool:
            key.verify(signature, message, pad, digest)
            return True

        return check_rsa
    edwards = key

    def check_eddsa(message: bytes, signature: bytes) -> bool:
        edwards.verify(signature, message)
        return True

    return check_eddsa


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
    checks: tuple[tuple[JsonWebKey, Check], ...] | None = keys.prepared.get((kid, alg))
    if checks is None:
        checks = tuple((k, _check(k.key, alg)) for k in keys.candidates(kid) if _key_fits(k, alg))
        if not checks:
            raise JwsError(JwsError.KEY_UNKNOWN, f"no {alg} key with kid {kid!r}")
        # Kept only for a kid of the set: as many entries as its keys (and None) times the algorithms.
        keys.prepared[(kid, alg)] = checks
    for key, check in checks:
        if _verifies(check, parsed):
            return key
    raise JwsError(JwsError.SIGNATURE, "signature verification failed")


def _verifies(check: Check, parsed: ParsedJws) -> bool:
    try:
        return check(parsed.signing_input, parsed.signature)
    except (InvalidSignature, ValueError, TypeError):  # e.g. a signature of the wrong length
        return False
