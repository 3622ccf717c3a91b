"""pdp.service.decision_log: one JSON line per decision, written as text on the hot path."""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import bound_token, check_request
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.decision import Decision, Step
from pdp.request import CheckRequest
from pdp.service.decision_log import DecisionLog


def test_a_line_is_the_json_of_every_member(make_pdp: Any, pki: Any, issuer: Any) -> None:
    pdp = make_pdp()
    request = check_request(chain=pki.chain(), token=bound_token(issuer, pki.client), path="/orders?page=2")
    decision = pdp.decide(request)
    line = json.loads(DecisionLog().line(decision, request, decision.identity, decision.token, "v1", 0.0000123))
    assert line == {
        "ts": round(request.time, 3), "decision_id": decision.decision_id, "allowed": True, "status": 200,
        "reason": "allowed", "message": "allowed",
        "request": {"method": "GET", "host": "api.test", "path": "/orders", "source": ""},
        "policy_version": "v1", "steps": [f"{s.name}:{'ok' if s.ok else 'fail'}" for s in decision.steps],
        "duration_us": 12.3,
        "cert": {"thumbprint": pki.client.thumbprint, "spiffe_id": "spiffe://example.org/demo/client",
                 "subject": decision.identity.subject, "serial": decision.identity.serial},
        "token": {"iss": decision.token.issuer, "sub": decision.token.claims.get("sub"),
                  "client_id": decision.token.claims.get("client_id"), "jti": decision.token.jti,
                  "digest": decision.token.digest[:16]},
    }
    assert "Bearer" not in json.dumps(line) and bound_token(issuer, pki.client) not in json.dumps(line)


@settings(max_examples=200, database=None, deadline=None)
@given(text=st.text(), code=st.text(max_size=10))
def test_any_text_makes_a_valid_line(text: str, code: str) -> None:
    """Messages and request parts quote whatever they hold (quotes, control characters, lone surrogates)."""
    request = CheckRequest(method=text[:5], path=f"/{text}?q", host=text, time=time.time(), source_address=text)
    decision = Decision(decision_id="d", allowed=False, status=403, reason=code, message=text,
                        steps=(Step("request", False, text),))
    line = json.loads(DecisionLog().line(decision, request, None, None, None, 0.5))
    assert (line["message"], line["reason"], line["request"]["host"]) == (text, code, text)
    assert line["request"]["path"] == f"/{text}".split("?", 1)[0]
