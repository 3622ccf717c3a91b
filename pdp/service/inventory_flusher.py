"""Writes the client-identity inventory (``pdp.certificates.inventory``) to the store, off the request path.

Every ``flush_interval`` seconds the records queued by requests are merged into
the store in one read and one write; a write the store refuses is queued
again (bounded). Once an hour records of long-expired certificates are
removed. The identity count (for ``/readyz``) and the counts by days to expiry
(for a gauge) are read from the store at most every 5 seconds and once a
minute, in the calling thread, one read at a time (callers meanwhile get the
value kept: a flood of ``/readyz`` on a hung store parks one thread, not all),
and kept.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pdp.certificates.inventory import (
    MAP,
    InventoryRecorder,
    expiry_buckets,
    forget_expired,
    read_expiries,
    write_records,
)
from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp")


class InventoryFlusher:
    SUMMARY_INTERVAL = 60.0
    COUNT_INTERVAL = 5.0
    FORGET_INTERVAL = 3600.0

    def __init__(self, store: Store, recorder: InventoryRecorder, *, max_identities: int, keep_expired: float,
                 flush_interval: float = 2.0) -> None:
        self.store = store
        self.recorder = recorder
        self.max_identities = max_identities
        self.keep_expired = keep_expired
        self.flush_interval = flush_interval
        #: New identities not recorded because the inventory was full (``inventory.max_identities``).
        self.dropped = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count: tuple[float, int | None] = (-1e9, None)
        self._buckets: tuple[float, dict[str, int] | None] = (-1e9, None)
        self._counting = threading.Lock()
        self._summing = threading.Lock()
        self._next_forget = time.monotonic() + self.FORGET_INTERVAL
        self._warned_full = False

    def flush(self) -> int:
        """Write what is queued now; how many records were stored."""
        with self._lock:
            records = self.recorder.take()
            if not records:
                return 0
            try:
                written = write_records(self.store, records, max_identities=self.max_identities)
            except StoreUnavailable as exc:
                self.failures += 1
                self.recorder.give_back(records)
                log.debug("identity inventory not written (%s): %d records kept for the next try", exc, len(records))
                return 0
            self.dropped += written.dropped
            if written.dropped and not self._warned_full:
                log.warning("the identity inventory holds inventory.max_identities = %d identities: new ones "
                            "are not recorded (counted as dropped)", self.max_identities)
            self._warned_full = bool(written.dropped)
            return written.stored

    def forget_expired(self) -> int:
        """Remove records of certificates that expired more than ``keep_expired`` seconds ago."""
        try:
            return forget_expired(self.store, keep_expired=self.keep_expired, now=time.time())
        except StoreUnavailable:
            return 0

    def count(self) -> int | None:
        """Identities in the inventory (read at most every ``COUNT_INTERVAL`` seconds; None while the store
        cannot tell)."""
        if time.monotonic() - self._count[0] >= self.COUNT_INTERVAL and self._counting.acquire(blocking=False):
            try:
                now = time.monotonic()
                if now - self._count[0] >= self.COUNT_INTERVAL:  # not read by the thread that held the lock
                    try:
                        self._count = (now, self.store.map_size(MAP))
                    except StoreUnavailable:
                        self._count = (now, self._count[1])
            finally:
                self._counting.release()
        return self._count[1]

    def expiry_counts(self) -> dict[str, int] | None:
        """Identities by days to expiry (``expired``, ``lt_1d``, ``lt_7d``, ``lt_30d``, ``ge_30d``), for a
        gauge; read at most once a minute, None while the store cannot tell."""
        if time.monotonic() - self._buckets[0] >= self.SUMMARY_INTERVAL and self._summing.acquire(blocking=False):
            try:
                now = time.monotonic()
                if now - self._buckets[0] >= self.SUMMARY_INTERVAL:
                    try:
                        self._buckets = (now, expiry_buckets(read_expiries(self.store), time.time()))
                    except StoreUnavailable:
                        self._buckets = (now - self.SUMMARY_INTERVAL + 5.0, self._buckets[1])
            finally:
                self._summing.release()
        return self._buckets[1]

    def status(self) -> dict[str, Any]:
        return {"identities": self.count(), "pending": self.recorder.pending(), "dropped": self.dropped,
                "overflow": self.recorder.overflow, "write_failures": self.failures}

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pdp-inventory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()  # what was queued last, if the store takes it

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
                if time.monotonic() >= self._next_forget:
                    self._next_forget = time.monotonic() + self.FORGET_INTERVAL
                    self.forget_expired()
            except Exception:  # the thread must outlive any surprise; the queue is bounded meanwhile
                log.exception("identity inventory flush failed")
