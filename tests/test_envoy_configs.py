"""The shipped Envoy configurations parse as Envoy's own Bootstrap message.

No Envoy binary runs here, so this is the stand-in for `envoy --mode validate`: each YAML file is
read into ``envoy.config.bootstrap.v3.Bootstrap`` with ``google.protobuf.json_format`` over the
xds-protos messages, every ``typed_config`` resolved to its registered type.
"""

from __future__ import annotations

import re
from pathlib import Path

# Registers the typed_config types the configs use, so that Any fields resolve.
import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2
import envoy.extensions.filters.http.router.v3.router_pb2
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 as hcm_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2 as tls_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from google.protobuf import json_format

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devinit import dev_init

ROOT = Path(__file__).resolve().parents[1]
ENVOY = ROOT / "examples" / "envoy"


def bootstrap(name: str) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(yaml.safe_load((ENVOY / name).read_text()), bootstrap_pb2.Bootstrap())


def ext_authz_of(config: bootstrap_pb2.Bootstrap) -> tuple[hcm_pb2.HttpConnectionManager, ext_authz_pb2.ExtAuthz]:
    listener = config.static_resources.listeners[0]
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    authz = ext_authz_pb2.ExtAuthz()
    manager.http_filters[0].typed_config.Unpack(authz)
    return manager, authz


@pytest.mark.parametrize("name", ["envoy-grpc.yaml", "envoy-http.yaml"])
def test_config_is_a_valid_bootstrap_with_a_fail_closed_ext_authz(name):
    config = bootstrap(name)
    downstream = tls_pb2.DownstreamTlsContext()
    config.static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.Unpack(downstream)
    assert downstream.require_client_certificate.value is True
    manager, authz = ext_authz_of(config)
    assert authz.failure_mode_allow is False
    assert authz.status_on_error.code == 503
    assert authz.transport_api_version == 2  # V3
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]


def test_grpc_mode_sends_the_peer_certificate_over_mtls():
    config = bootstrap("envoy-grpc.yaml")
    _, authz = ext_authz_of(config)
    assert authz.include_peer_certificate is True
    assert authz.grpc_service.envoy_grpc.cluster_name == "pdp_grpc"
    assert authz.grpc_service.timeout.ToMilliseconds() == 250
    cluster = next(c for c in config.static_resources.clusters if c.name == "pdp_grpc")
    upstream = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(upstream)
    assert upstream.common_tls_context.tls_certificates[0].certificate_chain.filename == "/setup/gateway.pem"
    assert cluster.health_checks[0].grpc_health_check.service_name == "envoy.service.auth.v3.Authorization"


def test_http_mode_forwards_the_client_certificate_in_xfcc():
    config = bootstrap("envoy-http.yaml")
    manager, authz = ext_authz_of(config)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.cert is True
    assert authz.http_service.path_prefix == "/ext_authz"
    allowed = [p.exact for p in authz.http_service.authorization_request.allowed_headers.patterns]
    assert "x-forwarded-client-cert" in allowed and "authorization" in allowed


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


def test_every_file_the_envoy_configs_name_is_written_by_dev_init(tmp_path):
    dev_init(tmp_path / "setup")
    for name in ("envoy-grpc.yaml", "envoy-http.yaml", "pdp.toml"):
        for path in re.findall(r"/setup/([\w.-]+)", (ENVOY / name).read_text()):
            assert (tmp_path / "setup" / path).exists(), (name, path)
