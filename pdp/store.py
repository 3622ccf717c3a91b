"""Shared state between replicas behind one small protocol: in memory, SQLite on one machine, or Redis.

pdp keeps only what must be shared in a ``Store``: the DPoP proof ``jti``
values seen within the acceptance window (RFC 9449 §11.1), so a proof replayed
against another replica is refused too, and the failed-authentication counters
and lock-outs of the introspection endpoint. ``remember`` is an atomic "add if
absent, with expiry" (Redis ``SET NX PX``), ``count`` an atomic increment of a
counter that expires (``INCR`` + ``PEXPIRE NX``; with ``keep=False`` the value
an increment would give, failing as it would, without keeping it),
``uncount`` takes one count back, ``put`` and ``get`` keep and read a value
(bytes) for a while, ``forget`` drops a key, ``ttl`` says how long a key has
left and ``load`` how full a bounded store is. A store that
cannot answer raises ``StoreUnavailable``, which whatever needed it turns into
a deny.

Named maps (field → bytes) hold what every replica reads as a whole: the
revocation list and the client-identity inventory. ``map_set`` and
``map_delete`` change fields (with ``notify=True`` they also advance the map's
``map_version`` and tell waiting readers), ``map_delete_unchanged`` drops
fields only where they still hold a given value, ``map_get``, ``map_items`` and
``map_size`` read, and ``wait_for_change`` blocks a reader until the version
moves past the one it has, or a timeout: Redis pub/sub between replicas, a
polled version row between the processes sharing a SQLite file, a condition
within one process. Maps are bounded by their users, not by the store's
``max_entries``.

``MemoryStore`` serves one process; ``SqliteStore`` the worker processes of
one ``pdp serve --workers N`` (a file in a private folder, nothing to start);
``RedisStore`` every replica behind a load balancer. A full store refuses new
keys rather than forgetting old ones: forgetting a ``jti`` would let its proof
be replayed, forgetting a failure counter would let a guesser go on.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The store did not answer; whatever needed it is denied."""


class Store(Protocol):
    def remember(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; False when it was already recorded (a replay)."""

    def count(self, key: str, ttl: float, *, keep: bool = True) -> int:
        """Add one to the counter ``key`` (created with a ``ttl``-second life) and return its value.

        ``keep=False``: return the value the increment would give, and fail as it would (a full store), but
        leave the counter as it is."""

    def uncount(self, key: str) -> None:
        """Take one count back from the counter ``key`` (never below 0; nothing when it is not there)."""

    def put(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds, replacing what was there."""

    def get(self, key: str) -> bytes | None:
        """The value kept under ``key``; None when there is none (or it expired)."""

    def forget(self, key: str) -> None:
        """Drop ``key`` (recorded, counted or kept), if it is there."""

    def ttl(self, key: str) -> float:
        """Seconds until ``key`` (recorded or counted) expires; 0 when it is not there."""

    def load(self) -> float | None:
        """The share of the store's capacity in use (0 to 1); None when the store cannot tell."""

    def map_set(self, name: str, items: Mapping[str, bytes], *, notify: bool = False) -> None:
        """Set fields of the map ``name`` (one step for every other client); ``notify``: advance its version."""

    def map_delete(self, name: str, fields: Sequence[str], *, notify: bool = False) -> int:
        """Drop fields of the map ``name``; how many were there. ``notify``: advance its version."""

    def map_delete_unchanged(self, name: str, items: Mapping[str, bytes]) -> int:
        """Drop each field of ``items`` from the map ``name`` only if its value is still the one given (one
        step for every other client: a value written since stays); how many were dropped."""

    def map_get(self, name: str, fields: Sequence[str]) -> list[bytes | None]:
        """The values of ``fields`` in the map ``name``, in order (None for a field not there)."""

    def map_items(self, name: str) -> dict[str, bytes]:
        """Every field of the map ``name`` and its value."""

    def map_size(self, name: str) -> int:
        """How many fields the map ``name`` has."""

    def map_version(self, name: str) -> int:
        """A number that changes with every notifying change of the map ``name`` (0 before the first; only
        equality means anything)."""

    def wait_for_change(self, name: str, seen: int, timeout: float) -> None:
        """Return once the map's version may differ from ``seen``, or after ``timeout`` seconds at most
        (also early, now and then: the caller reads the version again). Never raises."""

    def stop_waiting(self, name: str) -> None:
        """Release what waiting for changes of ``name`` holds (a subscription), if anything."""


class MemoryStore:
    """One process's store: expiry times by key, with a heap so expired keys leave as time passes.

    At most ``max_entries`` keys (recorded and counted together) live at once; a new key beyond that
    raises ``StoreUnavailable`` rather than forgetting one an attacker would like forgotten."""

    def __init__(self, max_entries: int = 250_000) -> None:
        self._seen: dict[str, float] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._values: dict[str, tuple[bytes, float]] = {}
        self._expiries: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._max = max_entries
        self._maps: dict[str, dict[str, bytes]] = {}
        self._versions: dict[str, int] = {}
        self._changed = threading.Condition(self._lock)

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

    def count(self, key: str, ttl: float, *, keep: bool = True) -> int:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            current = self._counters.get(key)
            if current is None:
                self._make_room()
                if not keep:
                    return 1
                current = (0, now + ttl)
                heapq.heappush(self._expiries, (current[1], "\0" + key))
            if keep:
                self._counters[key] = (current[0] + 1, current[1])
            return current[0] + 1

    def uncount(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            current = self._counters.get(key)
            if current is not None and current[0] > 0:
                self._counters[key] = (current[0] - 1, current[1])

    def put(self, key: str, value: bytes, ttl: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if key not in self._values:
                self._make_room()
            self._values[key] = (value, now + ttl)
            heapq.heappush(self._expiries, (now + ttl, "\1" + key))

    def get(self, key: str) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            kept = self._values.get(key)
            return kept[0] if kept is not None else None

    def forget(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)
            self._counters.pop(key, None)
            self._values.pop(key, None)

    def ttl(self, key: str) -> float:
        now = time.monotonic()
        with self._lock:
            expires = max(self._seen.get(key, now), self._counters.get(key, (0, now))[1],
                          self._values.get(key, (b"", now))[1])
            return max(0.0, expires - now)

    def load(self) -> float:
        with self._lock:
            self._expire(time.monotonic())
            return self._size() / self._max

    def map_set(self, name: str, items: Mapping[str, bytes], *, notify: bool = False) -> None:
        with self._lock:
            self._maps.setdefault(name, {}).update(items)
            if notify:
                self._advance(name)

    def map_delete(self, name: str, fields: Sequence[str], *, notify: bool = False) -> int:
        with self._lock:
            kept = self._maps.get(name, {})
            gone = sum(kept.pop(f, None) is not None for f in fields)
            if notify:
                self._advance(name)
            return gone

    def map_delete_unchanged(self, name: str, items: Mapping[str, bytes]) -> int:
        with self._lock:
            kept = self._maps.get(name, {})
            gone = [f for f, v in items.items() if kept.get(f) == v]
            for f in gone:
                del kept[f]
            return len(gone)

    def map_get(self, name: str, fields: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            kept = self._maps.get(name, {})
            return [kept.get(f) for f in fields]

    def map_items(self, name: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._maps.get(name, {}))

    def map_size(self, name: str) -> int:
        with self._lock:
            return len(self._maps.get(name, {}))

    def map_version(self, name: str) -> int:
        with self._lock:
            return self._versions.get(name, 0)

    def wait_for_change(self, name: str, seen: int, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._versions.get(name, 0) != seen, timeout)

    def stop_waiting(self, name: str) -> None:
        pass

    def _advance(self, name: str) -> None:
        self._versions[name] = self._versions.get(name, 0) + 1
        self._changed.notify_all()

    def _size(self) -> int:
        return len(self._seen) + len(self._counters) + len(self._values)

    def _make_room(self) -> None:
        if self._size() >= self._max:
            raise StoreUnavailable("the in-memory store is full")

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires, key = heapq.heappop(self._expiries)
            if key.startswith("\0"):
                if self._counters.get(key[1:], (0, None))[1] == expires:
                    del self._counters[key[1:]]
            elif key.startswith("\1"):
                if self._values.get(key[1:], (b"", None))[1] == expires:
                    del self._values[key[1:]]
            elif self._seen.get(key) == expires:
                del self._seen[key]


#: The tables of the workers' SQLite file: the DPoP replay state (``Pdp.store``), and the lock-out counters.
SHARED_TABLE, LOCKOUT_TABLE = "state", "lockout"
#: The files of one SQLite database in WAL mode: while any connection is open, all three exist.
_SQLITE_FILES = ("", "-wal", "-shm")


#: The statements of ``SqliteStore``, for the table named ``@t`` (a name of lower-case letters, checked).
_SQL = {
    "create": "CREATE TABLE IF NOT EXISTS @t (key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL NOT NULL) "
              "WITHOUT ROWID",
    "index": "CREATE INDEX IF NOT EXISTS @t_expires ON @t (expires)",
    # Inserted, or an expired row taken over: one row changed. A live row: none.
    "remember": "INSERT INTO @t (key, value, expires) VALUES (?, 1, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = 1, expires = excluded.expires WHERE @t.expires <= ?",
    "count": "INSERT INTO @t (key, value, expires) VALUES (?, 1, ?) ON CONFLICT (key) DO UPDATE SET "
             "value = CASE WHEN @t.expires <= ? THEN 1 ELSE @t.value + 1 END, "
             "expires = CASE WHEN @t.expires <= ? THEN excluded.expires ELSE @t.expires END RETURNING value",
    "value": "SELECT value FROM @t WHERE key = ? AND expires > ?",
    "put": "INSERT INTO @t (key, value, expires) VALUES (?, ?, ?) "
           "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires",
    "uncount": "UPDATE @t SET value = value - 1 WHERE key = ? AND value > 0 AND expires > ?",
    "forget": "DELETE FROM @t WHERE key = ?",
    "expires": "SELECT expires FROM @t WHERE key = ?",
    "sweep": "DELETE FROM @t WHERE expires <= ?",
    "rows": "SELECT count(*) FROM @t",
    # Named maps, and the version each notifying change advances (polled by the other processes).
    "maps": "CREATE TABLE IF NOT EXISTS @t_maps (name TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, "
            "PRIMARY KEY (name, field)) WITHOUT ROWID",
    "versions": "CREATE TABLE IF NOT EXISTS @t_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL) "
                "WITHOUT ROWID",
    "map_set": "INSERT INTO @t_maps (name, field, value) VALUES (?, ?, ?) "
               "ON CONFLICT (name, field) DO UPDATE SET value = excluded.value",
    "map_delete": "DELETE FROM @t_maps WHERE name = ? AND field = ?",
    "map_delete_unchanged": "DELETE FROM @t_maps WHERE name = ? AND field = ? AND value = ?",
    "map_get": "SELECT value FROM @t_maps WHERE name = ? AND field = ?",
    "map_items": "SELECT field, value FROM @t_maps WHERE name = ?",
    "map_size": "SELECT count(*) FROM @t_maps WHERE name = ?",
    "map_version": "SELECT version FROM @t_versions WHERE name = ?",
    "advance": "INSERT INTO @t_versions (name, version) VALUES (?, 1) "
               "ON CONFLICT (name) DO UPDATE SET version = version + 1",
}


def _file_identity(path: Path) -> list[list[int]]:
    """(device, inode) of the database file and its WAL and shared-memory files, so that a process told
    which files to open can tell them from files of the same name made since."""
    identity = []
    for suffix in _SQLITE_FILES:
        st = os.stat(f"{path}{suffix}")
        identity.append([st.st_dev, st.st_ino])
    return identity


class SqliteStore:
    """The store of the worker processes of one ``pdp serve --workers N``: one SQLite file on this machine.

    Each operation is one statement (an upsert), so it is atomic across processes; expiry is wall-clock
    time, the clock DPoP's ``iat`` window is judged by. The file lives in a private folder that the
    parent process creates and removes; nothing in it outlives the server. Expired rows are swept now
    and then; at ``max_entries`` live rows a new key raises ``StoreUnavailable``, as ``MemoryStore`` does.
    Each ``table`` is a store of its own with its own bound, so one use cannot fill another's.

    The parent creates the file (``create=True``) and keeps it open; each worker opens it with
    ``create=False`` and the ``identity`` the parent read (``file_identity``), so that a worker never
    makes a fresh, empty database of its own: if the files are gone or are other files than the
    parent's (a temp-folder cleaner, a restart), every operation raises ``StoreUnavailable``.
    """

    SWEEP_INTERVAL = 2.0

    def __init__(self, path: Path, *, table: str = "entries", max_entries: int = 250_000, timeout: float = 2.0,
                 create: bool = True, identity: list[list[int]] | None = None) -> None:
        if not re.fullmatch(r"[a-z_]{1,32}", table):
            raise ValueError(f"table name {table!r}")
        self.path = path
        self._sql = {name: sql.replace("@t", table) for name, sql in _SQL.items()}
        self._identity = identity
        self._max = max_entries
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._full = False
        self._rows = 0
        self._broken: str | None = None
        self._check_files()
        self._usable()  # never open (and so create the WAL files of) a database other than the parent's
        try:
            if create:
                self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            else:
                uri = f"file:{urllib.parse.quote(str(path))}?mode=rw"
                self._db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                                           check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")  # the state is worth nothing after a crash
            if create:
                for statement in ("create", "index", "maps", "versions"):
                    self._db.execute(self._sql[statement])
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {str(path)!r}: {exc}") from exc
        self._check_files()  # the same files after opening: none was swapped in between

    def file_identity(self) -> list[list[int]]:
        """What a worker needs to know it opened this store's files (see the class docstring)."""
        return _file_identity(self.path)

    def remember(self, key: str, ttl: float) -> bool:
        now = time.time()
        with self._lock:
            self._housekeeping(key, now)
            return self._run(self._sql["remember"], (key, now + ttl, now)).rowcount == 1

    def count(self, key: str, ttl: float, *, keep: bool = True) -> int:
        now = time.time()
        with self._lock:
            self._housekeeping(key, now)
            if not keep:
                row = self._run(self._sql["value"], (key, now)).fetchone()
                return int(row[0]) + 1 if row else 1
            rows = self._run(self._sql["count"], (key, now + ttl, now, now)).fetchall()
            return int(rows[0][0])  # fetchall: the write ends only when the statement has run to its end

    def uncount(self, key: str) -> None:
        now = time.time()
        with self._lock:
            self._usable()
            self._run(self._sql["uncount"], (key, now))

    def put(self, key: str, value: bytes, ttl: float) -> None:
        now = time.time()
        with self._lock:
            self._housekeeping(key, now)
            self._run(self._sql["put"], (key, value, now + ttl))

    def get(self, key: str) -> bytes | None:
        now = time.time()
        with self._lock:
            self._usable()
            row = self._run(self._sql["value"], (key, now)).fetchone()
        return row[0] if row is not None and isinstance(row[0], bytes) else None

    def forget(self, key: str) -> None:
        with self._lock:
            self._usable()
            self._run(self._sql["forget"], (key,))

    def ttl(self, key: str) -> float:
        now = time.time()
        with self._lock:
            self._usable()
            row = self._run(self._sql["expires"], (key,)).fetchone()
        return max(0.0, float(row[0]) - now) if row else 0.0

    def load(self) -> float:
        """As of the last sweep (at most ``SWEEP_INTERVAL`` seconds ago)."""
        with self._lock:
            self._usable()
            return self._rows / self._max

    #: How often ``wait_for_change`` reads the version row: SQLite has no notification between processes.
    POLL_INTERVAL = 0.25

    def map_set(self, name: str, items: Mapping[str, bytes], *, notify: bool = False) -> None:
        rows = [(name, f, bytes(v)) for f, v in items.items()]

        def write() -> None:
            self._db.executemany(self._sql["map_set"], rows)
            if notify:
                self._db.execute(self._sql["advance"], (name,))

        self._atomically(write)

    def map_delete(self, name: str, fields: Sequence[str], *, notify: bool = False) -> int:
        def write() -> int:
            gone = sum(self._db.execute(self._sql["map_delete"], (name, f)).rowcount for f in fields)
            if notify:
                self._db.execute(self._sql["advance"], (name,))
            return gone

        return self._atomically(write)

    def map_delete_unchanged(self, name: str, items: Mapping[str, bytes]) -> int:
        def write() -> int:
            return sum(self._db.execute(self._sql["map_delete_unchanged"], (name, f, bytes(v))).rowcount
                       for f, v in items.items())

        return self._atomically(write)

    def map_get(self, name: str, fields: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            self._usable()
            rows = [self._run(self._sql["map_get"], (name, f)).fetchone() for f in fields]
        return [bytes(r[0]) if r is not None else None for r in rows]

    def map_items(self, name: str) -> dict[str, bytes]:
        with self._lock:
            self._usable()
            return {str(f): bytes(v) for f, v in self._run(self._sql["map_items"], (name,)).fetchall()}

    def map_size(self, name: str) -> int:
        with self._lock:
            self._usable()
            return int(self._run(self._sql["map_size"], (name,)).fetchone()[0])

    def map_version(self, name: str) -> int:
        with self._lock:
            self._usable()
            row = self._run(self._sql["map_version"], (name,)).fetchone()
        return int(row[0]) if row else 0

    def wait_for_change(self, name: str, seen: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.POLL_INTERVAL))
            try:
                if self.map_version(name) != seen:
                    return
            except StoreUnavailable:
                return

    def stop_waiting(self, name: str) -> None:
        pass

    def _atomically(self, work: Callable[[], T]) -> T:
        """``work`` in one write transaction: every other process sees all of it or none."""
        with self._lock:
            self._usable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work()
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from exc
            return result

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _check_files(self) -> None:
        if self._identity is None or self._broken is not None:
            return
        try:
            same = _file_identity(self.path) == [list(i) for i in self._identity]
        except OSError:
            same = False
        if not same:
            self._broken = f"the shared worker store {str(self.path)!r} is gone or was replaced"

    def _usable(self) -> None:
        if self._broken is not None:
            raise StoreUnavailable(self._broken)

    def _housekeeping(self, key: str, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_INTERVAL
            self._check_files()
            self._usable()
            self._run(self._sql["sweep"], (now,))
            self._rows = int(self._run(self._sql["rows"]).fetchone()[0])
            self._full = self._rows >= self._max
        self._usable()
        if self._full and self._run(self._sql["value"], (key, now)).fetchone() is None:
            raise StoreUnavailable("the shared worker store is full")

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc


class UnavailableStore:
    """A store that cannot be had (a worker whose shared store is gone): every operation is refused."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> StoreUnavailable:
        return StoreUnavailable(self.reason)

    def remember(self, key: str, ttl: float) -> bool:
        raise self._refuse()

    def count(self, key: str, ttl: float, *, keep: bool = True) -> int:
        raise self._refuse()

    def uncount(self, key: str) -> None:
        raise self._refuse()

    def put(self, key: str, value: bytes, ttl: float) -> None:
        raise self._refuse()

    def get(self, key: str) -> bytes | None:
        raise self._refuse()

    def forget(self, key: str) -> None:
        raise self._refuse()

    def ttl(self, key: str) -> float:
        raise self._refuse()

    def load(self) -> float | None:
        return None

    def map_set(self, name: str, items: Mapping[str, bytes], *, notify: bool = False) -> None:
        raise self._refuse()

    def map_delete(self, name: str, fields: Sequence[str], *, notify: bool = False) -> int:
        raise self._refuse()

    def map_delete_unchanged(self, name: str, items: Mapping[str, bytes]) -> int:
        raise self._refuse()

    def map_get(self, name: str, fields: Sequence[str]) -> list[bytes | None]:
        raise self._refuse()

    def map_items(self, name: str) -> dict[str, bytes]:
        raise self._refuse()

    def map_size(self, name: str) -> int:
        raise self._refuse()

    def map_version(self, name: str) -> int:
        raise self._refuse()

    def wait_for_change(self, name: str, seen: int, timeout: float) -> None:
        time.sleep(timeout)

    def stop_waiting(self, name: str) -> None:
        pass


#: Drop each field (ARGV odd) whose value is still the one given (ARGV even): compare and delete in one step.
_DELETE_UNCHANGED = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""
#: Take one count back, never below 0, and never create the key (a plain DECR would, without expiry).
_UNCOUNT = "local v = redis.call('GET', KEYS[1]) if v and tonumber(v) > 0 then redis.call('DECR', KEYS[1]) end"


class RedisStore:
    """A Redis (or Redis Cluster / Sentinel-fronted) store shared by every replica.

    Run it with ``maxmemory-policy noeviction``: an evicted ``jti`` lets its proof be replayed, an evicted
    counter lets a guesser go on. At ``maxmemory`` every write fails, and pdp denies what needs one."""

    LOAD_INTERVAL = 1.0

    def __init__(self, url: str, *, prefix: str = "pdp:", timeout: float = 0.2, client: Any = None) -> None:
        import redis

        self._redis = client or redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._error = redis.RedisError
        self._uncount = self._redis.register_script(_UNCOUNT)
        self._delete_unchanged = self._redis.register_script(_DELETE_UNCHANGED)
        self.prefix = prefix
        self._load: tuple[float, float | None] = (0.0, None)
        self._subscriptions: dict[str, Any] = {}
        self._subscribing = threading.Lock()

    def remember(self, key: str, ttl: float) -> bool:
        try:
            return bool(self._redis.set(self.prefix + key, b"1", nx=True, px=max(1, int(ttl * 1000))))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def count(self, key: str, ttl: float, *, keep: bool = True) -> int:
        try:
            pipe = self._redis.pipeline()  # MULTI/EXEC: one step for every other client
            pipe.incr(self.prefix + key)
            pipe.pexpire(self.prefix + key, max(1, int(ttl * 1000)), nx=True)
            if not keep:
                pipe.decr(self.prefix + key)
            return int(pipe.execute()[0])
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def uncount(self, key: str) -> None:
        try:
            self._uncount(keys=[self.prefix + key])
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def put(self, key: str, value: bytes, ttl: float) -> None:
        try:
            self._redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        try:
            value = self._redis.get(self.prefix + key)
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return value if isinstance(value, bytes) else None

    def forget(self, key: str) -> None:
        try:
            self._redis.delete(self.prefix + key)
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def ttl(self, key: str) -> float:
        try:
            left = int(self._redis.pttl(self.prefix + key))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return left / 1000 if left > 0 else 0.0

    def load(self) -> float | None:
        """``used_memory`` over ``maxmemory``, read at most once a second; None without a ``maxmemory``."""
        now = time.monotonic()
        if now < self._load[0]:
            return self._load[1]
        try:
            info = self._redis.info("memory")
            limit = int(info.get("maxmemory", 0))
            value = int(info["used_memory"]) / limit if limit > 0 else None
        except (self._error, KeyError, ValueError, TypeError):
            value = None
        self._load = (now + self.LOAD_INTERVAL, value)
        return value

    # -- named maps: a hash, a version counter and a pub/sub channel, in one hash slot (Redis Cluster)
    def _map_key(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}"

    def map_set(self, name: str, items: Mapping[str, bytes], *, notify: bool = False) -> None:
        if not items:
            return
        key = self._map_key(name)
        try:
            pipe = self._redis.pipeline()  # MULTI/EXEC: the fields and the version move together
            pipe.hset(key, items=[part for pair in items.items() for part in pair])
            if notify:
                pipe.set(key + ":version", _new_version())
                pipe.publish(key + ":changes", b"1")
            pipe.execute()
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def map_delete(self, name: str, fields: Sequence[str], *, notify: bool = False) -> int:
        key = self._map_key(name)
        try:
            pipe = self._redis.pipeline()
            if fields:
                pipe.hdel(key, *fields)
            if notify:
                pipe.set(key + ":version", _new_version())
                pipe.publish(key + ":changes", b"1")
            results = pipe.execute()
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return int(results[0]) if fields else 0

    def map_delete_unchanged(self, name: str, items: Mapping[str, bytes]) -> int:
        if not items:
            return 0
        try:
            return int(self._delete_unchanged(keys=[self._map_key(name)],
                                              args=[part for pair in items.items() for part in pair]))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def map_get(self, name: str, fields: Sequence[str]) -> list[bytes | None]:
        if not fields:
            return []
        try:
            values = self._redis.hmget(self._map_key(name), list(fields))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [v if isinstance(v, bytes) else None for v in values]

    def map_items(self, name: str) -> dict[str, bytes]:
        try:
            items = self._redis.hgetall(self._map_key(name))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return {(f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)): v
                for f, v in items.items() if isinstance(v, bytes)}

    def map_size(self, name: str) -> int:
        try:
            return int(self._redis.hlen(self._map_key(name)))
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def map_version(self, name: str) -> int:
        try:
            value = self._redis.get(self._map_key(name) + ":version")
        except self._error as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return int(value) if value else 0

    def wait_for_change(self, name: str, seen: int, timeout: float) -> None:
        """Wait on the map's pub/sub channel. A fresh subscription returns at once (a change published
        before it was in place is only seen by reading the version); a broken one is dropped, waited
        out, and made again on the next call."""
        deadline = time.monotonic() + timeout
        with self._subscribing:
            subscription = self._subscriptions.get(name)
            try:
                if subscription is None:
                    subscription = self._redis.pubsub(ignore_subscribe_messages=True)
                    self._subscriptions[name] = subscription
                    subscription.subscribe(self._map_key(name) + ":changes")
                    return
                while (left := deadline - time.monotonic()) > 0:
                    if subscription.get_message(timeout=left) is not None:
                        return
                return
            except (self._error, OSError, ValueError):
                self._subscriptions.pop(name, None)
                _close_quietly(subscription)
        time.sleep(max(0.0, deadline - time.monotonic()))

    def stop_waiting(self, name: str) -> None:
        with self._subscribing:
            _close_quietly(self._subscriptions.pop(name, None))


def _new_version() -> int:
    """A version no earlier one of the map is likely to have had: a counter would start again at 1 in a
    Redis that restarted empty, and the number a reader holds could come round again with other contents."""
    return secrets.randbits(62) + 1


def _close_quietly(subscription: Any) -> None:
    if subscription is not None:
        with contextlib.suppress(Exception):  # a connection already gone: nothing left to release
            subscription.close()


def on_the_network(store: Store) -> bool:
    """Whether an operation on ``store`` waits on another machine (Redis), so that a decision which needs
    one must not be made on an event loop."""
    return isinstance(store, RedisStore)
