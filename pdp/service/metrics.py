"""Prometheus metrics: decisions by result and reason, decision latency, reloads, key refreshes, and the
introspection endpoint's refused client authentications and lock-outs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdp.decision import Decision

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
                                 registry=self.registry)

    def observe(self, decision: Decision, duration: float) -> None:
        self.decisions.labels("allow" if decision.allowed else "deny", decision.reason).inc()
        self.latency.observe(duration)

    def set_policy(self, version: str, engine: str) -> None:
        self.policy_info.clear()
        self.policy_info.labels(version, engine).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
