"""Whether the shared store answers: a cheap probe, at most once per ``interval``, for ``/readyz`` and metrics.

A probe reads one key that is never written (Redis ``GET``, one SQLite
``SELECT``); a store that raises ``StoreUnavailable`` is down until a later
probe gets an answer. Probes are spaced by ``interval`` however often
``/readyz`` is asked, and only one runs at a time: a caller that arrives while
one is under way is told the last result rather than wait behind it. What the
caller is told names no address: the store's own error (a host and port, a file
path) goes to the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdp.credentials.rfc9449 import STORE_UNAVAILABLE_TEXT
from pdp.store import MemoryStore, SqliteStore, Store, StoreUnavailable, UnavailableStore

log = logging.getLogger("pdp.store")

#: The key a probe reads. Nothing writes it, so a probe leaves nothing behind.
PROBE_KEY = "health:probe"
#: What ``/readyz`` says of a store that does not answer: what a denied request is told.
UNAVAILABLE_TEXT = STORE_UNAVAILABLE_TEXT


@dataclass(frozen=True, slots=True)
class StoreState:
    ok: bool
    #: ``memory``, ``sqlite``, ``redis`` or ``unavailable``.
    kind: str
    #: A text safe to show any caller; None when the store answers.
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"ok": self.ok, "kind": self.kind}
        if self.error is not None:
            out["error"] = self.error
        return out


def store_kind(store: Store) -> str:
    if isinstance(store, MemoryStore):
        return "memory"
    if isinstance(store, SqliteStore):
        return "sqlite"
    if isinstance(store, UnavailableStore):
        return "unavailable"
    return "redis"


class StoreHealth:
    """The last probe's result, probing again when it is older than ``interval`` seconds.

    ``on_probe(ok)`` is told each probe's outcome (the metrics: a failure counter and an up gauge)."""

    def __init__(self, store: Store, *, interval: float = 1.0,
                 on_probe: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._interval = interval
        self._on_probe = on_probe
        self._clock = clock
        self._kind = store_kind(store)
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._state: StoreState | None = None
        self.probes = 0

    def state(self) -> StoreState:
        """The store's state: probed now if the last probe is older than ``interval``; otherwise (or while
        another caller probes) the last result. The first call always probes."""
        now = self._clock()
        if now >= self._next and self._lock.acquire(blocking=self._state is None):
            try:
                if now >= self._next:
                    self._state = self._probe()
                    self._next = self._clock() + self._interval
            finally:
                self._lock.release()
        state = self._state
        assert state is not None
        return state

    def _probe(self) -> StoreState:
        self.probes += 1
        try:
            self._store.get(PROBE_KEY)
        except StoreUnavailable as exc:
            if self._state is None or self._state.ok:
                log.warning("the shared store does not answer: %s", exc)
            else:
                log.debug("the shared store still does not answer: %s", exc)
            self._tell(False)
            return StoreState(ok=False, kind=self._kind, error=UNAVAILABLE_TEXT)
        if self._state is not None and not self._state.ok:
            log.warning("the shared store answers again")
        self._tell(True)
        return StoreState(ok=True, kind=self._kind)

    def _tell(self, ok: bool) -> None:
        if self._on_probe is not None:
            self._on_probe(ok)
