"""The shipped Envoy configurations and compose.yaml, checked against what they must do.

No Envoy binary (and no Docker) can be had here, so this is the stand-in for `envoy --mode validate` and
`docker compose up`: each Envoy YAML file is read into ``envoy.config.bootstrap.v3.Bootstrap`` with
``google.protobuf.json_format`` over the xds-protos messages, every ``typed_config`` resolved to its
registered type. What Envoy would do with a setting is taken from its source
(``source/extensions/filters/common/ext_authz``) and written out below as small functions: which client
headers an ``http_service`` authorization request carries, which of pdp's answer headers go upstream or
to the client, and which certificates a ``match_typed_subject_alt_names`` list accepts. Those functions
then drive the real pdp, served from ``examples/envoy/pdp.toml`` over mutual TLS, with the certificates
``pdp dev init`` writes; and compose's healthcheck command is run against it.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Registers the typed_config types the configs use, so that Any fields resolve.
import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2
import envoy.extensions.filters.http.router.v3.router_pb2
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 as hcm_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2 as tls_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import json_format
from servers import free_port, serve_pdp

from pdp.assemble import build_certificate_headers, build_pdp
from pdp.config import Config, load_config
from pdp.devinit import AUDIENCE, CLIENT_ID, ISSUER, dev_init
from pdp.devpki import DpopKey, TokenIssuer, load_private_key
from pdp.request import CheckRequest

ROOT = Path(__file__).resolve().parents[1]
ENVOY = ROOT / "examples" / "envoy"
COMPOSE = ROOT / "compose.yaml"
MODES = ["envoy-grpc.yaml", "envoy-http.yaml"]


def bootstrap(name: str) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(yaml.safe_load((ENVOY / name).read_text()), bootstrap_pb2.Bootstrap())


def ext_authz_of(config: bootstrap_pb2.Bootstrap) -> tuple[hcm_pb2.HttpConnectionManager, ext_authz_pb2.ExtAuthz]:
    listener = config.static_resources.listeners[0]
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    authz = ext_authz_pb2.ExtAuthz()
    manager.http_filters[0].typed_config.Unpack(authz)
    return manager, authz


def pdp_cluster(config: bootstrap_pb2.Bootstrap) -> cluster_pb2.Cluster:
    """The cluster the ext_authz filter asks."""
    _, authz = ext_authz_of(config)
    name = (authz.grpc_service.envoy_grpc.cluster_name if authz.HasField("grpc_service")
            else authz.http_service.server_uri.cluster)
    return next(c for c in config.static_resources.clusters if c.name == name)


def upstream_tls(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    return context


# -- Envoy's behaviour, from its source

def string_matches(matcher: string_pb2.StringMatcher, value: str) -> bool:
    kind = matcher.WhichOneof("match_pattern")
    pattern = getattr(matcher, kind)
    if matcher.ignore_case:
        pattern, value = pattern.lower(), value.lower()
    if kind == "exact":
        return value == pattern
    if kind == "prefix":
        return value.startswith(pattern)
    if kind == "suffix":
        return value.endswith(pattern)
    if kind == "contains":
        return pattern in value
    raise AssertionError(f"a {kind} matcher: say here what Envoy does with it")


def any_matches(patterns: list[string_pb2.StringMatcher], value: str) -> bool:
    return any(string_matches(m, value) for m in patterns)


#: ClientConfig::toRequestMatchers: an http_service authorization request always carries these.
ENVOY_ALWAYS_SENT = (":method", ":path", ":authority", "authorization")
#: ClientConfig::toClientMatchers: a denied client always gets these once allowed_client_headers is set.
ENVOY_ALWAYS_TO_CLIENT = (":status", "content-length", "www-authenticate", "location")
ENVOY_AUTH_HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


def request_patterns(authz: ext_authz_pb2.ExtAuthz) -> list[string_pb2.StringMatcher]:
    """The filter-level allowed_headers, or its deprecated form (Envoy refuses both at once)."""
    legacy = authz.http_service.authorization_request
    assert not (authz.HasField("allowed_headers") and legacy.HasField("allowed_headers"))
    chosen = legacy.allowed_headers if legacy.HasField("allowed_headers") else authz.allowed_headers
    return list(chosen.patterns)


def envoy_authorization_request(authz: ext_authz_pb2.ExtAuthz,
                                client: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers) of the request Envoy's http_service sends pdp for ``client``'s request
    (pseudo-headers included): RawHttpClientImpl::check."""
    patterns = request_patterns(authz)
    sent = {k: v for k, v in client.items()
            if k != "content-length" and (k in ENVOY_ALWAYS_SENT or any_matches(patterns, k))}
    method, path = sent.pop(":method"), authz.http_service.path_prefix + sent.pop(":path")
    sent["host"] = sent.pop(":authority")
    sent["content-length"] = "0"
    return method, path, sent


def envoy_takes_from_an_allow(authz: ext_authz_pb2.ExtAuthz,
                              answer: httpx.Headers) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(headers set upstream, headers removed upstream, headers added to the client's response) from a
    200 answer: RawHttpClientImpl::toResponse."""
    response = authz.http_service.authorization_response
    removed = [n.strip() for v in answer.get_list(ENVOY_AUTH_HEADERS_TO_REMOVE) for n in v.split(",") if n.strip()]
    rest = {k: v for k, v in answer.items() if k != ENVOY_AUTH_HEADERS_TO_REMOVE}
    upstream = {k: v for k, v in rest.items() if any_matches(list(response.allowed_upstream_headers.patterns), k)}
    client = {k: v for k, v in rest.items()
              if any_matches(list(response.allowed_client_headers_on_success.patterns), k)}
    return upstream, removed, client


def envoy_passes_to_a_denied_client(authz: ext_authz_pb2.ExtAuthz, name: str) -> bool:
    patterns = list(authz.http_service.authorization_response.allowed_client_headers.patterns)
    if not patterns:
        return name != "host"
    return name in ENVOY_ALWAYS_TO_CLIENT or any_matches(patterns, name)


def subject_alt_names(cert: x509.Certificate) -> dict[int, list[str]]:
    """The certificate's SANs keyed by Envoy's SubjectAltNameMatcher.SanType."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {}
    kinds = common_pb2.SubjectAltNameMatcher
    return {kinds.DNS: san.get_values_for_type(x509.DNSName),
            kinds.URI: san.get_values_for_type(x509.UniformResourceIdentifier),
            kinds.EMAIL: san.get_values_for_type(x509.RFC822Name),
            kinds.IP_ADDRESS: [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]}


def envoy_accepts(validation: common_pb2.CertificateValidationContext, cert: x509.Certificate) -> bool:
    """Whether match_typed_subject_alt_names accepts ``cert`` (any matcher matching any SAN of its
    type); an empty list accepts every certificate of the trusted CA."""
    matchers = list(validation.match_typed_subject_alt_names)
    if not matchers:
        return True
    names = subject_alt_names(cert)
    return any(string_matches(m.matcher, value) for m in matchers for value in names.get(m.san_type, []))


# -- the Envoy configurations

@pytest.mark.parametrize("name", MODES)
def test_config_is_a_valid_bootstrap_with_a_fail_closed_ext_authz(name):
    config = bootstrap(name)
    downstream = tls_pb2.DownstreamTlsContext()
    config.static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.Unpack(downstream)
    assert downstream.require_client_certificate.value is True
    manager, authz = ext_authz_of(config)
    assert authz.failure_mode_allow is False
    assert authz.failure_mode_allow_header_add is False
    assert authz.status_on_error.code == 503
    assert authz.transport_api_version == 2  # V3
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]


@pytest.mark.parametrize("name", MODES)
def test_envoy_accepts_only_pdps_certificate_by_the_name_dev_init_gives_it(name, tmp_path):
    """Every certificate dev init writes chains to ca.pem, so trusting the CA alone would let the
    gateway's or a client's certificate pass for pdp: the SAN check must pick pdp-server.pem alone."""
    setup = tmp_path / "setup"
    dev_init(setup)
    cluster = pdp_cluster(bootstrap(name))
    tls = upstream_tls(cluster)
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/setup/ca.pem"
    assert list(validation.match_typed_subject_alt_names), "no SAN check: any certificate of the CA is pdp"
    certificates = {p.name: x509.load_pem_x509_certificate(p.read_bytes()) for p in sorted(setup.glob("*.pem"))}
    server = certificates.pop("pdp-server.pem")
    assert envoy_accepts(validation, server)
    assert len(certificates) >= 5
    for other, cert in certificates.items():
        assert not envoy_accepts(validation, cert), other
    # The SNI asked for is a name pdp's certificate carries, and every matcher names pdp's certificate.
    assert tls.sni in subject_alt_names(server)[common_pb2.SubjectAltNameMatcher.DNS]
    for matcher in validation.match_typed_subject_alt_names:
        own = subject_alt_names(server).get(matcher.san_type, [])
        assert any(string_matches(matcher.matcher, value) for value in own), matcher
        assert not string_matches(matcher.matcher, "localhost")  # every dev certificate may name localhost
    assert tls.common_tls_context.tls_certificates[0].certificate_chain.filename == "/setup/gateway.pem"
    assert len(cluster.health_checks) == 1


def test_grpc_mode_sends_the_peer_certificate_and_every_header_over_mtls():
    config = bootstrap("envoy-grpc.yaml")
    _, authz = ext_authz_of(config)
    assert authz.include_peer_certificate is True
    assert not authz.HasField("allowed_headers")  # over gRPC: every request header, dpop included
    assert authz.grpc_service.envoy_grpc.cluster_name == "pdp_grpc"
    assert authz.grpc_service.timeout.ToMilliseconds() == 250
    cluster = pdp_cluster(config)
    assert cluster.health_checks[0].grpc_health_check.service_name == "envoy.service.auth.v3.Authorization"


def test_http_mode_forwards_the_client_certificate_in_xfcc():
    config = bootstrap("envoy-http.yaml")
    manager, authz = ext_authz_of(config)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.cert is True
    assert authz.http_service.path_prefix == "/ext_authz"
    assert pdp_cluster(config).health_checks[0].http_health_check.path == "/readyz"


def compose_pdp_config(tmp_path: Path, setup: Path) -> Config:
    """examples/envoy/pdp.toml with its files in ``setup``, its gRPC listener on a free loopback port and
    its replay store in memory (one replica here)."""
    text = (ENVOY / "pdp.toml").read_text().replace("/setup", str(setup))
    text = text.replace('"0.0.0.0:9191"', f'"127.0.0.1:{free_port()}"')
    text = re.sub(r'(?m)^url = "redis://[^"]*"$', 'url = ""', text)
    (tmp_path / "pdp.toml").write_text(text)
    return load_config(tmp_path / "pdp.toml")


def test_http_mode_sends_pdp_every_header_it_reads(tmp_path):
    setup = tmp_path / "setup"
    dev_init(setup)
    cert_headers = build_certificate_headers(compose_pdp_config(tmp_path, setup))
    assert cert_headers is not None
    _, authz = ext_authz_of(bootstrap("envoy-http.yaml"))
    assert not authz.http_service.authorization_request.HasField("allowed_headers")  # the deprecated form
    patterns = request_patterns(authz)
    for header in ("authorization", "dpop", cert_headers.header):
        assert header in ENVOY_ALWAYS_SENT or any_matches(patterns, header), header
    # A client's own x-pdp-* headers are not pdp's business, and its Forwarded headers are not read.
    assert not any_matches(patterns, "x-pdp-subject")


def test_http_mode_passes_pdps_answer_upstream_and_to_the_client(tmp_path):
    setup = tmp_path / "setup"
    dev_init(setup)
    pdp = build_pdp(compose_pdp_config(tmp_path, setup))
    _, authz = ext_authz_of(bootstrap("envoy-http.yaml"))
    response = authz.http_service.authorization_response
    client_der = x509.load_pem_x509_certificate((setup / "client.pem").read_bytes()).public_bytes(Encoding.DER)
    token = (setup / "token.jwt").read_text().strip()
    now = time.time()
    allowed = pdp.decide(CheckRequest(method="GET", path="/orders", host="localhost:8443", time=now,
                                      headers={"authorization": f"Bearer {token}"}, client_cert_chain=(client_der,)))
    assert allowed.allowed, allowed.reason
    for name in allowed.headers:
        assert any_matches(list(response.allowed_upstream_headers.patterns), name), name
    for name in allowed.headers_to_remove:  # sent in x-envoy-auth-headers-to-remove: never copied upstream
        assert not any_matches(list(response.allowed_upstream_headers.patterns), name), name
    for patterns in (response.allowed_upstream_headers, response.allowed_client_headers,
                     response.allowed_client_headers_on_success):
        assert not any_matches(list(patterns.patterns), ENVOY_AUTH_HEADERS_TO_REMOVE)
    denied = pdp.decide(CheckRequest(method="GET", path="/orders", host="localhost:8443", time=now,
                                     client_cert_chain=(client_der,)))
    assert not denied.allowed and denied.status == 401
    _, headers = denied.denial()
    assert "www-authenticate" in headers
    for name in headers:
        assert envoy_passes_to_a_denied_client(authz, name), name
    assert envoy_passes_to_a_denied_client(authz, "dpop-nonce")
    assert any_matches(list(response.allowed_client_headers_on_success.patterns), "dpop-nonce")
    assert not envoy_passes_to_a_denied_client(authz, "server")


# -- the HTTP-mode config in front of the real pdp of compose.yaml

@pytest.fixture
def compose_pdp(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    setup = tmp_path / "setup"
    dev_init(setup)
    with serve_pdp(compose_pdp_config(tmp_path, setup)) as (url, _):
        yield url, setup


def gateway_context(setup: Path) -> ssl.SSLContext:
    """Envoy's side of the pdp cluster: the gateway's certificate, pdp's checked against ca.pem."""
    context = ssl.create_default_context(cafile=str(setup / "ca.pem"))
    context.load_cert_chain(setup / "gateway.pem", setup / "gateway.key")
    return context


def xfcc_of(setup: Path, name: str) -> str:
    """The x-forwarded-client-cert Envoy's listener sets (SANITIZE_SET; cert, chain, uri) for a client
    presenting ``name``; no By, as envoy.pem carries no URI SAN."""
    pem = (setup / name).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    quoted = urllib.parse.quote(pem.decode(), safe="")
    uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)[0]
    return (f'Hash={hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()};Cert="{quoted}";'
            f'Chain="{quoted}";URI={uri}')


@pytest.mark.integration
def test_dpop_works_through_the_http_mode_config_and_a_replayed_proof_is_refused(compose_pdp):
    url, setup = compose_pdp
    _, authz = ext_authz_of(bootstrap("envoy-http.yaml"))
    issuer = TokenIssuer(ISSUER, load_private_key((setup / "issuer.key").read_bytes()), "dev-1")
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    authority = "localhost:8443"
    client = {
        ":method": "GET", ":path": "/orders?page=2", ":authority": authority,
        "authorization": f"DPoP {token}", "dpop": key.proof("GET", f"https://{authority}/orders", token),
        "x-forwarded-client-cert": xfcc_of(setup, "client.pem"), "x-forwarded-proto": "https",
        "x-request-id": "5b1c", "user-agent": "curl/8", "x-pdp-subject": "admin", "cookie": "session=1",
    }

    def ask(config: ext_authz_pb2.ExtAuthz) -> httpx.Response:
        method, path, headers = envoy_authorization_request(config, client)
        with httpx.Client(verify=gateway_context(setup), base_url=url) as http:
            return http.request(method, path, headers=headers)

    # Without dpop in allowed_headers (the example before) the proof never reaches pdp.
    without = ext_authz_pb2.ExtAuthz()
    without.CopyFrom(authz)
    kept = [p for p in authz.allowed_headers.patterns if not string_matches(p, "dpop")]
    del without.allowed_headers.patterns[:]
    without.allowed_headers.patterns.extend(kept)
    refused = ask(without)
    assert refused.status_code == 401 and refused.json()["reason"] == "dpop_proof_invalid"  # no proof

    r = ask(authz)
    assert r.status_code == 200, r.text
    upstream, removed, _ = envoy_takes_from_an_allow(authz, r.headers)
    assert upstream["x-pdp-spiffe-id"] == CLIENT_ID
    assert upstream["x-pdp-subject"] == "demo-user"  # pdp's, overwriting the client's
    assert {"authorization", "dpop"} <= set(removed)
    replayed = ask(authz)
    assert replayed.status_code == 401 and replayed.json()["reason"] == "dpop_proof_invalid"  # the same jti
    assert replayed.headers["www-authenticate"].startswith("DPoP ")
    assert envoy_passes_to_a_denied_client(authz, "www-authenticate")


@pytest.mark.integration
def test_another_certificate_of_the_ca_in_xfcc_gets_a_401_through_the_http_mode_config(compose_pdp):
    url, setup = compose_pdp
    _, authz = ext_authz_of(bootstrap("envoy-http.yaml"))
    token = (setup / "token.jwt").read_text().strip()
    method, path, headers = envoy_authorization_request(authz, {
        ":method": "GET", ":path": "/orders", ":authority": "localhost:8443",
        "authorization": f"Bearer {token}", "x-forwarded-client-cert": xfcc_of(setup, "other.pem")})
    with httpx.Client(verify=gateway_context(setup), base_url=url) as http:
        r = http.request(method, path, headers=headers)
    assert r.status_code == 401 and r.json()["reason"] == "binding_mismatch"


# -- compose.yaml

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def pdp_services() -> list[str]:
    return [name for name, service in compose()["services"].items()
            if "pdp serve" in " ".join(service.get("command", []))]


def test_envoy_starts_once_every_pdp_replica_is_healthy():
    services = compose()["services"]
    replicas = pdp_services()
    assert len(replicas) == 2
    depends = services["envoy"]["depends_on"]
    for name in replicas:
        assert depends[name]["condition"] == "service_healthy", name
    for service in services.values():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck", {}).get("test"), dependency


def test_the_pdp_healthcheck_asks_readyz_over_the_mutual_tls_listener():
    for name in pdp_services():
        test = compose()["services"][name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "https://127.0.0.1:8181/readyz" in test[3] and "/setup/gateway.pem" in test[3]


def run_healthcheck(setup: Path, port: int) -> int:
    """compose's pdp healthcheck, with its files in ``setup`` and pdp on ``port``; its exit status."""
    test = compose()["services"][pdp_services()[0]]["healthcheck"]["test"]
    command = [sys.executable, *test[2:]]
    command[-1] = command[-1].replace("/setup/", f"{setup}/").replace(":8181/", f":{port}/")
    return subprocess.run(command, capture_output=True, timeout=30).returncode


@pytest.mark.integration
def test_the_compose_healthcheck_passes_on_a_ready_pdp_and_fails_otherwise(compose_pdp):
    url, setup = compose_pdp
    port = int(url.rsplit(":", 1)[1])
    assert run_healthcheck(setup, port) == 0

    # A listener that answers, but 503 on /readyz (pdp before its policy and trust bundles loaded).
    class NotReady(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(setup / "ca.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(setup / "pdp-server.pem", setup / "pdp-server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_healthcheck(setup, server.server_address[1]) != 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert run_healthcheck(setup, free_port()) != 0  # nothing listening


# -- shared

def test_a_misspelt_field_is_caught():
    text = (ENVOY / "envoy-grpc.yaml").read_text().replace("include_peer_certificate", "include_peer_certificat")
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def test_the_compose_pdp_config_builds_against_a_dev_setup(tmp_path):
    setup = tmp_path / "setup"
    dev_init(setup)
    text = (ENVOY / "pdp.toml").read_text().replace("/setup", str(setup))
    (tmp_path / "pdp.toml").write_text(text)
    config = load_config(tmp_path / "pdp.toml")
    assert config.server.tls is not None and config.server.tls.allowed_callers == ("spiffe://example.org/gateway",)
    assert config.store.url == "redis://redis:6379/0"
    assert build_pdp(config).policy is not None


def test_every_file_the_envoy_configs_and_compose_name_is_written_by_dev_init(tmp_path):
    dev_init(tmp_path / "setup")
    for path in (*(ENVOY / n for n in (*MODES, "pdp.toml")), COMPOSE):
        for name in re.findall(r"/setup/([\w.-]+)", path.read_text()):
            assert (tmp_path / "setup" / name).exists(), (path.name, name)

