"""Envoy ext_authz over gRPC: the real service, called by a real grpcio client built from Envoy's protos.

The client sends the bytes Envoy sends (there is no Envoy binary here; this client stands in for it).
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import Pki, bound_token, check_request
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import serve_pdp

from pdp.config import load_config

pytestmark = pytest.mark.integration


def envoy_request(pki: Pki | None = None, token: str | None = None, *, leaf: Any = None, path: str = "/orders",
                  method: str = "GET", certificate: str | None = None, raw_headers: bool = False,
                  extensions: dict[str, str] | None = None,
                  metadata: dict[str, Any] | None = None) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy builds it (include_peer_certificate: the URL-encoded leaf PEM)."""
    headers = {":authority": "api.test", ":method": method, ":path": path, "x-request-id": "r-1"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method=method, path=path, host="api.test", scheme="https", protocol="HTTP/2")
    if raw_headers:
        http.header_map.headers.extend(base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items())
    else:
        http.headers.update(headers)
    source = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=51000)))
    if certificate is not None:
        source.certificate = certificate
    elif pki is not None:
        source.certificate = urllib.parse.quote(((leaf or pki.client).pem).decode(), safe="")
        source.principal = "spiffe://example.org/demo/client"
    attributes = attribute_context_pb2.AttributeContext(
        source=source, request=attribute_context_pb2.AttributeContext.Request(http=http),
        context_extensions=extensions or {})
    if metadata is not None:
        attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(metadata)
    return external_auth_pb2.CheckRequest(attributes=attributes)


@pytest.fixture
def envoy(write_setup) -> Iterator[Any]:
    def start(**kw: Any) -> Any:
        ctx = serve_pdp(load_config(write_setup(**kw)))
        _, service = ctx.__enter__()
        opened.append(ctx)
        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc.port}")
        channels.append(channel)
        return external_auth_pb2_grpc.AuthorizationStub(channel), channel, service

    opened: list[Any] = []
    channels: list[grpc.Channel] = []
    yield start
    for channel in channels:
        channel.close()
    for ctx in opened:
        ctx.__exit__(None, None, None)


def headers_of(options) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}


def test_a_bound_token_on_its_certificate_is_ok_with_upstream_headers(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client)))
    assert response.status.code == code_pb2.OK
    added = headers_of(response.ok_response.headers)
    assert added["x-pdp-spiffe-id"] == "spiffe://example.org/demo/client"
    assert added["x-pdp-subject"] == "demo-user"
    # authorization and dpop are pdp's to strip; no x-pdp-* header is left for the client to forge
    assert list(response.ok_response.headers_to_remove) == ["authorization", "dpop"]
    assert all(o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
               for o in response.ok_response.headers)
    meta = json_format.MessageToDict(response.dynamic_metadata)
    assert meta["decision_id"] == added["x-pdp-decision-id"]
    assert meta["reason"] == "allowed" and meta["spiffe_id"] == "spiffe://example.org/demo/client"


def test_a_token_bound_to_another_certificate_is_unauthenticated_401(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client), leaf=pki.other))
    assert response.status.code == code_pb2.UNAUTHENTICATED
    denied = response.denied_response
    assert denied.status.code == 401
    challenge = headers_of(denied.headers)["www-authenticate"]
    assert 'error="invalid_token"' in challenge
    body = json.loads(denied.body)
    assert body["reason"] == "binding_mismatch"
    token = bound_token(issuer, pki.client)
    assert token not in denied.body and "BEGIN CERTIFICATE" not in denied.body


def test_no_certificate_is_permission_denied_403(envoy):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(None))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert json.loads(response.denied_response.body)["reason"] == "cert_required"


@pytest.mark.parametrize("certificate", ["%%%", urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n"),
                                         urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                            "-----END CERTIFICATE-----\n")])
def test_a_malformed_peer_certificate_is_denied_as_malformed(envoy, pki, issuer, certificate):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client), certificate=certificate))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert json.loads(response.denied_response.body)["reason"] == "cert_malformed"


def test_raw_header_map_and_query_strings_are_read_like_headers(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client), raw_headers=True,
                                        path="/orders?page=2"))
    assert response.status.code == code_pb2.OK


ECHO = """package pdp.authz
import rego.v1
result := {
  "allowed": true,
  "headers": {
    "x-tenant": input.attributes.contextExtensions.tenant,
    "x-jwt-sub": input.attributes.metadataContext.filterMetadata["envoy.filters.http.jwt_authn"].sub,
  },
  "dynamic_metadata": {"tier": "gold"},
}
"""


def test_context_extensions_and_metadata_context_reach_the_policy(envoy, pki, issuer, tmp_path):
    policy = tmp_path / "echo"
    policy.mkdir()
    (policy / "p.rego").write_text(ECHO)
    stub, _, _ = envoy(policy_paths=[str(policy)])
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client), extensions={"tenant": "acme"},
                                        metadata={"sub": "verified-by-envoy"}))
    assert response.status.code == code_pb2.OK, response
    added = headers_of(response.ok_response.headers)
    assert added["x-tenant"] == "acme" and added["x-jwt-sub"] == "verified-by-envoy"
    assert json_format.MessageToDict(response.dynamic_metadata)["policy"] == {"tier": "gold"}


def test_a_policy_error_is_a_deny_answer_not_an_rpc_failure(envoy, pki, issuer, tmp_path):
    policy = tmp_path / "broken"
    policy.mkdir()
    (policy / "p.rego").write_text('package pdp.authz\nimport rego.v1\nresult := to_number("x")\n')
    stub, _, _ = envoy(policy_paths=[str(policy)])
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client)))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert json.loads(response.denied_response.body)["reason"] == "policy_error"


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_metadata_that_has_no_json_form_is_a_request_invalid_deny(envoy, pki, issuer, number):
    """A ``Struct`` number that JSON cannot carry (Go's protojson refuses it too) is a deny with a reason,
    never an RPC error nor an internal error."""
    stub, _, _ = envoy()
    request = envoy_request(pki, bound_token(issuer, pki.client))
    metadata = struct_pb2.Struct()
    metadata.update({"n": number})
    request.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(metadata)
    response = stub.Check(request)
    assert response.status.code == code_pb2.PERMISSION_DENIED, response
    assert json.loads(response.denied_response.body)["reason"] == "request_invalid"


def test_the_standard_grpc_health_service_reports_serving(envoy):
    _, channel, _ = envoy()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_checks_each_get_their_own_answer(envoy, pki, issuer):
    stub, _, _ = envoy()
    token = bound_token(issuer, pki.client)

    def ask(i: int) -> tuple[int, int]:
        leaf = pki.client if i % 2 == 0 else pki.other
        return i, stub.Check(envoy_request(pki, token, leaf=leaf)).status.code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for i, code in pool.map(ask, range(64)):
            assert code == (code_pb2.OK if i % 2 == 0 else code_pb2.UNAUTHENTICATED)


# -- golden responses: the exact CheckResponse for a few decisions (the decision id normalised)

def _normalised(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    doc = json_format.MessageToDict(response)
    decision_id = doc.get("dynamicMetadata", {}).get("decision_id")
    text = json.dumps(doc, sort_keys=True)
    if decision_id:
        text = text.replace(decision_id, "DECISION-ID")
    return json.loads(text)


def test_golden_allow(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = _normalised(stub.Check(envoy_request(pki, bound_token(issuer, pki.client))))
    thumbprint = pki.client.thumbprint
    overwrite = "OVERWRITE_IF_EXISTS_OR_ADD"
    assert response == {
        "status": {},
        "okResponse": {
            "headers": [
                {"header": {"key": "x-pdp-spiffe-id", "value": "spiffe://example.org/demo/client"},
                 "appendAction": overwrite},
                {"header": {"key": "x-pdp-cert-thumbprint", "value": thumbprint}, "appendAction": overwrite},
                {"header": {"key": "x-pdp-subject", "value": "demo-user"}, "appendAction": overwrite},
                {"header": {"key": "x-pdp-client-id", "value": "demo-client"}, "appendAction": overwrite},
                {"header": {"key": "x-pdp-decision-id", "value": "DECISION-ID"}, "appendAction": overwrite},
            ],
            "headersToRemove": ["authorization", "dpop"],
        },
        "dynamicMetadata": {
            "decision_id": "DECISION-ID", "reason": "allowed", "spiffe_id": "spiffe://example.org/demo/client",
            "cert_thumbprint": thumbprint, "sub": "demo-user", "client_id": "demo-client",
            "iss": "https://issuer.test", "jti": response["dynamicMetadata"]["jti"],
        },
    }


def test_golden_deny_binding_mismatch(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = _normalised(stub.Check(envoy_request(pki, bound_token(issuer, pki.client), leaf=pki.other)))
    assert response == {
        "status": {"code": 16, "message": "binding_mismatch"},
        "deniedResponse": {
            "status": {"code": "Unauthorized"},
            "headers": [
                {"header": {"key": "www-authenticate",
                            "value": 'Bearer realm="pdp", error="invalid_token", error_description="the access '
                                     'token is bound to another certificate"'},
                 "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"},
                {"header": {"key": "content-type", "value": "application/json"},
                 "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"},
            ],
            "body": '{"reason": "binding_mismatch", "decision_id": "DECISION-ID"}',
        },
        "dynamicMetadata": {
            "decision_id": "DECISION-ID", "reason": "binding_mismatch",
            "spiffe_id": "spiffe://example.org/demo/other", "cert_thumbprint": pki.other.thumbprint,
            "sub": "demo-user", "client_id": "demo-client", "iss": "https://issuer.test",
            "jti": response["dynamicMetadata"]["jti"],
        },
    }


def test_golden_deny_token_required(envoy, pki):
    stub, _, _ = envoy()
    response = _normalised(stub.Check(envoy_request(pki)))
    assert response == {
        "status": {"code": 16, "message": "token_required"},
        "deniedResponse": {
            "status": {"code": "Unauthorized"},
            "headers": [
                {"header": {"key": "www-authenticate", "value": 'Bearer realm="pdp"'},
                 "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"},
                {"header": {"key": "content-type", "value": "application/json"},
                 "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"},
            ],
            "body": '{"reason": "token_required", "decision_id": "DECISION-ID"}',
        },
        "dynamicMetadata": {
            "decision_id": "DECISION-ID", "reason": "token_required",
            "spiffe_id": "spiffe://example.org/demo/client", "cert_thumbprint": pki.client.thumbprint,
        },
    }


def test_the_metadata_struct_is_valid_for_envoy(envoy, pki, issuer):
    stub, _, _ = envoy()
    response = stub.Check(envoy_request(pki, bound_token(issuer, pki.client)))
    assert isinstance(response.dynamic_metadata, struct_pb2.Struct)
    assert response.dynamic_metadata.fields["decision_id"].string_value


def test_pdp_serve_grpc_flag_opens_the_ext_authz_listener(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from servers import free_port, wait_for

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "pdp"), "serve", "--http", f"127.0.0.1:{http_port}",
                             "--grpc", f"127.0.0.1:{grpc_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{http_port}/healthz")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            denied = external_auth_pb2_grpc.AuthorizationStub(channel).Check(envoy_request(None))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert json.loads(denied.denied_response.body)["reason"] == "cert_required"


def _tampered(token: str) -> str:
    header, claims, signature = token.split(".")
    return f"{header}.{claims}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


@pytest.mark.parametrize(("case", "reason", "grpc_code", "http_status"), [
    ("expired", "token_expired", code_pb2.UNAUTHENTICATED, 401),
    ("bad_signature", "token_signature_invalid", code_pb2.UNAUTHENTICATED, 401),
    ("unknown_issuer", "token_issuer_unknown", code_pb2.UNAUTHENTICATED, 401),
    ("unbound", "token_unbound", code_pb2.UNAUTHENTICATED, 401),
    ("untrusted_cert", "cert_untrusted", code_pb2.PERMISSION_DENIED, 403),
    ("scope", "insufficient_scope", code_pb2.PERMISSION_DENIED, 403),
    ("admin_path", "spiffe_id_denied", code_pb2.PERMISSION_DENIED, 403),
    ("dot_segments", "request_invalid", code_pb2.PERMISSION_DENIED, 400),
])
def test_each_deny_reason_maps_to_envoys_codes(envoy, pki, issuer, case, reason, grpc_code, http_status):
    import time

    from pdp.devpki import TokenIssuer, make_ca, make_client

    stub, _, _ = envoy()
    path, leaf = "/orders", pki.client
    token = bound_token(issuer, pki.client)
    if case == "expired":
        token = bound_token(issuer, pki.client, now=time.time() - 7200, lifetime=60)
    elif case == "bad_signature":
        token = _tampered(token)
    elif case == "unknown_issuer":
        token = bound_token(TokenIssuer.generate("https://elsewhere.test", kid="k1"), pki.client)
    elif case == "unbound":
        token = issuer.mint(audience="https://api.test")
    elif case == "untrusted_cert":
        leaf = make_client(make_ca("rogue"))
        token = bound_token(issuer, leaf)
    elif case == "scope":
        token = bound_token(issuer, pki.client, scope="profile")
    elif case == "admin_path":
        path = "/admin/users"
    elif case == "dot_segments":
        path = "/public/../orders"
    message = envoy_request(pki, token, leaf=leaf, path=path)
    if case == "untrusted_cert":
        message.attributes.source.certificate = urllib.parse.quote(leaf.pem.decode(), safe="")
    response = stub.Check(message)
    assert json.loads(response.denied_response.body)["reason"] == reason
    assert (response.status.code, response.denied_response.status.code) == (grpc_code, http_status)


def test_dpop_through_envoy_rebuilds_htu_from_scheme_host_and_path(envoy, pki, issuer):
    from conftest import AUDIENCE

    from pdp.devpki import DpopKey

    stub, _, _ = envoy()
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    message = envoy_request(pki, path="/orders?page=2")
    message.attributes.request.http.headers["authorization"] = f"DPoP {token}"
    message.attributes.request.http.headers["dpop"] = key.proof("GET", "https://api.test/orders", token)
    assert stub.Check(message).status.code == code_pb2.OK
    wrong_host = key.proof("GET", "https://other.test/orders", token)
    message.attributes.request.http.headers["dpop"] = wrong_host
    denied = stub.Check(message)
    assert json.loads(denied.denied_response.body)["reason"] == "dpop_proof_invalid"
    challenge = {h.header.key: h.header.value for h in denied.denied_response.headers}["www-authenticate"]
    assert challenge.startswith("DPoP ")


# -- a repeated allow is rendered from kept bytes: the same bytes as a whole rendering

RICH = """package pdp.authz
import rego.v1
result := {
  "allowed": true,
  "headers": object.union(
    {"x-tenant": "acme", "set-cookie": ["a=1", "b=2"]},
    {k: v | some k, v in {"x-pdp-decision-id": "policy-made"}; input.attributes.request.http.headers["x-own-id"]}),
  "response_headers_to_add": {"x-served-by": "pdp"},
  "request_headers_to_remove": ["x-debug"],
  "query_parameters_to_set": {"page": "1"},
  "query_parameters_to_remove": ["trace"],
  "dynamic_metadata": {"tier": "gold", "limits": {"rps": 10}},
}
"""


def _effective(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    """What Envoy makes of a response: each header list applied in order (overwrite or append), the
    metadata as a document, every other member as it is."""
    def applied(options: Any) -> dict[str, list[str]]:
        lines: dict[str, list[str]] = {}
        for option in options:
            key, value = option.header.key, option.header.value
            if option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD:
                lines[key] = [value]
            else:
                lines.setdefault(key, []).append(value)
        return lines

    doc = json_format.MessageToDict(response)
    doc.get("okResponse", {}).pop("headers", None)
    doc.get("okResponse", {}).pop("responseHeadersToAdd", None)
    doc.pop("dynamicMetadata", None)
    return {"rest": doc, "headers": applied(response.ok_response.headers),
            "response_headers": applied(response.ok_response.response_headers_to_add),
            "metadata": json_format.MessageToDict(response.dynamic_metadata)}


@pytest.mark.parametrize("own_id", [False, True], ids=["pdp's id", "the policy's id header"])
def test_a_repeated_allow_renders_as_the_whole_response_would(make_pdp, pki, issuer, tmp_path, own_id):
    from pdp.adapters.envoy_grpc import render, to_check_response

    policy = tmp_path / "rich"
    policy.mkdir()
    (policy / "p.rego").write_text(RICH)
    pdp = make_pdp(engine="regorus", policy_paths=[str(policy)])
    token = bound_token(issuer, pki.client)
    headers = {"x-own-id": "1"} if own_id else {}
    decisions = [pdp.decide(check_request(chain=pki.chain(), token=token, headers=headers, path="/orders?trace=1"))
                 for _ in range(4)]
    assert all(d.allowed for d in decisions) and decisions[1].parts is decisions[0].parts
    for decision in decisions:
        assert render(decision) == to_check_response(decision).SerializeToString()  # byte for byte
        rendered = external_auth_pb2.CheckResponse.FromString(render(decision))
        assert _effective(rendered) == _effective(to_check_response(decision))
        assert rendered.dynamic_metadata.fields["decision_id"].string_value == decision.decision_id
    assert len({d.decision_id for d in decisions}) == 4


def test_a_changed_header_with_further_lines_keeps_them(make_pdp, pki, issuer, tmp_path):
    """A set-cookie the policy sets twice is one header and one appended line: a copy of the decision
    with another first value still sends the appended line, as the whole rendering does."""
    import dataclasses

    from pdp.adapters.envoy_grpc import render, to_check_response

    policy = tmp_path / "cookies"
    policy.mkdir()
    (policy / "p.rego").write_text('package pdp.authz\nimport rego.v1\nresult := {"allowed": true, '
                                   '"headers": {"set-cookie": ["a=1", "b=2"]}}\n')
    pdp = make_pdp(engine="regorus", policy_paths=[str(policy)])
    first = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    render(first)
    changed = dataclasses.replace(first, headers={**first.headers, "set-cookie": "c=3"})
    rendered = external_auth_pb2.CheckResponse.FromString(render(changed))
    assert _effective(rendered) == _effective(to_check_response(changed))
    assert _effective(rendered)["headers"]["set-cookie"] == ["c=3", "b=2"]


def test_an_allow_changed_after_the_pipeline_is_rendered_whole(make_pdp, pki, issuer):
    """A decision copied with other headers (``dataclasses.replace``) keeps its parts: what differs from
    them is rendered, never the kept bytes alone."""
    import dataclasses

    from pdp.adapters.envoy_grpc import render, to_check_response

    pdp = make_pdp()
    first = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    render(first)
    changed = [
        dataclasses.replace(first, headers={**first.headers, "x-pdp-subject": "someone-else"}),
        dataclasses.replace(first, headers={k: v for k, v in first.headers.items() if k != "x-pdp-subject"}),
        dataclasses.replace(first, headers_to_remove=("x-other",)),
        dataclasses.replace(first, metadata={**first.metadata, "sub": "someone-else"}),
        dataclasses.replace(first, metadata={**first.metadata, "extra": {"nested": 1}}),
        dataclasses.replace(first, allowed=False, status=403, reason="policy_denied"),
        dataclasses.replace(first, headers={**first.headers, "X-PDP-Subject": "someone-else"}),
    ]
    for decision in changed:
        rendered = external_auth_pb2.CheckResponse.FromString(render(decision))
        assert _effective(rendered) == _effective(to_check_response(decision))
