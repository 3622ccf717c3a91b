"""Shared state between replicas behind one small protocol: in memory, or Redis.

pdp keeps only what must be shared in a ``Store``: today the DPoP proof
``jti`` values seen within the acceptance window (RFC 9449 §11.1), so a proof
replayed against another replica is refused too. ``remember`` is an atomic
"add if absent, with expiry" (Redis ``SET NX EX``). A store that cannot answer
raises ``StoreUnavailable``, which the pipeline turns into a deny.
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Any, Protocol


class StoreUnavailable(RuntimeError):
    """The store did not answer; whatever needed it is denied."""


class Store(Protocol):
    def remember(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; False when it was already recorded (a replay)."""

    def count(self, key: str, ttl: float) -> int:
        """Add one to the counter ``key`` (created with a ``ttl``-second life) and return its value."""


class MemoryStore:
    """One process's store: expiry times by key, with a heap so expired keys leave as time passes."""

    def __init__(self, max_entries: int = 250_000) -> None:
        self._seen: dict[str, float] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._expiries: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._max = max_entries

    def remember(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            expires = self._seen.get(key)
            if expires is not None and expires > now:
                return False
            if len(self._seen) >= self._max:
                raise StoreUnavailable("the in-memory store is full")
            self._seen[key] = now + ttl
            heapq.heappush(self._expiries, (now + ttl, key))
            return True

    def count(self, key: str, ttl: float) -> int:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            value, expires = self._counters.get(key, (0, now + ttl))
            if expires == now + ttl:
                heapq.heappush(self._expiries, (expires, "\0" + key))
            self._counters[key] = (value + 1, expires)
            return value + 1

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires, key = heapq.heappop(self._expiries)
            if key.startswith("\0"):
                if self._counters.get(key[1:], (0, None))[1] == expires:
                    del self._counters[key[1:]]
            elif self._seen.get(key) == expires:
                del self._seen[key]


class RedisStore:
    """A Redis (or Redis Cluster / Sentinel-fronted) store shared by every replica."""

    def __init__(self, url: str, *, prefix: str = "pdp:", timeout: float = 0.2, client: Any = None) -> None:
        import redis

        self._redis = client or redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._error = redis.RedisError
        self.prefix = prefix

    def remember(self, key: str, ttl: float) -> bool:
        try:
            return bool(self._redis.set(self.prefix + key, b"1", nx=True, px=max(1, int(ttl * 1000))))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def count(self, key: str, ttl: float) -> int:
        try:
            pipe = self._redis.pipeline()
            pipe.incr(self.prefix + key)
            pipe.pexpire(self.prefix + key, max(1, int(ttl * 1000)), nx=True)
            value, _ = pipe.execute()
            return int(value)
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
