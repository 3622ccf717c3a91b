"""Revocation answers from the network: CRLs at distribution points (RFC 5280 §4.2.1.13) and OCSP (RFC 6960).

``OnlineRevocation`` gets, for one certificate of a *verified* chain and the
issuing CA found in that chain, a fresh answer from the URLs the certificate
names, and keeps it:

- **in process**, judged (a CRL as the set of serials it revokes, an OCSP
  answer as its status), in two bounded LRU maps (``crl_cache_size``
  distinct CRL URLs, ``ocsp_cache_size`` OCSP answers). ``cached`` reads them
  without any I/O. An answer vouches for ``good`` until its ``nextUpdate``
  (one without: ``undated_ttl`` seconds, and never once it is older than that,
  see ``pdp.certificates.freshness``); what it revokes stays revoked after
  that (except ``certificateHold``), until a newer answer from the same source
  replaces it. An answer is only ever replaced by one with a later
  ``thisUpdate``: an older answer (a lagging responder node, a replayed
  response) cannot roll a revocation back;
- **in the shared store**, as the DER bytes under ``crl:``/``ocsp:`` + SHA-256,
  until its ``nextUpdate``, so one replica's fetch serves every replica. Bytes
  read from the store are judged again exactly like bytes from the network:
  size, signature, issuer, freshness. The store is trusted no more than the
  network.

``obtain`` asks the sources in order (OCSP responders, then CRL distribution
points; see ``pdp.certificates.revocation`` for the whole order): each first in
the store, then over the network within what is left of the bundle's
``revocation_timeout``. With ``network=False`` it raises ``NeedsNetwork`` rather
than wait. A source that failed is not asked again for ``retry_after`` seconds
(the failure is repeated at once, so a dead responder does not hold every
request for a whole timeout); a source left unasked because the budget was
spent has not failed and is asked by the next request. Concurrent requests for
one source share one fetch. A URL with userinfo (``user:pass@host``) is never
fetched (kind ``unsupported``).

The refresher (``start``/``stop``, a daemon thread) fetches again the answers
that were used within ``recent_use`` seconds and have lived three quarters of
their time, so requests rarely wait; a newer answer in the store (another
replica's refresh) is taken without a fetch. It leaves alone a source a request
is fetching, and a request never waits for the refresher (its fetch has its own
time, not the request's budget). A newly kept answer — renewed, or fetched on
the request path — that revokes what the one it replaces did not calls the
``on_change`` callbacks (the chain verifier forgets its cached identities).

OCSP requests carry no nonce unless ``send_nonce``: most responders serve
pre-signed answers and ignore it, and an answer shared through the store is
replayed to other replicas anyway; freshness rests on ``thisUpdate`` and
``nextUpdate``.

``stats`` counts fetches, store hits, failures by source and kind, and
soft-failed allows, for metrics.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pdp.certificates import crl_distribution, ocsp
from pdp.certificates.crl_distribution import CrlError
from pdp.certificates.freshness import LEEWAY, vouches_until
from pdp.certificates.ocsp import OcspError
from pdp.credentials.http_fetch import FetchError
from pdp.errors import NeedsNetwork
from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp")

#: An OCSP response is one SingleResponse and perhaps its responder's certificate: a few KiB.
MAX_OCSP_BYTES = 64 * 1024

#: Less time than this left of ``revocation_timeout`` is not worth a request.
MIN_FETCH_TIME = 0.05


class RevocationFetch(Protocol):
    """What ``OnlineRevocation`` needs from HTTP (``pdp.credentials.http_fetch.HttpFetch`` is one): a GET and a
    POST, each with a timeout and a size limit, raising (``FetchError`` or any other exception) on failure."""

    def get(self, url: str, *, accept: str, timeout: float, max_bytes: int) -> bytes: ...

    def post(self, url: str, body: bytes, *, content_type: str, accept: str, timeout: float,
             max_bytes: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Answer:
    """A fresh revocation status of one certificate: good until ``until``, or ``revoked``."""

    revoked: bool
    until: float
    source: str


class RevocationStats:
    """Counters for metrics, safe to read from any thread (``snapshot``):

    - ``soft_fail_allows``: certificates allowed with their revocation status unknown (``revocation = "soft"``);
    - ``fetches[source]``: requests sent, by source (``"crl"``, ``"ocsp"``);
    - ``store_hits[source]``: answers taken from the shared store instead of the network;
    - ``failures[(source, kind)]``: answers not had, by kind: ``timeout``, ``connect``, ``status``,
      ``too_large``, ``transport`` (the fetch), ``malformed``, ``signature``, ``stale`` (past its
      ``nextUpdate``, made in the future, or older than the answer held), ``mismatch``, ``unsupported`` (a
      critical extension not understood, a delta or indirect CRL, a content coding, a URL with userinfo),
      ``unknown_status``, ``responder_error`` (the answer), ``store`` (the store did not answer),
      ``unavailable`` (no HTTP client). A source left unasked for want of time is not counted;
    - ``refreshes[source]``: answers renewed by the refresher.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.soft_fail_allows = 0
        self.fetches: dict[str, int] = {}
        self.store_hits: dict[str, int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.refreshes: dict[str, int] = {}

    def soft_fail(self) -> None:
        with self._lock:
            self.soft_fail_allows += 1

    def fetched(self, source: str) -> None:
        self._add(self.fetches, source)

    def store_hit(self, source: str) -> None:
        self._add(self.store_hits, source)

    def failed(self, source: str, kind: str) -> None:
        with self._lock:
            self.failures[(source, kind)] = self.failures.get((source, kind), 0) + 1

    def refreshed(self, source: str) -> None:
        self._add(self.refreshes, source)

    def _add(self, counter: dict[str, int], key: str) -> None:
        with self._lock:
            counter[key] = counter.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"soft_fail_allows": self.soft_fail_allows, "fetches": dict(self.fetches),
                    "store_hits": dict(self.store_hits), "failures": dict(self.failures),
                    "refreshes": dict(self.refreshes)}


@dataclass(frozen=True)
class _Source:
    """One place to ask about one certificate: what it takes to fetch and judge its answer again."""

    kind: str  # "crl" or "ocsp"
    url: str
    issuer: x509.Certificate
    issuer_id: bytes
    cert: x509.Certificate | None  # OCSP only: a CRL answers for every certificate of its issuer
    timeout: float
    max_bytes: int

    @property
    def key(self) -> tuple[str, str, bytes, int]:
        # A CRL is kept per URL and per issuer it was checked against: another CA naming the same URL gets its own.
        return (self.kind, self.url, self.issuer_id, self.cert.serial_number if self.cert is not None else -1)

    @property
    def store_key(self) -> str:
        if self.cert is None:
            return "crl:" + hashlib.sha256(self.url.encode()).hexdigest()
        name = b"\0".join((self.url.encode(), self.issuer_id, str(self.cert.serial_number).encode()))
        return "ocsp:" + hashlib.sha256(name).hexdigest()


@dataclass(frozen=True)
class _Entry:
    source: _Source
    #: A CRL's revoked serials (a set: looking a serial up in a large CRL itself is a linear scan); for OCSP, the
    #: certificate's serial when it is revoked.
    revoked: frozenset[int]
    #: The serials on certificateHold: revoked only while the answer is current.
    held: frozenset[int]
    this_update: float
    #: Until when it vouches for good (already past when it was obtained when it came stale).
    until: float
    refresh_at: float
    last_used: float

    def current(self, now: float) -> bool:
        return self.this_update <= now + LEEWAY and now <= self.until

    def answer(self, cert: x509.Certificate, now: float) -> Answer | None:
        """What it says about ``cert`` at ``now``: revoked (for good, even when stale), good while current, or
        None (stale: it can vouch for nothing)."""
        source = f"{self.source.kind} {self.source.url}"
        if cert.serial_number in self.revoked:
            return Answer(True, self.until, source)
        if not self.current(now):
            return None
        return Answer(cert.serial_number in self.held, self.until, source)

    def supersedes(self, held: _Entry) -> bool:
        """Whether it may replace ``held``: newer, or as new and revoking at least as much (the same answer)."""
        if self.this_update != held.this_update:
            return self.this_update > held.this_update
        return held.revoked | held.held <= self.revoked | self.held


class _Failed(Exception):
    """No answer from a source; ``counted`` False when the source was not even asked (not its failure)."""

    def __init__(self, message: str, kind: str, *, counted: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.counted = counted


def issuer_id(issuer: x509.Certificate) -> bytes:
    return hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER)).digest()


class OnlineRevocation:
    def __init__(self, fetch: RevocationFetch | None, store: Store | None = None, *, crl_cache_size: int = 100,
                 ocsp_cache_size: int = 10_000, retry_after: float = 10.0, undated_ttl: float = 60.0,
                 recent_use: float = 3 * 3600.0, refresh_interval: float = 5.0, refresh_retry: float = 60.0,
                 send_nonce: bool = False) -> None:
        self.fetch = fetch
        self.store = store
        self.stats = RevocationStats()
        #: Called (from the refresher's or a request's thread, holding no lock) when a newly kept answer revokes
        #: what the one it replaced did not.
        self.on_change: list[Callable[[], None]] = []
        #: How long a failed source is not asked again, and how long a soft-failed identity is kept.
        self.retry_after = retry_after
        self._sizes = {"crl": crl_cache_size, "ocsp": ocsp_cache_size}
        self._undated_ttl = undated_ttl
        # A verified identity is checked again at least hourly (``ChainVerifier``'s ``max_cache_seconds``):
        # an answer in use is seen within that time, so ``recent_use`` must be longer.
        self._recent_use = recent_use
        self._refresh_interval = refresh_interval
        self._refresh_retry = refresh_retry
        self._send_nonce = send_nonce
        self._lock = threading.Lock()
        self._entries: dict[str, OrderedDict[tuple[str, str, bytes, int], _Entry]] = {
            "crl": OrderedDict(), "ocsp": OrderedDict()}
        self._failures: OrderedDict[tuple[str, str, bytes, int], tuple[float, str]] = OrderedDict()
        self._inflight: dict[tuple[str, str, bytes, int], threading.Event] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the request path
    def cached(self, cert: x509.Certificate, issuer: x509.Certificate, ocsp_urls: Iterable[str],
               crl_urls: Iterable[str], now: float) -> list[Answer]:
        """The answers about ``cert`` already in this process: the current ones, and revocations from stale ones;
        no I/O."""
        ident = issuer_id(issuer)
        keys = [("ocsp", u, ident, cert.serial_number) for u in ocsp_urls] + [("crl", u, ident, -1) for u in crl_urls]
        answers: list[Answer] = []
        with self._lock:
            for key in keys:
                entry = self._entries[key[0]].get(key)
                answer = entry.answer(cert, now) if entry is not None else None
                if entry is not None and answer is not None:
                    self._entries[key[0]][key] = replace(entry, last_used=max(entry.last_used, now))
                    answers.append(answer)
        return answers

    def obtain(self, cert: x509.Certificate, issuer: x509.Certificate, ocsp_urls: Iterable[str],
               crl_urls: Iterable[str], now: float, *, timeout: float, max_crl_bytes: int, deadline: float,
               network: bool = True) -> tuple[Answer | None, list[str]]:
        """The first answer about ``cert`` from its OCSP responders, then its CRL distribution points, each
        asked in the store and then over the network until the monotonic ``deadline``: a revocation, or a
        current good; or None and why not. With ``network`` False, raise ``NeedsNetwork`` instead of any I/O."""
        ident = issuer_id(issuer)
        sources = ([_Source("ocsp", u, issuer, ident, cert, timeout, MAX_OCSP_BYTES) for u in ocsp_urls]
                   + [_Source("crl", u, issuer, ident, None, timeout, max_crl_bytes) for u in crl_urls])
        problems: list[str] = []
        pending: list[_Source] = []
        mono = time.monotonic()
        with self._lock:
            for source in sources:
                failure = self._failures.get(source.key)
                if failure is not None and mono < failure[0]:
                    problems.append(f"{failure[1]} (not asked again for {self.retry_after:g} s)")
                else:
                    pending.append(source)
        if pending and not network:
            raise NeedsNetwork()
        for source in pending:
            try:
                entry = self._get(source, now, deadline)
            except _Failed as failed:
                problems.append(str(failed))
                continue
            answer = entry.answer(cert, now)
            if answer is None:
                problems.append(f"{source.url}: the answer is past its nextUpdate")
                continue
            return answer, problems
        return None, problems

    def _get(self, source: _Source, now: float, deadline: float) -> _Entry:
        """The newest entry for ``source``: the current one held, one another request just fetched, the store's,
        or the network's. It may be stale (its revocations still count); a stale one fetched is also recorded
        as the source's failure."""
        key = source.key
        with self._lock:
            held = self._entries[source.kind].get(key)
            if held is not None and held.current(now):
                return held
            waiting = self._inflight.get(key)
            if waiting is None:
                self._inflight[key] = threading.Event()
        if waiting is not None:
            waiting.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                entry = self._entries[source.kind].get(key)
                failure = self._failures.get(key)
            if entry is not None and (held is None or entry.this_update > held.this_update or entry.current(now)):
                return entry  # what the fetch under way brought
            raise _Failed(failure[1] if failure else f"{source.url}: the fetch under way did not end in time",
                          "timeout", counted=False)
        try:
            entry = (self._from_store(source, now, held)
                     or self._from_network(source, now, deadline))
            if not self._keep(replace(entry, last_used=now)):  # before the waiters wake
                raise _Failed(f"{source.url}: the answer (thisUpdate {entry.this_update:.0f}) is older than the one "
                              "already held: not taken (a rollback)", "stale")
            if not entry.current(now):
                self._record_failure(source, _Failed(f"{source.url}: the answer is past its nextUpdate", "stale"))
        except _Failed as failed:
            if failed.counted:
                self._record_failure(source, failed)
            raise
        finally:
            with self._lock:
                done = self._inflight.pop(key)
            done.set()
        return entry

    def _record_failure(self, source: _Source, failed: _Failed) -> None:
        self.stats.failed(source.kind, failed.kind)
        key = source.key
        with self._lock:
            self._failures[key] = (time.monotonic() + self.retry_after, str(failed))
            self._failures.move_to_end(key)
            while len(self._failures) > sum(self._sizes.values()):
                self._failures.popitem(last=False)

    # -- fetching and judging
    def _judge(self, source: _Source, data: bytes, now: float, nonce: bytes | None = None) -> _Entry:
        try:
            if source.cert is None:
                crl = crl_distribution.parse_crl(data)
                this_update, next_update = crl_distribution.verify_crl(crl, source.issuer, now)
                revoked, held = crl_distribution.read_entries(crl)
            else:
                answer = ocsp.verify_response(data, source.cert, source.issuer, now, nonce)
                this_update, next_update = answer.this_update, answer.next_update
                serial = frozenset((source.cert.serial_number,)) if answer.revoked else frozenset()
                revoked, held = (frozenset(), serial) if answer.on_hold else (serial, frozenset())
        except (CrlError, OcspError):
            raise
        except Exception as exc:  # an algorithm or encoding the library refuses (UnsupportedAlgorithm…): unusable
            error = CrlError if source.cert is None else OcspError
            raise error(f"unusable answer: {type(exc).__name__}: {exc}", "malformed") from exc
        until = vouches_until(this_update, next_update, now, self._undated_ttl)
        if until < now:
            refresh_at = now + max(1.0, self._refresh_retry)  # stale already: worth asking again, not at once
        else:
            # Renewed after three quarters of its life, and not sooner than a retry from now.
            refresh_at = max(this_update + 0.75 * (until - this_update),
                             now + min(self._refresh_retry, (until - now) / 2))
        return _Entry(source, revoked, held, this_update, until, refresh_at, now)

    def _from_store(self, source: _Source, now: float, held: _Entry | None) -> _Entry | None:
        """The store's answer for ``source`` if it is current and no older than ``held``; None otherwise."""
        if self.store is None:
            return None
        try:
            data = self.store.get(source.store_key)
        except StoreUnavailable:
            self.stats.failed(source.kind, "store")
            return None
        if data is None:
            return None
        if len(data) > source.max_bytes:
            # Held to the same size limit as the network's answer (another replica's larger limit, or a forgery).
            log.info("revocation: the store's answer for %s (%d bytes) is over the %d-byte limit: not used",
                     source.url, len(data), source.max_bytes)
            return None
        try:
            entry = self._judge(source, data, now)
        except (CrlError, OcspError):
            return None  # not for this issuer, or unusable: the network may have better
        if not entry.current(now) or (held is not None and not entry.supersedes(held)):
            return None  # stale, or older than what this process holds
        self.stats.store_hit(source.kind)
        return entry

    def _from_network(self, source: _Source, now: float, deadline: float) -> _Entry:
        if self.fetch is None:
            raise _Failed(f"{source.url}: no HTTP client to fetch it with", "unavailable")
        problem = _url_problem(source.url)
        if problem:
            raise _Failed(f"{source.url}: {problem}", "unsupported")
        left = deadline - time.monotonic()
        if left < MIN_FETCH_TIME:
            raise _Failed(f"{source.url}: not asked, revocation_timeout spent", "timeout", counted=False)
        timeout = min(source.timeout, left)
        nonce = os.urandom(16) if self._send_nonce and source.cert is not None else None
        self.stats.fetched(source.kind)
        try:
            if source.cert is None:
                data = self.fetch.get(source.url, accept=crl_distribution.CRL_TYPES, timeout=timeout,
                                      max_bytes=source.max_bytes)
            else:
                body = ocsp.build_request(source.cert, source.issuer, nonce)
                data = self.fetch.post(source.url, body, content_type=ocsp.REQUEST_TYPE, accept=ocsp.RESPONSE_TYPE,
                                       timeout=timeout, max_bytes=source.max_bytes)
        except FetchError as exc:
            raise _Failed(str(exc), exc.kind) from exc
        except Exception as exc:  # whatever the transport raises, the answer is not had
            raise _Failed(f"{source.url}: {type(exc).__name__}: {exc}", "transport") from exc
        if len(data) > source.max_bytes:  # a fetch that does not hold to its limit is held to it here
            raise _Failed(f"{source.url}: larger than {source.max_bytes} bytes", "too_large")
        try:
            entry = self._judge(source, data, now, nonce)
        except (CrlError, OcspError) as exc:
            raise _Failed(f"{source.url}: {exc}", exc.kind) from exc
        if self.store is not None and entry.current(now):
            try:
                self.store.put(source.store_key, data, max(1.0, entry.until - now))
            except StoreUnavailable:
                self.stats.failed(source.kind, "store")
        return entry

    def _keep(self, entry: _Entry) -> bool:
        """Keep ``entry`` unless the one held is newer (see ``_Entry.supersedes``); when it revokes what the one it
        replaces did not, call ``on_change``. Whether it was kept."""
        kind, key = entry.source.kind, entry.source.key
        with self._lock:
            entries = self._entries[kind]
            held = entries.get(key)
            if held is not None and not entry.supersedes(held):
                return False
            entries[key] = entry
            entries.move_to_end(key)
            while len(entries) > self._sizes[kind]:
                entries.popitem(last=False)
            self._failures.pop(key, None)
        before = held.revoked | held.held if held is not None else frozenset()
        if not entry.revoked | entry.held <= before:
            for callback in self.on_change:
                callback()
        return True

    # -- the refresher
    def refresh_due(self, now: float) -> int:
        """One pass of the refresher: renew the answers in recent use that are due; return how many were renewed."""
        with self._lock:
            due = [e for entries in self._entries.values() for e in entries.values()
                   if e.refresh_at <= now and e.last_used >= now - self._recent_use]
        renewed = 0
        for entry in due:
            if self._stop.is_set():
                break
            renewed += self._refresh(entry, now)
        return renewed

    def _refresh(self, entry: _Entry, now: float) -> int:
        source = entry.source
        with self._lock:
            if source.key in self._inflight:
                return 0  # a request is fetching it: what it fetches is kept
        try:
            fresh = self._from_store(source, now, entry)
            if fresh is None or fresh.this_update <= entry.this_update:
                fresh = self._from_network(source, now, time.monotonic() + source.timeout)
        except _Failed as failed:
            if failed.counted:
                self.stats.failed(source.kind, failed.kind)
            log.warning("revocation: renewing %s failed: %s", source.url, failed)
            fresh = None
        # Kept only if newer than what is held *now*: a request may have fetched a newer answer meanwhile.
        if fresh is None or fresh.this_update <= entry.this_update \
                or not self._keep(replace(fresh, last_used=entry.last_used)):
            # Nothing newer yet (the CA has not published, or the fetch failed): try again a little later.
            later = now + min(self._refresh_retry, max(1.0, (entry.until - now) / 2))
            with self._lock:
                if self._entries[source.kind].get(source.key) is entry:
                    self._entries[source.kind][source.key] = replace(entry, refresh_at=later)
            return 0
        if not fresh.current(now):
            log.warning("revocation: renewing %s brought an answer past its nextUpdate", source.url)
            return 0
        self.stats.refreshed(source.kind)
        return 1

    def start(self) -> None:
        """Start the refresher's daemon thread (a second start is a no-op)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="pdp-revocation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the refresher and wait (at most ``timeout`` seconds) for its thread to end."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        """Stop the refresher and close the HTTP client."""
        self.stop()
        if self.fetch is not None:
            self.fetch.close()

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_interval):
            try:
                self.refresh_due(time.time())
            except Exception:  # a bug here must not end the refresher; the request path still works without it
                log.exception("revocation: the refresher's pass failed")


def _url_problem(url: str) -> str:
    """Why ``url`` may not be fetched; "" when it may. Credentials in a URL (RFC 3986 §3.2.1 userinfo) would be
    sent to whoever the certificate names, and are deprecated for http(s) anyway (RFC 9110 §4.2.4)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"not a usable URL: {exc}"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "a URL with userinfo (user:password@host) is not fetched"
    return ""
