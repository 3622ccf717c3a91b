"""The admin endpoints: only on the mutual-TLS listener, only to the admin callers, and effective at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from servers import free_port, serve_pdp
from test_listener_tls import GATEWAY_ID, client_context, gateway_pki, tls_setup  # noqa: F401  (fixtures)

from pdp.config import load_config
from pdp.devpki import make_client
from pdp.errors import ConfigError

pytestmark = pytest.mark.integration

PDP = str(Path(sys.executable).parent / "pdp")
OPS_ID = "spiffe://example.org/ops"
ALLOWED = f'["{GATEWAY_ID}", "{OPS_ID}"]'


def _admin(path: Path, lines: str) -> Path:
    path.write_text(path.read_text().replace("[server]\n", f"[server]\n{lines}\n", 1))
    return path


@pytest.fixture
def callers(gateway_pki):  # noqa: F811
    return {**gateway_pki, "ops": make_client(gateway_pki["ca"], spiffe_id=OPS_ID, common_name="ops")}


def _client(callers, tmp_path, who: str) -> httpx.Client:
    return httpx.Client(verify=client_context(callers, tmp_path, who), timeout=10)


def _check(client: httpx.Client, url: str, pem: str) -> str:
    return str(client.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders", "client_cert": pem})
               .json()["reason"])


def test_revoke_list_and_unrevoke_over_mutual_tls(tls_setup, tmp_path, callers, pki):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, _), _client(callers, tmp_path, "ops") as ops, \
            _client(callers, tmp_path, "gateway") as gateway:
        chain = pki.chain_pem()
        assert _check(gateway, url, chain) != "cert_revoked"
        r = ops.post(f"{url}/admin/revocations", json={"kind": "cert", "value": pki.client.thumbprint,
                                                       "reason": "key leaked", "ttl": "1h"})
        assert r.status_code == 201, r.text
        assert r.json()["revoked"]["by"] == f"{OPS_ID} (admin endpoint)"
        assert _check(gateway, url, chain) == "cert_revoked"  # this replica at once

        listed = ops.get(f"{url}/admin/revocations").json()["revocations"]
        assert [(e["kind"], e["value"], e["reason"]) for e in listed] == [("cert", pki.client.thumbprint,
                                                                           "key leaked")]
        other = "spiffe://example.org/demo/other"
        assert ops.post(f"{url}/admin/revocations", json={"kind": "subject", "value": other}).status_code == 201
        subject = urllib.parse.quote(other, safe="")
        assert _check(gateway, url, pki.chain_pem(pki.other)) == "subject_revoked"
        assert ops.delete(f"{url}/admin/revocations/subject/{subject}").status_code == 200
        assert ops.delete(f"{url}/admin/revocations/cert/{pki.client.thumbprint}").status_code == 200
        assert ops.delete(f"{url}/admin/revocations/cert/{pki.client.thumbprint}").status_code == 404
        assert _check(gateway, url, chain) != "cert_revoked"

        identities = ops.get(f"{url}/admin/identities", params={"expiring": "3650d"})
        assert identities.status_code == 200


@pytest.mark.parametrize(("body", "status"), [
    ({"kind": "cert", "value": "nope"}, 400), ({"kind": "host", "value": "x"}, 400),
    ({"kind": "token", "value": "j", "ttl": "soon"}, 400), ({"kind": "token", "value": "j", "ttl": True}, 400),
    ([1, 2], 400), ("not json", 400),
])
def test_bad_admin_requests_are_400_and_change_nothing(tls_setup, tmp_path, callers, body, status):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        if isinstance(body, str):
            r = ops.post(f"{url}/admin/revocations", content=body)
        else:
            r = ops.post(f"{url}/admin/revocations", json=body)
        assert r.status_code == status and r.json()["error"] == "invalid_request"
        assert service.pdp.store.map_items("revocations") == {}


def test_a_listener_caller_who_is_not_an_admin_caller_gets_403(tls_setup, tmp_path, callers, pki):  # noqa: F811
    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "gateway") as gateway:
        r = gateway.post(f"{url}/admin/revocations", json={"kind": "cert", "value": pki.client.thumbprint})
        assert r.status_code == 403 and r.json()["error"] == "caller_not_allowed"
        assert gateway.get(f"{url}/admin/revocations").status_code == 403
        assert service.pdp.store.map_items("revocations") == {}


def test_without_server_admin_there_are_no_admin_endpoints(tls_setup, tmp_path, callers):  # noqa: F811
    with serve_pdp(load_config(tls_setup(ALLOWED))) as (url, _), _client(callers, tmp_path, "ops") as ops:
        assert ops.get(f"{url}/admin/revocations").status_code == 404


def test_the_admin_switch_is_refused_without_a_gated_mutual_tls_listener(write_setup, tls_setup, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError) as plain:
        load_config(_admin(write_setup(), "admin = true"))
    assert plain.value.key == "server.admin"
    with pytest.raises(ConfigError) as ungated:
        load_config(_admin(tls_setup("[]"), "admin = true"))
    assert ungated.value.key == "server.admin"
    with pytest.raises(ConfigError) as outside:
        load_config(_admin(tls_setup(ALLOWED), 'admin = true\nadmin_callers = ["spiffe://example.org/else"]'))
    assert outside.value.key == "server.admin_callers"
    with pytest.raises(ConfigError) as off:
        load_config(_admin(tls_setup(ALLOWED), f'admin_callers = ["{OPS_ID}"]'))
    assert off.value.key == "server.admin_callers"


def test_every_worker_of_pdp_serve_enforces_a_revocation_made_at_one(tls_setup, tmp_path, callers, pki):  # noqa: F811
    """``pdp serve --workers 2`` without ``store.url``: the workers share a SQLite file, and each reads the
    list's version every 0.25 s."""
    config = _admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]')
    port = free_port()
    server = subprocess.Popen([PDP, "serve", "--config", str(config), "--workers", "2", "--http",
                               f"127.0.0.1:{port}", "--grpc", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    fresh = {"connection": "close"}  # a new connection each time: either worker may take it
    try:
        with _client(callers, tmp_path, "ops") as ops, _client(callers, tmp_path, "gateway") as gateway:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if gateway.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "pdp serve --workers 2 did not start"
                time.sleep(0.1)
            r = ops.post(f"{url}/admin/revocations", json={"kind": "cert", "value": pki.client.thumbprint},
                         headers=fresh)
            assert r.status_code == 201, r.text
            revoked_at = time.monotonic()
            denied_in_a_row = 0
            while denied_in_a_row < 30:
                reason = gateway.post(f"{url}/v1/check", headers=fresh, json={
                    "method": "GET", "path": "/orders", "client_cert": pki.chain_pem()}).json()["reason"]
                denied_in_a_row = denied_in_a_row + 1 if reason == "cert_revoked" else 0
                assert time.monotonic() - revoked_at < 10, "not every worker enforces the revocation"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, err = server.communicate(timeout=30)
        assert b"Traceback" not in err, err.decode()


def test_admin_needs_its_callers_named(tls_setup):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        load_config(_admin(tls_setup(ALLOWED), "admin = true\nadmin_callers = []"))
    assert err.value.key == "server.admin_callers" and "admin_callers" in str(err.value)


@pytest.mark.parametrize("prefix", ["/admin", "/ADMIN", "/admin/x", "/oauth2", "/oauth2/introspect", "/.well-known",
                                    "/.well-known/oauth-authorization-server", "/v1/check", "/metrics", "/healthz/x"])
def test_an_ext_authz_prefix_on_pdp_s_own_endpoints_is_refused(write_setup, prefix):
    path = write_setup()
    path.write_text(path.read_text() + f'\n[gateway]\next_authz_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "gateway.ext_authz_prefix"


@pytest.mark.parametrize("prefix", ["/{p:path}", "/{rest}", "/ext_authz/{x}", "/a/../b", "/a/./b", "/a//b",
                                    "/ext authz", "/a%2Fb", "/ext_authz?x", "/ext_authz#x", "/\u00e9", "/a\\b"])
def test_an_ext_authz_prefix_a_router_or_decoder_reads_otherwise_is_refused(write_setup, prefix):
    """'/{p:path}' passed the check for pdp's own endpoints as text, and the router then read it as a
    pattern that took every path, /healthz and /v1/check included."""
    path = write_setup()
    path.write_text(path.read_text() + f'\n[gateway]\next_authz_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "gateway.ext_authz_prefix"


@pytest.mark.parametrize("prefix", ["/authz", "/administration", "/oauth", "/v10", "/ext_authz.v2", "/a/b-c/d~e"])
def test_an_ext_authz_prefix_beside_them_is_fine(write_setup, prefix):
    path = write_setup()
    path.write_text(path.read_text() + f'\n[gateway]\next_authz_prefix = "{prefix}"\n')
    assert load_config(path).gateway.ext_authz_prefix == prefix


def test_a_revoked_admin_is_refused_by_its_spiffe_id_too(tls_setup, tmp_path, callers):  # noqa: F811
    from pdp.certificates.revocation_list import Revocation, store_revocation

    config = load_config(_admin(tls_setup(ALLOWED), f'admin = true\nadmin_callers = ["{OPS_ID}"]'))
    with serve_pdp(config) as (url, service), _client(callers, tmp_path, "ops") as ops:
        assert ops.get(f"{url}/admin/revocations").status_code == 200
        store_revocation(service.pdp.store, Revocation("subject", OPS_ID, "left the team", time.time()))
        assert service.revocation_sync.refresh()
        r = ops.post(f"{url}/admin/revocations", json={"kind": "subject", "value": "spiffe://example.org/x"})
        assert r.status_code == 403 and r.json()["reason"] == "caller_revoked"
        assert ops.delete(f"{url}/admin/revocations/subject/{urllib.parse.quote(OPS_ID, safe='')}").status_code == 403
