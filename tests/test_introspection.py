"""The RFC 7662 introspection endpoint on the real service, called by httpx as a resource server would."""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
import urllib.parse

import httpx
import pytest
from conftest import AUDIENCE, bound_token, check_request
from servers import serve_pdp

from pdp.config import load_config
from pdp.devpki import DpopKey, make_client
from pdp.errors import ConfigError

pytestmark = pytest.mark.integration

SECRET = "s3cret-of-the-orders-api"
RS_ID = "spiffe://example.org/orders-api"


def clients_toml(extra_client: str = "") -> str:
    return (f'[introspection]\nenabled = true\nissuer = "https://pdp.example.org"\n'
            f'[[introspection.clients]]\nclient_id = "orders-api"\n'
            f'secret_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"\n'
            f'[[introspection.clients]]\nclient_id = "mtls-api"\ntls_client_auth_san_uri = "{RS_ID}"\n'
            f"{extra_client}")


@pytest.fixture
def serve(write_setup):
    contexts = []

    def start(extra: str = clients_toml()):
        ctx = serve_pdp(load_config(write_setup(extra=extra)))
        url, _ = ctx.__enter__()
        contexts.append(ctx)
        return url

    yield start
    for ctx in contexts:
        ctx.__exit__(None, None, None)


def introspect(url: str, token: str, **kw) -> httpx.Response:
    kw.setdefault("auth", ("orders-api", SECRET))
    return httpx.post(f"{url}/oauth2/introspect", data={"token": token, "token_type_hint": "access_token"}, **kw)


def test_a_valid_bound_token_is_active_with_its_cnf(serve, pki, issuer):
    url = serve()
    token = bound_token(issuer, pki.client, scope="read write")
    r = introspect(url, token)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["active"] is True
    assert body["cnf"] == {"x5t#S256": pki.client.thumbprint}
    assert body["token_type"] == "Bearer" and body["scope"] == "read write"
    assert body["iss"] == "https://issuer.test" and body["aud"] == AUDIENCE
    assert body["sub"] == "demo-user" and body["client_id"] == "demo-client"
    assert {"exp", "iat", "nbf", "jti"} <= set(body)


def test_a_dpop_bound_token_has_token_type_dpop_and_jkt(serve, issuer):
    url = serve()
    key = DpopKey.generate()
    body = introspect(url, issuer.mint(audience=AUDIENCE, dpop_key=key)).json()
    assert body["token_type"] == "DPoP" and body["cnf"] == {"jkt": key.jkt}


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x" * 5000])
def test_anything_invalid_is_just_inactive(serve, token):
    url = serve()
    assert introspect(url, token).json() == {"active": False}


def test_an_expired_token_is_inactive_without_a_reason(serve, pki, issuer):
    url = serve()
    expired = bound_token(issuer, pki.client, now=time.time() - 7200, lifetime=60)
    assert introspect(url, expired).json() == {"active": False}


@pytest.mark.parametrize("auth", [None, ("orders-api", "wrong"), ("nobody", SECRET), ("mtls-api", "anything")])
def test_unauthenticated_callers_get_401(serve, pki, issuer, auth):
    url = serve()
    r = httpx.post(f"{url}/oauth2/introspect", data={"token": bound_token(issuer, pki.client)}, auth=auth)
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_client"} and r.headers["www-authenticate"].startswith("Basic")


def test_a_request_without_a_token_is_invalid_request(serve):
    url = serve()
    r = httpx.post(f"{url}/oauth2/introspect", data={"nothing": "here"}, auth=("orders-api", SECRET))
    assert r.status_code == 400 and r.json() == {"error": "invalid_request"}


def test_the_metadata_document_lists_the_endpoint(serve):
    url = serve()
    meta = httpx.get(f"{url}/.well-known/oauth-authorization-server").json()
    assert meta["introspection_endpoint"] == "https://pdp.example.org/oauth2/introspect"
    assert "tls_client_auth" in meta["introspection_endpoint_auth_methods_supported"]
    assert meta["tls_client_certificate_bound_access_tokens"] is True


def test_tls_client_auth_through_a_trusted_proxy_header(serve, pki, issuer):
    url = serve(clients_toml() + '[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "xfcc"\n')
    rs = make_client(pki.intermediate, spiffe_id=RS_ID, common_name="orders api")
    xfcc = f'Hash={hashlib.sha256(rs.der).hexdigest()};Cert="{urllib.parse.quote(rs.pem.decode(), safe="")}"'
    r = introspect(url, bound_token(issuer, pki.client), auth=None, headers={"x-forwarded-client-cert": xfcc})
    assert r.status_code == 200 and r.json()["active"] is True
    stranger = make_client(pki.intermediate, spiffe_id="spiffe://example.org/nobody")
    xfcc = f'Cert="{urllib.parse.quote(stranger.pem.decode(), safe="")}"'
    denied = introspect(url, bound_token(issuer, pki.client), auth=None, headers={"x-forwarded-client-cert": xfcc})
    assert denied.status_code == 401


def test_tls_client_auth_over_pdps_mutual_tls_listener(write_setup, tmp_path, pki, issuer):
    server = make_client(pki.intermediate, spiffe_id=None, common_name="pdp", ips=("127.0.0.1",),
                         client_auth=False)
    (tmp_path / "server.pem").write_bytes(server.pem + pki.intermediate.pem)
    (tmp_path / "server.key").write_bytes(server.key_pem)
    (tmp_path / "client-ca.pem").write_bytes(pki.root.pem + pki.intermediate.pem)
    path = write_setup(extra=clients_toml())
    text = path.read_text().replace("\n[policy]", '\n[server.tls]\ncert = "server.pem"\nkey = "server.key"\n'
                                                  'client_ca = "client-ca.pem"\n\n[policy]', 1)
    path.write_text(text)
    rs = make_client(pki.intermediate, spiffe_id=RS_ID, common_name="orders api")
    (tmp_path / "rs.pem").write_bytes(rs.pem)
    (tmp_path / "rs.key").write_bytes(rs.key_pem)
    ctx = ssl.create_default_context(cadata=pki.root.pem.decode())
    ctx.load_cert_chain(str(tmp_path / "rs.pem"), str(tmp_path / "rs.key"))
    with serve_pdp(load_config(path)) as (url, _), httpx.Client(verify=ctx) as client:
        r = client.post(f"{url}/oauth2/introspect", data={"token": bound_token(issuer, pki.client)})
    assert r.status_code == 200, r.text
    assert r.json()["active"] is True


def test_introspection_config_errors_name_the_key(write_setup):
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra="[introspection]\nenabled = true\n"))
    assert err.value.key == "introspection.clients"
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra='[introspection]\n[[introspection.clients]]\nclient_id = "a"\n'
                                      'secret_sha256 = "nothex"\n'))
    assert err.value.key == "introspection.clients[0].secret_sha256"


# -- attacks on the endpoint, one test each


def metric(url: str, name: str) -> float:
    """The value of one sample of /metrics, 0 when it has not been counted yet."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


LOCKOUT = "[introspection.lockout]\nsource_failures = 3\nclient_failures = 50\nduration = 60\n"
PROXY = '[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "xfcc"\n'


def test_brute_force_on_client_secrets_is_locked_out(serve, pki, issuer):
    url = serve(clients_toml() + LOCKOUT + PROXY)
    token = bound_token(issuer, pki.client)
    wrong = [introspect(url, token, auth=("orders-api", f"guess-{i}")) for i in range(3)]
    assert [r.status_code for r in wrong] == [401, 401, 401]
    # locked out: the right secret is refused like any other, so a guess made now proves nothing
    locked = introspect(url, token)
    assert locked.status_code == 429 and locked.json()["error"] == "invalid_client"
    assert 0 < int(locked.headers["retry-after"]) <= 60
    assert locked.headers["cache-control"] == "no-store"
    assert introspect(url, token, auth=("billing-api", "x")).status_code == 429  # the source, for any client
    # tls_client_auth cannot be guessed at, and no lock-out touches it
    rs = make_client(pki.intermediate, spiffe_id=RS_ID, common_name="orders api")
    xfcc = f'Cert="{urllib.parse.quote(rs.pem.decode(), safe="")}"'
    assert introspect(url, token, auth=None, headers={"x-forwarded-client-cert": xfcc}).json()["active"] is True
    assert metric(url, 'pdp_introspection_auth_failures_total{result="invalid"}') == 3
    assert metric(url, 'pdp_introspection_auth_failures_total{result="locked"}') == 2
    assert metric(url, 'pdp_introspection_lockouts_total{scope="source"}') == 1


def test_an_expired_or_not_yet_valid_token_within_the_gateways_leeway_is_inactive(serve, make_pdp, pki, issuer):
    url = serve()
    expired = bound_token(issuer, pki.client, now=time.time() - 70, lifetime=60)  # exp 10 s ago
    early = bound_token(issuer, pki.client, now=time.time() + 10)  # nbf 10 s ahead
    pdp = make_pdp()
    for token in (expired, early):  # the gateway forgives 30 s of clock skew (tokens.leeway) ...
        assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
        assert introspect(url, token).json() == {"active": False}  # ... introspection forgives none


def test_a_token_the_gateway_cached_is_judged_again_without_leeway(write_setup, pki, issuer):
    early = bound_token(issuer, pki.client, now=time.time() + 10)
    with serve_pdp(load_config(write_setup(extra=clients_toml()))) as (url, service):
        assert service.pdp.decide(check_request(chain=pki.chain(), token=early)).allowed  # cached, with leeway
        assert introspect(url, early).json() == {"active": False}


def test_introspection_leeway_is_its_own_setting(serve, pki, issuer):
    url = serve(clients_toml().replace('issuer = "https://pdp.example.org"\n',
                                       'issuer = "https://pdp.example.org"\nleeway = 15\n', 1))
    expired = bound_token(issuer, pki.client, now=time.time() - 70, lifetime=60)
    assert introspect(url, expired).json()["active"] is True


def test_a_token_for_another_resource_server_is_inactive_for_this_client(write_setup, pki, issuer):
    billing = "https://billing.test"
    client = ('[[introspection.clients]]\nclient_id = "billing-api"\n'
              f'secret_sha256 = "{hashlib.sha256(b"billing-secret").hexdigest()}"\naudiences = ["{billing}"]\n')
    path = write_setup(extra=clients_toml(client))
    path.write_text(path.read_text().replace(f'audiences = ["{AUDIENCE}"]', f'audiences = ["{AUDIENCE}", "{billing}"]'))
    orders_token = bound_token(issuer, pki.client)
    both = bound_token(issuer, pki.client, audience=[AUDIENCE, billing])
    with serve_pdp(load_config(path)) as (url, _):
        assert introspect(url, orders_token).json()["active"] is True  # orders-api: every audience
        assert introspect(url, orders_token, auth=("billing-api", "billing-secret")).json() == {"active": False}
        assert introspect(url, both, auth=("billing-api", "billing-secret")).json()["active"] is True


def test_an_unbound_token_is_inactive_when_bound_tokens_are_required(write_setup, issuer):
    unbound = issuer.mint(audience=AUDIENCE, scope="read")
    with serve_pdp(load_config(write_setup(extra=clients_toml(), require_bound=True))) as (url, _):
        assert introspect(url, unbound).json() == {"active": False}
    with serve_pdp(load_config(write_setup(extra=clients_toml(), require_bound=False))) as (url, _):
        assert introspect(url, unbound).json()["active"] is True


def test_a_repeated_token_parameter_is_invalid_request(serve, pki, issuer):
    url = serve()
    r = httpx.post(f"{url}/oauth2/introspect", auth=("orders-api", SECRET),
                   content=f"token=garbage&token={bound_token(issuer, pki.client)}",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json() == {"error": "invalid_request"}


@pytest.mark.parametrize("case", ["no_token", "not_a_form", "not_utf8", "repeated", "unauthenticated"])
def test_every_refusal_says_no_store(serve, case):
    url = serve()
    body, ctype, auth = {
        "no_token": (b"nothing=here", "application/x-www-form-urlencoded", ("orders-api", SECRET)),
        "not_a_form": (b'{"token": "x"}', "application/json", ("orders-api", SECRET)),
        "not_utf8": (b"token=\xff", "application/x-www-form-urlencoded", ("orders-api", SECRET)),
        "repeated": (b"token=a&token_type_hint=x&token_type_hint=y", "application/x-www-form-urlencoded",
                     ("orders-api", SECRET)),
        "unauthenticated": (b"token=a", "application/x-www-form-urlencoded", ("orders-api", "wrong")),
    }[case]
    r = httpx.post(f"{url}/oauth2/introspect", content=body, headers={"content-type": ctype}, auth=auth)
    assert r.status_code in (400, 401)
    assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache"


def test_lockout_and_client_audience_config_errors_name_the_key(write_setup):
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra=clients_toml() + "[introspection.lockout]\nsource_failure = 3\n"))
    assert err.value.key == "introspection.lockout.source_failure"
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra=clients_toml() + "[introspection.lockout]\nduration = 600\nmax_duration = 60\n"))
    assert err.value.key == "introspection.lockout.max_duration"
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra=clients_toml('audiences = ["https://nobody.test"]\n')))
    assert err.value.key == "introspection.clients[1].audiences" and "no issuer's audience" in err.value.message


def test_two_authorization_headers_are_invalid_request(serve, pki, issuer):
    """Which of two would be the client's? Refused before either is looked at, and not counted."""
    url = serve()
    token = bound_token(issuer, pki.client)
    basic = "Basic " + base64.b64encode(f"orders-api:{SECRET}".encode()).decode()
    for headers in ([("authorization", basic), ("authorization", basic)],
                    [("authorization", "Basic Zm9vOmJhcg=="), ("authorization", basic)]):
        r = httpx.post(f"{url}/oauth2/introspect", data={"token": token}, headers=headers)
        assert (r.status_code, r.json()) == (400, {"error": "invalid_request"})
        assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache"
    assert metric(url, 'pdp_introspection_auth_failures_total{result="invalid"}') == 0
    assert introspect(url, token).json()["active"] is True


def test_a_full_lockout_store_answers_503_whatever_the_secret(serve, pki, issuer):
    """With the lock-out store full, a wrong secret cannot be counted: the right one must get the same 503,
    or the store's being full turns the lock-out into an oracle."""
    url = serve(clients_toml() + "[introspection.lockout]\nmax_tracked = 100\n")
    token = bound_token(issuer, pki.client)

    def post(auth: tuple[str, str], source: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
            return client.post(f"{url}/oauth2/introspect", data={"token": token}, auth=auth)

    fill = [post(("nobody", "x"), f"127.0.5.{1 + i}").status_code for i in range(110)]
    assert set(fill) == {401, 503} and fill[0] == 401  # one counter per source, then the store is full
    wrong = post(("orders-api", "guess"), "127.0.9.9")
    right = post(("orders-api", SECRET), "127.0.9.9")
    assert (wrong.status_code, right.status_code) == (503, 503)
    assert wrong.json() == right.json() == {"error": "temporarily_unavailable"}
    assert right.headers["cache-control"] == "no-store"
