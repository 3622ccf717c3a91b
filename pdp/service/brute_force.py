"""Brute-force protection for password authentication: failure counters and growing lock-outs.

RFC 6749 §2.3.1 asks a server that authenticates clients with a password to
protect that endpoint against brute force, and RFC 7662 §4 names the same
threat for introspection. pdp counts failed ``client_secret_basic`` attempts
twice, in the shared ``Store``:

- **per source** (an IPv4 address, or an IPv6 /64, the smallest block a host
  is usually given): after ``source_failures`` failures within ``window``
  seconds the source is locked out;
- **per registered client id**, from anywhere: after ``client_failures``.

A lock-out lasts ``duration`` seconds and doubles with each further lock-out
of the same source or client within a day, up to ``max_duration``. While
locked, attempts are refused without looking at the secret, so a right guess
made during a lock-out cannot be told from a wrong one, and they are not
counted, so a stranger cannot keep a lock alive for free.

The trade-off: a per-client lock-out lets anyone who knows a client id (not a
secret, RFC 6749 §2.2) lock that client's password out. So the per-source
limit is low and triggers first, and the per-client one is high: it only
stops a guesser spread over many addresses. A client that must never be
locked out by strangers authenticates with its certificate
(``tls_client_auth``), which no counter touches; a lock-out also shows that a
client id is registered, which the same §2.2 allows.

Memory: one counter, and when locked a lock and a strike counter, per source
and per registered client, each expiring; the store's bound caps the rest
(a full store refuses, it does not forget).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from pdp.store import Store

log = logging.getLogger("pdp")

#: Lock-outs of one source or client within this long double the next one.
STRIKE_MEMORY = 86_400.0


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


def source_key(address: str) -> str:
    """The unit a source is counted in: the IPv4 address, or the /64 of an IPv6 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """Counts failures per source and per client in a ``Store``; answers how long either is locked out.

    ``client`` is a registered client id, or None for an id nobody registered: those are counted on one
    shared key that never locks, so that a registered and an unknown id cost the same store calls."""

    def __init__(self, settings: LockoutSettings, store: Store, *,
                 on_lockout: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._store = store
        self._on_lockout = on_lockout

    def _keys(self, source: str, client: str | None) -> tuple[str, str]:
        client_part = hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest() if client else "-"
        return f"bf:s:{source_key(source)}", f"bf:c:{client_part}"

    def locked_for(self, source: str, client: str | None) -> float:
        """Seconds left of a lock-out of ``source`` or of ``client``; 0 when neither is locked."""
        source_scope, client_scope = self._keys(source, client)
        return max(self._store.ttl(source_scope + ":lock"), self._store.ttl(client_scope + ":lock"))

    def failed(self, source: str, client: str | None) -> float:
        """Record a failed attempt; the seconds of the lock-out it started (0 if none)."""
        s = self.settings
        locked = 0.0
        source_scope, client_scope = self._keys(source, client)
        for scope, key, limit in (("source", source_scope, s.source_failures),
                                  ("client", client_scope, s.client_failures)):
            failures = self._store.count(key, s.window)
            if failures < limit or (client is None and scope == "client"):
                continue
            strikes = self._store.count(key + ":strikes", STRIKE_MEMORY)
            duration = min(s.duration * math.pow(2, min(strikes - 1, 32)), s.max_duration)
            if self._store.remember(key + ":lock", duration):
                locked = max(locked, duration)
                log.warning("%s %s locked out for %g s after %d failed client authentications", scope,
                            source_key(source) if scope == "source" else repr(client), duration, failures)
                if self._on_lockout is not None:
                    self._on_lockout(scope)
        return locked
