"""policy.dry_run: a deny of the policy is let through and said loudly; nothing else ever is."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import bound_token, check_request
from policy_trials import CONFLICTING, ENFORCED, lines_of, with_policy_keys, write_policy
from servers import free_port, wait_for

from pdp.assemble import build_pdp
from pdp.cli import main
from pdp.config import load_config
from pdp.devpki import TokenIssuer, make_ca, make_client
from pdp.service.server import Service

PDP = str(Path(sys.executable).parent / "pdp")


def _config(write_setup: Any, tmp_path: Path, policy: str = ENFORCED) -> Path:
    folder = write_policy(tmp_path / "enforced", policy)
    return with_policy_keys(write_setup(engine="regorus", policy_paths=[str(folder)]), "dry_run = true")


def _dry_run_allows(service: Service, reason: str) -> float:
    for line in service.metrics.render().decode().splitlines():
        if line.startswith(f'pdp_dry_run_allows_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_policy_deny_is_allowed_logged_and_counted(write_setup: Any, tmp_path: Path, pki: Any,
                                                     issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path)))
    try:
        with lines_of("pdp.decisions") as lines:
            decision = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client),
                                                        path="/closed"))
        assert decision.allowed and decision.status == 200 and decision.reason == "orders_closed"
        step = next(s for s in decision.steps if s.name == "dry_run")
        assert not step.ok and "would have been denied (orders_closed, 403)" in step.detail
        # The upstream gets what pdp vouches for, nothing of the deny (its header was meant for the client).
        assert decision.headers["x-pdp-subject"] == "demo-user" and "x-why" not in decision.headers
        assert "x-why" not in decision.response_headers and "authorization" in decision.headers_to_remove
        line = json.loads(lines[0])
        assert line["decision_id"] == decision.decision_id and line["allowed"] is True
        assert line["dry_run"] == {"would_have_been_denied": True, "reason": "orders_closed", "status": 403}
        assert "dry_run:fail" in line["steps"]
        assert _dry_run_allows(service, "orders_closed") == 1

        plain = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client),
                                                 path="/elsewhere"))
        assert plain.allowed and plain.reason == "policy_denied" and _dry_run_allows(service, "policy_denied") == 1
        allowed = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert allowed.headers["x-tier"] == "gold" and not any(s.name == "dry_run" for s in allowed.steps)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def strangers() -> dict[str, Any]:
    """A CA nobody trusts, its client, and an issuer whose key pdp does not know."""
    ca = make_ca("stranger root")
    return {"client": make_client(ca, spiffe_id="spiffe://example.org/demo/client"),
            "issuer": TokenIssuer.generate("https://issuer.test", kid="k1")}


@pytest.mark.parametrize("case, reason", [
    ("expired token", "token_expired"),
    ("token bound to another certificate", "binding_mismatch"),
    ("untrusted certificate", "cert_untrusted"),
    ("malformed token", "token_malformed"),
    ("forged signature", "token_signature_invalid"),
    ("wrong audience", "token_audience_invalid"),
    ("dot segments", "request_invalid"),
])
def test_dry_run_never_allows_an_invalid_credential_or_request(write_setup: Any, tmp_path: Path, pki: Any,
                                                               issuer: Any, strangers: dict[str, Any], case: str,
                                                               reason: str) -> None:
    pdp = build_pdp(load_config(_config(write_setup, tmp_path)), probe=False)
    chain, token, path = pki.chain(), bound_token(issuer, pki.client), "/closed"
    if case == "expired token":
        token = bound_token(issuer, pki.client, now=time.time() - 7200)
    elif case == "token bound to another certificate":
        chain = pki.chain(pki.other)
    elif case == "untrusted certificate":
        chain = (strangers["client"].der,)
    elif case == "malformed token":
        token = "not a token"
    elif case == "forged signature":
        token = bound_token(strangers["issuer"], pki.client)
    elif case == "wrong audience":
        token = bound_token(issuer, pki.client, audience="https://elsewhere.test")
    elif case == "dot segments":
        path = "/orders/../closed"
    decision = pdp.decide(check_request(chain=chain, token=token, path=path))
    assert not decision.allowed and decision.reason == reason
    assert not any(s.name == "dry_run" for s in decision.steps)


def test_dry_run_never_allows_a_policy_that_fails(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    pdp = build_pdp(load_config(_config(write_setup, tmp_path, policy=CONFLICTING)), probe=False)
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert not decision.allowed and decision.reason == "policy_error"


def test_a_policy_deny_naming_a_credential_reason_stays_a_deny(write_setup: Any, tmp_path: Path, pki: Any,
                                                               issuer: Any) -> None:
    pdp = build_pdp(load_config(_config(write_setup, tmp_path)), probe=False)
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client),
                                        path="/revoked-by-policy"))
    assert not decision.allowed and decision.reason == "token_revoked"


def test_a_warning_at_start_and_on_every_reload(write_setup: Any, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdp")
    service = Service(load_config(_config(write_setup, tmp_path)))
    try:
        said = [r for r in caplog.records if "policy.dry_run is on" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        service.reloader.check(force=True)
        assert len([r for r in caplog.records if "policy.dry_run is on" in r.getMessage()]) == 2
    finally:
        service.stop()


def test_pdp_check_explain_says_dry_run(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # `pdp check` turns the decision lines off, in this process: on again after this test.
    monkeypatch.setattr(logging.getLogger("pdp.decisions"), "disabled", False)
    config = _config(write_setup, tmp_path)
    (tmp_path / "client.pem").write_text(pki.chain_pem())
    (tmp_path / "token.jwt").write_text(bound_token(issuer, pki.client))
    code = main(["check", "--config", str(config), "--cert", str(tmp_path / "client.pem"), "--token",
                 str(tmp_path / "token.jwt"), "--path", "/closed", "--explain"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("ALLOW 200 orders_closed")
    assert "FAIL dry_run" in out and "DRY RUN (policy.dry_run = true)" in out


def test_a_served_pdp_in_dry_run_says_so_loudly(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    """`pdp serve`: a warning at start, `"dry_run": true` in /readyz, and the decision line."""
    config = _config(write_setup, tmp_path)
    port = free_port()
    server = subprocess.Popen([PDP, "serve", "--config", str(config), "--http", f"127.0.0.1:{port}", "--grpc", ""],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/healthz")
        assert httpx.get(f"{base}/readyz").json()["dry_run"] is True
        answer = httpx.post(f"{base}/v1/check", json={
            "method": "GET", "path": "/closed", "host": "api.test", "client_cert": pki.chain_pem(),
            "headers": {"authorization": f"Bearer {bound_token(issuer, pki.client)}"}}).json()
        assert answer["allowed"] is True and answer["reason"] == "orders_closed"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert "WARNING" in err.decode() and "policy.dry_run is on" in err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if '"decision_id"' in line]
    assert [line["dry_run"]["would_have_been_denied"] for line in lines] == [True]
