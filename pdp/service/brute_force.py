"""Brute-force protection for password authentication: failure counters and growing lock-outs.

RFC 6749 §2.3.1 asks a server that authenticates clients with a password to
protect that endpoint against brute force, and RFC 7662 §4 names the same
threat for introspection. pdp counts ``client_secret_basic`` attempts twice,
in the shared ``Store``:

- **per source** (an IPv4 address, also when it arrives embedded in an IPv6
  one, or an IPv6 /64, the smallest block a host is usually given): after
  ``source_failures`` failures within ``window`` seconds the source is locked
  out;
- **per registered client id**, from anywhere: after ``client_failures``.

Each attempt (``FailureLimiter.attempt``) is written to the store whatever its
secret: a wrong one is counted, a right one takes the same step without
keeping the count (``count(keep=False)``). So a store that cannot take the
attempt (full, or Redis at ``maxmemory``) refuses right and wrong secrets
alike, and the answer never tells them apart. The value the increment gives
decides, and the locks are read after it, so the limits hold under concurrent
attempts (from several workers or replicas): an attempt past a limit, or made
while its source or client is locked out, is refused as locked out whatever
its secret, and its count is taken back — a right guess made then proves
nothing, and attempts made during a lock-out count for nothing.

The failure that reaches a limit locks the source or client out for
``duration`` seconds, twice as long for each further lock-out within a day,
up to ``max_duration``, and starts its count again from zero: every lock-out
costs the full limit of failures.

The trade-off: a per-client lock-out lets anyone who knows a client id (not a
secret, RFC 6749 §2.2) lock that client's password out. So the per-source
limit is low and triggers first, the per-client one is high, and a client is
not locked out at a source it authenticated from recently: a right secret
marks the (client, source) pair for a day (at least 12 hours), and a marked
pair is held only by its own source's lock-out. A stranger can still keep a
client from authenticating at a new source; a client that must never be
locked out by strangers authenticates with its certificate
(``tls_client_auth``), which no counter touches. A lock-out also shows that a
client id is registered, which the same §2.2 allows.

Memory: one counter per source and per registered client, a lock and a
strike counter while locked, and a mark per (client, source) pair that
authenticated in the last day, each expiring; the store's bound caps the rest
(a full store refuses, it does not forget).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp")

#: Lock-outs of one source or client within this long double the next one.
STRIKE_MEMORY = 86_400.0
#: A (client, source) pair that authenticated within this long (at least half of it) is not held by the
#: client's lock-out. Marks are written per half-period, so a busy client writes two a day per source.
KNOWN_FOR = 86_400.0
#: The Retry-After of an attempt past a limit whose lock-out another attempt is starting at this moment.
RACE_WAIT = 1.0

#: IPv6 prefixes that carry an IPv4 address in their last 32 bits: SIIT (RFC 6145) and NAT64 (RFC 6052).
_IPV4_EMBEDDED = (ipaddress.IPv6Network("::ffff:0:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"))


@dataclass(frozen=True)
class LockoutSettings:
    #: Failed attempts from one source address (IPv6: one /64) within ``window`` before it is locked out.
    source_failures: int = 10
    #: Failed attempts for one registered client id, from any source, within ``window``.
    client_failures: int = 100
    window: float = 300.0
    #: The first lock-out, in seconds; each further one within a day lasts twice as long as the one before.
    duration: float = 60.0
    max_duration: float = 3600.0
    #: Sources and clients tracked at once when the state is kept in this process.
    max_tracked: int = 100_000


class Locked(Exception):
    """The attempt is refused as locked out, whatever its secret; ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"locked out for another {retry_after:.0f} s after too many failed attempts")
        self.retry_after = retry_after


def source_key(address: str) -> str:
    """The unit a source is counted in: the IPv4 address (also one embedded in IPv6: mapped, SIIT, NAT64,
    6to4, Teredo's client), or the /64 of an IPv6 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # without a %zone
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if any(ip in net for net in _IPV4_EMBEDDED):
            return str(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        if ip.sixtofour is not None:  # 2002:a.b.c.d::/48 holds 65536 /64s of one IPv4 host
            return str(ip.sixtofour)
        if ip.teredo is not None:  # 2001::/32: the /64 is the Teredo server's, shared by all its clients
            return str(ip.teredo[1])
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class _Scope:
    name: str  # "source" or "client"
    key: str
    limit: int | None  # None: counted, never locked (an id nobody registered)


class FailureLimiter:
    """Counts attempts per source and per client in a ``Store``; refuses those made while either is locked out.

    ``client`` is a registered client id, or None for an id nobody registered: those are counted on one
    shared key that never locks, so that a registered and an unknown id cost the same store calls."""

    def __init__(self, settings: LockoutSettings, store: Store, *,
                 on_lockout: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._store = store
        self._on_lockout = on_lockout

    def with_store(self, store: Store) -> FailureLimiter:
        """The same limiter keeping its state in ``store``."""
        return FailureLimiter(self.settings, store, on_lockout=self._on_lockout)

    def _scopes(self, source: str, client: str | None) -> tuple[_Scope, _Scope]:
        s = self.settings
        return (_Scope("source", f"bf:s:{source_key(source)}", s.source_failures),
                _Scope("client", f"bf:c:{_digest(client) if client else '-'}", s.client_failures if client else None))

    def _known_keys(self, source: str, client: str) -> tuple[str, str]:
        """The marks of a (client, source) pair for this half-period and the one before."""
        half = int(time.time() // (KNOWN_FOR / 2))
        base = f"bf:k:{_digest(client)}:{source_key(source)}"
        return f"{base}:{half}", f"{base}:{half - 1}"

    def _known(self, source: str, client: str | None) -> bool:
        return client is not None and any(self._store.ttl(k) > 0 for k in self._known_keys(source, client))

    def locked_for(self, source: str, client: str | None) -> float:
        """Seconds left of a lock-out of ``source`` or of ``client`` (unless the pair is known); 0 when neither."""
        source_scope, client_scope = self._scopes(source, client)
        client_wait = self._store.ttl(client_scope.key + ":lock") if client is not None else 0.0
        if client_wait > 0 and self._known(source, client):
            client_wait = 0.0
        return max(self._store.ttl(source_scope.key + ":lock"), client_wait)

    def attempt(self, source: str, client: str | None, *, ok: bool) -> float:
        """Record one attempt whose secret was right (``ok``) or wrong, before its answer is given.

        Raises ``Locked`` when it must be refused as locked out whatever its secret, ``StoreUnavailable``
        when the store cannot take it (for a right secret as for a wrong one). Returns the seconds of the
        lock-out a failure started (0 if none)."""
        scopes = self._scopes(source, client)
        # A refused attempt takes one count back in each scope it reached, whatever its secret: right and
        # wrong cost the same store calls. (A right one thus takes back a count it did not keep, maybe
        # someone else's failure: only the holder of the secret can do that.)
        counted: list[str] = []
        try:
            values = []
            for scope in scopes:
                values.append(self._store.count(scope.key, self.settings.window, keep=not ok))
                counted.append(scope.key)
            wait = self._wait(source, client, scopes, values)
        except StoreUnavailable:
            self._take_back(counted)
            raise
        if wait > 0:
            self._take_back(counted)
            raise Locked(wait)
        if ok:
            self._mark_known(source, client)
            return 0.0
        return self._lock_reached(source, client, scopes, values)

    def failed(self, source: str, client: str | None) -> float:
        """``attempt`` with a wrong secret."""
        return self.attempt(source, client, ok=False)

    def _wait(self, source: str, client: str | None, scopes: Iterable[_Scope], values: list[int]) -> float:
        """How long this attempt must wait: a lock-out read after counting it, or a limit it went past."""
        waits = {}
        for scope, value in zip(scopes, values, strict=True):
            if scope.limit is None:
                continue
            wait = self._store.ttl(scope.key + ":lock")
            waits[scope.name] = max(wait, RACE_WAIT) if value > scope.limit else wait
        if waits.get("client", 0.0) > 0 and self._known(source, client):
            waits["client"] = 0.0
        return max(waits.values(), default=0.0)

    def _lock_reached(self, source: str, client: str | None, scopes: Iterable[_Scope], values: list[int]) -> float:
        s = self.settings
        locked = 0.0
        for scope, failures in zip(scopes, values, strict=True):
            if scope.limit is None or failures < scope.limit:
                continue
            strikes = self._store.count(scope.key + ":strikes", STRIKE_MEMORY)
            duration = min(s.duration * math.pow(2, min(strikes - 1, 32)), s.max_duration)
            if self._store.remember(scope.key + ":lock", duration):
                locked = max(locked, duration)
                log.warning("%s %s locked out for %g s after %d failed client authentications", scope.name,
                            source_key(source) if scope.name == "source" else repr(client), duration, failures)
                if self._on_lockout is not None:
                    self._on_lockout(scope.name)
            else:  # locked already (a known pair failing, or another attempt at the same moment)
                self._store.uncount(scope.key + ":strikes")
            self._store.forget(scope.key)  # the next lock-out costs the full limit again
        return locked

    def _mark_known(self, source: str, client: str | None) -> None:
        if client is None:
            return
        try:
            self._store.remember(self._known_keys(source, client)[0], KNOWN_FOR)
        except StoreUnavailable as exc:  # the pair is not exempted: stricter, never looser
            log.warning("a successful client authentication could not be remembered: %s", exc)

    def _take_back(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._store.uncount(key)
            except StoreUnavailable as exc:  # counted one too many: stricter, never looser
                log.warning("a refused attempt's count could not be taken back: %s", exc)


def _digest(client: str) -> str:
    return hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()
