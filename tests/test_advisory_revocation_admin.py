"""Attacks on pdp's own revocation list, its sync between replicas, the identity inventory and the admin endpoints.

One test per attack class, on real servers (the mutual-TLS listener with real client certificates), a real
Redis (the shared one under a key prefix, or one of the test's own where it is stopped) and the real CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse

import httpx
import pytest
import redis
from conftest import REDIS_URL, bound_token, check_request
from redis_process import RedisProcess
from servers import serve_pdp
from test_admin import ALLOWED, OPS_ID, _admin, _client, callers  # noqa: F401  (fixtures)
from test_introspection import PROXY, SECRET, clients_toml, introspect
from test_listener_tls import (  # noqa: F401  (fixtures)
    GATEWAY_ID,
    _with_tls,
    client_context,
    gateway_pki,
    tls_setup,
    write,
)
from test_revocation_sync import ALLOW_ALL, _config, _reason, _replica, _until

from pdp.certificates.revocation_list import (
    Revocation,
    RevocationError,
    drop_expired,
    normalize,
    read_revocations,
    store_revocation,
)
from pdp.cli import main
from pdp.config import load_config
from pdp.devpki import make_client
from pdp.errors import ConfigError
from pdp.service.server import Service
from pdp.store import RedisStore

pytestmark = pytest.mark.integration

RS_ID = "spiffe://example.org/orders-api"
#: A JSON integer no float holds: ``float()`` of it raises OverflowError, which is not a ValueError.
HUGE = "9" * 400


def _raw(prefix: str, name: str) -> tuple[redis.Redis, str]:
    """A plain Redis client and the key of the store map ``name`` (what someone with Redis access writes to)."""
    return redis.Redis.from_url(REDIS_URL), f"{prefix}{{{name}}}"


def _status(client: httpx.Client, url: str) -> int | str:
    try:
        return client.get(url).status_code
    except httpx.HTTPError as exc:  # the server dropped the connection: what a caller sees of a traceback
        return type(exc).__name__


def _store_toml(prefix: str) -> str:
    return f'\n[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\ntimeout = 0.5\n'


# -- admin access: a proxy cannot hand over an admin identity, no path reaches the handlers unchecked
def test_admin_a_trusted_proxy_cannot_forward_an_admin_identity_nor_reach_admin_by_path_tricks(
        write_setup, tmp_path, callers, pki):  # noqa: F811
    write(tmp_path / "server", callers["server"])
    (tmp_path / "gateway-ca.pem").write_bytes(callers["ca"].pem)
    path = _with_tls(write_setup(extra=f'[gateway]\ntrusted_proxies = ["{GATEWAY_ID}"]\ncert_header = "xfcc"\n'),
                     ALLOWED)
    config = load_config(_admin(path, f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    ops = callers["ops"]
    xfcc = f'Hash={hashlib.sha256(ops.der).hexdigest()};Cert="{urllib.parse.quote(ops.pem.decode(), safe="")}"'
    body = {"kind": "cert", "value": pki.client.thumbprint}
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "gateway") as gateway:
        forwarded = {"x-forwarded-client-cert": xfcc, "x-forwarded-for": "127.0.0.1"}
        assert gateway.post(f"{url}/admin/revocations", json=body, headers=forwarded).status_code == 403
        assert gateway.get(f"{url}/admin/revocations", headers=forwarded).status_code == 403
        assert gateway.head(f"{url}/admin/revocations").status_code == 403
        assert gateway.delete(f"{url}/admin/revocations/cert/{pki.client.thumbprint}").status_code == 403
        assert gateway.post(f"{url}/admin/revocations", json=body,
                            headers={"x-http-method-override": "DELETE"}).status_code == 403
        for target in ("/admin/revocations/", "//admin/revocations", "/ADMIN/revocations", "/admin%2Frevocations",
                       "/ext_authz/admin/revocations", "/admin/revocations?kind=cert"):
            r = gateway.post(url + target, json=body)
            assert r.status_code not in (200, 201), (target, r.status_code, r.text)
        assert service.pdp.store.map_items("revocations") == {}


def test_admin_input_bounds_ttl_value_and_body_are_refused(tls_setup, tmp_path, callers):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        for doc in ({"kind": "token", "value": "j", "ttl": "0"}, {"kind": "token", "value": "j", "ttl": -5},
                    {"kind": "token", "value": "j", "ttl": "100000w"}, {"kind": "token", "value": "j", "ttl": "nan"},
                    {"kind": "token", "value": ""}, {"kind": "token", "value": "x" * 5000},
                    {"kind": "token", "value": "a\nb"}, {"kind": "cert", "value": "A" * 42 + "=="},
                    {"kind": "token", "value": "j", "reason": "r" * 20_000}):
            r = ops.post(f"{url}/admin/revocations", json=doc)
            assert r.status_code == 400 and r.json()["error"] == "invalid_request", (doc.get("ttl"), r.text)
        for raw in ('{"kind": "token", "value": "j", "ttl": 1e400}', '{"kind": "token", "value": "j", "ttl": NaN}',
                    '{"kind": "token", "value": "j", "ttl": ' + HUGE + "}"):
            r = ops.post(f"{url}/admin/revocations", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == "invalid_request", (raw[-12:], r.text)
        assert ops.delete(f"{url}/admin/revocations/token/never-revoked").status_code == 404
        assert ops.delete(f"{url}/admin/revocations/host/x").status_code == 404
        assert service.pdp.store.map_items("revocations") == {}


def test_admin_a_revoked_admin_certificate_can_no_longer_administer(tls_setup, tmp_path, callers):  # noqa: F811
    """An admin's key leaks; its certificate is revoked on pdp's own list. The holder of the key must not be
    able to read the list, let alone take the revocation of its own certificate off it."""
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        thumbprint = callers["ops"].thumbprint
        store_revocation(service.pdp.store, Revocation("cert", thumbprint, "admin key leaked", time.time()))
        assert service.revocation_sync.refresh()
        assert ops.get(f"{url}/admin/revocations").status_code == 403
        assert ops.delete(f"{url}/admin/revocations/cert/{thumbprint}").status_code == 403
        assert service.pdp.store.map_get("revocations", [f"cert:{thumbprint}"])[0] is not None


def test_admin_without_admin_callers_every_gateway_is_an_admin(tls_setup):  # noqa: F811
    """``admin = true`` alone makes every caller allowed to ask for decisions (the gateways) an admin that
    can revoke and unrevoke; the switch that changes what every replica enforces must name its callers."""
    with pytest.raises(ConfigError) as err:
        load_config(_admin(tls_setup(ALLOWED), "admin = true"))
    assert err.value.key == "server.admin_callers"


# -- log and terminal injection through the free-text reason
def test_log_injection_a_reason_with_control_characters_is_refused(tls_setup, tmp_path, callers, pki):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    forged = (f"rotation\n2026-12-02 01:00:00,000 WARNING pdp: revocation of cert {pki.client.thumbprint} "
              f"removed by {OPS_ID}\x1b[2K")
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        r = ops.post(f"{url}/admin/revocations", json={"kind": "cert", "value": pki.client.thumbprint,
                                                       "reason": forged})
        stored = [e.reason for e in read_revocations(service.pdp.store)[1]]
    assert r.status_code == 400 or all(reason.isprintable() for reason in stored), (r.status_code, stored)


# -- revocation semantics
def test_thumbprint_a_non_canonical_x5t_s256_is_refused_or_normalised(make_pdp, tmp_path, pki):
    """The last of 43 base64url characters carries 4 bits of the digest and 2 spare bits: with a spare bit set,
    the value names the same digest but not the same string. Accepted as it is, it never matches."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    allow = tmp_path / "allow.rego"
    allow.write_text(ALLOW_ALL)
    canonical = pki.client.thumbprint
    odd = canonical[:-1] + alphabet[alphabet.index(canonical[-1]) + 1]
    try:
        value = normalize("cert", odd)
    except RevocationError:
        return  # refused: the operator learns at once
    pdp = make_pdp(engine="regorus", policy_paths=[str(allow)])
    pdp.revocations.replace([Revocation("cert", canonical, created=time.time())], 1, time.time())
    assert pdp.decide(check_request(chain=pki.chain())).reason == "cert_revoked"  # the canonical form matches
    pdp.revocations.replace([Revocation("cert", value, created=time.time())], 2, time.time())
    assert pdp.decide(check_request(chain=pki.chain())).reason == "cert_revoked"


def test_thumbprint_hex_fingerprints_in_any_case_match_and_cached_decisions_are_checked_again(
        write_setup, tmp_path, pki, issuer):
    with _replica(_config(write_setup, tmp_path)) as service:
        token = bound_token(issuer, pki.client)
        request = check_request(chain=pki.chain(), token=token)
        assert service.pdp.decide(request).allowed and service.pdp.decide(request).allowed  # cached now
        jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==").decode())["jti"]
        store_revocation(service.pdp.store, Revocation("token", normalize("token", jti), created=time.time()))
        _until(lambda: service.pdp.decide(request).reason == "token_revoked")
        store_revocation(service.pdp.store, Revocation("token", "unrelated", created=time.time()))
        hex_upper = ":".join(f"{b:02X}" for b in hashlib.sha256(pki.other.der).digest())
        store_revocation(service.pdp.store, Revocation("cert", normalize("cert", hex_upper), created=time.time()))
        _until(lambda: _reason(service, pki.chain(pki.other)) == "cert_revoked")
        hex_lower = hashlib.sha256(pki.client.der).hexdigest()
        assert normalize("cert", hex_lower) == pki.client.thumbprint


def test_revoke_a_whole_jwt_given_as_the_jti_is_refused_or_enforced(write_setup, tmp_path, pki, issuer, prefix,
                                                                     capsys):
    """``pdp revoke token`` takes a jti; an operator who pastes the token itself must not be told it is revoked
    while every replica goes on allowing it."""
    (tmp_path / "allow.rego").write_text(ALLOW_ALL)
    config = write_setup(engine="regorus", policy_paths=[str(tmp_path / "allow.rego")], extra=_store_toml(prefix))
    token = bound_token(issuer, pki.client)
    code = main(["revoke", "token", token, "--config", str(config)])
    if code != 0:
        return
    with _replica(load_config(config)) as service:
        assert service.pdp.decide(check_request(chain=pki.chain(), token=token)).reason == "token_revoked"


def test_re_revoking_with_a_ttl_does_not_shorten_a_permanent_revocation(prefix, pki):
    """A permanent revocation (a leaked key), then a temporary one of the same certificate (an incident
    script): once the second runs out the leaked certificate must still be denied."""
    store = RedisStore(REDIS_URL, prefix=prefix)
    now = time.time()
    store_revocation(store, Revocation("cert", pki.client.thumbprint, "key leaked", now))
    store_revocation(store, Revocation("cert", pki.client.thumbprint, "incident drill", now, expires=now + 60))
    _, entries = read_revocations(store)
    later = now + 120
    assert [e.value for e in entries if e.active(later)] == [pki.client.thumbprint]


def test_sync_race_the_expiry_sweep_deletes_a_revocation_written_after_the_read(prefix, pki):
    """What ``RevocationSync.refresh`` does, step by step: read the list, then delete the expired entries by
    field name. A revocation of the same certificate stored in between (the operator renews it as the old
    one runs out) is deleted with them, without a version change: replicas that re-read lose it."""
    store = RedisStore(REDIS_URL, prefix=prefix)
    now = time.time()
    store_revocation(store, Revocation("cert", pki.client.thumbprint, "first", now - 120, expires=now - 1))
    _, entries = read_revocations(store)  # the sync thread's read
    store_revocation(store, Revocation("cert", pki.client.thumbprint, "renewed", now))  # the operator
    drop_expired(store, entries, now)  # the sync thread's sweep
    _, after = read_revocations(store)
    assert [(e.value, e.reason) for e in after] == [(pki.client.thumbprint, "renewed")]


# -- sync: Redis restarted empty, garbage in the store
def test_sync_redis_restarted_empty_does_not_silently_unrevoke(write_setup, tmp_path, pki):
    """Redis without persistence restarts: the list is gone from the store. A replica that enforced a
    revocation must not drop it silently on its next read (a version of 0 after a non-zero one is a lost
    store, never an operator's change: every unrevoke writes a new version)."""
    server = RedisProcess(tmp_path).start()
    try:
        with _replica(_config(write_setup, tmp_path, server.url)) as service:
            store_revocation(RedisStore(server.url, prefix="pdp:"),
                             Revocation("cert", pki.other.thumbprint, "key leaked", time.time()))
            _until(lambda: _reason(service, pki.chain(pki.other)) == "cert_revoked")
            server.stop()
            _until(lambda: not service.revocation_sync.reachable)
            server.start()  # the same port, empty
            _until(lambda: service.revocation_sync.reachable)
            assert _reason(service, pki.chain(pki.other)) == "cert_revoked"
    finally:
        server.stop()


def test_garbage_revocation_entry_does_not_freeze_the_list_on_every_replica(write_setup, tmp_path, pki, prefix):
    """One entry whose ``expires`` no float holds, written by anyone with Redis access: the read of the whole
    list must skip it, not fail, or no replica ever takes on another revocation (nor starts)."""
    config = _config(write_setup, tmp_path, REDIS_URL, prefix)
    client, key = _raw(prefix, "revocations")
    try:
        with _replica(config) as service:
            client.hset(key, "cert:" + "A" * 43, '{"expires": ' + HUGE + "}")
            store_revocation(service.pdp.store, Revocation("cert", pki.client.thumbprint, "key leaked", time.time()))
            _until(lambda: _reason(service, pki.chain()) == "cert_revoked", deadline=3.0)
        fresh = Service(config)  # a replica starting now reads the same list
        try:
            assert _reason(fresh, pki.chain()) == "cert_revoked"
        finally:
            fresh.stop()
    finally:
        client.close()


def test_garbage_store_entries_are_no_500_at_the_admin_endpoints_nor_metrics(tls_setup, tmp_path, callers):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        store = service.pdp.store
        store.map_set("revocations", {"cert:" + "B" * 43: b'{"created": 1e400}'}, notify=True)
        store.map_set("inventory", {
            "C" * 43: b'1900000000 {"s":null,"d":"CN=x","i":"CN=y","b":"z","f":1e400,"l":0}',
            "D" * 43: f'{HUGE} {{"s":null,"d":"CN=x","i":"CN=y","b":"z","f":0,"l":0}}'.encode()})
        statuses = {path: _status(ops, url + path) for path in ("/admin/revocations", "/admin/identities", "/metrics")}
    assert statuses == {"/admin/revocations": 200, "/admin/identities": 200, "/metrics": 200}


def test_garbage_store_entries_do_not_crash_the_list_commands(write_setup, tmp_path, prefix, capsys):
    (tmp_path / "allow.rego").write_text(ALLOW_ALL)
    config = str(write_setup(engine="regorus", policy_paths=[str(tmp_path / "allow.rego")],
                             extra=_store_toml(prefix)))
    client, revocations = _raw(prefix, "revocations")
    try:
        client.hset(revocations, "token:j1", '{"expires": ' + HUGE + "}")
        client.hset(f"{prefix}{{inventory}}", "D" * 43,
                    f'{HUGE} {{"s":null,"d":"CN=x","i":"CN=y","b":"z","f":0,"l":0}}')
        outcomes = {}
        for command in (["revoke", "list"], ["certs", "list"]):
            try:
                outcomes[command[0]] = main([*command, "--config", config])
            except Exception as exc:  # what the user sees as a traceback
                outcomes[command[0]] = type(exc).__name__
    finally:
        client.close()
    assert all(isinstance(code, int) for code in outcomes.values()), outcomes


# -- introspection: the revocation list is pdp's answer there too
def test_introspection_a_revoked_client_certificate_no_longer_authenticates(write_setup, pki, issuer):
    rs = make_client(pki.intermediate, spiffe_id=RS_ID, common_name="orders api")
    xfcc = f'Cert="{urllib.parse.quote(rs.pem.decode(), safe="")}"'
    with serve_pdp(load_config(write_setup(extra=clients_toml() + PROXY))) as (url, service):
        token = bound_token(issuer, pki.client)
        assert introspect(url, token, auth=None, headers={"x-forwarded-client-cert": xfcc}).json()["active"]
        store_revocation(service.pdp.store, Revocation("cert", rs.thumbprint, "key leaked", time.time()))
        assert service.revocation_sync.refresh()
        assert service.pdp.decide(check_request(chain=(rs.der, pki.intermediate.der))).reason == "cert_revoked"
        r = introspect(url, token, auth=None, headers={"x-forwarded-client-cert": xfcc})
    assert r.status_code == 401, r.text


def test_introspection_a_token_bound_to_a_revoked_certificate_is_not_active(write_setup, pki, issuer):
    """A resource server that introspects checks the token's cnf against the certificate it was shown, which
    its own TLS trusts: the revocation on pdp's list is only known to pdp."""
    with serve_pdp(load_config(write_setup(extra=clients_toml()))) as (url, service):
        token = bound_token(issuer, pki.client)
        assert introspect(url, token, auth=("orders-api", SECRET)).json()["active"] is True
        store_revocation(service.pdp.store, Revocation("cert", pki.client.thumbprint, "key leaked", time.time()))
        assert service.revocation_sync.refresh()
        assert service.pdp.decide(check_request(chain=pki.chain(), token=token)).reason == "cert_revoked"
        assert introspect(url, token, auth=("orders-api", SECRET)).json() == {"active": False}


# -- errors a caller can reach
def test_errors_a_reason_that_is_no_unicode_text_is_400_not_500_and_leaves_the_list_readable(
        tls_setup, tmp_path, callers, pki):  # noqa: F811
    """A lone surrogate (valid JSON, ``"\\ud800"``) in the reason: stored, then the answer cannot be encoded
    (500), and every later listing of the list fails the same way until the entry is removed."""
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    body = json.dumps({"kind": "cert", "value": pki.client.thumbprint, "reason": "\ud800"})  # ASCII: "\\ud800"
    with serve_pdp(config) as (url, _), _client(callers, tmp_path, "ops") as ops:
        r = ops.post(f"{url}/admin/revocations", content=body, headers={"content-type": "application/json"})
        listing = _status(ops, f"{url}/admin/revocations")
    assert (r.status_code, listing) == (400, 200), r.text


# -- pdp revoke cert PEM_FILE: which certificate of the file is revoked
def test_revoke_cert_a_file_with_the_ca_first_revokes_the_client_or_is_refused(write_setup, tmp_path, pki,
                                                                                prefix, capsys):
    """A chain file written CA first (or a CA's file by mistake): the first certificate is a CA, whose
    thumbprint no client ever presents. Revoking it says "revoked" and changes nothing."""
    (tmp_path / "allow.rego").write_text(ALLOW_ALL)
    config = write_setup(engine="regorus", policy_paths=[str(tmp_path / "allow.rego")], extra=_store_toml(prefix))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.intermediate.pem + pki.client.pem)
    code = main(["revoke", "cert", str(chain), "--config", str(config)])
    revoked = [e.value for e in read_revocations(RedisStore(REDIS_URL, prefix=prefix))[1]]
    assert code != 0 or pki.client.thumbprint in revoked, (code, revoked, pki.intermediate.thumbprint)


def test_admin_an_ext_authz_prefix_of_admin_turns_auth_checks_into_admin_calls(tls_setup, tmp_path, callers):  # noqa: F811
    """``gateway.ext_authz_prefix = "/admin"`` (the loader refuses /v1, /healthz, /readyz and /metrics, not
    /admin): Envoy's check of a client's ``GET /identities`` arrives as ``GET /admin/identities`` and is answered
    by the admin endpoint, 200 with the inventory, which Envoy takes for an allow that no policy made."""
    path = tls_setup(ALLOWED)
    path.write_text(path.read_text() + '\n[gateway]\next_authz_prefix = "/admin"\n')
    try:  # admin_callers named: without them the loader refuses server.admin first (an admin without callers)
        config = load_config(_admin(path, f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    except ConfigError as err:
        assert err.key == "gateway.ext_authz_prefix"
        return
    with serve_pdp(config) as (url, _), _client(callers, tmp_path, "gateway") as gateway:
        assert gateway.get(f"{url}/admin/orders").status_code == 403  # the policy: no client certificate
        r = gateway.get(f"{url}/admin/identities")  # the same request for /identities
    assert r.status_code != 200, r.text


def test_listener_a_revoked_trusted_proxy_certificate_is_no_longer_believed(write_setup, tmp_path, gateway_pki,  # noqa: F811
                                                                           pki, issuer):
    """A trusted proxy's key leaks and its certificate goes on pdp's list. The XFCC header carries no proof of
    possession, only certificates, which are public: whoever holds the proxy's key can hand over any client's
    certificate. The revoked proxy must not be believed (nor let in)."""
    write(tmp_path / "server", gateway_pki["server"])
    (tmp_path / "gateway-ca.pem").write_bytes(gateway_pki["ca"].pem)
    path = _with_tls(write_setup(extra=f'[gateway]\ntrusted_proxies = ["{GATEWAY_ID}"]\ncert_header = "xfcc"\n'),
                     f'["{GATEWAY_ID}"]')
    chain = urllib.parse.quote((pki.client.pem + pki.intermediate.pem).decode(), safe="")
    headers = {"authorization": f"Bearer {bound_token(issuer, pki.client)}",
               "x-forwarded-client-cert": f"Hash={hashlib.sha256(pki.client.der).hexdigest()};Chain=\"{chain}\""}
    with serve_pdp(load_config(path)) as (url, service), \
            httpx.Client(verify=client_context(gateway_pki, tmp_path, "gateway"), timeout=10) as proxy:
        assert proxy.get(f"{url}/ext_authz/orders", headers=headers).status_code == 200
        store_revocation(service.pdp.store, Revocation("cert", gateway_pki["gateway"].thumbprint, "proxy key leaked",
                                                       time.time()))
        assert service.revocation_sync.refresh()
        r = proxy.get(f"{url}/ext_authz/orders", headers=headers)
    assert r.status_code != 200, r.text
