"""One structured (JSON) log line per decision.

Credentials are never written: a certificate appears as its RFC 8705
thumbprint and SPIFFE ID, a token as its ``jti``, issuer, subject and a
truncated hash; the request path is logged without its query string, and no
header values are logged at all. With ``log.include_input`` a line also holds the policy's input
document, its credentials redacted (``pdp.policy.redaction``); under ``policy.dry_run`` a line says
when the policy would have denied. Those members come with the decision (``members``), never kept here.

As served (``setup_logging``), lines go to standard output through a
``DecisionStream``: written to the stream's buffer on the request's path and
flushed by a background thread at least every ``FLUSH_INTERVAL`` seconds, at
shutdown, and whenever the buffer fills, rather than one system call and one
``LogRecord`` per decision. Every line is kept; none is dropped. Other handlers
(a test's, an application's) get one ``LogRecord`` per decision, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TextIO

from pdp.certificates.identity import CertIdentity
from pdp.credentials.tokens import VerifiedToken
from pdp.decision import Decision
from pdp.request import CheckRequest

logger = logging.getLogger("pdp.decisions")

_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
_ascii: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _json(value: Any) -> str:
    """``value`` as JSON: a string (the usual member) straight through the encoder's own string function."""
    return _ascii(value) if type(value) is str else _dumps(value)


#: A step as the line lists it ('"identity:ok"'), by name and outcome: the same few on every line.
_STEPS: dict[tuple[str, bool], str] = {}


class DecisionLog:
    """Writes one JSON line per decision to the ``pdp.decisions`` logger.

    A line is on the path of every request, so it is written as text: the parts that belong to a
    certificate or a token (the same for every request of a returning client) are encoded once and
    kept, bounded, and the record goes to the logger's handlers without the caller look-up that
    ``logger.info`` makes.
    """

    _KEPT = 4096

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._certs: dict[tuple[str, str], str] = {}
        self._tokens: dict[str, str] = {}

    def writing(self) -> bool:
        """Whether a decision's line is written now (a line's extra members are only worth making then)."""
        return self.enabled and logger.isEnabledFor(logging.INFO)

    def write(self, decision: Decision, request: CheckRequest, identity: CertIdentity | None,
              token: VerifiedToken | None, policy_version: str | None, duration_s: float, members: str = "") -> None:
        """Write the decision's line; ``members`` (JSON text: ``,"name":value``...) are added to it."""
        if self.enabled and logger.isEnabledFor(logging.INFO):
            line = self.line(decision, request, identity, token, policy_version, duration_s, members)
            handlers = logger.handlers
            if len(handlers) == 1 and type(handlers[0]) is DecisionStream and not logger.filters:
                handlers[0].write_line(line)
            else:
                logger.handle(logging.LogRecord(logger.name, logging.INFO, "", 0, line, None, None))

    def line(self, decision: Decision, request: CheckRequest, identity: CertIdentity | None,
             token: VerifiedToken | None, policy_version: str | None, duration_s: float, members: str = "") -> str:
        steps = ",".join([_STEPS.get((s.name, s.ok)) or _step(s.name, s.ok) for s in decision.steps])
        text = (f'{{"ts":{round(request.time, 3)},"decision_id":"{decision.decision_id}",'
                f'"allowed":{"true" if decision.allowed else "false"},"status":{decision.status},'
                f'"reason":{_json(decision.reason)},"message":{_json(decision.message)},'
                f'"request":{{"method":{_json(request.method)},"host":{_json(request.host)},'
                f'"path":{_json(request.path.split("?", 1)[0])},"source":{_json(request.source_address)}}},'
                f'"policy_version":{_json(policy_version)},"steps":[{steps}],'
                f'"duration_us":{round(duration_s * 1e6, 1)}')
        if identity is not None:
            text += ',"cert":' + self._cert(identity)
        if token is not None:
            text += ',"token":' + self._token(token)
        return text + members + "}"

    def _cert(self, identity: CertIdentity) -> str:
        key = (identity.thumbprint, identity.trust_bundle)
        kept = self._certs.get(key)
        if kept is None:
            kept = _dumps({"thumbprint": identity.thumbprint, "spiffe_id": identity.spiffe_id,
                           "subject": identity.subject, "serial": identity.serial})
            _keep(self._certs, key, kept)
        return kept

    def _token(self, token: VerifiedToken) -> str:
        kept = self._tokens.get(token.digest)
        if kept is None:
            kept = _dumps({"iss": token.issuer, "sub": token.claims.get("sub"),
                           "client_id": token.claims.get("client_id"), "jti": token.jti,
                           "digest": token.digest[:16]})
            _keep(self._tokens, token.digest, kept)
        return kept


def _step(name: str, ok: bool) -> str:
    text = _dumps(f"{name}:{'ok' if ok else 'fail'}")
    if len(_STEPS) < 64:  # pdp's own step names: a handful
        _STEPS[name, ok] = text
    return text


def _keep(kept: dict[Any, str], key: Any, text: str) -> None:
    if len(kept) >= DecisionLog._KEPT:
        kept.clear()  # a flood of new clients: start again rather than grow
    kept[key] = text


#: The longest a written decision line waits in the stream's buffer.
FLUSH_INTERVAL = 0.2


class DecisionStream(logging.StreamHandler):  # type: ignore[type-arg]
    """The decision lines' handler as served: a line is written to the stream's buffer, and flushed by a
    background thread within ``FLUSH_INTERVAL`` (and by ``logging.shutdown`` at exit)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))
        self._pending = False
        _Flusher.watch(self)

    def write_line(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line + "\n")
            except Exception:  # a closed or broken stream: as logging does, say so on stderr and go on
                self.handleError(logging.LogRecord("pdp.decisions", logging.INFO, "", 0, line, None, None))
            self._pending = True

    def flush_pending(self) -> None:
        if self._pending:
            with self.lock:  # type: ignore[union-attr]
                self._pending = False
                with contextlib.suppress(OSError, ValueError):  # the stream went away: the next write says so
                    self.flush()


class _Flusher:
    """One daemon thread flushing every ``DecisionStream`` with lines written since the last pass."""

    _streams: ClassVar[weakref.WeakSet[DecisionStream]] = weakref.WeakSet()
    _thread: ClassVar[threading.Thread | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def watch(cls, handler: DecisionStream) -> None:
        with cls._lock:
            cls._streams.add(handler)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._run, name="pdp-decision-log", daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        event = threading.Event()
        while not event.wait(FLUSH_INTERVAL):
            for handler in list(cls._streams):
                handler.flush_pending()


def setup_logging(level: str) -> None:
    """Decision lines (bare JSON) to standard output; everything else to standard error."""
    decisions = logging.getLogger("pdp.decisions")
    if not decisions.handlers:
        decisions.addHandler(DecisionStream(sys.stdout))
    decisions.propagate = False
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
