"""Opaque access tokens end to end: a real authlib-based authorization server on a loopback port issues a
certificate-bound opaque token to a client over mutual TLS; pdp resolves it by introspection."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from authz_server import AuthorizationServerApp, Client, RunningServer
from conftest import AUDIENCE, check_request
from servers import free_port

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devpki import make_client
from pdp.service.listener_tls import ListenerTls

pytestmark = pytest.mark.integration

AS_ISSUER = "https://as.test"
RS_SECRET = "resource-server-secret"


@pytest.fixture
def make_opaque_pdp(write_setup):
    made = []

    def make(extra: str):
        pdp = build_pdp(load_config(write_setup(extra=extra)), probe=False)
        made.append(pdp)
        return pdp

    yield make
    for pdp in made:
        pdp.close()


@pytest.fixture
def authorization_server(tmp_path, pki):
    server_cert = make_client(pki.intermediate, spiffe_id=None, common_name="as", ips=("127.0.0.1",),
                              client_auth=False)
    (tmp_path / "as.pem").write_bytes(server_cert.pem + pki.intermediate.pem)
    (tmp_path / "as.key").write_bytes(server_cert.key_pem)
    (tmp_path / "as-clients-ca.pem").write_bytes(pki.root.pem + pki.intermediate.pem)
    rs_cert = make_client(pki.intermediate, spiffe_id="spiffe://example.org/pdp", common_name="pdp")
    (tmp_path / "pdp-client.pem").write_bytes(rs_cert.pem + pki.intermediate.pem)
    (tmp_path / "pdp-client.key").write_bytes(rs_cert.key_pem)
    app = AuthorizationServerApp(issuer=AS_ISSUER, audience=AUDIENCE, clients={
        "demo-client": Client("demo-client", spiffe_id="spiffe://example.org/demo/client"),
        "rs-pdp": Client("rs-pdp", secret=RS_SECRET, auth_methods=("client_secret_basic",)),
        "rs-pdp-mtls": Client("rs-pdp-mtls", spiffe_id="spiffe://example.org/pdp", auth_methods=("tls_client_auth",)),
    })
    tls = ListenerTls(cert=tmp_path / "as.pem", key=tmp_path / "as.key", client_ca=tmp_path / "as-clients-ca.pem")
    with RunningServer(app, tls, free_port()) as running:
        yield app, running


def client_token(running: RunningServer, pki, tmp_path: Path, scope: str = "read") -> str:
    """The client credentials grant with tls_client_auth, as the demo client."""
    (tmp_path / "client.pem").write_bytes(pki.client.pem + pki.intermediate.pem)
    (tmp_path / "client.key").write_bytes(pki.client.key_pem)
    ctx = ssl.create_default_context(cadata=pki.root.pem.decode())
    ctx.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    r = httpx.post(f"{running.url}/token", verify=ctx,
                   data={"grant_type": "client_credentials", "client_id": "demo-client", "scope": scope})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def opaque_issuer_toml(running: RunningServer, tmp_path: Path, *, mtls: bool = False) -> str:
    auth = ('introspection_client_id = "rs-pdp-mtls"\nintrospection_auth = "tls_client_auth"\n'
            'introspection_client_cert = "pdp-client.pem"\nintrospection_client_key = "pdp-client.key"\n') if mtls \
        else f'introspection_client_id = "rs-pdp"\nintrospection_client_secret = "{RS_SECRET}"\n'
    return (f'\n[[tokens.issuers]]\nissuer = "{AS_ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
            f'introspection_endpoint = "{running.url}/introspect"\nintrospection_ca = "as-clients-ca.pem"\n{auth}')


@pytest.mark.parametrize("mtls", [False, True], ids=["client_secret_basic", "tls_client_auth"])
def test_a_certificate_bound_opaque_token_is_resolved_by_introspection(make_opaque_pdp, tmp_path, pki,
                                                                       authorization_server, mtls):
    _, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path, mtls=mtls))
    token = client_token(running, pki, tmp_path)
    decision = pdp.decide(check_request(chain=pki.chain(), token=token))
    assert decision.allowed, decision.explanation()
    assert decision.token is not None and decision.token.policy_view["kind"] == "opaque"
    assert decision.token.x5t_s256 == pki.client.thumbprint


def test_the_same_binding_rule_applies_to_the_introspected_cnf(make_opaque_pdp, tmp_path, pki, authorization_server):
    _, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path))
    token = client_token(running, pki, tmp_path)
    decision = pdp.decide(check_request(chain=pki.chain(pki.other), token=token))
    assert (decision.allowed, decision.reason) == (False, "binding_mismatch")


def test_an_unknown_opaque_token_is_inactive_and_the_answer_is_cached_briefly(make_opaque_pdp, tmp_path, pki,
                                                                              authorization_server):
    app, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path))
    for _ in range(3):
        decision = pdp.decide(check_request(chain=pki.chain(), token="no-such-token"))
        assert (decision.allowed, decision.reason) == (False, "token_inactive")
    assert app.introspections == 1


def test_positive_answers_are_cached_and_survive_an_outage(make_opaque_pdp, tmp_path, pki, authorization_server):
    app, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path))
    token = client_token(running, pki, tmp_path)
    assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
    running.stop()
    assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
    assert app.introspections == 1
    fresh = pdp.decide(check_request(chain=pki.chain(), token="never-seen"))
    assert (fresh.allowed, fresh.reason, fresh.status) == (False, "introspection_unavailable", 503)


def test_on_the_event_loop_path_a_cache_miss_needs_the_network(make_opaque_pdp, tmp_path, pki, authorization_server):
    from pdp.errors import NeedsNetwork

    _, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path))
    token = client_token(running, pki, tmp_path)
    with pytest.raises(NeedsNetwork):
        pdp.decide(check_request(chain=pki.chain(), token=token), network=False)
    assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
    assert pdp.decide(check_request(chain=pki.chain(), token=token), network=False).allowed


def test_pdps_introspection_endpoint_passes_the_authorization_servers_cnf_on(write_setup, tmp_path, pki,
                                                                             authorization_server):
    import hashlib

    from servers import serve_pdp

    _, running = authorization_server
    extra = opaque_issuer_toml(running, tmp_path) + (
        f'\n[introspection]\nenabled = true\n[[introspection.clients]]\nclient_id = "orders-api"\n'
        f'secret_sha256 = "{hashlib.sha256(b"x" * 16).hexdigest()}"\n')
    token = client_token(running, pki, tmp_path)
    with serve_pdp(load_config(write_setup(extra=extra))) as (url, _):
        body = httpx.post(f"{url}/oauth2/introspect", data={"token": token}, auth=("orders-api", "x" * 16)).json()
    assert body["active"] is True and body["cnf"] == {"x5t#S256": pki.client.thumbprint}
    assert body["iss"] == AS_ISSUER
