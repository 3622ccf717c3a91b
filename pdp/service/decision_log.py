"""One structured (JSON) log line per decision.

Credentials are never written: a certificate appears as its RFC 8705
thumbprint and SPIFFE ID, a token as its ``jti``, issuer, subject and a
truncated hash; the request path is logged without its query string, and no
header values are logged at all.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from pdp.certificates.identity import CertIdentity
from pdp.credentials.tokens import VerifiedToken
from pdp.decision import Decision
from pdp.request import CheckRequest

logger = logging.getLogger("pdp.decisions")

_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


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

    def write(self, decision: Decision, request: CheckRequest, identity: CertIdentity | None,
              token: VerifiedToken | None, policy_version: str | None, duration_s: float) -> None:
        if self.enabled and logger.isEnabledFor(logging.INFO):
            line = self.line(decision, request, identity, token, policy_version, duration_s)
            logger.handle(logging.LogRecord(logger.name, logging.INFO, "", 0, line, None, None))

    def line(self, decision: Decision, request: CheckRequest, identity: CertIdentity | None,
             token: VerifiedToken | None, policy_version: str | None, duration_s: float) -> str:
        steps = ",".join(f'"{s.name}:{"ok" if s.ok else "fail"}"' for s in decision.steps)
        text = (f'{{"ts":{round(request.time, 3)},"decision_id":"{decision.decision_id}",'
                f'"allowed":{"true" if decision.allowed else "false"},"status":{decision.status},'
                f'"reason":{_dumps(decision.reason)},"message":{_dumps(decision.message)},'
                f'"request":{{"method":{_dumps(request.method)},"host":{_dumps(request.host)},'
                f'"path":{_dumps(request.path.split("?", 1)[0])},"source":{_dumps(request.source_address)}}},'
                f'"policy_version":{_dumps(policy_version)},"steps":[{steps}],'
                f'"duration_us":{round(duration_s * 1e6, 1)}')
        if identity is not None:
            text += ',"cert":' + self._cert(identity)
        if token is not None:
            text += ',"token":' + self._token(token)
        return text + "}"

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


def _keep(kept: dict[Any, str], key: Any, text: str) -> None:
    if len(kept) >= DecisionLog._KEPT:
        kept.clear()  # a flood of new clients: start again rather than grow
    kept[key] = text


def setup_logging(level: str) -> None:
    """Decision lines (bare JSON) to standard output; everything else to standard error."""
    decisions = logging.getLogger("pdp.decisions")
    if not decisions.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        decisions.addHandler(handler)
    decisions.propagate = False
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
