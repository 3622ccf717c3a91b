"""Prometheus metrics: decisions by result and reason, decision latency, reloads, key refreshes, the
introspection endpoint's refused client authentications and lock-outs, and the shared store's health.

One process keeps its metrics in its own registry. The worker processes of ``pdp serve --workers N``
keep them in prometheus_client's multiprocess mode instead: the parent makes a private folder and
names it in ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers, each worker writes its values
to files of its own there, and a scrape of any worker reads them all, so every scrape counts the
decisions of every worker (those of a worker that died included). The gauges say how to join the
workers' values: the store is as the latest probe by any live worker found it (``livemostrecent``;
a scrape probes first, at most once a second), and the policy versions are those in force at any live
worker (``livemax``; a version no longer in force reads 0).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from pdp import reasons
from pdp.decision import Decision

log = logging.getLogger("pdp")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How many of a policy's own reason codes become labels of ``pdp_decisions_total`` (``Metrics._label``).
POLICY_REASONS = 16
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: The variable prometheus_client reads, when it is first imported, to keep values in files in that folder.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The folder the workers of this ``pdp serve --workers N`` keep their metrics in; None in one process."""
    folder = os.environ.get(MULTIPROCESS_ENV)
    return Path(folder) if folder else None


def forget_process(pid: int, folder: Path) -> None:
    """Drop the gauges of worker ``pid``, which is gone (its counters and histograms still count)."""
    mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._folder = multiprocess_dir()
        if self._folder is not None and not self._folder.is_dir():
            # Removed under the server (a temp-folder cleaner): a worker that cannot write its values must
            # still serve, so it keeps them in memory, as one process does, and says so.
            log.error("the workers' metrics folder %s is gone: this worker's /metrics reports itself only",
                      self._folder)
            values.ValueClass = values.MutexValue
            self._folder = None
        self.decisions = Counter("pdp_decisions", "Decisions made, by result and reason code.",
                                 ["result", "reason"], registry=self.registry)
        self.latency = Histogram(
            "pdp_decision_duration_seconds", "Time to make a decision (CPU in the pipeline).",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry)
        self.reloads = Counter("pdp_reloads", "Reloads of policy, trust bundles and key sets, by outcome.",
                               ["part", "result"], registry=self.registry)
        self.jwks_refresh_failures = Counter("pdp_jwks_refresh_failures", "Failed JWKS fetches, by issuer.",
                                             ["issuer"], registry=self.registry)
        self.untrusted_cert_headers = Counter(
            "pdp_untrusted_cert_headers", "Certificate headers ignored because the peer is not a trusted proxy.",
            registry=self.registry)
        self.introspection_auth_failures = Counter(
            "pdp_introspection_auth_failures",
            "Refused client authentications at the introspection endpoint: 'invalid' credentials, or 'locked' "
            "(refused unseen during a lock-out).", ["result"], registry=self.registry)
        self.introspection_lockouts = Counter(
            "pdp_introspection_lockouts", "Lock-outs after too many failed client secrets, by 'source' or 'client'.",
            ["scope"], registry=self.registry)
        self.policy_info = Gauge("pdp_policy_info", "The policy version in force.", ["version", "engine"],
                                 registry=self.registry, multiprocess_mode="livemax")
        self.store_failures = Counter(
            "pdp_store_failures",
            "Shared-store operations that got no answer, by use: 'probe' (the readiness probe) or "
            "'introspection' (reading or writing a shared introspection answer).", ["use"], registry=self.registry)
        self.store_up = Gauge("pdp_store_up", "1 while the shared store answers the readiness probe, else 0.",
                              registry=self.registry, multiprocess_mode="livemostrecent")
        self.introspection_store_fallbacks = Counter(
            "pdp_introspection_store_fallbacks",
            "Opaque tokens introspected at the authorization server because the shared store did not answer.",
            registry=self.registry)
        self.revocation_soft_fails = Counter(
            "pdp_revocation_soft_fail_allows",
            "Client certificates allowed with their revocation status unknown (a trust bundle's revocation = "
            "\"soft\").", registry=self.registry)
        self.revocation_fetches = Counter(
            "pdp_revocation_fetches", "OCSP requests and CRL fetches sent, by source ('ocsp', 'crl').", ["source"],
            registry=self.registry)
        self.revocation_store_hits = Counter(
            "pdp_revocation_store_hits", "OCSP answers and CRLs taken from the shared store instead of the network.",
            ["source"], registry=self.registry)
        self.revocation_failures = Counter(
            "pdp_revocation_failures", "OCSP answers and CRLs that could not be had, by source and kind.",
            ["source", "kind"], registry=self.registry)
        self.revocation_refreshes = Counter(
            "pdp_revocation_refreshes", "OCSP answers and CRLs renewed in the background, by source.", ["source"],
            registry=self.registry)
        self.revoked = Gauge("pdp_revocation_list_entries", "Entries of pdp's revocation list held by this process.",
                             registry=self.registry, multiprocess_mode="livemostrecent")
        self.revocation_sync_up = Gauge(
            "pdp_revocation_list_store_up", "1 while the revocation list is read from the store, else 0.",
            registry=self.registry, multiprocess_mode="livemin")
        self.identities = Gauge(
            "pdp_client_identities", "Client identities in the inventory, by days to the certificate's notAfter.",
            ["expires_in"], registry=self.registry, multiprocess_mode="livemostrecent")
        self.inventory_dropped = Counter(
            "pdp_inventory_dropped", "New client identities not recorded because the inventory is full.",
            registry=self.registry)
        self.shadow_decisions = Counter(
            "pdp_shadow_decisions",
            "Decisions the shadow policy ([policy.shadow]) answered the 'same' as the enforced one, 'different'ly, "
            "or could not answer ('error': it failed or took longer than policy.shadow.timeout), and decisions not "
            "compared because its queue was full ('skipped').", ["result"], registry=self.registry)
        self.dry_run_allows = Counter(
            "pdp_dry_run_allows", "Requests the policy denied and policy.dry_run let through, by the deny's reason.",
            ["reason"], registry=self.registry)
        self._by_outcome: dict[tuple[bool, str], Any] = {}
        self._policy_reasons: set[str] = set()
        self._synced: dict[tuple[int, tuple[str, ...]], int] = {}
        self._policy: tuple[str, str] | None = None
        # Only among workers: which live worker made how many of the decisions (a ``pid`` label each).
        self.worker_decisions = None if self._folder is None else Gauge(
            "pdp_worker_decisions", "Decisions made by each live worker process of pdp serve --workers N.",
            registry=self.registry, multiprocess_mode="liveall")

    def observe(self, decision: Decision, duration: float) -> None:
        key = (decision.allowed, decision.reason)
        counter = self._by_outcome.get(key)
        if counter is None:  # ``labels()`` looks the child up under a lock: once per outcome is enough
            reason = self._label(decision)
            counter = self.decisions.labels("allow" if decision.allowed else "deny", reason)
            if len(self._by_outcome) < 1024:
                self._by_outcome[key] = counter
        counter.inc()
        self.latency.observe(duration)
        if self.worker_decisions is not None:
            self.worker_decisions.inc()

    def _label(self, decision: Decision) -> str:
        """The ``reason`` label of a decision: pdp's own codes, and the first ``POLICY_REASONS`` codes a
        policy answers (its ``public_path``, ``tenant_suspended``, …). A policy may answer any text as its
        reason (a tenant a caller names), and a label per value would be a series per value, kept for
        ever: past those, a policy's reason counts as ``allowed`` or ``policy_denied`` (the decision log
        keeps the text)."""
        code = decision.reason
        if reasons.is_known(code) or code in self._policy_reasons:
            return code
        if len(self._policy_reasons) < POLICY_REASONS and _CODE.fullmatch(code):
            self._policy_reasons.add(code)
            return code
        return reasons.ALLOWED.code if decision.allowed else reasons.POLICY_DENIED.code

    def shadow_compared(self, result: str) -> None:
        """A shadow policy's answer was compared (``same``, ``different``, ``error``), or not (``skipped``)."""
        self.shadow_decisions.labels(result).inc()

    def dry_run_allowed(self, reason: str) -> None:
        """Dry run allowed a deny of ``reason`` (bounded as ``pdp_decisions_total``'s reasons are)."""
        if not (reasons.is_known(reason) or reason in self._policy_reasons):
            if len(self._policy_reasons) < POLICY_REASONS and _CODE.fullmatch(reason):
                self._policy_reasons.add(reason)
            else:
                reason = reasons.POLICY_DENIED.code
        self.dry_run_allows.labels(reason).inc()

    def set_policy(self, version: str, engine: str) -> None:
        if self._folder is None:
            self.policy_info.clear()
        elif self._policy is not None:
            # A worker's values live in its file, and prometheus_client cannot clear labels there: the
            # version no longer in force reads 0.
            self.policy_info.labels(*self._policy).set(0)
        self.policy_info.labels(version, engine).set(1)
        self._policy = (version, engine)

    def store_probed(self, ok: bool) -> None:
        self.store_up.set(1 if ok else 0)
        if not ok:
            self.store_failures.labels("probe").inc()

    def introspection_store_failed(self, operation: str) -> None:
        """A shared introspection answer could not be read (``read``: the authorization server is asked
        instead) or written (``write``)."""
        self.store_failures.labels("introspection").inc()
        if operation == "read":
            self.introspection_store_fallbacks.inc()

    def sync_revocation(self, snapshot: dict[str, Any]) -> None:
        """Bring the revocation counters up to the running totals in ``snapshot``
        (``pdp.certificates.online_revocation.RevocationStats.snapshot``)."""
        self._add(self.revocation_soft_fails, (), snapshot["soft_fail_allows"])
        for name, counter in (("fetches", self.revocation_fetches), ("store_hits", self.revocation_store_hits),
                              ("refreshes", self.revocation_refreshes)):
            for source, total in snapshot[name].items():
                self._add(counter, (source,), total)
        for (source, kind), total in snapshot["failures"].items():
            self._add(self.revocation_failures, (source, kind), total)

    def set_revocation_list(self, entries: int, store_up: bool) -> None:
        self.revoked.set(entries)
        self.revocation_sync_up.set(1 if store_up else 0)

    def set_inventory(self, counts: dict[str, int] | None, dropped: int) -> None:
        """The inventory's identities by days to expiry (None: not read yet) and its running drop count."""
        if counts is not None:
            for bucket, value in counts.items():
                self.identities.labels(bucket).set(value)
        self._add(self.inventory_dropped, (), dropped)

    def _add(self, counter: Counter, labels: tuple[str, ...], total: int) -> None:
        """Increase ``counter`` (with ``labels``) by what ``total`` grew since the last call."""
        key = (id(counter), labels)
        grown = total - self._synced.get(key, 0)
        if grown > 0:
            (counter.labels(*labels) if labels else counter).inc(grown)
            self._synced[key] = total

    def render(self) -> bytes:
        if self._folder is None:
            return generate_latest(self.registry)
        joined = CollectorRegistry()
        MultiProcessCollector(joined, str(self._folder))  # type: ignore[no-untyped-call]
        return generate_latest(joined)
