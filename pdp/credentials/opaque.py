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

With a shared ``Store`` (Redis, or the workers' SQLite file) and a secret
all replicas hold (``SharedAnswers``: ``store.secret``, or the one ``pdp serve
--workers`` draws), answers are shared too, so one replica's call serves every
replica that asks the same endpoint as the same client: kept under a keyed
hash of the issuer, the endpoint, the client_id and the token (never the token
itself), with a MAC, for the same time as in this process, behind this
process's own bounded cache. Without the secret nothing is shared: a store
writer must not be able to make up an answer. What the store gives back is
read as untrusted input: a document whose MAC does not match, or of another
shape, is ignored (the authorization server is asked), and an authentic answer
is checked again exactly as a fresh one. A store that does not answer costs a
call to the authorization server (``on_store_failure`` counts it); only when
that fails too is the token denied (``introspection_unavailable``).
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
from pdp.credentials.shared_introspection import SHARED_VERSION, SharedAnswers
from pdp.errors import Denied, NeedsNetwork
from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp.opaque")

#: token → the introspection response (a JSON object); raises on transport or HTTP errors.
Introspect = Callable[[str], Mapping[str, Any]]
#: Told ``"read"`` when a shared answer could not be read (the authorization server is asked instead),
#: ``"write"`` when one could not be shared.
StoreFailure = Callable[[str], None]

_ACCESS_TOKEN_TYPES = frozenset({"bearer", "dpop", "access_token", "n_a"})
#: Seconds a shared answer's expiry may lie past what this replica would give it: replicas' clocks differ.
CLOCK_SLACK = 5.0


@dataclass(frozen=True)
class OpaqueIssuer:
    issuer: str
    audiences: frozenset[str]
    introspect: Introspect
    cache_ttl: float = 300.0
    negative_ttl: float = 10.0
    #: Where and as whom pdp asks: the authorization server may tailor its answer to the asking client
    #: (RFC 7662 §2.2), so answers are shared only between replicas that ask alike.
    endpoint: str = ""
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class _Inactive:
    issuer: str


class OpaqueVerifier:
    def __init__(self, issuers: list[OpaqueIssuer], *, leeway: float = 30.0, cache_size: int = 10_000,
                 max_concurrent_calls: int = 8, store: Store | None = None,
                 shared: SharedAnswers | None = None, on_store_failure: StoreFailure | None = None) -> None:
        self.issuers = issuers
        self._leeway = leeway
        # Random tokens each cost a call: past this many at once, answer at once instead of queueing
        # every worker thread behind a slow authorization server.
        self._calls = threading.BoundedSemaphore(max_concurrent_calls)
        self._cache: ExpiringCache[tuple[str, bytes], dict[str, Any] | _Inactive] = ExpiringCache(cache_size)
        self._store = store
        # Shared only with the secret that authenticates what the store gives back.
        self._shared_answers = shared
        self._on_store_failure = on_store_failure

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
                reachable, shared = self._shared(issuer, digest, now)
                if shared is not None:
                    answer, expires = shared
                else:
                    raw = self._ask(issuer, token)
                    if raw is None:
                        unavailable.append(issuer.issuer)
                        continue
                    try:
                        answer = self._check(issuer, raw, now)
                        expires = now + issuer.negative_ttl if isinstance(answer, _Inactive) else min(
                            float(answer["exp"]), now + issuer.cache_ttl)
                    except Denied:
                        raise
                    except Exception as exc:  # an answer no check foresaw: fail closed, as for no answer
                        log.warning("introspection at %s gave an unusable answer: %s", issuer.issuer, exc)
                        unavailable.append(issuer.issuer)
                        continue
                    if reachable:  # a store that just failed to answer is not made to fail (and wait) again
                        self._share(issuer, digest, None if isinstance(answer, _Inactive) else raw, expires, now)
                self._cache.put(key, answer, expires)
            if not isinstance(answer, _Inactive):
                return issuer, answer
        if unavailable:
            raise Denied(reasons.INTROSPECTION_UNAVAILABLE, f"introspection failed at {', '.join(unavailable)}")
        raise Denied(reasons.TOKEN_INACTIVE, "the authorization server says the token is not active")

    def _ask(self, issuer: OpaqueIssuer, token: str) -> dict[str, Any] | None:
        """The authorization server's answer; None when it could not be had."""
        if not self._calls.acquire(blocking=False):
            raise Denied(reasons.INTROSPECTION_UNAVAILABLE, "too many introspection calls at once")
        try:
            return dict(issuer.introspect(token))
        except Exception as exc:  # transport, HTTP status, not JSON: fail closed
            log.warning("introspection at %s failed: %s", issuer.issuer, exc)
            return None
        finally:
            self._calls.release()

    def _check(self, issuer: OpaqueIssuer, raw: Mapping[str, Any], now: float) -> dict[str, Any] | _Inactive:
        """An answer as the authorization server gave it (or as shared), checked."""
        answer = dict(raw)
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

    # -- the answers shared through the store
    def _failed(self, operation: str, exc: StoreUnavailable) -> None:
        log.warning("a shared introspection answer could not be %s: %s", "read" if operation == "read"
                    else "written", exc)
        if self._on_store_failure is not None:
            self._on_store_failure(operation)

    def _shared(self, issuer: OpaqueIssuer, digest: bytes,
                now: float) -> tuple[bool, tuple[dict[str, Any] | _Inactive, float] | None]:
        """Whether the store answered, and the answer another replica shared there (authentic, checked
        again) with until when to keep it, or None."""
        answers = self._shared_answers
        if self._store is None or answers is None:
            return False, None
        key = answers.key(issuer.issuer, issuer.endpoint, issuer.client_id, digest)
        try:
            data = self._store.get(key)
        except StoreUnavailable as exc:
            self._failed("read", exc)
            return False, None
        if data is None:
            return True, None
        doc = answers.open(key, data)
        if doc is None:
            log.warning("ignored a shared introspection answer for %s whose MAC does not match: not written by "
                        "a replica holding this store.secret", issuer.issuer)
            return True, None
        stated, raw = doc.get("until"), doc.get("answer")
        until = float(stated) if isinstance(stated, int | float) and rfc9068.is_numeric_date(stated) else now
        longest = max(issuer.cache_ttl, issuer.negative_ttl) + CLOCK_SLACK
        if doc.get("v") != SHARED_VERSION or doc.get("iss") != issuer.issuer or not now < until <= now + longest \
                or not (raw is None or isinstance(raw, dict)):
            log.warning("ignored a shared introspection answer for %s that is not one pdp writes", issuer.issuer)
            return True, None
        # Kept here no longer than this replica would keep an answer it had asked for itself.
        try:
            answer = _Inactive(issuer.issuer) if raw is None else self._check(issuer, raw, now)
            if isinstance(answer, _Inactive):
                return True, (answer, min(until, now + issuer.negative_ttl))
            return True, (answer, min(until, float(answer["exp"]), now + issuer.cache_ttl))
        except Denied:
            raise
        except Exception as exc:  # a shape no check foresaw: as if nothing were stored
            log.warning("ignored a shared introspection answer for %s: %s", issuer.issuer, exc)
            return True, None

    def _share(self, issuer: OpaqueIssuer, digest: bytes, raw: Mapping[str, Any] | None, until: float,
               now: float) -> None:
        """Keep ``raw`` (None: inactive) in the store until ``until`` for the other replicas."""
        answers = self._shared_answers
        if self._store is None or answers is None or until <= now:
            return
        key = answers.key(issuer.issuer, issuer.endpoint, issuer.client_id, digest)
        try:
            data = answers.seal(key, {"v": SHARED_VERSION, "iss": issuer.issuer, "until": until,
                                      "answer": None if raw is None else dict(raw)})
        except (TypeError, ValueError):  # not JSON after all (an Introspect that is no JSON client)
            return
        try:
            self._store.put(key, data, until - now)
        except StoreUnavailable as exc:
            self._failed("write", exc)
