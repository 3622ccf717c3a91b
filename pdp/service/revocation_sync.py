"""Keeps this replica's copy of pdp's revocation list (``pdp.certificates.revocation_list``) current.

A background thread reads the list's version from the store and, when it has
moved, the whole list; between looks it waits for a change notice (Redis
pub/sub between replicas, a polled version row between the ``--workers``
processes sharing a SQLite file, a condition within one process), and looks
again every ``interval`` seconds whatever it heard, so a lost notice costs at
most that long. No request waits on any of it: requests read the copy.

When the store cannot be reached the copy in force stays in force; the first
successful look after that re-reads the whole list, so a revocation written
while this replica was cut off is enforced as soon as it is back.

A store that lost its contents (Redis restarted without persistence, or was
flushed) is not an operator taking every revocation back: every change pdp
makes writes a new, non-zero version, so a version that is gone after one was
read, or the list's marker key gone (``MARKER``, set once and never removed by
pdp: it tells a lost store from a changed one even when a revocation was
written since the restart), means the store forgot. The replica then keeps
enforcing the entries it holds, writes those the store lacks back (a change
notice, so every replica reads them again), and logs an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pdp.certificates.revocation_list import (
    MAP,
    Revocation,
    RevocationList,
    drop_expired,
    read_revocations,
    restore_revocations,
)
from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp")

#: A store key that exists as long as the store keeps what it was given (``Store.remember``: set if absent).
MARKER = "revocations:kept"
MARKER_TTL = 100 * 365 * 86400.0


def initial_list(store: Store, now: float | None = None) -> RevocationList:
    """The list as the store has it now, or — when the store does not answer, or its list cannot be read —
    a list not yet loaded, which denies requests that present credentials (``store_unavailable``) until
    its first load. Never raises: a replica starts whatever the store holds."""
    try:
        version, entries = read_revocations(store)
        _marker_was_missing(store)
    except StoreUnavailable as exc:
        log.warning("pdp's revocation list cannot be read (%s): requests that present a certificate or a "
                    "token are denied until it can", exc)
        return RevocationList.not_loaded()
    except Exception:  # whatever is in the store, a replica starts (denying credentials until it reads it)
        log.exception("pdp's revocation list cannot be read: requests that present a certificate or a token "
                      "are denied until it can")
        return RevocationList.not_loaded()
    return RevocationList(entries, version=version, now=time.time() if now is None else now)


def _marker_was_missing(store: Store) -> bool:
    """Set ``MARKER`` if it is absent; whether it was (False also when the store cannot say: a full
    in-memory store refuses new keys, and that is no sign of a lost list)."""
    try:
        return store.remember(MARKER, MARKER_TTL)
    except StoreUnavailable:
        return False


class RevocationSync:
    """The thread that keeps ``revocations`` in step with the list in ``store``."""

    def __init__(self, store: Store, revocations: RevocationList, *, interval: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.revocations = revocations
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The last look reached the store; False forces a full read on the next one that does.
        self.reachable = revocations.loaded
        self.last_error: str | None = None
        self.last_read = time.monotonic() if revocations.loaded else 0.0

    def refresh(self) -> bool:
        """One look at the store: read the whole list if its version moved, the last look failed, or it
        was never loaded. False when the store did not answer (the copy in force stays)."""
        with self._lock:
            current = self.revocations
            try:
                if current.loaded and self.reachable and self.store.map_version(MAP) == current.version:
                    self.last_read = time.monotonic()
                    now = self._clock()
                    if now >= current.next_expiry:  # a --ttl ran out: off this copy, and out of the store
                        drop_expired(self.store, current.expired(now), now)
                        current.replace(current.entries(now), current.version, now)
                    return True
                version, entries = read_revocations(self.store)
                marker_missing = _marker_was_missing(self.store)
                now = self._clock()
                if current.loaded and current.version > 0 and (version == 0 or marker_missing):
                    version, entries = self._restore(current, version, entries, now)
                current.replace(entries, version, now)
                drop_expired(self.store, entries, now)
            except StoreUnavailable as exc:
                if self.reachable or self.last_error is None:
                    log.warning("pdp's revocation list cannot be read (%s): %s", exc,
                                f"enforcing the {len(current)} entries read before" if current.loaded
                                else "requests that present credentials are denied until it can")
                self.reachable, self.last_error = False, str(exc)
                return False
            if not self.reachable:
                log.info("pdp's revocation list read again: %d entries", len(current))
                # A subscription that outlived the outage may be a dead connection that never says so.
                self.store.stop_waiting(MAP)
            self.reachable, self.last_error = True, None
            self.last_read = time.monotonic()
            return True

    def _restore(self, current: RevocationList, version: int, entries: list[Revocation],
                 now: float) -> tuple[int, list[Revocation]]:
        """The store lost the list: write back what this replica enforces, and read the list again."""
        written = restore_revocations(self.store, current.entries(now), now)
        log.error("pdp's revocation list is gone from the store, which restarted empty or was flushed (its version "
                  "is %d after %d, or its marker %s is gone; run Redis with persistence and noeviction): enforcing "
                  "the %d entries this replica holds, %d of them written back", version, current.version, MARKER,
                  len(current.entries(now)), written)
        if not written:
            return version, entries
        return read_revocations(self.store)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pdp-revocations", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.store.stop_waiting(MAP)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # the thread must outlive any surprise: the copy in force stays meanwhile
                log.exception("revocation list refresh failed")
            if self._stop.is_set():
                return
            self.store.wait_for_change(MAP, self.revocations.version, self.interval)

    @property
    def ready(self) -> bool:
        """The list has been read at least once (until then, credentials are denied)."""
        return self.revocations.loaded

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: loaded, how many entries, whether the store answered the last look."""
        return {"loaded": self.revocations.loaded, "entries": len(self.revocations),
                "version": self.revocations.version, "store_reachable": self.reachable,
                "seconds_since_read": round(time.monotonic() - self.last_read, 1) if self.last_read else None,
                # The detail (which names the store's address) is in the log; /readyz only says what failed.
                "error": "the shared store is unavailable" if self.last_error else None}
