"""A policy written the OPA-Envoy way, unchanged, through every entry point.

The input members opa-envoy-plugin builds (``version``, ``parsed_path``, ``parsed_body``,
``truncated_body``) and every result member it reads (``headers`` as a list of objects,
``response_headers_to_add``, ``request_headers_to_remove``, ``query_parameters_to_set`` / ``_remove``,
``http_status``, ``body``, ``dynamic_metadata``), and what each adapter does with each.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format
from google.rpc import code_pb2
from pdp.adapters.asgi import PdpMiddleware
from servers import free_port, serve_pdp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.errors import Denied
from pdp.policy.input import parse_body
from pdp.request import CheckRequest

pytestmark = pytest.mark.integration

POLICY = """package envoy.authz

import rego.v1

default allow := false

default item := "none"

item := input.parsed_body.item

default truncated := "no"

truncated := "yes" if input.truncated_body

allow := {
  "allowed": true,
  "headers": [{"x-tenant": "acme"}, {"x-item": item, "x-truncated": truncated}],
  "response_headers_to_add": {"x-served-by": "pdp"},
  "request_headers_to_remove": ["x-internal"],
  "query_parameters_to_set": {"tenant": "acme", "tag": ["a", "b"]},
  "query_parameters_to_remove": ["debug"],
  "dynamic_metadata": {"tier": "gold"},
  "comment": "members the plugin does not read are ignored",
} if {
  input.parsed_path == ["orders"]
  input.version == {"ext_authz": "v3", "encoding": "protojson"}
}

allow := {
  "allowed": false,
  "http_status": 451,
  "body": "not here",
  "headers": [{"x-why": "geo"}],
  "dynamic_metadata": {"blocked": true},
} if {
  input.parsed_path == ["blocked"]
}
"""


@pytest.fixture
def config(write_setup: Any, tmp_path: Path) -> Path:
    policy = tmp_path / "envoy-policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(POLICY)
    path: Path = write_setup(engine="regorus", policy_paths=[str(policy)])
    path.write_text(path.read_text().replace("[policy]\n", '[policy]\ndecision = "envoy/authz/allow"\n', 1))
    return path


@pytest.fixture
def service(config: Path) -> Iterator[tuple[str, Any]]:
    with serve_pdp(load_config(config)) as (url, svc):
        yield url, svc


def _envoy_request(path: str, *, body: str = "", raw_body: bytes = b"",
                   headers: dict[str, str] | None = None) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="POST", path=path, host="api.test", scheme="https", protocol="HTTP/1.1", body=body,
        raw_body=raw_body)
    http.headers.update({":authority": "api.test", "x-internal": "secret", **(headers or {})})
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))


def _pairs(options: Any) -> list[tuple[str, str]]:
    return [(o.header.key, o.header.value) for o in options]


def test_envoy_grpc_honours_every_member(service: tuple[str, Any]) -> None:
    _, svc = service
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        body = json.dumps({"item": "book"})
        ok = stub.Check(_envoy_request("/orders?debug=1&keep=2", body=body, headers={
            "content-type": "application/json", "content-length": str(len(body))}))
        packed = stub.Check(_envoy_request("/orders", raw_body=b'{"item": "pen"}',
                                           headers={"content-type": "application/json"}))
        cut = stub.Check(_envoy_request("/orders", body='{"item": "bo', headers={
            "content-type": "application/json", "content-length": "4096"}))
        denied = stub.Check(_envoy_request("/blocked"))
        garbled = stub.Check(_envoy_request("/orders", body="{not json", headers={"content-type": "application/json"}))
    assert ok.status.code == code_pb2.OK, ok
    upstream = dict(_pairs(ok.ok_response.headers))
    assert upstream["x-tenant"] == "acme" and upstream["x-item"] == "book" and upstream["x-truncated"] == "no"
    assert "x-internal" in ok.ok_response.headers_to_remove
    assert _pairs(ok.ok_response.response_headers_to_add) == [("x-served-by", "pdp")]
    assert [(p.key, p.value) for p in ok.ok_response.query_parameters_to_set] == [
        ("tag", "a"), ("tag", "b"), ("tenant", "acme")]
    assert list(ok.ok_response.query_parameters_to_remove) == ["debug"]
    assert json_format.MessageToDict(ok.dynamic_metadata)["policy"] == {"tier": "gold"}
    assert dict(_pairs(packed.ok_response.headers))["x-item"] == "pen"
    cut_headers = dict(_pairs(cut.ok_response.headers))
    assert cut_headers["x-item"] == "none" and cut_headers["x-truncated"] == "yes"
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert denied.denied_response.status.code == 451 and denied.denied_response.body == "not here"
    assert dict(_pairs(denied.denied_response.headers))["x-why"] == "geo"
    assert json_format.MessageToDict(denied.dynamic_metadata)["policy"] == {"blocked": True}
    # a body that is not what its content type says is a malformed request, as in the plugin
    assert garbled.status.code == code_pb2.PERMISSION_DENIED
    assert garbled.denied_response.status.code == 400
    assert json.loads(garbled.denied_response.body)["reason"] == "request_invalid"


def test_json_check_reports_every_member(service: tuple[str, Any]) -> None:
    url, _ = service
    ok = httpx.post(f"{url}/v1/check", json={
        "method": "POST", "path": "/orders?debug=1", "host": "api.test",
        "headers": {"content-type": "application/x-www-form-urlencoded", "x-internal": "s"},
        "body": "item=lamp&item=desk"}).json()
    assert ok["allowed"] is True
    # a form field is a list of values: as a header value, each value of the header
    assert ok["headers"]["x-tenant"] == "acme" and ok["headers"]["x-item"] == "lamp, desk"
    assert "x-internal" in ok["headers_to_remove"]
    assert ok["response_headers"] == {"x-served-by": "pdp"}
    assert ok["query_parameters_to_set"] == {"tenant": ["acme"], "tag": ["a", "b"]}
    assert ok["query_parameters_to_remove"] == ["debug"]
    assert ok["metadata"]["policy"] == {"tier": "gold"}
    denied = httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/blocked", "host": "api.test"}).json()
    assert denied["allowed"] is False and denied["status"] == 451 and denied["body"] == "not here"
    assert denied["response_headers"]["x-why"] == "geo"


def test_http_ext_authz_cannot_change_the_query_so_it_denies(service: tuple[str, Any]) -> None:
    url, _ = service
    r = httpx.get(f"{url}/ext_authz/orders?debug=1", headers={"host": "api.test"})
    assert r.status_code == 403 and r.headers["x-pdp-reason"] == "policy_error"
    denied = httpx.get(f"{url}/ext_authz/blocked", headers={"host": "api.test"})
    assert denied.status_code == 451 and denied.text == "not here" and denied.headers["x-why"] == "geo"


def test_asgi_rewrites_the_query_and_headers(config: Path) -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"query": request.scope["query_string"].decode(),
                             "tenant": request.headers.get("x-tenant"), "internal": request.headers.get("x-internal")})

    app = PdpMiddleware(Starlette(routes=[Route("/orders", echo), Route("/blocked", echo)]),
                        pdp=build_pdp(load_config(config), probe=False))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        ok = httpx.get(f"http://127.0.0.1:{port}/orders?debug=1&keep=%20x&tag=old",
                       headers={"x-internal": "secret"})
        denied = httpx.get(f"http://127.0.0.1:{port}/blocked")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"query": "keep=%20x&tag=a&tag=b&tenant=acme", "tenant": "acme", "internal": None}
    assert ok.headers["x-served-by"] == "pdp"
    assert denied.status_code == 451 and denied.text == "not here" and denied.headers["x-why"] == "geo"


def test_the_decision_cache_keys_on_the_parsed_body(config: Path) -> None:
    pdp = build_pdp(load_config(config), probe=False)
    assert pdp.policy.decisions is not None

    def item(body: str) -> str:
        request = CheckRequest(method="POST", path="/orders", time=time.time(), host="api.test", body=body,
                               headers=MappingProxyType({"content-type": "application/json"}))
        return pdp.decide(request).headers["x-item"]

    assert [item('{"item": "a"}'), item('{"item": "b"}'), item('{"item": "a"}'), item("")] == ["a", "b", "a", "none"]
    assert pdp.policy.decisions.hits == 1


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ({}, '{"a": 1}', (None, False)),
    ({"content-type": "text/plain"}, '{"a": 1}', (None, False)),
    ({"content-type": "application/json"}, "", (None, False)),
    ({"content-type": "application/json; charset=utf-8"}, '{"a": [1, 2.5]}', ({"a": [1, 2.5]}, False)),
    ({"content-type": "application/json"}, b'{"a": "\\ud800"}', ({"a": "\ufffd"}, False)),
    ({"content-type": "application/json", "content-length": "9"}, '{"a": 1}', (None, True)),
    ({"content-type": "application/json", "content-length": "-1"}, '{"a": 1}', ({"a": 1}, False)),
    ({"content-type": "application/x-www-form-urlencoded"}, "a=1&a=2&b=x+y&c", (
        {"a": ["1", "2"], "b": ["x y"], "c": [""]}, False)),
    ({"content-type": "multipart/form-data; boundary=x"}, "--x--", ({}, False)),
    ({"content-type": "multipart/form-data; boundary=x"}, '--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
     "--x--", ({"a": ["1"]}, False)),
], ids=repr)
def test_parse_body_as_the_plugin(headers: dict[str, str], body: str | bytes, expected: tuple[Any, bool]) -> None:
    assert parse_body(headers, body) == expected


# The plugin reads content-length with Go's strconv.ParseInt(v, 10, 64) and refuses the request when it errs.
@pytest.mark.parametrize("length", [
    "1_000", " 99999", "99999 ", "9\n", "\uff19\uff19\uff19", "\u0663", "", "+", "-", "+-1", "--1", "0x10", "1e3",
    "1.0", "9223372036854775808", "-9223372036854775809", "9" * 5000,
])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_content_length_is_read_as_go_parseint_reads_it(length: str, content_type: str) -> None:
    with pytest.raises(Denied) as caught:
        parse_body({"content-type": content_type, "content-length": length}, '{"a": 1}')
    assert caught.value.reason.code == "request_invalid"


@pytest.mark.parametrize(("length", "truncated"), [
    ("8", False), ("+8", False), ("0008", False), ("0" * 5000 + "9", True), ("9", True), ("-1", False), ("-0", False),
    ("-" + "0" * 5000 + "1", False), ("-9223372036854775808", False), ("9223372036854775807", True),
])
def test_content_length_go_accepts(length: str, truncated: bool) -> None:
    expected = (None, True) if truncated else ({"a": 1}, False)
    assert parse_body({"content-type": "application/json", "content-length": length}, '{"a": 1}') == expected


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", "{"), ("application/json", "NaN"), ("application/json", '{"a": 1} x'),
    ("application/x-www-form-urlencoded", "a=1;b=2"), ("application/x-www-form-urlencoded", "a=%zz"),
    ("multipart/form-data; boundary=x", "--x\r\n\r\nno closing boundary"), ("multipart/form-data; boundary", "--x--"),
])
def test_a_body_that_is_not_its_content_type_is_refused(content_type: str, body: str) -> None:
    with pytest.raises(Denied):
        parse_body({"content-type": content_type}, body)
