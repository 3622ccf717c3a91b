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


def log_record(decision: Decision, request: CheckRequest, identity: CertIdentity | None,
               token: VerifiedToken | None, policy_version: str | None, duration_s: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "ts": round(request.time, 3),
        "decision_id": decision.decision_id,
        "allowed": decision.allowed,
        "status": decision.status,
        "reason": decision.reason,
        "message": decision.message,
        "request": {
            "method": request.method,
            "host": request.host,
            "path": request.path.split("?", 1)[0],
            "source": request.source_address,
        },
        "policy_version": policy_version,
        "steps": [f"{s.name}:{'ok' if s.ok else 'fail'}" for s in decision.steps],
        "duration_us": round(duration_s * 1e6, 1),
    }
    if identity is not None:
        record["cert"] = {"thumbprint": identity.thumbprint, "spiffe_id": identity.spiffe_id,
                          "subject": identity.subject, "serial": identity.serial}
    if token is not None:
        record["token"] = {"iss": token.issuer, "sub": token.claims.get("sub"),
                           "client_id": token.claims.get("client_id"), "jti": token.jti,
                           "digest": token.digest[:16]}
    return record


class DecisionLog:
    """Writes decision records to the ``pdp.decisions`` logger as JSON."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled and logger.isEnabledFor(logging.INFO):
            logger.info(json.dumps(record, separators=(",", ":"), default=str))


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
