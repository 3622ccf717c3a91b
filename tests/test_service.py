"""Integration tests: the real service on a loopback port, called over HTTP with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import AUDIENCE, Pki, bound_token
from servers import JwksServer, serve_pdp

from pdp.config import load_config
from pdp.devpki import TokenIssuer, make_ca, make_client

pytestmark = pytest.mark.integration


def doc(pki: Pki, token: str | None = None, *, leaf=None, path: str = "/orders", method: str = "GET") -> dict:
    d: dict = {"method": method, "path": path, "host": "api.test", "client_cert": pki.chain_pem(leaf)}
    if token is not None:
        d["headers"] = {"authorization": f"Bearer {token}"}
    return d


def test_check_allows_a_bound_token_on_its_certificate(write_setup, pki, issuer):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", json=doc(pki, bound_token(issuer, pki.client)))
    assert r.status_code == 200
    body = r.json()
    assert body["allowed"] is True, body
    assert body["status"] == 200
    assert body["headers"]["x-pdp-spiffe-id"] == "spiffe://example.org/demo/client"
    assert body["headers"]["x-pdp-decision-id"] == body["decision_id"]
    assert body["headers_to_remove"] == ["authorization", "dpop"]
    assert [s["step"] for s in body["explanation"]["steps"]] == [
        "identity", "credential", "binding", "policy", "decision"]


def test_check_denies_a_token_bound_to_another_certificate(write_setup, pki, issuer):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", json=doc(pki, bound_token(issuer, pki.client), leaf=pki.other))
    assert r.status_code == 200  # the endpoint succeeded; the decision is in the body
    body = r.json()
    assert (body["allowed"], body["status"], body["reason"]) == (False, 401, "binding_mismatch")
    challenge = body["response_headers"]["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge


@pytest.mark.parametrize(("content", "reason", "status"), [
    (b"not json", "request_invalid", 400),
    (b"[1, 2]", "request_invalid", 400),
    (b'{"method": "GET", "path": "/", "surprise": 1}', "request_invalid", 400),
    (b'{"method": 7, "path": "/"}', "request_invalid", 400),
    (b'{"method": "GET", "path": "/", "headers": {"x": {"nested": 1}}}', "request_invalid", 400),
    (b"\xff\xfe\x00garbage", "request_invalid", 400),
    # A lone surrogate is no character: in a member name it once made the answer unwritable (a 500), in a
    # header value it once crashed the policy engine and the whole process.
    (b'{"\\ud800": 1}', "request_invalid", 400),
    (b'{"method": "GET", "path": "/public/x", "headers": {"x-a": "\\ud800"}}', "request_invalid", 200),
])
def test_unreadable_request_documents_get_a_deny_document(write_setup, content, reason, status):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    body = r.json()
    assert body["allowed"] is False and body["reason"] == reason and body["decision_id"]


def test_an_oversized_request_document_is_refused(write_setup):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert r.status_code == 413
    assert (r.json()["status"], r.json()["reason"]) == (413, "request_too_large")  # the body agrees


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_check_document_of_another_content_type_is_refused_with_415(write_setup, content_type):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", content=b'{"method": "GET", "path": "/healthz"}',
                       headers={"content-type": content_type})
    assert r.status_code == 415
    assert (r.json()["allowed"], r.json()["status"], r.json()["reason"]) == (False, 415, "request_invalid")


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                          "application/vnd.pdp+json"])
def test_a_check_document_as_json_or_of_no_declared_type_is_read(write_setup, content_type):
    headers = {"content-type": content_type} if content_type else {}
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", content=b'{"method": "GET", "path": "/healthz"}', headers=headers)
    assert r.status_code == 200 and r.json()["reason"] == "public_path"


@pytest.mark.parametrize("cert", [
    "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----\nMIIB\n",
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "hello",
])
def test_garbage_certificates_are_denied_as_malformed(write_setup, pki, issuer, cert):
    with serve_pdp(load_config(write_setup())) as (url, _):
        d = doc(pki, bound_token(issuer, pki.client))
        d["client_cert"] = cert
        r = httpx.post(f"{url}/v1/check", json=d)
    assert r.status_code == 200
    assert (r.json()["allowed"], r.json()["reason"]) == (False, "cert_malformed")


def test_huge_headers_are_denied_not_crashed(write_setup, pki, issuer):
    with serve_pdp(load_config(write_setup())) as (url, _):
        d = doc(pki, bound_token(issuer, pki.client))
        d["headers"]["x-big"] = "a" * 200_000
        r = httpx.post(f"{url}/v1/check", json=d)
    assert r.status_code == 200
    assert (r.json()["allowed"], r.json()["reason"]) == (False, "request_too_large")


def test_health_readiness_and_metrics(write_setup, pki, issuer):
    with serve_pdp(load_config(write_setup())) as (url, service):
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        assert ready.json()["policy_version"] == service.pdp.policy.version
        assert ready.json()["trust_bundles"] == ["example.org"]
        httpx.post(f"{url}/v1/check", json=doc(pki, bound_token(issuer, pki.client)))
        httpx.post(f"{url}/v1/check", json=doc(pki))
        metrics = httpx.get(f"{url}/metrics").text
    assert 'pdp_decisions_total{reason="allowed",result="allow"} 1.0' in metrics
    assert 'pdp_decisions_total{reason="token_required",result="deny"} 1.0' in metrics
    assert "pdp_decision_duration_seconds_bucket" in metrics
    assert f'pdp_policy_info{{engine="regopy",version="{service.pdp.policy.version}"}} 1.0' in metrics


def test_concurrent_checks_each_get_their_own_answer(write_setup, pki, issuer):
    good = bound_token(issuer, pki.client)
    with serve_pdp(load_config(write_setup())) as (url, _), httpx.Client() as client:
        def ask(i: int) -> tuple[int, bool, str]:
            leaf = pki.client if i % 2 == 0 else pki.other
            r = client.post(f"{url}/v1/check", json=doc(pki, good, leaf=leaf))
            return i, r.json()["allowed"], r.json()["reason"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(64)))
    for i, allowed, reason in results:
        assert allowed == (i % 2 == 0), (i, reason)
        assert reason == ("allowed" if i % 2 == 0 else "binding_mismatch")


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true, "reason": "v1"}\n'


def test_a_changed_policy_is_reloaded_and_a_broken_one_refused(write_setup, tmp_path, pki, issuer):
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "p.rego").write_text(ALLOW_ALL)
    config = load_config(write_setup(policy_paths=["policy"], reload_interval=0.1))
    token = bound_token(issuer, pki.client)
    with serve_pdp(config) as (url, service):
        first = service.pdp.policy.version
        assert httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["reason"] == "v1"

        (policy_dir / "p.rego").write_text(ALLOW_ALL.replace('"v1"', '"v2"'))
        assert _wait(lambda: service.pdp.policy.version != first)
        assert httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["reason"] == "v2"
        second = service.pdp.policy.version

        (policy_dir / "p.rego").write_text("package pdp.authz\nresult := {{{ broken")
        assert _wait(lambda: 'pdp_reloads_total{part="policy",result="failed"} 1.0'
                     in httpx.get(f"{url}/metrics").text)
        assert service.pdp.policy.version == second
        assert httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["reason"] == "v2"


def test_a_replaced_trust_bundle_takes_effect_and_a_broken_one_is_refused(write_setup, tmp_path, pki, issuer):
    config = load_config(write_setup(reload_interval=0.1))
    token = bound_token(issuer, pki.client)
    with serve_pdp(config) as (url, _):
        assert httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["allowed"] is True
        (tmp_path / "ca.pem").write_text("not a certificate")
        assert _wait(lambda: 'pdp_reloads_total{part="trust_bundles",result="failed"} 1.0'
                     in httpx.get(f"{url}/metrics").text)
        assert httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["allowed"] is True
        (tmp_path / "ca.pem").write_bytes(make_ca("someone else").pem)
        assert _wait(lambda: httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["reason"]
                     == "cert_untrusted")


def _remote_config(tmp_path: Path, pki: Pki, issuer_url: str, how: str) -> Path:
    (tmp_path / "ca.pem").write_bytes(pki.root.pem)
    source = "discovery = true" if how == "discovery" else f'jwks_url = "{issuer_url}/jwks.json"'
    path = tmp_path / "pdp.toml"
    path.write_text(f"""
[server]
reload_interval = 0
grpc = "127.0.0.1:0"
[[certificates.trust_bundles]]
name = "example.org"
file = "ca.pem"
[tokens]
require_bound = true
[[tokens.issuers]]
issuer = "{issuer_url}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
{source}
jwks_timeout = 1.0
jwks_min_refresh_interval = 0
""")
    return path


@pytest.mark.parametrize("how", ["jwks_url", "discovery"])
def test_remote_jwks_rotation_and_outage(tmp_path, pki, how):
    with JwksServer() as jwks_server:
        old = TokenIssuer.generate(jwks_server.issuer, kid="old")
        new = TokenIssuer(jwks_server.issuer, TokenIssuer.generate(kid="x").key, "new")
        jwks_server.jwks = old.jwks
        config = load_config(_remote_config(tmp_path, pki, jwks_server.issuer, how))
        with serve_pdp(config) as (url, _):
            t_old = old.mint(audience=AUDIENCE, bound_to=pki.client)
            assert httpx.post(f"{url}/v1/check", json=doc(pki, t_old)).json()["allowed"] is True

            # Rotation: a token signed with a kid pdp has not seen triggers one refresh.
            jwks_server.jwks = {"keys": [old.jwk, new.jwk]}
            t_new = new.mint(audience=AUDIENCE, bound_to=pki.client)
            assert httpx.post(f"{url}/v1/check", json=doc(pki, t_new)).json()["allowed"] is True

            # Outage: the cached key set keeps working.
            jwks_server.stop()
            fresh = new.mint(audience=AUDIENCE, bound_to=pki.client)
            body = httpx.post(f"{url}/v1/check", json=doc(pki, fresh)).json()
            assert body["allowed"] is True, body


def test_an_issuer_whose_keys_never_loaded_is_jwks_unavailable(tmp_path, pki):
    with JwksServer() as jwks_server:
        jwks_server.fail = True
        iss = TokenIssuer.generate(jwks_server.issuer, kid="k")
        config = load_config(_remote_config(tmp_path, pki, jwks_server.issuer, "jwks_url"))
        with serve_pdp(config) as (url, _):
            body = httpx.post(f"{url}/v1/check",
                              json=doc(pki, iss.mint(audience=AUDIENCE, bound_to=pki.client))).json()
            ready = httpx.get(f"{url}/readyz").json()
    assert (body["allowed"], body["reason"], body["status"]) == (False, "jwks_unavailable", 503)
    assert ready["issuers"][jwks_server.issuer]["keys"] is None
    # Anyone may read /readyz: a fixed text, not the URL nor the HTTP status (those are in the log).
    assert ready["issuers"][jwks_server.issuer]["error"] == "the key set could not be fetched"


def test_unknown_kid_refreshes_are_rate_limited(tmp_path, pki):
    with JwksServer() as jwks_server:
        iss = TokenIssuer.generate(jwks_server.issuer, kid="known")
        jwks_server.jwks = iss.jwks
        path = _remote_config(tmp_path, pki, jwks_server.issuer, "jwks_url")
        path.write_text(path.read_text().replace("jwks_min_refresh_interval = 0",
                                                 "jwks_min_refresh_interval = 60"))
        with serve_pdp(load_config(path)) as (url, _):
            assert _wait(lambda: jwks_server.fetches >= 1)
            stranger = TokenIssuer(jwks_server.issuer, TokenIssuer.generate().key, "unknown")
            for _ in range(5):
                body = httpx.post(f"{url}/v1/check",
                                  json=doc(pki, stranger.mint(audience=AUDIENCE, bound_to=pki.client))).json()
                assert body["reason"] == "token_key_unknown"
    assert jwks_server.fetches == 1


def test_decision_log_lines_are_json_without_credentials(write_setup, pki, issuer, caplog):
    token = bound_token(issuer, pki.client)
    with caplog.at_level("INFO", logger="pdp.decisions"), serve_pdp(load_config(write_setup())) as (url, _):
        decision_id = httpx.post(f"{url}/v1/check", json=doc(pki, token)).json()["decision_id"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pdp.decisions"]
    line = next(entry for entry in lines if entry["decision_id"] == decision_id)
    assert line["cert"]["thumbprint"] == pki.client.thumbprint
    assert line["token"]["jti"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in text and token.split(".")[2] not in text
    assert pki.client.pem.decode().splitlines()[1] not in text


def test_an_evil_trust_domain_is_refused_end_to_end(write_setup, tmp_path, pki, issuer):
    evil_ca = make_ca("evil")
    evil = make_client(evil_ca, spiffe_id="spiffe://example.org/demo/client")
    (tmp_path / "evil.pem").write_bytes(evil_ca.pem)
    path = write_setup(extra='[[certificates.trust_bundles]]\nname = "evil"\nfile = "evil.pem"\n'
                             'trust_domain = "evil.example"\n')
    with serve_pdp(load_config(path)) as (url, _):
        d = {"method": "GET", "path": "/orders", "client_cert": evil.pem.decode(),
             "headers": {"authorization": f"Bearer {bound_token(issuer, evil)}"}}
        body = httpx.post(f"{url}/v1/check", json=d).json()
    # The evil CA is trusted only for evil.example, so it cannot vouch for an example.org SPIFFE ID.
    assert (body["allowed"], body["reason"]) == (False, "cert_untrusted")
