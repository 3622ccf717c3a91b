"""Changing a policy safely: a shadow policy beside the enforced one, dry run, and recorded inputs.

- **Shadow** (``[policy.shadow]``): a second bundle, on the same engine, evaluated on the very input
  document the enforced policy got, once the decision is made, in a process of its own
  (``pdp.policy.shadow_process``): a decision only queues its input, so a slow shadow never slows it.
  It never changes the answer: an error in it (or an evaluation longer than ``policy.shadow.timeout``)
  is counted (``error``) and logged, never raised; a decision that finds the queue full is not compared
  (``skipped``). Outcomes are compared as the caller and the upstream would see them
  (``differences``), the enforced one being the decision actually made; a difference is one JSON line
  on ``pdp.decisions.shadow`` (beside the decision lines) with the decision id, both outcomes (cut to
  a bounded size) and both policy versions. The shadow keeps its own decision cache, keyed on the
  facts *it* reads, so an enforced outcome taken from the enforced policy's cache is still compared.
- **Dry run** (``policy.dry_run``): a deny the policy itself gave becomes an allow, marked in the
  decision's steps (``dry_run``), its log line and its explanation as "would have been denied".
  Only the policy's answer is turned: a credential or request pdp refused never reaches the policy,
  a policy that fails is ``policy_error`` before this module sees it, and a deny whose reason is one
  of pdp's own credential, request or error codes stays a deny. The upstream gets what any allow
  carries from pdp (its ``x-pdp-*`` identity headers, the credentials removed) and nothing of the
  policy's: the headers of a deny were meant for the client.
- **Recorded inputs** (``log.include_input``): the input document, credentials redacted
  (``pdp.policy.redaction``), added to each decision line, for ``pdp policy diff`` to replay.

OPA has the same three ideas (decision logs with ``mask``, ``opa eval`` on recorded inputs); the
comparison here follows opa-envoy-plugin's reading of a result (``pdp.policy.result``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

from pdp import reasons
from pdp.decision import Decision, Step
from pdp.policy.engine import PolicyEngine
from pdp.policy.redaction import REDACTED, redacted_input
from pdp.policy.result import PolicyOutcome
from pdp.policy.shadow_process import QUEUE_SIZE, ShadowProcess

if TYPE_CHECKING:
    from pdp.request import CheckRequest
    from pdp.service.decision_log import DecisionLog

__all__ = ["DIFFERENT", "ERROR", "REDACTED", "SAME", "SKIPPED", "Reviewed", "Trial", "TrialObserver", "deny_of",
           "differences", "dry_run_allows", "redacted_input", "summary"]

log = logging.getLogger("pdp.decisions.shadow")

_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode

#: A deny with one of these reasons is never turned into an allow by dry run, whoever gave it: pdp's
#: codes for a credential, a request or a failure (the policy runs after every credential check, so
#: it gives these only to say the same thing, and "invalid credentials are always refused").
_POLICY_REASONS = frozenset({reasons.POLICY_DENIED.code, reasons.TOKEN_REQUIRED.code, reasons.CERT_REQUIRED.code,
                             reasons.SCOPE_INSUFFICIENT.code, reasons.SPIFFE_ID_DENIED.code})

#: Shadow results, the values of the ``result`` label of ``pdp_shadow_decisions_total`` (``skipped``: the
#: shadow's queue was full, the decision was not compared).
SAME, DIFFERENT, ERROR, SKIPPED = "same", "different", "error", "skipped"


class TrialObserver(Protocol):
    """Where the counts go (``pdp.service.metrics.Metrics``)."""

    def shadow_compared(self, result: str) -> None: ...

    def dry_run_allowed(self, reason: str) -> None: ...


def deny_of(outcome: PolicyOutcome) -> tuple[str, int]:
    """The reason code and status a policy deny becomes (as ``Pdp._decision`` renders it)."""
    reason = reasons.by_code(outcome.reason or reasons.POLICY_DENIED.code)
    if reason.status < 400:
        reason = reasons.POLICY_DENIED
    code = outcome.reason if outcome.reason and reason.status >= 400 else reason.code
    status = outcome.http_status if outcome.http_status and outcome.http_status >= 400 else reason.status
    return code, status


def summary(outcome: PolicyOutcome) -> dict[str, Any]:
    """What a caller and an upstream get from ``outcome``: the members ``differences`` compares."""
    if not outcome.allowed:
        code, status = deny_of(outcome)
        return {"allowed": False, "reason": code, "status": status,
                "headers": sorted({**outcome.headers, **outcome.response_headers}.items())
                + sorted(outcome.more_headers + outcome.more_response_headers),
                "body": outcome.body, "scope": outcome.scope}
    return {"allowed": True, "reason": outcome.reason or reasons.ALLOWED.code, "status": 200,
            "headers": sorted(outcome.headers.items()) + sorted(outcome.more_headers),
            "response_headers": sorted(outcome.response_headers.items()) + sorted(outcome.more_response_headers),
            "headers_to_remove": sorted(outcome.headers_to_remove),
            "query_to_set": list(outcome.query_to_set), "query_to_remove": sorted(outcome.query_to_remove)}


def differences(old: PolicyOutcome, new: PolicyOutcome) -> list[str]:
    """The members of the two outcomes' summaries that differ: ``[]`` when a caller and an upstream
    could not tell them apart. Dynamic metadata is left out (it reaches neither)."""
    if old == new:
        return []
    a, b = summary(old), summary(new)
    if a["allowed"] != b["allowed"]:
        return ["allowed"]
    return [k for k in a if a[k] != b.get(k)]


def dry_run_allows(outcome: PolicyOutcome) -> bool:
    """Whether dry run turns this deny into an allow: a policy's own reason, not a pdp code of a
    credential, request or failure."""
    code, _ = deny_of(outcome)
    return code in _POLICY_REASONS or not reasons.is_known(code)


@dataclass(frozen=True, slots=True)
class Reviewed(PolicyOutcome):
    """The outcome the decision goes on with, plus what the trial saw on the way."""

    input: Mapping[str, Any] | None = None
    policy_version: str = ""
    #: The enforced outcome, when dry run turned its deny into this allow.
    would_deny: PolicyOutcome | None = None


_OUTCOME_FIELDS = tuple(f.name for f in fields(PolicyOutcome))


def _reviewed(outcome: PolicyOutcome, **extra: Any) -> Reviewed:
    return Reviewed(**{name: getattr(outcome, name) for name in _OUTCOME_FIELDS}, **extra)


@dataclass(frozen=True, slots=True)
class _Compared:
    """What the comparison of one decision needs once the shadow has answered."""

    decision_id: str
    time: float
    method: str
    host: str
    path: str
    enforced: PolicyOutcome
    policy_version: str


class Trial:
    """The shadow policy, dry run and input recording of one ``Pdp`` (``Pdp.trial``; None when all
    are off, which costs a decision an attribute check in its policy and record steps). ``shadow`` is
    replaced whole on reload; its evaluations run in a process of their own (``ShadowProcess``)."""

    def __init__(self, *, shadow: PolicyEngine | None = None, dry_run: bool = False,
                 decision_log: DecisionLog | None = None, include_input: bool = False,
                 observer: TrialObserver | None = None, shadow_timeout: float = 1.0,
                 shadow_queue: int = QUEUE_SIZE, shadow_cache_size: int = 0,
                 redact_headers: tuple[str, ...] = ()) -> None:
        self.dry_run = dry_run
        self.decision_log = decision_log
        self.include_input = include_input
        self.observer = observer
        #: Further header names whose values a recorded input never holds (``log.redact_headers``).
        self.redact_headers = redact_headers
        self._timeout, self._queue_size, self._cache_size = shadow_timeout, shadow_queue, shadow_cache_size
        self._shadow: PolicyEngine | None = None
        self._process: ShadowProcess | None = None
        self.shadow = shadow

    @property
    def shadow(self) -> PolicyEngine | None:
        """The shadow policy in force (its version; the evaluations are its process's)."""
        return self._shadow

    @shadow.setter
    def shadow(self, engine: PolicyEngine | None) -> None:
        if engine is None:
            if self._process is not None:
                self._process.close()
            self._process = None
        elif self._process is None:
            self._process = ShadowProcess(engine, self._compared, timeout=self._timeout,
                                          queue_size=self._queue_size, cache_size=self._cache_size)
        else:
            self._process.engine = engine  # its next input gets a process for this version
        self._shadow = engine

    @property
    def shadow_process(self) -> ShadowProcess | None:
        return self._process

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the shadow has answered every queued input (False if it has not after ``timeout``)."""
        return self._process.drain(timeout) if self._process is not None else True

    def close(self) -> None:
        """Stop the shadow's process (``Pdp.close``)."""
        if self._process is not None:
            self._process.close()

    def review(self, doc: dict[str, Any], outcome: PolicyOutcome, policy_version: str,
               steps: list[Step]) -> PolicyOutcome:
        """After the policy step (``Pdp._policy``): under dry run turn a policy deny into an allow (with a
        ``dry_run`` step saying what it would have been); keep ``doc`` for the shadow and the log line."""
        if self._shadow is None and not self.include_input and (outcome.allowed or not self.dry_run):
            return outcome  # nothing to compare, record or turn: the decision goes on as without a trial
        if self.dry_run and not outcome.allowed and dry_run_allows(outcome):
            code, status = deny_of(outcome)
            steps.append(Step("dry_run", False, f"would have been denied ({code}, {status}); allowed because "
                                                f"policy.dry_run = true"))
            return Reviewed(allowed=True, reason=code, input=doc, policy_version=policy_version, would_deny=outcome)
        return _reviewed(outcome, input=doc, policy_version=policy_version)

    def decided(self, decision: Decision, request: CheckRequest, outcome: PolicyOutcome) -> str:
        """Once the decision is made (``Pdp._record``): queue the shadow's comparison with the decision
        actually made, count the dry-run allow, and return the members this decision's line adds
        (JSON text, ``,"name":value``...). Never raises."""
        if not isinstance(outcome, Reviewed):
            return ""
        try:
            return self._decided(decision, request, outcome)
        except Exception:  # the trial must never cost the decision more than its own work
            log.exception("recording the shadow or dry run of decision %s failed", decision.decision_id)
            return ""

    def _decided(self, decision: Decision, request: CheckRequest, outcome: Reviewed) -> str:
        observer = self.observer
        process = self._process
        if process is not None and outcome.input is not None:
            enforced: PolicyOutcome = outcome.would_deny or outcome
            if outcome.allowed and not decision.allowed:
                # pdp refused what the policy allowed (a query change this entry point cannot make): the
                # shadow is compared with that deny, the answer the caller got.
                enforced = PolicyOutcome(allowed=False, reason=decision.reason, http_status=decision.status)
            compared = _Compared(decision.decision_id, request.time, request.method, request.host,
                                 request.path.split("?", 1)[0], enforced, outcome.policy_version)
            if not process.submit(outcome.input, compared) and observer is not None:
                observer.shadow_compared(SKIPPED)
        members = ""
        if outcome.would_deny is not None and decision.allowed:
            code, status = deny_of(outcome.would_deny)
            if observer is not None:
                observer.dry_run_allowed(code)
            members += f',"dry_run":{{"would_have_been_denied":true,"reason":{_dumps(code)},"status":{status}}}'
        if self.include_input and outcome.input is not None and self.decision_log is not None \
                and self.decision_log.writing():
            members += ',"input":' + _dumps(redacted_input(outcome.input, self.redact_headers))
        return members

    def _compared(self, compared: _Compared, shadow: PolicyOutcome | str, version: str) -> None:
        """The shadow's answer for one decision (in the shadow's thread): count it, log a difference."""
        if isinstance(shadow, str):
            result, differs = ERROR, ["error"]
        else:
            differs = differences(compared.enforced, shadow)
            result = DIFFERENT if differs else SAME
        if self.observer is not None:
            self.observer.shadow_compared(result)
        if differs:
            log.info("%s", shadow_line(compared, shadow, version, result, differs))


#: At most this many headers (or query changes) of each kind are logged of a shadow line's outcome ...
MAX_LOGGED_ITEMS = 50
#: ... each name and value cut at this many characters ...
MAX_LOGGED_TEXT = 256
#: ... and the body at this many: a line says ``"truncated": true`` when something was cut.
MAX_LOGGED_BODY = 1024


def _cut(value: Any, limit: int = MAX_LOGGED_TEXT) -> tuple[Any, bool]:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit], True
    if isinstance(value, tuple | list):
        cut = [_cut(v, limit) for v in value]
        return [v for v, _ in cut], any(c for _, c in cut)
    return value, False


def _side(outcome: PolicyOutcome | str, version: str) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"policy_version": version, "error": outcome}
    side: dict[str, Any] = {"policy_version": version}
    truncated = False
    for name, value in summary(outcome).items():
        if isinstance(value, list) and len(value) > MAX_LOGGED_ITEMS:
            value, truncated = value[:MAX_LOGGED_ITEMS], True
        value, cut = _cut(value, MAX_LOGGED_BODY if name == "body" else MAX_LOGGED_TEXT)
        side[name] = value
        truncated = truncated or cut
    if truncated:
        side["truncated"] = True
    return side


def shadow_line(compared: _Compared, shadow: PolicyOutcome | str, shadow_version: str, result: str,
                differs: list[str]) -> str:
    """One JSON line: the decision, both outcomes and both versions (no credentials: the summaries hold
    the policies' answers, cut to a bounded size, and the request only its method, host and path
    without the query)."""
    return _dumps({
        "ts": round(compared.time, 3), "decision_id": compared.decision_id, "shadow": result, "differs": differs,
        "request": {"method": compared.method, "host": compared.host, "path": compared.path},
        "enforced": _side(compared.enforced, compared.policy_version),
        "shadow_policy": _side(shadow, shadow_version),
    })
