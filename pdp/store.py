"""Shared state between replicas behind one small protocol: in memory, SQLite on one machine, or Redis.

pdp keeps only what must be shared in a ``Store``: the DPoP proof ``jti``
values seen within the acceptance window (RFC 9449 §11.1), so a proof replayed
against another replica is refused too, and the failed-authentication counters
and lock-outs of the introspection endpoint. ``remember`` is an atomic "add if
absent, with expiry" (Redis ``SET NX PX``), ``count`` an atomic increment of a
counter that expires (``INCR`` + ``PEXPIRE NX``), ``ttl`` how long a key has
left. A store that cannot answer raises ``StoreUnavailable``, which whatever
needed it turns into a deny.

``MemoryStore`` serves one process; ``SqliteStore`` the worker processes of
one ``pdp serve --workers N`` (a file in a private folder, nothing to start);
``RedisStore`` every replica behind a load balancer.
"""

from __future__ import annotations

import heapq
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol


class StoreUnavailable(RuntimeError):
    """The store did not answer; whatever needed it is denied."""


class Store(Protocol):
    def remember(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; False when it was already recorded (a replay)."""

    def count(self, key: str, ttl: float) -> int:
        """Add one to the counter ``key`` (created with a ``ttl``-second life) and return its value."""

    def ttl(self, key: str) -> float:
        """Seconds until ``key`` (recorded or counted) expires; 0 when it is not there."""


class MemoryStore:
    """One process's store: expiry times by key, with a heap so expired keys leave as time passes.

    At most ``max_entries`` keys (recorded and counted together) live at once; a new key beyond that
    raises ``StoreUnavailable`` rather than forgetting one an attacker would like forgotten."""

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
            self._make_room()
            self._seen[key] = now + ttl
            heapq.heappush(self._expiries, (now + ttl, key))
            return True

    def count(self, key: str, ttl: float) -> int:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            current = self._counters.get(key)
            if current is None:
                self._make_room()
                current = (0, now + ttl)
                heapq.heappush(self._expiries, (current[1], "\0" + key))
            self._counters[key] = (current[0] + 1, current[1])
            return current[0] + 1

    def ttl(self, key: str) -> float:
        now = time.monotonic()
        with self._lock:
            expires = max(self._seen.get(key, now), self._counters.get(key, (0, now))[1])
            return max(0.0, expires - now)

    def _make_room(self) -> None:
        if len(self._seen) + len(self._counters) >= self._max:
            raise StoreUnavailable("the in-memory store is full")

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires, key = heapq.heappop(self._expiries)
            if key.startswith("\0"):
                if self._counters.get(key[1:], (0, None))[1] == expires:
                    del self._counters[key[1:]]
            elif self._seen.get(key) == expires:
                del self._seen[key]


class SqliteStore:
    """The store of the worker processes of one ``pdp serve --workers N``: one SQLite file on this machine.

    Each operation is one statement (an upsert), so it is atomic across processes; expiry is wall-clock
    time, the clock DPoP's ``iat`` window is judged by. The file lives in a private folder that the
    parent process creates and removes; nothing in it outlives the server. Expired rows are swept now
    and then; at ``max_entries`` live rows a new key raises ``StoreUnavailable``, as ``MemoryStore`` does.
    """

    SWEEP_INTERVAL = 2.0

    def __init__(self, path: Path, *, max_entries: int = 250_000, timeout: float = 2.0) -> None:
        self.path = path
        self._max = max_entries
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._full = False
        try:
            self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")  # the state is worth nothing after a crash
            self._db.execute("CREATE TABLE IF NOT EXISTS entries "
                             "(key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID")
            self._db.execute("CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires)")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {str(path)!r}: {exc}") from exc

    def remember(self, key: str, ttl: float) -> bool:
        now = time.time()
        with self._lock:
            self._housekeeping(key, now)
            # Inserted, or an expired row taken over: one row changed. A live row: none.
            changed = self._run("INSERT INTO entries (key, value, expires) VALUES (?, 1, ?) "
                                "ON CONFLICT (key) DO UPDATE SET value = 1, expires = excluded.expires "
                                "WHERE entries.expires <= ?", (key, now + ttl, now)).rowcount
            return changed == 1

    def count(self, key: str, ttl: float) -> int:
        now = time.time()
        with self._lock:
            self._housekeeping(key, now)
            rows = self._run("INSERT INTO entries (key, value, expires) VALUES (?, 1, ?) "
                             "ON CONFLICT (key) DO UPDATE SET "
                             "value = CASE WHEN entries.expires <= ? THEN 1 ELSE entries.value + 1 END, "
                             "expires = CASE WHEN entries.expires <= ? THEN excluded.expires ELSE entries.expires END "
                             "RETURNING value", (key, now + ttl, now, now)).fetchall()
            return int(rows[0][0])  # fetchall: the write ends only when the statement has run to its end

    def ttl(self, key: str) -> float:
        now = time.time()
        with self._lock:
            row = self._run("SELECT expires FROM entries WHERE key = ?", (key,)).fetchone()
        return max(0.0, float(row[0]) - now) if row else 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _housekeeping(self, key: str, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_INTERVAL
            self._run("DELETE FROM entries WHERE expires <= ?", (now,))
            self._full = self._run("SELECT count(*) FROM entries").fetchone()[0] >= self._max
        if self._full and self._run("SELECT 1 FROM entries WHERE key = ? AND expires > ?", (key, now)).fetchone() \
                is None:
            raise StoreUnavailable("the shared worker store is full")

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc


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

    def ttl(self, key: str) -> float:
        try:
            left = int(self._redis.pttl(self.prefix + key))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return left / 1000 if left > 0 else 0.0
