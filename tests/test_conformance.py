"""One request, one reading: every raw request of the matrix gets the same answer through every entry point.

The rows (``conformance_rows.ROWS``) are raw requests — ordinary ones and one for each way around a
check that a proxy and pdp could read differently — with the one answer pdp must give. Each is sent
through ``POST /v1/check``, HTTP ext_authz as Envoy, nginx and Traefik call it, Envoy's gRPC ext_authz
(both header forms) and the ASGI middleware built from a config file and from a ``Pdp``, all real
servers on loopback started once for the module. Every entry point must answer with the row's
allow/deny and reason code, report the status that reason carries, and, on an allow, hand the
upstream neither the credentials nor any ``x-pdp-*`` header a client wrote.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import ssl
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from conformance_entry_points import (
    CheckEndpoint,
    DecisionRecords,
    EntryPoint,
    EnvoyGrpc,
    ExtAuthz,
    Materials,
    Middleware,
    echo_app,
    resolve,
    wait_until,
)
from conformance_rows import (
    ALL,
    ASGI_CONFIG,
    ASGI_PDP,
    CHECK,
    ENVOY_HTTP,
    GATEWAY,
    GRPC,
    GRPC_RAW,
    NGINX,
    POLICY_DATA,
    ROWS,
    TRAEFIK,
    Row,
)
from conftest import AUDIENCE, ISSUER, Pki
from pdp.adapters.asgi import PdpMiddleware
from servers import free_port, serve_pdp
from starlette.applications import Starlette
from starlette.routing import Mount

from pdp import reasons
from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devpki import DpopKey, TokenIssuer, make_ca, make_client

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[1] / "policies" / "zero_trust.rego"


def config_text(*, cert_header: str, forwarded: str, grpc: bool) -> str:
    xfcc_by = f'xfcc_by = "{GATEWAY}"\n' if cert_header == "xfcc" else ""
    return f"""
[server]
http = "127.0.0.1:0"
grpc = "{'127.0.0.1:0' if grpc else ''}"
reload_interval = 0

[policy]
engine = "regorus"
paths = ["policy"]

[[certificates.trust_bundles]]
name = "example.org"
file = "ca.pem"
intermediates = "intermediates.pem"
trust_domain = "example.org"

[tokens]
require_bound = true

[[tokens.issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
jwks_file = "jwks.json"

[gateway]
trusted_proxies = ["127.0.0.1/32"]
cert_header = "{cert_header}"
{xfcc_by}forwarded_request = "{forwarded}"
"""


def make_materials(pki: Pki, issuer: TokenIssuer) -> Materials:
    inter = pki.intermediate
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    foreign_root = make_ca("another root")
    chains = {
        "client": (pki.client, inter), "other": (pki.other, inter), "admin": (pki.admin, inter),
        "expired": (make_client(inter, not_before=past, days=1), inter),
        "foreign_ca": (make_client(foreign_root),),
        "server_eku": (make_client(inter, client_auth=False), inter),
        "other_domain": (make_client(inter, spiffe_id="spiffe://elsewhere.org/demo/client"), inter),
    }
    dpop_key = DpopKey.generate()

    def mint(leaf: str | None = "client", **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("scope", "read write")
        return issuer.mint(bound_to=chains[leaf][0] if leaf else None, **kw)

    now = datetime.datetime.now(datetime.UTC).timestamp()
    alg_none = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "demo-user", "iat": int(now),
                           "exp": int(now) + 600, "jti": "none"}, None, algorithm="none",
                          headers={"typ": "at+jwt", "kid": issuer.kid})
    tokens = {
        "client": mint(), "client_read": mint(scope="read"), "client_reports": mint(scope="read reports"),
        "admin": mint("admin", scope="read write admin"), "other": mint("other"),
        "expired": mint(now=now - 7200), "not_yet": mint(now=now + 3600), "typ_jwt": mint(typ="JWT"),
        "audience": mint(audience="https://elsewhere.test"),
        "unknown_issuer": TokenIssuer.generate("https://unknown.test", kid=issuer.kid).mint(
            audience=AUDIENCE, bound_to=pki.client),
        "bad_signature": TokenIssuer.generate(ISSUER, kid=issuer.kid).mint(audience=AUDIENCE, bound_to=pki.client),
        "unknown_kid": TokenIssuer.generate(ISSUER, kid="k-unknown").mint(audience=AUDIENCE, bound_to=pki.client),
        "unbound": mint(None), "alg_none": alg_none,
        "expired_cert": mint("expired"), "foreign_ca": mint("foreign_ca"), "server_eku": mint("server_eku"),
        "other_domain": mint("other_domain"),
        "dpop": mint(None, dpop_key=dpop_key),
    }
    return Materials(chains=chains, tokens=tokens, dpop_keys={"dpop": dpop_key})


def serve_middleware(stack: ExitStack, app: Any, setup: Path) -> int:
    """uvicorn as an app owner runs it (TLS, no proxy-header rewriting), in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False, lifespan="off",
        ssl_certfile=str(setup / "server.pem"), ssl_keyfile=str(setup / "server.key")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the middleware's server")
    if not server.started:
        raise RuntimeError("the middleware's server did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    stack.callback(stop)
    return port


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory: pytest.TempPathFactory, pki: Pki,
                 issuer: TokenIssuer) -> Iterator[dict[str, EntryPoint]]:
    setup = tmp_path_factory.mktemp("conformance")
    (setup / "ca.pem").write_bytes(pki.root.pem)
    (setup / "intermediates.pem").write_bytes(pki.intermediate.pem)
    (setup / "jwks.json").write_text(json.dumps(issuer.jwks))
    (setup / "policy").mkdir()
    shutil.copy(POLICY, setup / "policy" / "zero_trust.rego")
    (setup / "policy" / "data.json").write_text(json.dumps(POLICY_DATA))
    server = make_client(pki.intermediate, spiffe_id=None, common_name="api.test", dns=("api.test",),
                         client_auth=False)
    (setup / "server.pem").write_bytes(server.pem + pki.intermediate.pem)
    (setup / "server.key").write_bytes(server.key_pem)
    files = {}
    for name, header, forwarded, grpc in (("envoy", "xfcc", "envoy", True), ("nginx", "nginx", "nginx", False),
                                          ("traefik", "traefik", "traefik", False)):
        files[name] = setup / f"{name}.toml"
        files[name].write_text(config_text(cert_header=header, forwarded=forwarded, grpc=grpc))

    records = DecisionRecords()
    decisions = logging.getLogger("pdp.decisions")
    saved = decisions.level, decisions.propagate
    decisions.setLevel(logging.INFO)
    decisions.propagate = False
    decisions.addHandler(records)
    materials = make_materials(pki, issuer)
    tls = ssl.create_default_context(cafile=str(setup / "ca.pem"))
    with ExitStack() as stack:
        stack.callback(decisions.removeHandler, records)
        stack.callback(decisions.setLevel, saved[0])
        stack.callback(setattr, decisions, "propagate", saved[1])
        envoy_url, envoy = stack.enter_context(serve_pdp(load_config(files["envoy"])))
        nginx_url, _ = stack.enter_context(serve_pdp(load_config(files["nginx"])))
        traefik_url, _ = stack.enter_context(serve_pdp(load_config(files["traefik"])))
        assert envoy.grpc is not None
        app = Starlette(routes=[Mount("/", app=echo_app)])
        from_config = serve_middleware(stack, PdpMiddleware(app, config=files["envoy"]), setup)
        pdp = build_pdp(load_config(files["envoy"]))
        stack.callback(pdp.close)
        from_pdp = serve_middleware(stack, PdpMiddleware(app, pdp=pdp), setup)

        def port(url: str) -> int:
            return int(url.rsplit(":", 1)[1])

        points: dict[str, EntryPoint] = {
            CHECK: CheckEndpoint(materials, records, port(envoy_url)),
            ENVOY_HTTP: ExtAuthz(materials, records, port(envoy_url), ENVOY_HTTP),
            NGINX: ExtAuthz(materials, records, port(nginx_url), NGINX),
            TRAEFIK: ExtAuthz(materials, records, port(traefik_url), TRAEFIK),
            GRPC: EnvoyGrpc(materials, records, envoy.grpc.port, GRPC),
            GRPC_RAW: EnvoyGrpc(materials, records, envoy.grpc.port, GRPC_RAW),
            ASGI_CONFIG: Middleware(materials, records, from_config, ASGI_CONFIG, tls),
            ASGI_PDP: Middleware(materials, records, from_pdp, ASGI_PDP, tls),
        }
        for point in points.values():
            if isinstance(point, EnvoyGrpc):
                stack.callback(point.close)
        yield points


CASES = [pytest.param(row, name, id=f"{row.id}-{name}") for row in ROWS for name in ALL if row.applies_to(name)]


def test_the_matrix_has_a_row_for_each_attack_class() -> None:
    ids = {row.id for row in ROWS}
    assert len(ids) == len(ROWS), "row ids are unique"
    assert len(ROWS) >= 60
    assert {"two_dpop_proofs", "two_authorization_headers", "encoded_slash", "grpc_request_over_4_mib",
            "lower_case_get_on_a_method_specific_route", "xfcc_element_without_by", "dot_dot_segment",
            "encoded_backslashes", "semicolon_parameter", "two_host_headers", "certificate_header_twice",
            "forged_certificate_header_with_a_stolen_token", "forged_identity_headers_on_an_allowed_request",
            "path_over_8_kib", "over_200_headers", "a_64_kib_header", "dpop_proof_replayed"} <= ids


@pytest.mark.parametrize(("row", "entry_point"), CASES)
def test_every_entry_point_gives_the_rows_answer(row: Row, entry_point: str,
                                                 entry_points: dict[str, EntryPoint]) -> None:
    point = entry_points[entry_point]
    sent = resolve(row, point.materials)
    if row.replay:
        first = point.send(sent)
        assert first.verdict == (True, "allowed"), f"{entry_point}: the first use of the proof: {first}"
    outcome = point.send(sent)
    expected_status = reasons.by_code(row.expect[1]).status if not row.expect[0] else 200
    if row.transport_refusal and outcome.reason.startswith("transport:"):
        # The HTTP server refused the bytes before pdp saw them: a refusal, with the reason's status
        # (h11 refuses a second Host line; an oversized head, when it arrives in pieces).
        assert outcome.status in (400, 431), f"{row.id} via {entry_point}: {outcome}"
        return
    assert outcome.verdict == row.expect, f"{row.id} via {entry_point} ({row.why}): {outcome}"
    if outcome.decision_id is not None and outcome.decision_id in point.records.records:
        assert point.records.records[outcome.decision_id]["reason"] == outcome.reason, "the log agrees"
    if entry_point == NGINX and expected_status not in (200, 401):
        expected_status = 403  # auth_request understands only 2xx, 401 and 403: every other deny is a 403
    assert outcome.status == expected_status, f"{row.id} via {entry_point}: {outcome}"
    if outcome.allowed:
        check_upstream(row, sent.headers, outcome.upstream)


def check_upstream(row: Row, client_headers: tuple[tuple[str, str], ...],
                   upstream: list[tuple[str, str]] | None) -> None:
    """The upstream never gets the credentials, nor an ``x-pdp-*`` value a client wrote; the row's
    expectations about its headers hold."""
    assert upstream is not None
    names = [n.lower() for n, _ in upstream]
    assert "authorization" not in names and "dpop" not in names, upstream
    forged = {v for n, v in client_headers if n.lower().startswith("x-pdp-")}
    for name, value in upstream:
        if name.lower().startswith("x-pdp-"):
            assert names.count(name.lower()) == 1, f"{name} once: {upstream}"
            assert value not in forged, f"a client's {name} reached the upstream"
    seen = {n.lower(): v for n, v in upstream}
    for name, expected in row.upstream:
        assert seen.get(name) == expected, f"upstream {name}: {upstream}"
