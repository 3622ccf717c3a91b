"""pdp's own callers against pdp's revocation list: one rule (``caller_refusal``) for the HTTP gate, the gRPC gate
and the admin endpoints, with or without an allowlist of callers."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from conftest import bound_token
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from servers import serve_pdp
from test_envoy_grpc import envoy_request
from test_listener_tls import (  # noqa: F401  (fixtures)
    GATEWAY_ID,
    _grpc_channel,
    client_context,
    gateway_pki,
    tls_setup,
)

from pdp.certificates.revocation_list import Revocation, remove_revocation, store_revocation
from pdp.config import load_config

pytestmark = pytest.mark.integration


def _http_status(client: httpx.Client, url: str, pem: str) -> tuple[int, str]:
    r = client.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders", "client_cert": pem})
    return r.status_code, str(r.json().get("reason"))


def _grpc_code(port: int, gateway_pki, pki, token: str) -> grpc.StatusCode | int:  # noqa: F811
    with _grpc_channel(port, gateway_pki, "gateway") as channel:
        try:
            answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(envoy_request(pki, token))
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return int(answer.status.code)


@pytest.mark.parametrize("allowed", [f'["{GATEWAY_ID}"]', "[]"], ids=["allowlist", "any-caller-of-the-ca"])
@pytest.mark.parametrize("kind", ["cert", "subject"])
def test_a_revoked_gateway_is_refused_on_both_listeners_and_admitted_again_once_unrevoked(
        tls_setup, tmp_path, gateway_pki, pki, issuer, allowed, kind):  # noqa: F811
    value = gateway_pki["gateway"].thumbprint if kind == "cert" else GATEWAY_ID
    token = bound_token(issuer, pki.client)
    with serve_pdp(load_config(tls_setup(allowed))) as (url, service), \
            httpx.Client(verify=client_context(gateway_pki, tmp_path, "gateway"), timeout=10) as gateway:
        assert _http_status(gateway, url, pki.chain_pem())[0] == 200
        assert _grpc_code(service.grpc.port, gateway_pki, pki, token) == code_pb2.OK
        store_revocation(service.pdp.store, Revocation(kind, value, "gateway key leaked", time.time()))
        assert service.revocation_sync.refresh()
        assert _http_status(gateway, url, pki.chain_pem()) == (403, "caller_revoked")
        assert gateway.get(f"{url}/readyz").status_code == 403  # every route: the gate is before them all
        assert _grpc_code(service.grpc.port, gateway_pki, pki, token) == grpc.StatusCode.PERMISSION_DENIED
        assert remove_revocation(service.pdp.store, kind, value)
        assert service.revocation_sync.refresh()
        assert _http_status(gateway, url, pki.chain_pem())[0] == 200
        assert _grpc_code(service.grpc.port, gateway_pki, pki, token) == code_pb2.OK


def test_another_callers_revocation_refuses_no_one_else(tls_setup, tmp_path, gateway_pki, pki):  # noqa: F811
    with serve_pdp(load_config(tls_setup())) as (url, service), \
            httpx.Client(verify=client_context(gateway_pki, tmp_path, "gateway"), timeout=10) as gateway:
        store_revocation(service.pdp.store, Revocation("cert", gateway_pki["dns_gateway"].thumbprint,
                                                       created=time.time()))
        assert service.revocation_sync.refresh()
        assert _http_status(gateway, url, pki.chain_pem())[0] == 200
