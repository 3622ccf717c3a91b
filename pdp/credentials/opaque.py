"""Opaque access tokens, resolved by RFC 7662 introspection at the issuing authorization server.

For issuers whose tokens are not JWTs, pdp asks the issuer's introspection
endpoint (through an ``Introspect`` callable the service wires: authlib's
client authentication over httpx) and checks the answer: ``active`` must be
true, ``exp`` current, ``iss`` (when given) the configured issuer, ``aud``
(when given) one of the configured audiences, and ``token_type`` (when given)
an access-token type. The same binding rules as for JWTs then apply to the
``cnf`` it returns (RFC 8705 ``x5t#S256`` or RFC 9449 ``jkt``).

Positive answers are cached until ``exp`` (never longer than the configured
TTL), negative ones briefly; a cache miss on the event-loop path raises
``NeedsNetwork`` so the service asks from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdp import reasons
from pdp.cache import ExpiringCache
from pdp.credentials import rfc9068
from pdp.errors import Denied, NeedsNetwork

log = logging.getLogger("pdp.opaque")

#: token → the introspection response (a JSON object); raises on transport or HTTP errors.
Introspect = Callable[[str], Mapping[str, Any]]

_ACCESS_TOKEN_TYPES = frozenset({"bearer", "dpop", "access_token", "n_a"})


@dataclass(frozen=True)
class OpaqueIssuer:
    issuer: str
    audiences: frozenset[str]
    introspect: Introspect
    cache_ttl: float = 300.0
    negative_ttl: float = 10.0


@dataclass(frozen=True, slots=True)
class _Inactive:
    issuer: str


class OpaqueVerifier:
    def __init__(self, issuers: list[OpaqueIssuer], *, leeway: float = 30.0, cache_size: int = 10_000,
                 max_concurrent_calls: int = 8) -> None:
        self.issuers = issuers
        self._leeway = leeway
        # Random tokens each cost a call: past this many at once, answer at once instead of queueing
        # every worker thread behind a slow authorization server.
        self._calls = threading.BoundedSemaphore(max_concurrent_calls)
        self._cache: ExpiringCache[tuple[str, bytes], dict[str, Any] | _Inactive] = ExpiringCache(cache_size)

    def __bool__(self) -> bool:
        return bool(self.issuers)

    def verify(self, token: str, digest: bytes, now: float, network: bool) -> tuple[OpaqueIssuer, dict[str, Any]]:
        """The issuer whose introspection found ``token`` active, and the checked answer."""
        unavailable: list[str] = []
        for issuer in self.issuers:
            key = (issuer.issuer, digest)
            answer = self._cache.get(key, now)
            if answer is None:
                if not network:
                    raise NeedsNetwork(issuer.issuer)
                if not self._calls.acquire(blocking=False):
                    raise Denied(reasons.INTROSPECTION_UNAVAILABLE, "too many introspection calls at once")
                try:
                    answer = self._ask(issuer, token, now)
                except Denied:
                    raise
                except Exception as exc:  # transport, HTTP status, not JSON: fail closed
                    log.warning("introspection at %s failed: %s", issuer.issuer, exc)
                    unavailable.append(issuer.issuer)
                    continue
                finally:
                    self._calls.release()
                expires = now + issuer.negative_ttl if isinstance(answer, _Inactive) else min(
                    float(answer["exp"]), now + issuer.cache_ttl)
                self._cache.put(key, answer, expires)
            if not isinstance(answer, _Inactive):
                return issuer, answer
        if unavailable:
            raise Denied(reasons.INTROSPECTION_UNAVAILABLE, f"introspection failed at {', '.join(unavailable)}")
        raise Denied(reasons.TOKEN_INACTIVE, "the authorization server says the token is not active")

    def _ask(self, issuer: OpaqueIssuer, token: str, now: float) -> dict[str, Any] | _Inactive:
        answer = dict(issuer.introspect(token))
        if answer.get("active") is not True:
            return _Inactive(issuer.issuer)
        if "exp" not in answer:
            raise Denied(reasons.TOKEN_CLAIMS_INVALID, "the introspection answer has no exp")
        iss = answer.get("iss")
        if iss is not None and iss != issuer.issuer:
            raise Denied(reasons.TOKEN_ISSUER_UNKNOWN, f"introspection answered for issuer {iss!r}")
        token_type = answer.get("token_type")
        if token_type is not None and str(token_type).lower() not in _ACCESS_TOKEN_TYPES:
            raise Denied(reasons.TOKEN_TYPE_INVALID, f"token_type {token_type!r} is not an access token")
        # aud is required: without it a token issued for another resource server would pass here.
        rfc9068.check_claims(answer, required=("exp", "aud"), audiences=issuer.audiences, now=now,
                             leeway=self._leeway)
        answer.pop("active", None)
        answer.setdefault("iss", issuer.issuer)
        return answer
