"""RFC 9068, the JWT profile for OAuth 2.0 access tokens: header type and claims.

§2.1: the header ``typ`` is ``at+jwt`` (``application/at+jwt`` also seen).
§2.2: ``iss``, ``exp``, ``aud``, ``sub``, ``client_id``, ``iat`` and ``jti``
are required. §4: the resource server checks issuer, audience and time.
Issuers that mint plain JWT access tokens (``typ: JWT``) are accepted only
when configured to be, with a lighter set of required claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pdp import reasons
from pdp.errors import Denied

AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
PLAIN_JWT_TYPES = frozenset({"jwt", "application/jwt", ""})

PROFILE_REQUIRED_CLAIMS = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
PLAIN_REQUIRED_CLAIMS = ("iss", "exp", "aud")

_STRING_CLAIMS = ("iss", "sub", "client_id", "jti", "scope")
_TIME_CLAIMS = ("exp", "nbf", "iat")


def check_type(header: Mapping[str, Any], accept_plain_jwt: bool) -> None:
    typ = header.get("typ", "")
    if not isinstance(typ, str):
        raise Denied(reasons.TOKEN_TYPE_INVALID, "'typ' is not a string")
    typ = typ.lower()
    if typ in AT_JWT_TYPES or (accept_plain_jwt and typ in PLAIN_JWT_TYPES):
        return
    expected = "at+jwt or JWT" if accept_plain_jwt else "at+jwt"
    raise Denied(reasons.TOKEN_TYPE_INVALID, f"token type {typ or '(none)'!r} is not {expected}")


def is_numeric_date(value: Any) -> bool:
    """A JSON number usable as a NumericDate: not a boolean, and finite as a float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def check_claims(claims: Mapping[str, Any], *, required: tuple[str, ...], audiences: frozenset[str],
                 now: float, leeway: float) -> None:
    """Raise ``Denied`` unless the claims are well-typed, present, current and for us."""
    for name in required:
        if name not in claims:
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, f"required claim {name!r} is missing")
    for name in _STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, f"claim {name!r} is not a string")
    for name in _TIME_CLAIMS:
        if name in claims and not is_numeric_date(claims[name]):
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, f"claim {name!r} is not a number")

    check_times(claims, now=now, leeway=leeway)

    aud = claims.get("aud")
    if aud is not None or audiences:
        token_auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(token_auds, list) or not all(isinstance(a, str) for a in token_auds):
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, "claim 'aud' is not a string or list of strings")
        if audiences and audiences.isdisjoint(token_auds):
            raise Denied(reasons.TOKEN_AUDIENCE_INVALID, "no accepted audience in 'aud'")

    scp = claims.get("scp")
    if scp is not None and not (isinstance(scp, list) and all(isinstance(s, str) for s in scp)):
        raise Denied(reasons.TOKEN_CLAIMS_INVALID, "claim 'scp' is not a list of strings")
    cnf = claims.get("cnf")
    if cnf is not None and not isinstance(cnf, dict):
        raise Denied(reasons.TOKEN_CLAIMS_INVALID, "claim 'cnf' is not an object")


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float) -> None:
    """Raise ``Denied`` unless ``now`` lies within ``exp``/``nbf``/``iat`` (well-typed numbers), give or take
    ``leeway`` seconds for the clocks of issuer and pdp."""
    exp = claims.get("exp")
    if exp is not None and now >= exp + leeway:
        raise Denied(reasons.TOKEN_EXPIRED, f"expired at {moment(exp, now)}")
    nbf = claims.get("nbf")
    if nbf is not None and now + leeway < nbf:
        raise Denied(reasons.TOKEN_NOT_YET_VALID, f"not valid before {moment(nbf, now)}")
    iat = claims.get("iat")
    if iat is not None and now + leeway < iat:
        raise Denied(reasons.TOKEN_NOT_YET_VALID, f"issued in the future ({moment(iat, now)})")


def moment(ts: float, now: float) -> str:
    """A NumericDate for people: ISO 8601 in UTC and how far from ``now``
    (``2026-12-01T10:00:00Z, 2 h 5 min ago``); the number itself where no calendar reaches."""
    try:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (seconds since 1970)"
    return f"{when}, {_span(abs(now - ts))} {'ago' if now >= ts else 'from now'}"


def _span(seconds: float) -> str:
    s = int(seconds)
    for big, small, unit_big, unit_small in ((86400, 3600, "d", "h"), (3600, 60, "h", "min"), (60, 1, "min", "s")):
        if s >= big:
            rest = (s % big) // small
            return f"{s // big} {unit_big}" + (f" {rest} {unit_small}" if rest else "")
    return f"{s} s"


def scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from ``scope`` (space-separated, RFC 9068 §2.2.3) and ``scp`` (a list, as some issuers send)."""
    found: list[str] = []
    scope = claims.get("scope")
    if isinstance(scope, str):
        found.extend(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        found.extend(s for s in scp if isinstance(s, str))
    return tuple(dict.fromkeys(found))
