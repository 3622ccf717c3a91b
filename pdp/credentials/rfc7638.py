"""RFC 7638, JSON Web Key thumbprints: SHA-256 over the key's required members, in lexical order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pdp.credentials.jose import b64url_encode

_REQUIRED = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x"),
             "oct": ("k", "kty")}


class ThumbprintError(ValueError):
    pass


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The base64url SHA-256 thumbprint of a JWK (RFC 7638 §3), as DPoP's ``cnf.jkt`` carries it."""
    members = _REQUIRED.get(str(jwk.get("kty")))
    if members is None:
        raise ThumbprintError(f"unsupported key type {jwk.get('kty')!r}")
    if not all(isinstance(jwk.get(m), str) for m in members):
        raise ThumbprintError(f"a {jwk['kty']} key needs string members {', '.join(members)}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True,
                           ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())
