"""pdp.service.decision_log: one JSON line per decision, written as text on the hot path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import time
from collections.abc import Iterator
from typing import Any

from conftest import bound_token, check_request
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.decision import Decision, Step
from pdp.request import CheckRequest
from pdp.service.decision_log import FLUSH_INTERVAL, DecisionLog, DecisionStream


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


@contextlib.contextmanager
def _decision_lines(handler: logging.Handler) -> Iterator[None]:
    logger = logging.getLogger("pdp.decisions")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])


def _read_lines(fd: int, count: int, deadline: float) -> list[str]:
    data = b""
    while data.count(b"\n") < count and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            data += os.read(fd, 65536)
    return data.decode().splitlines()


def test_served_lines_reach_the_stream_without_further_traffic(make_pdp: Any, pki: Any, issuer: Any) -> None:
    """As served, a line is written to the buffer and the flusher delivers it within FLUSH_INTERVAL: the
    last decisions before a quiet spell are not left waiting for the next one."""
    read, write = os.pipe()
    stream = os.fdopen(write, "w")  # a pipe, as standard output is in a container: block-buffered
    handler = DecisionStream(stream)
    pdp = make_pdp()
    try:
        with _decision_lines(handler):
            decisions = [pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
                         for _ in range(3)]
            lines = _read_lines(read, 3, time.monotonic() + 20 * FLUSH_INTERVAL + 5)
    finally:
        stream.close()
        os.close(read)
    assert [json.loads(line)["decision_id"] for line in lines] == [d.decision_id for d in decisions]


def test_every_served_line_is_kept_and_the_rest_is_flushed_at_shutdown(make_pdp: Any, tmp_path: Any) -> None:
    pdp = make_pdp()
    path = tmp_path / "decisions.log"
    with path.open("w") as stream:
        handler = DecisionStream(stream)
        with _decision_lines(handler):
            decisions = [pdp.decide(check_request(path=f"/x/{i}")) for i in range(2000)]
        handler.flush()  # what logging.shutdown does at exit
        ids = [json.loads(line)["decision_id"] for line in path.read_text().splitlines()]
    assert ids == [d.decision_id for d in decisions]


def test_other_handlers_get_one_record_per_decision(make_pdp: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="pdp.decisions")
    decision = make_pdp().decide(check_request())
    records = [r for r in caplog.records if r.name == "pdp.decisions"]
    assert [json.loads(r.getMessage())["decision_id"] for r in records] == [decision.decision_id]
