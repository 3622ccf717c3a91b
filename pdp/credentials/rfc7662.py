"""RFC 7662, OAuth 2.0 token introspection: the response members for a token pdp verified.

An invalid, expired or unknown token is ``{"active": false}`` and nothing
more (§2.2: no reason leaks). An active one carries the standard members pdp
knows (``scope``, ``client_id``, ``username``, ``sub``, ``token_type``,
``exp``, ``iat``, ``nbf``, ``iss``, ``aud``, ``jti``) plus ``cnf``, so a
resource server can check the binding itself: ``x5t#S256`` (RFC 8705 §3.2) or
``jkt`` (RFC 9449 §6.2, where ``token_type`` is then ``DPoP``).
"""

from __future__ import annotations

from typing import Any

from pdp.credentials.tokens import VerifiedToken

INACTIVE: dict[str, Any] = {"active": False}

_COPIED = ("client_id", "username", "sub", "exp", "iat", "nbf", "iss", "aud", "jti")


def introspection_response(token: VerifiedToken | None) -> dict[str, Any]:
    if token is None:
        return dict(INACTIVE)
    claims = token.claims
    out: dict[str, Any] = {"active": True}
    if token.scopes:
        out["scope"] = " ".join(token.scopes)
    for name in _COPIED:
        if name in claims:
            out[name] = claims[name]
    out["iss"] = token.issuer
    out["token_type"] = "DPoP" if token.jkt else "Bearer"
    cnf = {k: v for k, v in (("x5t#S256", token.x5t_s256), ("jkt", token.jkt)) if v}
    if cnf:
        out["cnf"] = cnf
    return out
