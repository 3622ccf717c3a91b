"""pdp's own listeners over mutual TLS, with an allowlist of the gateways that may ask for decisions."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import bound_token
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from servers import serve_pdp
from test_envoy_grpc import envoy_request

from pdp.config import load_config
from pdp.devpki import Issued, make_ca, make_client
from pdp.errors import ConfigError

pytestmark = pytest.mark.integration

GATEWAY_ID = "spiffe://example.org/gateway"


@pytest.fixture(scope="module")
def gateway_pki():
    ca = make_ca("gateway CA")
    return {
        "ca": ca,
        "server": make_client(ca, spiffe_id=None, common_name="pdp", dns=("localhost",), ips=("127.0.0.1",),
                              client_auth=False),
        "gateway": make_client(ca, spiffe_id=GATEWAY_ID, common_name="envoy"),
        "stranger": make_client(ca, spiffe_id="spiffe://example.org/stranger", common_name="stranger"),
        "dns_gateway": make_client(ca, spiffe_id=None, common_name="nginx", dns=("nginx.example.org",)),
    }


def write(path: Path, issued: Issued) -> tuple[str, str]:
    (path.with_suffix(".pem")).write_bytes(issued.pem)
    (path.with_suffix(".key")).write_bytes(issued.key_pem)
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@pytest.fixture
def tls_setup(write_setup, tmp_path, gateway_pki):
    write(tmp_path / "server", gateway_pki["server"])
    (tmp_path / "gateway-ca.pem").write_bytes(gateway_pki["ca"].pem)

    def setup(allowed: str = f'["{GATEWAY_ID}", "dns:nginx.example.org"]') -> Path:
        return _with_tls(write_setup(), allowed)

    return setup


def _with_tls(path: Path, allowed: str) -> Path:
    text = path.read_text()
    tls = (f'\n[server.tls]\ncert = "server.pem"\nkey = "server.key"\nclient_ca = "gateway-ca.pem"\n'
           f"allowed_callers = {allowed}\n")
    # [server.tls] must follow the [server] keys: put it right before [policy].
    text = text.replace("\n[policy]", tls + "\n[policy]", 1)
    path.write_text(text)
    return path


def client_context(gateway_pki, tmp_path, who: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None)
    ctx.load_verify_locations(cadata=gateway_pki["ca"].pem.decode())
    cert, key = write(tmp_path / who, gateway_pki[who])
    ctx.load_cert_chain(cert, key)
    return ctx


def test_an_allowed_gateway_gets_decisions_over_https(tls_setup, tmp_path, gateway_pki, pki, issuer):
    with serve_pdp(load_config(tls_setup())) as (url, _):
        assert url.startswith("https://")
        for who in ("gateway", "dns_gateway"):
            with httpx.Client(verify=client_context(gateway_pki, tmp_path, who)) as client:
                body = client.post(f"{url}/v1/check", json={
                    "method": "GET", "path": "/orders", "client_cert": pki.chain_pem(),
                    "headers": {"authorization": f"Bearer {bound_token(issuer, pki.client)}"}}).json()
            assert body["allowed"] is True, (who, body)


def test_a_caller_outside_the_allowlist_gets_403_before_any_decision(tls_setup, tmp_path, gateway_pki):
    with serve_pdp(load_config(tls_setup())) as (url, service), \
            httpx.Client(verify=client_context(gateway_pki, tmp_path, "stranger")) as client:
        r = client.post(f"{url}/v1/check", json={"method": "GET", "path": "/healthz"})
        metrics = service.metrics.render().decode()
    assert r.status_code == 403 and r.json()["reason"] == "caller_not_allowed"
    assert "pdp_decisions_total{" not in metrics  # no decision was made


def test_a_caller_without_a_certificate_cannot_connect(tls_setup, gateway_pki):
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=gateway_pki["ca"].pem.decode())
    with serve_pdp(load_config(tls_setup())) as (url, _), httpx.Client(verify=ctx) as client:
        with pytest.raises(httpx.HTTPError):
            client.get(f"{url}/healthz")


def _grpc_channel(url_port: int, gateway_pki, who: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=gateway_pki["ca"].pem,
                                         private_key=gateway_pki[who].key_pem,
                                         certificate_chain=gateway_pki[who].pem)
    return grpc.secure_channel(f"127.0.0.1:{url_port}", creds)


def test_grpc_over_mtls_admits_the_gateway_and_refuses_a_stranger(tls_setup, gateway_pki, pki, issuer):
    with serve_pdp(load_config(tls_setup())) as (_, service):
        port = service.grpc.port
        with _grpc_channel(port, gateway_pki, "gateway") as channel:
            ok = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                envoy_request(pki, bound_token(issuer, pki.client)))
        assert ok.status.code == code_pb2.OK
        with _grpc_channel(port, gateway_pki, "stranger") as channel:
            with pytest.raises(grpc.RpcError) as err:
                external_auth_pb2_grpc.AuthorizationStub(channel).Check(envoy_request(pki))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tls_config_errors_name_the_key(write_setup, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_with_tls(write_setup(), '["x"]'))
    assert err.value.key == "server.tls.cert"


def test_xfcc_is_believed_from_a_gateway_known_by_its_certificate(write_setup, tmp_path, gateway_pki, pki, issuer):
    import hashlib
    import urllib.parse

    write(tmp_path / "server", gateway_pki["server"])
    (tmp_path / "gateway-ca.pem").write_bytes(gateway_pki["ca"].pem)
    path = _with_tls(write_setup(extra=f'[gateway]\ntrusted_proxies = ["{GATEWAY_ID}"]\ncert_header = "xfcc"\n'),
                     f'["{GATEWAY_ID}", "spiffe://example.org/stranger"]')
    token = bound_token(issuer, pki.client)
    chain = urllib.parse.quote((pki.client.pem + pki.intermediate.pem).decode(), safe="")
    headers = {"authorization": f"Bearer {token}",
               "x-forwarded-client-cert": f"Hash={hashlib.sha256(pki.client.der).hexdigest()};Chain=\"{chain}\""}
    with serve_pdp(load_config(path)) as (url, _):
        with httpx.Client(verify=client_context(gateway_pki, tmp_path, "gateway")) as client:
            trusted = client.get(f"{url}/ext_authz/orders", headers=headers)
        with httpx.Client(verify=client_context(gateway_pki, tmp_path, "stranger")) as client:
            other = client.get(f"{url}/ext_authz/orders", headers=headers)
    assert trusted.status_code == 200, trusted.text
    # An admitted caller that is not a trusted proxy cannot hand over a certificate.
    assert other.status_code == 401 and other.json()["reason"] == "binding_cert_missing"
