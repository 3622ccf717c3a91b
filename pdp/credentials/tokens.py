"""Bearer access tokens → verified claims, for several issuers, with a cache.

The order of checks is fixed: parse strictly, find the issuer by the
(unverified) ``iss``, check the token type and algorithm allowlist, verify the
signature with that issuer's keys (an unknown ``kid`` triggers one
rate-limited refresh of the key set), then the RFC 9068 claims. A verified
token is cached by its SHA-256 until just before ``exp``, tied to the key set
that verified it: when the issuer's keys change the token is verified again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pdp import reasons
from pdp.cache import ExpiringCache
from pdp.credentials import rfc9068
from pdp.credentials.jose import DecodeError, json_object
from pdp.credentials.jwks import KeySet, KeySource
from pdp.credentials.jws import JwsError, ParsedJws, parse_compact, verify
from pdp.credentials.opaque import OpaqueIssuer, OpaqueVerifier
from pdp.errors import Denied, NeedsNetwork

#: A cached token expires this long before its ``exp``.
CACHE_MARGIN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Issuer:
    """One trusted token issuer and what pdp accepts from it."""

    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    keys: KeySource
    accept_plain_jwt: bool = False
    required_claims: tuple[str, ...] = rfc9068.PROFILE_REQUIRED_CLAIMS


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature and claims were checked."""

    digest: str
    issuer: str
    claims: dict[str, Any]
    scopes: tuple[str, ...]
    alg: str
    kid: str | None
    exp: float
    #: RFC 8705 ``cnf.x5t#S256`` (base64url SHA-256 of the bound certificate), if the token is bound.
    x5t_s256: str | None
    #: RFC 9449 ``cnf.jkt`` (the DPoP key's RFC 7638 thumbprint), if the token is DPoP-bound.
    jkt: str | None
    #: The ``input.token`` document for the policy, built once.
    policy_view: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def jti(self) -> str | None:
        jti = self.claims.get("jti")
        return jti if isinstance(jti, str) else None


#: The longest token kept in the cache by its text (longer ones by their SHA-256).
_TEXT_KEY_MAX = 2048


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenVerifier:
    def __init__(self, issuers: list[Issuer], *, leeway: float = 30.0, cache_size: int = 10_000,
                 max_cache_seconds: float = 300.0, opaque: OpaqueVerifier | None = None) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        self._opaque = opaque
        self._leeway = leeway
        self._max_cache = max_cache_seconds
        #: By the token's text (hashing it costs a fraction of a SHA-256), or by its digest when the text is
        #: long enough that keeping it would cost more memory than the entry itself.
        self._cache: ExpiringCache[str | bytes, tuple[KeySet, VerifiedToken]] = ExpiringCache(cache_size)

    @property
    def issuers(self) -> dict[str, Issuer]:
        return self._issuers

    @property
    def opaque_issuers(self) -> list[OpaqueIssuer]:
        return self._opaque.issuers if self._opaque else []

    def verify(self, token: str, now: float, *, network: bool = True, leeway: float | None = None) -> VerifiedToken:
        """Verify ``token`` at ``now``; raise ``Denied``. With ``network=False``, raise
        ``NeedsNetwork`` instead of waiting on a key-set fetch or an introspection call.

        ``leeway`` below the configured one holds the token to a stricter validity window (introspection
        answers with none: its caller judges ``exp`` itself). Every token, from the cache or not, is
        then checked against it, since the cached one was verified with the configured leeway."""
        verified = self._verify(token, now, network)
        if leeway is not None and leeway < self._leeway:
            rfc9068.check_times(verified.claims, now=now, leeway=leeway)
        return verified

    def _verify(self, token: str, now: float, network: bool) -> VerifiedToken:
        if self._opaque and token.count(".") != 2:
            digest = token_digest(token)
            opaque_issuer, answer = self._opaque.verify(token, digest, now, network)
            return _from_introspection(digest, opaque_issuer.issuer, answer)
        key = token if len(token) <= _TEXT_KEY_MAX else token_digest(token)
        hit = self._cache.get(key, now)
        if hit is not None:
            keyset, verified = hit
            issuer = self._issuers.get(verified.issuer)
            if issuer is not None and issuer.keys.current() is keyset:
                return verified
        keyset, verified = self._verify_uncached(token, token_digest(token), now, network)
        expires = min(verified.exp - CACHE_MARGIN_SECONDS, now + self._max_cache)
        if expires > now:
            self._cache.put(key, (keyset, verified), expires)
        return verified

    def _verify_uncached(self, token: str, digest: bytes, now: float,
                         network: bool) -> tuple[KeySet, VerifiedToken]:
        try:
            parsed = parse_compact(token)
        except JwsError as exc:
            raise Denied(reasons.TOKEN_MALFORMED, str(exc)) from exc
        try:
            claims = json_object(parsed.payload)
        except DecodeError as exc:
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, f"claims: {exc}") from exc
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, "the token has no 'iss' string")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise Denied(reasons.TOKEN_ISSUER_UNKNOWN, f"issuer {iss!r} is not configured")
        rfc9068.check_type(parsed.header, issuer.accept_plain_jwt)
        keyset = self._check_signature(parsed, issuer, now, network)
        rfc9068.check_claims(claims, required=issuer.required_claims, audiences=issuer.audiences,
                             now=now, leeway=self._leeway)
        return keyset, _verified(digest, issuer, parsed, claims)

    @staticmethod
    def _refresh(issuer: Issuer, now: float, network: bool) -> bool:
        if not network and issuer.keys.would_fetch(now):
            raise NeedsNetwork(issuer.issuer)
        return issuer.keys.refresh(now)

    def _check_signature(self, parsed: ParsedJws, issuer: Issuer, now: float, network: bool) -> KeySet:
        keyset = issuer.keys.current()
        if keyset is None and self._refresh(issuer, now, network):
            keyset = issuer.keys.current()
        if keyset is None:
            raise Denied(reasons.JWKS_UNAVAILABLE, f"no key set for issuer {issuer.issuer!r} could be loaded")
        try:
            verify(parsed, keyset, issuer.algorithms)
            return keyset
        except JwsError as exc:
            if exc.kind != JwsError.KEY_UNKNOWN:
                raise _denial(exc) from exc
        # Unknown kid: the issuer may have rotated its keys. One refresh (rate-limited), one retry, also
        # when the refresh was not this request's to make but another request's fetch brought a new set.
        self._refresh(issuer, now, network)
        fresh = issuer.keys.current()
        if fresh is not None and fresh is not keyset:
            try:
                verify(parsed, fresh, issuer.algorithms)
                return fresh
            except JwsError as exc:
                raise _denial(exc) from exc
        raise Denied(reasons.TOKEN_KEY_UNKNOWN, f"no key of issuer {issuer.issuer!r} matches the token")

    def clear_cache(self) -> None:
        self._cache.clear()


def _denial(exc: JwsError) -> Denied:
    reason = {
        JwsError.MALFORMED: reasons.TOKEN_MALFORMED,
        JwsError.ALGORITHM: reasons.TOKEN_ALG_NOT_ALLOWED,
        JwsError.KEY_UNKNOWN: reasons.TOKEN_KEY_UNKNOWN,
        JwsError.SIGNATURE: reasons.TOKEN_SIGNATURE_INVALID,
    }[exc.kind]
    return Denied(reason, str(exc))


def _binding_claims(claims: dict[str, Any]) -> tuple[str | None, str | None]:
    """``cnf.x5t#S256`` and ``cnf.jkt``. A member that is there is a non-empty string, or the token is
    invalid: an empty one would be "bound" to a decision and "unbound" to an introspection answer."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None, None
    if not isinstance(cnf, dict):
        raise Denied(reasons.TOKEN_CLAIMS_INVALID, "'cnf' is not an object")
    x5t, jkt = cnf.get("x5t#S256"), cnf.get("jkt")
    for name, value in (("x5t#S256", x5t), ("jkt", jkt)):
        if name in cnf and (not isinstance(value, str) or not value):
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, f"'cnf.{name}' is not a non-empty string")
    return x5t, jkt


def _from_introspection(digest: bytes, issuer: str, claims: dict[str, Any]) -> VerifiedToken:
    """A ``VerifiedToken`` for an opaque token, from its (checked) RFC 7662 answer."""
    x5t, jkt = _binding_claims(claims)
    scopes = rfc9068.scopes(claims)
    hexdigest = digest.hex()
    view = {"present": True, "kind": "opaque", "issuer": issuer, "claims": claims, "scopes": list(scopes),
            "sub": claims.get("sub"), "client_id": claims.get("client_id"), "jti": claims.get("jti"),
            "alg": None, "digest": hexdigest[:32]}
    return VerifiedToken(digest=hexdigest, issuer=issuer, claims=claims, scopes=scopes, alg="opaque", kid=None,
                         exp=float(claims["exp"]), x5t_s256=x5t, jkt=jkt, policy_view=view)


def _verified(digest: bytes, issuer: Issuer, parsed: ParsedJws, claims: dict[str, Any]) -> VerifiedToken:
    x5t, jkt = _binding_claims(claims)
    scopes = rfc9068.scopes(claims)
    hexdigest = digest.hex()
    view = {
        "present": True,
        "kind": "jwt",
        "issuer": issuer.issuer,
        "claims": claims,
        "scopes": list(scopes),
        "sub": claims.get("sub"),
        "client_id": claims.get("client_id"),
        "jti": claims.get("jti"),
        "alg": parsed.header.get("alg"),
        "digest": hexdigest[:32],
    }
    return VerifiedToken(
        digest=hexdigest, issuer=issuer.issuer, claims=claims, scopes=scopes,
        alg=str(parsed.header.get("alg")), kid=parsed.header.get("kid"), exp=float(claims["exp"]),
        x5t_s256=x5t, jkt=jkt, policy_view=view,
    )
