"""HTTP ext_authz (Envoy http_service, nginx auth_request, Traefik forwardAuth) on the real service.

httpx stands in for the proxies: it sends what each of them sends to an auth endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse

import httpx
import pytest
from conftest import bound_token
from servers import serve_pdp

from pdp.config import load_config

pytestmark = pytest.mark.integration


def xfcc(leaf_pem: bytes, chain_pem: bytes, der: bytes) -> str:
    quoted = urllib.parse.quote(leaf_pem.decode(), safe="")
    chain = urllib.parse.quote(chain_pem.decode(), safe="")
    return (f'By=spiffe://example.org/gateway;Hash={hashlib.sha256(der).hexdigest()};Cert="{quoted}";'
            f'Chain="{chain}";Subject="CN=demo client,O=pdp dev";URI=spiffe://example.org/demo/client')


def gateway_toml(fmt: str, trusted: str = "127.0.0.1/32", forwarded: str = "envoy") -> str:
    return (f'[gateway]\ntrusted_proxies = ["{trusted}"]\ncert_header = "{fmt}"\n'
            f'forwarded_request = "{forwarded}"\n')


@pytest.fixture
def serve(write_setup):
    contexts = []

    def start(extra: str = ""):
        ctx = serve_pdp(load_config(write_setup(extra=extra)))
        url, service = ctx.__enter__()
        contexts.append(ctx)
        return url, service

    yield start
    for ctx in contexts:
        ctx.__exit__(None, None, None)


def test_envoy_http_service_allow_with_xfcc(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc"))
    token = bound_token(issuer, pki.client)
    r = httpx.get(f"{url}/ext_authz/orders?page=2", headers={
        "authorization": f"Bearer {token}",
        "x-forwarded-client-cert": xfcc(pki.client.pem, pki.client.pem + pki.intermediate.pem, pki.client.der)})
    assert r.status_code == 200, r.text
    assert r.headers["x-pdp-spiffe-id"] == "spiffe://example.org/demo/client"
    assert r.headers["x-envoy-auth-headers-to-remove"] == "authorization,dpop"
    assert r.headers["x-pdp-decision-id"]


def test_envoy_http_service_keeps_the_method(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc"))
    token = bound_token(issuer, pki.client, scope="read")
    r = httpx.post(f"{url}/ext_authz/orders", headers={
        "authorization": f"Bearer {token}",
        "x-forwarded-client-cert": xfcc(pki.client.pem, pki.client.pem + pki.intermediate.pem, pki.client.der)})
    assert r.status_code == 403
    assert r.json()["reason"] == "insufficient_scope"


def test_deny_is_401_with_a_bearer_challenge(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc"))
    token = bound_token(issuer, pki.client)
    r = httpx.get(f"{url}/ext_authz/orders", headers={
        "authorization": f"Bearer {token}",
        "x-forwarded-client-cert": xfcc(pki.other.pem, pki.other.pem + pki.intermediate.pem, pki.other.der)})
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["reason"] == "binding_mismatch"
    assert token not in r.text


def test_a_certificate_header_from_an_untrusted_peer_is_ignored_and_counted(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc", trusted="10.0.0.0/8"))
    token = bound_token(issuer, pki.client)
    r = httpx.get(f"{url}/ext_authz/orders", headers={
        "authorization": f"Bearer {token}",
        "x-forwarded-client-cert": xfcc(pki.client.pem, pki.client.pem + pki.intermediate.pem, pki.client.der)})
    # The forged certificate counts for nothing: the bound token has no certificate to match.
    assert r.status_code == 401 and r.json()["reason"] == "binding_cert_missing"
    assert "pdp_untrusted_cert_headers_total 1.0" in httpx.get(f"{url}/metrics").text


def test_forwarded_request_headers_from_an_untrusted_peer_are_ignored(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc", trusted="10.0.0.0/8"))
    r = httpx.get(f"{url}/ext_authz/orders", headers={"x-forwarded-uri": "/healthz"})
    assert r.status_code == 403 and r.json()["reason"] == "cert_required"


def test_a_malformed_certificate_header_from_a_trusted_proxy_is_denied(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc"))
    r = httpx.get(f"{url}/ext_authz/orders", headers={"x-forwarded-client-cert": 'Cert="unterminated'})
    assert r.status_code == 403 and r.json()["reason"] == "cert_malformed"


def test_nginx_auth_request(serve, pki, issuer):
    url, _ = serve(gateway_toml("nginx", forwarded="nginx"))
    token = bound_token(issuer, pki.client, scope="read")
    escaped = urllib.parse.quote((pki.client.pem + pki.intermediate.pem).decode(), safe="")
    r = httpx.get(f"{url}/ext_authz", headers={
        "authorization": f"Bearer {token}", "ssl-client-cert": escaped,
        "x-original-uri": "/orders?id=1", "x-original-method": "GET"})
    assert r.status_code == 200, r.text
    denied = httpx.get(f"{url}/ext_authz", headers={
        "authorization": f"Bearer {token}", "ssl-client-cert": escaped,
        "x-original-uri": "/orders", "x-original-method": "DELETE"})
    assert denied.status_code == 403 and denied.json()["reason"] == "insufficient_scope"


def test_traefik_forward_auth(serve, pki, issuer):
    url, _ = serve(gateway_toml("traefik", forwarded="traefik"))
    token = bound_token(issuer, pki.client, scope="read")
    bodies = ",".join("".join(p.decode().splitlines()[1:-1]) for p in (pki.client.pem, pki.intermediate.pem))
    r = httpx.get(f"{url}/ext_authz", headers={
        "authorization": f"Bearer {token}", "x-forwarded-tls-client-cert": urllib.parse.quote(bodies, safe=""),
        "x-forwarded-method": "GET", "x-forwarded-uri": "/orders", "x-forwarded-host": "api.test",
        "x-forwarded-proto": "https"})
    assert r.status_code == 200, r.text


def test_rfc9440_client_cert(serve, pki, issuer):
    url, _ = serve(gateway_toml("rfc9440"))
    token = bound_token(issuer, pki.client)
    r = httpx.get(f"{url}/ext_authz/orders", headers={
        "authorization": f"Bearer {token}",
        "client-cert": f":{base64.b64encode(pki.client.der).decode()}:",
        "client-cert-chain": f":{base64.b64encode(pki.intermediate.der).decode()}:"})
    assert r.status_code == 200, r.text


def test_aws_alb_header(serve, pki, issuer):
    url, _ = serve(gateway_toml("alb"))
    token = bound_token(issuer, pki.client)
    value = urllib.parse.quote((pki.client.pem + pki.intermediate.pem).decode(), safe="+=/")
    r = httpx.get(f"{url}/ext_authz/orders", headers={"authorization": f"Bearer {token}",
                                                      "x-amzn-mtls-clientcert": value})
    assert r.status_code == 200, r.text


def test_any_method_under_the_prefix_is_an_auth_request(serve):
    url, _ = serve(gateway_toml("xfcc"))
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        r = httpx.request(method, f"{url}/ext_authz/healthz")
        assert r.status_code == 200, (method, r.status_code)


def test_gateway_config_errors_name_the_key(write_setup):
    from pdp.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra='[gateway]\ncert_header = "xfcc"\n'))
    assert err.value.key == "gateway.trusted_proxies"
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra='[gateway]\ntrusted_proxies = ["nope"]\n'))
    assert err.value.key == "gateway.trusted_proxies"
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra='[gateway]\ncert_header = "pigeon"\ntrusted_proxies = ["10.0.0.0/8"]\n'))
    assert err.value.key == "gateway.cert_header"


def test_the_body_never_carries_credentials(serve, pki, issuer):
    url, _ = serve(gateway_toml("xfcc"))
    token = bound_token(issuer, pki.client)
    r = httpx.get(f"{url}/ext_authz/orders", headers={"authorization": f"Bearer {token}x"})
    body = json.loads(r.text)
    assert set(body) == {"reason", "decision_id"}


def test_behind_nginx_a_clients_own_x_forwarded_uri_means_nothing(serve):
    """nginx passes client headers through to auth_request: only X-Original-* (which nginx sets) count."""
    url, _ = serve(gateway_toml("nginx", forwarded="nginx"))
    r = httpx.get(f"{url}/ext_authz", headers={"x-original-uri": "/admin/users", "x-original-method": "DELETE",
                                              "x-forwarded-uri": "/public/x", "x-forwarded-method": "GET"})
    assert r.status_code == 403 and r.json()["reason"] == "cert_required"


def test_behind_traefik_the_forwarded_uri_is_the_request_judged(serve, pki, issuer):
    url, _ = serve(gateway_toml("traefik", forwarded="traefik"))
    bodies = ",".join("".join(p.decode().splitlines()[1:-1]) for p in (pki.client.pem, pki.intermediate.pem))
    r = httpx.get(f"{url}/ext_authz", headers={
        "authorization": f"Bearer {bound_token(issuer, pki.client, scope='read admin')}",
        "x-forwarded-tls-client-cert": urllib.parse.quote(bodies, safe=""),
        "x-forwarded-method": "GET", "x-forwarded-uri": "/admin/users"})
    assert r.status_code == 403 and r.json()["reason"] == "spiffe_id_denied"
