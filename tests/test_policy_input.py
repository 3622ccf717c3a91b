"""The policy's input document: opa-envoy-plugin's layout plus what pdp verified."""

from __future__ import annotations

import json
import time
import urllib.parse
from types import MappingProxyType
from typing import Any

import pytest
from conftest import AUDIENCE, CLIENT_ID, bound_token

from pdp.certificates.identity import CertIdentity
from pdp.certificates.trust import ChainVerifier, TrustBundle
from pdp.credentials.jwks import StaticKeySource, parse_jwks
from pdp.credentials.tokens import Issuer, TokenVerifier, VerifiedToken
from pdp.policy.input import build_input, parse_path
from pdp.request import CheckRequest


@pytest.fixture
def identity(pki: Any) -> CertIdentity:
    verifier = ChainVerifier([TrustBundle("example.org", (pki.root.cert,), "example.org")])
    return verifier.verify(pki.chain(), time.time())


@pytest.fixture
def token(issuer: Any, pki: Any) -> tuple[str, VerifiedToken]:
    verifier = TokenVerifier([Issuer(issuer=issuer.issuer, audiences=frozenset([AUDIENCE]),
                                     algorithms=frozenset(["ES256"]),
                                     keys=StaticKeySource(parse_jwks(issuer.jwks)))])
    raw = bound_token(issuer, pki.client, scope="read write", subject="alice", client_id="app-1")
    return raw, verifier.verify(raw, time.time())


def request(path: str = "/orders/42?expand=items&expand=customer", **kw: Any) -> CheckRequest:
    kw.setdefault("headers", MappingProxyType({"authorization": "Bearer x", "x-trace": "t1"}))
    return CheckRequest(method="GET", path=path, time=time.time(), host="api.test", scheme="https",
                        protocol="HTTP/2", source_address="10.1.2.3", **kw)


def test_envoy_layout_with_certificate_and_token(identity: CertIdentity, token: tuple[str, VerifiedToken],
                                                 pki: Any) -> None:
    raw, verified = token
    binding = {"method": "x5t#S256", "bound": True}
    doc = build_input(request(), identity, verified, binding)

    http = doc["attributes"]["request"]["http"]
    assert http == {"method": "GET", "path": "/orders/42?expand=items&expand=customer", "host": "api.test",
                    "scheme": "https", "protocol": "HTTP/2",
                    "headers": {"authorization": "Bearer x", "x-trace": "t1"}}
    assert type(http["headers"]) is dict

    source = doc["attributes"]["source"]
    assert source["address"] == {"socketAddress": {"address": "10.1.2.3"}}
    assert source["principal"] == CLIENT_ID
    # Envoy's attributes.source.certificate: the leaf as URL-encoded PEM
    assert urllib.parse.unquote(source["certificate"]) == pki.client.pem.decode()
    assert "\n" not in source["certificate"]

    assert doc["path"] == "/orders/42"
    assert doc["parsed_path"] == ["orders", "42"]
    assert doc["parsed_query"] == {"expand": ["items", "customer"]}

    cert = doc["cert"]
    assert cert["present"] is True
    assert cert["spiffe_id"] == CLIENT_ID
    assert cert["trust_domain"] == "example.org"
    assert cert["thumbprint"] == pki.client.thumbprint
    assert cert["trust_bundle"] == "example.org"

    tok = doc["token"]
    assert tok["present"] is True
    assert tok["sub"] == "alice" and tok["client_id"] == "app-1"
    assert tok["issuer"] == verified.issuer
    assert tok["scopes"] == ["read", "write"]
    assert tok["claims"]["cnf"] == {"x5t#S256": pki.client.thumbprint}
    assert tok["jti"] == verified.jti
    assert raw not in json.dumps(tok)

    assert doc["binding"] == binding
    assert json.loads(json.dumps(doc)) == doc  # plain JSON all the way down


def test_no_certificate_no_token() -> None:
    doc = build_input(request(), None, None, {"method": None, "bound": False})
    assert doc["cert"] == {"present": False}
    assert doc["token"] == {"present": False}
    assert doc["binding"] == {"method": None, "bound": False}
    assert doc["attributes"]["source"] == {"address": {"socketAddress": {"address": "10.1.2.3"}}}


def test_context_extensions_and_metadata() -> None:
    ctx = {"context_extensions": {"virtual_host": "api"}, "metadata_context": {"filter_metadata": {"a": {"b": 1}}}}
    doc = build_input(request(context=MappingProxyType(ctx)), None, None, {})
    assert doc["attributes"]["contextExtensions"] == {"virtual_host": "api"}
    assert doc["attributes"]["metadataContext"] == {"filter_metadata": {"a": {"b": 1}}}
    empty = build_input(request(), None, None, {})
    assert empty["attributes"]["contextExtensions"] == {}
    assert empty["attributes"]["metadataContext"] == {}


@pytest.mark.parametrize("path,expected", [
    ("/orders", "/orders"),
    ("/orders?x=1", "/orders"),
    ("/orders?x=1#frag", "/orders"),
    ("/a#frag?x=1", "/a"),
    ("/a%20b?c", "/a%20b"),
    ("/", "/"),
])
def test_input_path_is_the_path_without_query(path: str, expected: str) -> None:
    doc = build_input(request(path), None, None, {})
    assert doc["path"] == expected
    assert doc["attributes"]["request"]["http"]["path"] == path


@pytest.mark.parametrize("path,segments,query", [
    ("/a/b?x=1&x=2", ["a", "b"], {"x": ["1", "2"]}),
    ("/orders", ["orders"], {}),
    ("/a//b", ["a", "", "b"], {}),
    ("/a%20b/c%2Fd", ["a b", "c", "d"], {}),  # split after decoding, as the plugin does
    ("/caf%C3%A9", ["caf\u00e9"], {}),
    ("/s?q=a%26b&k%3D=v+w&e&x=1&x=2&x=", ["s"],
     {"q": ["a&b"], "k=": ["v w"], "e": [""], "x": ["1", "2", ""]}),
    ("/s?b=2&a=1&b=1", ["s"], {"b": ["2", "1"], "a": ["1"]}),
    ("/p#frag", ["p"], {}),
])
def test_parse_path(path: str, segments: list[str], query: dict[str, list[str]]) -> None:
    assert parse_path(path) == (segments, query)


def test_parsed_path_and_query_reach_the_document() -> None:
    doc = build_input(request("/v1/items%2Fx?tag=a&tag=b%20c"), None, None, {})
    assert doc["parsed_path"] == ["v1", "items", "x"]
    assert doc["parsed_query"] == {"tag": ["a", "b c"]}


@pytest.mark.parametrize("path,segments", [("/", [""]), ("/a/", ["a", ""]), ("/a/b/?x=1", ["a", "b", ""])])
def test_parsed_path_matches_opa_envoy_plugin_for_trailing_slashes(path: str, segments: list[str]) -> None:
    assert parse_path(path)[0] == segments
