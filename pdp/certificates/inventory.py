"""The client-identity inventory: every client certificate pdp has verified, and when it was last seen.

One record per certificate (by its RFC 8705 ``x5t#S256`` thumbprint): SPIFFE
ID, subject and issuer DN, the trust bundle that vouched for it, ``notAfter``,
first and last seen. ``pdp certs list --expiring 7d`` answers which clients
are about to lose access; ``expiry_buckets`` gives the counts by days to
expiry for a gauge.

Recording costs the request path a dictionary lookup: ``InventoryRecorder.seen``
queues a record the first time a thumbprint is seen and again at most once per
``interval`` after that; a background thread (``pdp.service.inventory_flusher``)
writes the queue to the store's map ``inventory`` in batches. The inventory is
bounded: at ``max_identities`` records a new identity is not recorded (it is
counted, as ``dropped``); records of certificates that expired more than
``keep_expired`` seconds ago are removed. The queue and this process's memory
of what it has queued are bounded too.

No I/O here: the store is reached through the ``Store`` protocol.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pdp.certificates.identity import CertIdentity
from pdp.store import Store
from pdp.stored_values import shown, unix_seconds, unix_time

#: The store map the records live in.
MAP = "inventory"
DAY = 86400.0
#: The gauge's buckets by days to expiry: (label, upper bound in seconds from now).
BUCKETS = (("expired", 0.0), ("lt_1d", DAY), ("lt_7d", 7 * DAY), ("lt_30d", 30 * DAY), ("ge_30d", float("inf")))
_MAX_TEXT = 2048


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    thumbprint: str
    spiffe_id: str | None
    subject: str
    issuer: str
    trust_bundle: str
    not_after: float
    first_seen: float
    last_seen: float

    def encode(self) -> bytes:
        """``NOT_AFTER JSON``: the notAfter first, so that a listing by expiry reads a number and decodes
        only the records it shows; short names, which at tens of thousands of records add up."""
        doc = json.dumps({"s": self.spiffe_id, "d": self.subject, "i": self.issuer, "b": self.trust_bundle,
                          "f": int(self.first_seen), "l": int(self.last_seen)},
                         separators=(",", ":"), ensure_ascii=False)
        return f"{int(self.not_after)} {doc}".encode()

    @classmethod
    def decode(cls, thumbprint: str, value: bytes) -> IdentityRecord:
        """The record stored under ``thumbprint``; ``ValueError`` when it is not one pdp wrote."""
        head, _, body = value.partition(b" ")
        return cls.from_document(thumbprint, unix_seconds(head), _document_or_none(body))

    @classmethod
    def from_document(cls, thumbprint: str, not_after: int, doc: Any) -> IdentityRecord:
        """The record from its parts; ``ValueError`` unless the field is printable text, the times are times
        (``pdp.stored_values``) and the names are text (shown with any control character replaced)."""
        if not 0 < len(thumbprint) <= _MAX_TEXT or not thumbprint.isprintable():
            raise ValueError("the field is not printable text")
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        spiffe = doc.get("s")
        try:
            return cls(thumbprint, shown(spiffe, _MAX_TEXT) if isinstance(spiffe, str) else None,
                       shown(str(doc["d"]), _MAX_TEXT), shown(str(doc["i"]), _MAX_TEXT),
                       shown(str(doc["b"]), _MAX_TEXT), unix_time(not_after), unix_time(doc["f"]),
                       unix_time(doc["l"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"incomplete record: {exc}") from exc

    def merged(self, older: IdentityRecord | None) -> IdentityRecord:
        """This record with what ``older`` (the one in the store) knew first."""
        if older is None:
            return self
        return IdentityRecord(self.thumbprint, self.spiffe_id, self.subject, self.issuer, self.trust_bundle,
                              self.not_after, min(self.first_seen, older.first_seen),
                              max(self.last_seen, older.last_seen))

    def view(self) -> dict[str, object]:
        return {"thumbprint": self.thumbprint, "spiffe_id": self.spiffe_id, "subject": self.subject,
                "issuer": self.issuer, "trust_bundle": self.trust_bundle, "not_after": int(self.not_after),
                "first_seen": int(self.first_seen), "last_seen": int(self.last_seen)}


class InventoryRecorder:
    """What this process has seen and not yet written. ``seen`` is called on every request with a
    verified certificate: a dictionary lookup, and a lock only when a record is due."""

    def __init__(self, *, interval: float = 60.0, max_pending: int = 10_000, max_remembered: int = 100_000) -> None:
        self.interval = interval
        self._max_pending = max_pending
        self._max_remembered = max_remembered
        self._queued: dict[str, float] = {}  # thumbprint → when it was last queued
        self._pending: dict[str, IdentityRecord] = {}
        self._lock = threading.Lock()
        #: Records not queued because the queue was full (the store too slow or away for too long).
        self.overflow = 0

    def seen(self, identity: CertIdentity, now: float) -> None:
        last = self._queued.get(identity.thumbprint)
        if last is not None and now - last < self.interval:
            return
        record = IdentityRecord(identity.thumbprint, identity.spiffe_id, identity.subject, identity.issuer,
                                identity.trust_bundle, identity.not_after, now, now)
        with self._lock:
            if len(self._queued) >= self._max_remembered:
                # Forgetting costs one more write per identity, never a lost record: bounded, and simple.
                self._queued.clear()
            self._queued[identity.thumbprint] = now
            self._queue(record)

    def take(self) -> list[IdentityRecord]:
        """The records queued since the last call."""
        with self._lock:
            taken = list(self._pending.values())
            self._pending = {}
        return taken

    def give_back(self, records: Iterable[IdentityRecord]) -> None:
        """Queue again records a write failed to store (a newer record of the same identity wins)."""
        with self._lock:
            for record in records:
                self._queue(record.merged(self._pending.get(record.thumbprint)))

    def pending(self) -> int:
        return len(self._pending)

    def _queue(self, record: IdentityRecord) -> None:
        if record.thumbprint in self._pending or len(self._pending) < self._max_pending:
            self._pending[record.thumbprint] = record.merged(self._pending.get(record.thumbprint))
        else:
            self.overflow += 1


# -- the inventory in the store
@dataclass(frozen=True, slots=True)
class Written:
    stored: int
    #: New identities not recorded: the inventory holds ``max_identities`` already.
    dropped: int


def write_records(store: Store, records: list[IdentityRecord], *, max_identities: int) -> Written:
    """Merge ``records`` into the store (first seen kept, last seen advanced), in one read and one write.
    Beyond ``max_identities``, records of identities the store does not know yet are dropped."""
    if not records:
        return Written(0, 0)
    known = store.map_get(MAP, [r.thumbprint for r in records])
    room = max_identities - store.map_size(MAP)
    items: dict[str, bytes] = {}
    dropped = 0
    for record, value in zip(records, known, strict=True):
        older = _decode_or_none(record.thumbprint, value)
        if older is None:
            if room <= 0:
                dropped += 1
                continue
            room -= 1
        items[record.thumbprint] = record.merged(older).encode()
    store.map_set(MAP, items)
    return Written(len(items), dropped)


def read_records(store: Store, *, expiring_by: float | None = None) -> list[IdentityRecord]:
    """Every record in the store (ones pdp did not write are skipped); with ``expiring_by``, only those
    whose ``not_after`` is not past it.

    Tens of thousands of records are read as one JSON document (one parser call instead of one per
    record), and only the records chosen are built: ``pdp certs list`` answers within a second."""
    chosen: list[tuple[str, int, bytes]] = []
    for thumbprint, value in store.map_items(MAP).items():
        head, _, body = value.partition(b" ")
        try:
            not_after = unix_seconds(head)
        except ValueError:
            continue
        if expiring_by is None or not_after <= expiring_by:
            chosen.append((thumbprint, not_after, body))
    bodies = [body for _, _, body in chosen]
    try:
        # Each body is one JSON object pdp wrote; any other makes the joined text invalid or the count differ
        # (an empty body cannot make up for one holding two objects: ',,' is not JSON).
        docs = json.loads(b"[" + b",".join(bodies) + b"]")
        if len(docs) != len(bodies):
            raise ValueError("a value is not one JSON document")
    except (ValueError, RecursionError):
        docs = [_document_or_none(body) for body in bodies]
    records = []
    for (thumbprint, not_after, _), doc in zip(chosen, docs, strict=True):
        try:
            records.append(IdentityRecord.from_document(thumbprint, not_after, doc))
        except ValueError:
            continue
    return records


def _document_or_none(value: bytes) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return None


def read_expiries(store: Store) -> list[float]:
    """The ``not_after`` of every record, and nothing else (a number per record: no JSON is decoded)."""
    expiries = []
    for value in store.map_items(MAP).values():
        try:
            expiries.append(float(unix_seconds(value.partition(b" ")[0])))
        except ValueError:
            continue
    return expiries


def forget_expired(store: Store, *, keep_expired: float, now: float) -> int:
    """Remove the records of certificates that expired more than ``keep_expired`` seconds ago."""
    old = [r.thumbprint for r in read_records(store, expiring_by=now - keep_expired)
           if r.not_after + keep_expired < now]
    return store.map_delete(MAP, old) if old else 0


def expiring(records: Iterable[IdentityRecord], now: float, within: float | None = None) -> list[IdentityRecord]:
    """The records sorted by ``not_after``; with ``within``, only those expiring in that many seconds
    (the ones already expired included)."""
    chosen = records if within is None else (r for r in records if r.not_after <= now + within)
    return sorted(chosen, key=lambda r: (r.not_after, r.thumbprint))


def expiry_buckets(expiries: Iterable[float], now: float) -> dict[str, int]:
    """How many of the ``not_after`` times fall in each of ``BUCKETS`` (each counted once, in the first
    that fits; ``expired``: at or before ``now``)."""
    counts = dict.fromkeys((label for label, _ in BUCKETS), 0)
    for not_after in expiries:
        left = not_after - now
        for label, bound in BUCKETS:
            if left < bound or (label == "expired" and left <= 0):
                counts[label] += 1
                break
    return counts


def _decode_or_none(thumbprint: str, value: bytes | None) -> IdentityRecord | None:
    if value is None:
        return None
    try:
        return IdentityRecord.decode(thumbprint, value)
    except ValueError:
        return None
