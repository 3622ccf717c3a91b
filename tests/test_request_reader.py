"""pdp.request_reader: the one reading of a request, each rule tested on its own.

Every entry point hands its request over as a ``RawRequest``; these tests
hold the rules themselves (the conformance matrix sends the same requests
through every entry point)."""

from __future__ import annotations

import hashlib
import urllib.parse
from typing import Any

import pytest
from conftest import Pki
from cryptography.hazmat.primitives import serialization
from pdp.adapters.cert_headers import CertificateHeaders

from pdp import reasons
from pdp.errors import Denied
from pdp.request import CheckRequest
from pdp.request_reader import GatewaySettings, RawRequest, RequestReader, Via

NOW = 1_700_000_000.0
PROXY = "10.0.0.5"
STRANGER = "192.0.2.7"


def raw(via: Via = Via.SUBREQUEST, *, method: str = "GET", target: str = "/ext_authz/orders",
        headers: tuple[tuple[str, str], ...] = (), **kw: Any) -> RawRequest:
    return RawRequest(via=via, method=method, target=target, headers=headers, time=NOW, **kw)


def reader(fmt: str = "xfcc", forwarded: str = "envoy", **kw: Any) -> RequestReader:
    certs = CertificateHeaders(fmt, [f"{PROXY}/32", "spiffe://example.org/gateway"], **kw)
    return RequestReader(GatewaySettings(forwarded_request=forwarded, certificate_headers=certs))


def refused(r: RequestReader, request: RawRequest) -> str:
    with pytest.raises(Denied) as info:
        r.read(request)
    assert info.value.reason is reasons.REQUEST_INVALID
    return info.value.detail


def xfcc(pem: bytes, by: str | None = None) -> str:
    from cryptography import x509

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    element = f'Hash={hashlib.sha256(der).hexdigest()};Cert="{urllib.parse.quote(pem.decode(), safe="")}"'
    return f"By={by};{element}" if by else element


# -- singleton headers

@pytest.mark.parametrize("name", ["Authorization", "DPoP", "Host"])
def test_repeated_singleton_header_lines_are_refused(name: str) -> None:
    request = raw(headers=((name, "Bearer a" if name == "Authorization" else "x"), (name.upper(), "y")))
    assert "more than one" in refused(RequestReader(), request)


@pytest.mark.parametrize(("name", "value"), [
    ("authorization", "Bearer aaa,Bearer bbb"),
    ("authorization", "Bearer aaa, DPoP bbb"),
    ("authorization", "Basic dXNlcjpwYXNz,Bearer bbb"),
    ("authorization", "Digest username=\"a\", realm=\"b\",Bearer ccc"),
    ("dpop", "eyJ0.eyJ0.sig,eyJ0.eyJ0.sig"),
    ("host", "a.example,b.example"),
])
def test_two_values_joined_by_a_proxy_are_refused(name: str, value: str) -> None:
    """Envoy's gRPC headers map joins a repeated header with ',': the same rule must still hold."""
    refused(RequestReader(), raw(Via.DOCUMENT, target="/orders", headers=((name, value),)))


def test_one_credential_with_auth_params_is_not_two() -> None:
    request = raw(Via.DOCUMENT, target="/orders",
                  headers=(("authorization", 'Digest username="a", realm="b c", nonce="d"'),))
    assert RequestReader().read(request).headers["authorization"].startswith("Digest")


def test_other_repeated_headers_are_joined_in_order() -> None:
    request = raw(Via.DOCUMENT, target="/", headers=(("Accept", "a/b"), ("x-a", "1"), ("accept", "c/d")))
    assert dict(RequestReader().read(request).headers) == {"accept": "a/b,c/d", "x-a": "1"}


def test_host_and_authority_must_agree() -> None:
    assert "different hosts" in refused(RequestReader(), raw(Via.DOCUMENT, target="/", headers=(
        ("host", "a.example"), (":authority", "b.example"))))


def test_a_single_valued_certificate_header_is_a_singleton(pki: Pki) -> None:
    r = reader("nginx")
    value = urllib.parse.quote(pki.client.pem.decode(), safe="")
    refused(r, raw(headers=(("ssl-client-cert", value), ("ssl-client-cert", value)), peer_address=PROXY))


def test_two_lines_of_a_list_certificate_header_are_refused(pki: Pki) -> None:
    """XFCC holds its elements in one line; with two lines an upstream reading the first would see
    another certificate than pdp, which reads the last element."""
    value = xfcc(pki.client.pem)
    refused(reader(), raw(headers=(("x-forwarded-client-cert", value), ("X-Forwarded-Client-Cert", value)),
                          peer_address=PROXY))
    one_line = reader().read(raw(headers=(("x-forwarded-client-cert", f"{value},{value}"),), peer_address=PROXY))
    assert one_line.client_cert_chain[0] == pki.client.der


# -- method and target

def test_method_is_compared_upper_cased() -> None:
    assert RequestReader().read(raw(Via.DIRECT, method="get", target="/admin")).method == "GET"


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", "GÉT", "(GET)"])
def test_a_method_that_is_not_a_token_is_refused(method: str) -> None:
    refused(RequestReader(), raw(Via.DIRECT, method=method, target="/"))


@pytest.mark.parametrize(("target", "path"), [
    ("/ext_authz/public%2Fx", "/public%2Fx"),
    ("/ext_authz/a/../b?q=%2F", "/a/../b?q=%2F"),
    ("/ext_authz", "/"),
    ("/ext_authz?x=1", "/?x=1"),
])
def test_the_prefix_comes_off_the_raw_target_and_nothing_is_decoded(target: str, path: str) -> None:
    assert RequestReader().read(raw(target=target)).path == path


@pytest.mark.parametrize("target", ["/ext_authz*", "/ext_authzx/orders", "*", "/orders"])
def test_a_sub_request_target_outside_the_prefix_is_refused(target: str) -> None:
    """Envoy sends 'OPTIONS *' as '/ext_authz*': there is no request path in it to judge."""
    refused(RequestReader(), raw(target=target))


def test_the_sub_requests_framing_headers_are_not_the_originals() -> None:
    request = raw(headers=(("content-length", "0"), ("x-a", "1")))
    assert dict(RequestReader().read(request).headers) == {"x-a": "1"}


# -- forwarded original request

def test_nginx_original_request_headers_only_from_a_trusted_proxy() -> None:
    r = reader(forwarded="nginx")
    headers = (("x-original-uri", "/admin"), ("x-original-method", "delete"))
    trusted = r.read(raw(headers=headers, peer_address=PROXY))
    assert (trusted.method, trusted.path) == ("DELETE", "/admin")
    stranger = r.read(raw(headers=headers, peer_address=STRANGER))
    assert (stranger.method, stranger.path) == ("GET", "/orders")


def test_only_the_configured_gateways_family_is_read() -> None:
    r = reader(forwarded="nginx")
    request = r.read(raw(headers=(("x-forwarded-uri", "/admin"), ("x-forwarded-method", "DELETE"),
                                  ("x-original-uri", "/orders")), peer_address=PROXY))
    assert (request.method, request.path) == ("GET", "/orders")


def test_traefik_original_request_with_host_and_scheme() -> None:
    request = reader(forwarded="traefik").read(raw(headers=(
        ("x-forwarded-method", "POST"), ("x-forwarded-uri", "/orders?id=1"), ("x-forwarded-host", "api.example:8443"),
        ("x-forwarded-proto", "http")), peer_address=PROXY))
    assert (request.method, request.path, request.host, request.scheme) == (
        "POST", "/orders?id=1", "api.example:8443", "http")


def test_a_repeated_original_request_header_is_refused() -> None:
    refused(reader(forwarded="nginx"), raw(headers=(("x-original-uri", "/public"), ("x-original-uri", "/admin")),
                                          peer_address=PROXY))


# -- where the certificate comes from

def test_certificate_header_from_a_stranger_is_ignored_and_reported(pki: Pki) -> None:
    seen: list[tuple[str, str]] = []
    r = reader()
    r.on_untrusted = lambda header, peer: seen.append((header, peer))
    request = r.read(raw(headers=(("x-forwarded-client-cert", xfcc(pki.client.pem)),), peer_address=STRANGER))
    assert request.client_cert_chain == () and request.client_cert_error is None
    assert seen == [("x-forwarded-client-cert", STRANGER)]


def test_certificate_header_from_a_trusted_proxy(pki: Pki) -> None:
    request = reader().read(raw(headers=(("x-forwarded-client-cert", xfcc(pki.client.pem)),), peer_address=PROXY))
    assert request.client_cert_chain[0] == pki.client.der


def test_certificate_header_from_a_proxy_trusted_by_its_certificate(pki: Pki) -> None:
    request = reader().read(raw(headers=(("x-forwarded-client-cert", xfcc(pki.client.pem)),),
                                peer_address=STRANGER, caller_names=frozenset({"spiffe://example.org/gateway"})))
    assert request.client_cert_chain[0] == pki.client.der


def test_xfcc_by_is_applied_on_every_entry_point(pki: Pki) -> None:
    r = reader(xfcc_by="spiffe://example.org/gateway")
    for via in (Via.SUBREQUEST, Via.DIRECT):
        bare = r.read(raw(via, headers=(("x-forwarded-client-cert", xfcc(pki.client.pem)),), peer_address=PROXY))
        assert bare.client_cert_error is not None and not bare.client_cert_chain
        other = r.read(raw(via, headers=(("x-forwarded-client-cert", xfcc(pki.client.pem, "spiffe://x/y")),),
                           peer_address=PROXY))
        assert other.client_cert_error is not None and not other.client_cert_chain
        good = r.read(raw(via, headers=(("x-forwarded-client-cert", xfcc(pki.client.pem,
                                                                          "spiffe://example.org/gateway")),),
                          peer_address=PROXY))
        assert good.client_cert_chain[0] == pki.client.der


def test_a_document_names_the_chain_and_headers_cannot_replace_it(pki: Pki) -> None:
    request = reader().read(raw(Via.DOCUMENT, target="/", headers=(
        ("x-forwarded-client-cert", xfcc(pki.client.pem)),), peer_address=PROXY))
    assert request.client_cert_chain == ()


def test_direct_tls_peer_chain_is_the_clients(pki: Pki) -> None:
    request = reader().read(raw(Via.DIRECT, target="/", peer_address=STRANGER,
                                client_chain=(pki.client.der,), caller_names=frozenset({"spiffe://a/b"})))
    assert request.client_cert_chain == (pki.client.der,)


def test_a_gateways_own_tls_certificate_is_never_taken_for_the_clients(pki: Pki) -> None:
    """Behind a gateway trusted by its certificate, the TLS peer's chain names the gateway."""
    gateway = frozenset({"spiffe://example.org/gateway"})
    direct = reader().read(raw(Via.DIRECT, target="/", client_chain=(pki.client.der,), caller_names=gateway))
    assert direct.client_cert_chain == ()
    sub = reader().read(raw(client_chain=(pki.client.der,), caller_names=frozenset({"spiffe://a/b"})))
    assert sub.client_cert_chain == ()


def test_the_result_is_a_check_request_with_the_source_address() -> None:
    request = RequestReader().read(raw(Via.DOCUMENT, target="/", peer_address="127.0.0.1", source_address="10.1.1.1"))
    assert isinstance(request, CheckRequest) and request.source_address == "10.1.1.1"


# -- text that is not Unicode, and gateways that do not name the request

@pytest.mark.parametrize("where", ["target", "header value", "header name", "host", "source", "protocol", "method"])
def test_a_lone_surrogate_anywhere_is_refused_before_any_engine_sees_it(where: str, make_pdp: Any) -> None:
    """A JSON document can carry "\\ud800"; regorus dies converting such a string."""
    bad = "\ud800"
    kw: dict[str, Any] = {"target": "/public/x"}
    if where == "target":
        kw["target"] = f"/public/x{bad}"
    elif where == "header value":
        kw["headers"] = (("x-a", bad),)
    elif where == "header name":
        kw["headers"] = ((f"x-{bad}", "1"),)
    elif where == "host":
        kw["host"] = f"a{bad}.example"
    elif where == "source":
        kw["source_address"] = bad
    elif where == "protocol":
        kw["protocol"] = bad
    else:
        kw["method"] = f"GET{bad}"
    decision = make_pdp().check(raw(Via.DOCUMENT, **kw))
    assert (decision.allowed, decision.reason) == (False, "request_invalid")


def test_a_lone_surrogate_in_a_check_document_is_a_deny_and_pdp_lives(make_pdp: Any) -> None:
    from pdp.adapters.json_check import parse_request

    pdp = make_pdp()
    doc = {"method": "GET", "path": "/public/x", "headers": {"x-a": "\ud800"}}
    decision = pdp.check(parse_request(doc, now=NOW))
    assert (decision.allowed, decision.reason) == (False, "request_invalid")
    assert pdp.check(parse_request({"method": "GET", "path": "/public/x"}, now=NOW)).allowed


@pytest.mark.parametrize("forwarded", ["nginx", "traefik"])
def test_a_trusted_gateway_that_names_no_target_is_refused(forwarded: str) -> None:
    """Falling back to the sub-request's own path would judge a request nobody sent."""
    uri = "x-original-uri" if forwarded == "nginx" else "x-forwarded-uri"
    method = "x-original-method" if forwarded == "nginx" else "x-forwarded-method"
    r = reader(forwarded=forwarded)
    refused(r, raw(target="/ext_authz/public/info", peer_address=PROXY))
    refused(r, raw(target="/ext_authz/public/info", headers=((uri, ""), (method, "GET")), peer_address=PROXY))
    refused(r, raw(target="/ext_authz/public/info", headers=((uri, "/admin"), (method, "")), peer_address=PROXY))


def test_nginx_keeps_the_original_method_on_its_sub_request() -> None:
    request = reader(forwarded="nginx").read(raw(method="DELETE", headers=(("x-original-uri", "/admin"),),
                                                 peer_address=PROXY))
    assert (request.method, request.path) == ("DELETE", "/admin")


def test_traefik_must_name_the_method() -> None:
    refused(reader(forwarded="traefik"), raw(headers=(("x-forwarded-uri", "/admin"),), peer_address=PROXY))


def test_the_scheme_is_compared_lower_cased() -> None:
    assert RequestReader().read(raw(Via.DOCUMENT, target="/", scheme="HTTPS")).scheme == "https"
