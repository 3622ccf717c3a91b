"""``policy.engine = "opa"`` (pdp.policy.opa_remote, pdp.policy.opa_session) against an OPA stand-in.

No OPA binary is available here, so ``OpaStandIn`` is a real HTTP/1.1 server on a loopback port that
speaks the part of OPA's REST API pdp uses: ``POST /v1/data/<path>`` with ``{"input": ...}`` answers
``{"result": ..., "provenance": {...}}`` (``result`` left out when undefined), and ``GET /health``. Its
policy is one fixed rule evaluated in Python: allowed when ``input.attributes.request.http.method`` is
``GET``. It can also misbehave (slow, dripping, 500, not JSON, no result, too large, a redirect), counts
the connections it accepts (and the most open at once), and keeps what it was asked. Everything else is
the real pdp: ``Pdp.check``, the served HTTP and gRPC listeners, the decision log and ``/readyz``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import AUDIENCE
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from servers import free_port, serve_pdp
from test_envoy_grpc import envoy_request

from pdp.assemble import build_pdp
from pdp.config import OpaConfig, load_config
from pdp.devpki import DpopKey, make_ca, make_client
from pdp.errors import ConfigError, NeedsNetwork
from pdp.pipeline import Pdp
from pdp.policy import explain
from pdp.policy.opa_remote import RemoteEngine, revision_of
from pdp.policy.opa_session import RESOLVER, RESOLVER_THREADS
from pdp.request_reader import RawRequest, Via

pytestmark = pytest.mark.integration


class OpaStandIn:
    """OPA's Data API and /health on 127.0.0.1, with one rule; ``mode`` makes it misbehave."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.provenance: dict[str, Any] = {"version": "1.0.0", "bundles": {"authz": {"revision": "rev-1"}}}
        self.asked: list[dict[str, Any]] = []  # path, query, authorization, input
        self.connections = 0
        self.open = 0  # connections not yet closed by pdp
        self.peak = 0  # the most connections open at once
        self.peers: list[dict[str, Any] | None] = []  # over TLS: each connection's client certificate
        counting = threading.Lock()
        self.healthy = True
        self.status = 200  # of ``mode = "body"``, with ``body``
        self.body = b""
        self.pieces: list[tuple[float, bytes]] = []  # ``mode = "raw"``: (wait, bytes) written as they are
        # The next ``hang_ups`` requests are read, left unanswered for ``hang_up_wait`` seconds and their
        # connection closed (with an RST when ``hang_up_reset``), as a server closing an idle connection
        # just as a request arrives on it.
        self.hang_ups = 0
        self.hang_up_wait = 0.0
        self.hang_up_reset = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as OPA's Go server
            disable_nagle_algorithm = True  # as Go's: no delayed-ACK wait between head and body
            timeout = 10

            def setup(self) -> None:
                with counting:
                    outer.connections += 1
                    outer.open += 1
                    outer.peak = max(outer.peak, outer.open)
                if isinstance(self.request, ssl.SSLSocket):
                    outer.peers.append(self.request.getpeercert())
                super().setup()

            def finish(self) -> None:
                with counting:
                    outer.open -= 1
                super().finish()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health?bundles=true" and outer.healthy:
                    self._send(200, b"{}")
                else:
                    self._send(500, b'{"code": "internal_error"}')

            def do_POST(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.asked.append({"path": url.path, "query": urllib.parse.parse_qs(url.query),
                                    "authorization": self.headers.get("authorization"), "input": body["input"],
                                    "accept-encoding": self.headers.get("accept-encoding")})
                mode = outer.mode
                with counting:
                    hang_up, outer.hang_ups = outer.hang_ups > 0, max(0, outer.hang_ups - 1)
                if hang_up:
                    time.sleep(outer.hang_up_wait)
                    if outer.hang_up_reset:  # closed with a linger of 0 s and no shutdown first: an RST alone
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()  # the descriptor goes once finish() closes rfile and wfile
                    self.close_connection = True
                    return
                if outer.delay:
                    time.sleep(outer.delay)
                if mode == "raw":  # the answer's bytes as given, then the connection closes
                    for wait, piece in outer.pieces:
                        time.sleep(wait)
                        self.wfile.write(piece)
                        self.wfile.flush()
                    self.close_connection = True
                    return
                if mode == "body":
                    self._send(outer.status, outer.body)
                    return
                if mode == "drip":  # an answer that never ends in time: a byte every 50 ms
                    self.send_response(200)
                    self.send_header("content-length", "100000")
                    self.end_headers()
                    for _ in range(100):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                if mode == "500":
                    self._send(500, b'{"code": "internal_error", "message": "eval_conflict_error"}')
                elif mode == "garbage":
                    self._send(200, b'{"result": tr')
                elif mode == "lone-surrogate":
                    self._send(200, b'{"result": {"allowed": true, "headers": {"x-a": "\\ud800"}}}')
                elif mode == "not-an-object":
                    self._send(200, b'[true]')
                elif mode == "huge":
                    self._send(200, json.dumps({"result": True, "padding": "x" * 3_000_000}).encode())
                elif mode == "redirect":
                    self.send_response(307)
                    self.send_header("location", "http://127.0.0.1:9/v1/data/elsewhere")
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif mode == "no-result":
                    self._send(200, json.dumps({"provenance": outer.provenance}).encode())
                else:
                    method = body["input"].get("attributes", {}).get("request", {}).get("http", {}).get("method")
                    allowed = method == "GET"
                    result: Any = allowed if url.path.endswith("/allow") else \
                        {"allowed": allowed, "reason": "allowed" if allowed else "policy_denied"}
                    self._send(200, json.dumps({"result": result, "provenance": outer.provenance}).encode())

        self.server = _Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> OpaStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # as a Go server's: many connections at once are accepted, not reset
    block_on_close = False
    closed = 0  # connections the server has closed (its FIN or RST sent)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.closed += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # pdp hangs up on an answer it will not read to the end (too large, too slow): expected here


@pytest.fixture
def opa() -> Iterator[OpaStandIn]:
    with OpaStandIn() as server:
        yield server


def opa_config(write_setup: Any, url: str, *, timeout: float = 1.0, decision: str = "", more: str = "") -> Path:
    """The test setup's config with ``engine = "opa"`` asking ``url``."""
    extra = f'[policy.opa]\nurl = "{url}"\ntimeout = {timeout}\n{more}'
    path: Path = write_setup(engine="opa", extra=extra)
    if decision:
        path.write_text(path.read_text().replace('engine = "opa"', f'engine = "opa"\ndecision = "{decision}"'))
    return path


@contextlib.contextmanager
def opa_pdp(write_setup: Any, url: str, **options: Any) -> Iterator[Pdp]:
    """A Pdp asking ``url`` (``opa_config``), closed afterwards."""
    pdp = build_pdp(load_config(opa_config(write_setup, url, **options)))
    try:
        yield pdp
    finally:
        pdp.close()


def decision_lines(caplog: Any) -> dict[str, dict[str, Any]]:
    """The decision log lines caught, by decision id."""
    return {(entry := json.loads(r.getMessage()))["decision_id"]: entry for r in caplog.records
            if r.name == "pdp.decisions"}


def raw(method: str = "GET", path: str = "/orders") -> RawRequest:
    return RawRequest(via=Via.DOCUMENT, method=method, target=path, host="api.test", scheme="https",
                      time=time.time())


def decide(pdp: Any, method: str = "GET") -> Any:
    return pdp.check(raw(method))


# -- the contract: the same input, the same reader, the configured entrypoint

def test_allow_and_deny_come_from_the_remote_policy(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        allowed, denied = decide(pdp, "GET"), decide(pdp, "DELETE")
    assert (allowed.allowed, allowed.reason, allowed.status) == (True, "allowed", 200)
    assert (denied.allowed, denied.reason, denied.status) == (False, "policy_denied", 403)
    asked = opa.asked[0]
    assert asked["path"] == "/v1/data/pdp/authz/result"
    assert asked["query"] == {"provenance": ["true"], "strict-builtin-errors": ["true"]}
    assert asked["authorization"] is None
    # The embedded engines' input document: opa-envoy-plugin's shape plus what pdp verified.
    assert asked["input"]["attributes"]["request"]["http"]["method"] == "GET"
    assert asked["input"]["path"] == "/orders"
    assert {"cert", "token", "binding"} <= set(asked["input"])


def test_a_boolean_entrypoint_of_the_envoy_plugin_shape(write_setup, opa):
    with opa_pdp(write_setup, opa.url, decision="envoy/authz/allow") as pdp:
        assert decide(pdp, "GET").allowed is True
        assert decide(pdp, "POST").allowed is False
    assert [a["path"] for a in opa.asked] == ["/v1/data/envoy/authz/allow"] * 2


def test_an_undefined_answer_is_a_deny_as_on_the_embedded_engines(write_setup, opa):
    opa.mode = "no-result"
    with opa_pdp(write_setup, opa.url) as pdp:
        decision = decide(pdp, "GET")
    assert (decision.allowed, decision.reason) == (False, "policy_denied")


def test_no_decision_is_cached_the_remote_policy_is_asked_every_time(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        assert pdp.policy.decisions is None
        for _ in range(3):
            assert decide(pdp).allowed is True
    assert len(opa.asked) == 3


# -- the revision

def test_the_revision_is_each_decisions_policy_version_in_the_explanation_and_the_log(write_setup, opa, caplog):
    caplog.set_level(logging.INFO, logger="pdp.decisions")
    with opa_pdp(write_setup, opa.url) as pdp:
        first = decide(pdp)
        opa.provenance = {"revision": "legacy-7"}  # OPA's legacy single-bundle form
        second = decide(pdp)
    lines = decision_lines(caplog)
    assert lines[first.decision_id]["policy_version"] == "rev-1"
    assert lines[second.decision_id]["policy_version"] == "legacy-7"
    assert "by policy rev-1" in next(s.detail for s in first.steps if s.name == "policy")


def test_revision_of_reads_every_form_of_provenance():
    assert revision_of({"revision": "r1"}) == "r1"
    assert revision_of({"bundles": {"one": {"revision": "r2"}}}) == "r2"
    assert revision_of({"bundles": {"b": {"revision": "2"}, "a": {"revision": "1"}}}) == "a=1,b=2"
    assert revision_of({"version": "1.0.0", "bundles": {}}) is None
    assert revision_of({"revision": "r\n3\x00"}) == "r3"
    assert revision_of("nonsense") is None


# -- failures: a deny with policy_unavailable, naming no address

FAILURES = {"down": "cannot be reached", "slow": "did not answer within 0.3 s",
            "drip": "did not answer within 0.3 s", "500": "answered HTTP 500",
            "garbage": "answered with something that is not JSON",
            "not-an-object": "answered with JSON that is not a decision document",
            "lone-surrogate": "answered with JSON that is not a decision document",
            "huge": "answered with more than 1048576 bytes", "redirect": "answered with a redirect"}


@pytest.mark.parametrize(("mode", "message"), FAILURES.items())
def test_every_failure_is_a_policy_unavailable_deny(write_setup, opa, mode, message):
    url = opa.url
    if mode == "down":
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    elif mode == "slow":
        opa.delay = 2.0
    else:
        opa.mode = mode
    with opa_pdp(write_setup, url, timeout=0.3) as pdp:
        started = time.monotonic()
        decision = decide(pdp)
        took = time.monotonic() - started
    assert (decision.allowed, decision.reason, decision.status) == (False, "policy_unavailable", 503)
    assert took < 1.0, f"{mode}: {took:.2f} s with a 0.3 s timeout"
    assert decision.message == f"the policy engine {message}"
    shown = json.dumps(decision.explanation())
    assert "127.0.0.1" not in shown and str(opa.port) not in shown and "the policy engine" in decision.message


def test_the_timeout_covers_the_whole_exchange(write_setup, opa):
    """Each byte arrives well within the timeout; the whole answer does not."""
    opa.mode = "drip"
    with opa_pdp(write_setup, opa.url, timeout=0.5) as pdp:
        started = time.monotonic()
        decision = decide(pdp)
        took = time.monotonic() - started
    assert decision.reason == "policy_unavailable" and "did not answer within 0.5 s" in decision.message
    assert 0.45 < took < 0.8


def test_after_a_failure_the_next_answer_is_used(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        opa.mode = "500"
        assert decide(pdp).reason == "policy_unavailable"
        opa.mode = "ok"
        assert decide(pdp).allowed is True


# -- connections

def test_one_thread_keeps_one_connection_from_decision_to_decision(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        for _ in range(20):
            assert decide(pdp).allowed is True
    assert len(opa.asked) == 20
    assert opa.connections == 1


def test_threads_share_no_connection_and_each_reuses_its_own(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: decide(pdp).allowed, range(80)))
    assert all(results) and len(opa.asked) == 80
    assert opa.connections <= 4


# -- network waits: never on an event loop

def test_a_decision_without_network_waits_is_deferred_before_any_step(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        with pytest.raises(NeedsNetwork) as raised:
            pdp.check(raw(), network=False)
        assert opa.asked == []  # nothing was asked on the caller's thread
        assert raised.value.request is not None
        assert pdp.decide(raised.value.request).allowed is True


def test_the_served_http_listener_decides_and_its_event_loop_stays_free(write_setup, opa):
    opa.delay = 0.4
    with serve_pdp(load_config(opa_config(write_setup, opa.url, timeout=2.0))) as (url, _), \
            httpx.Client(timeout=10) as client, ThreadPoolExecutor(8) as pool:
        checks = [pool.submit(client.post, f"{url}/v1/check", json={"method": m, "path": "/orders"})
                  for m in ("GET", "POST") * 4]
        time.sleep(0.1)  # the checks wait on OPA now
        started = time.monotonic()
        assert client.get(f"{url}/healthz").status_code == 200
        health_took = time.monotonic() - started
        answers = [c.result().json() for c in checks]
    assert health_took < 0.3, f"/healthz took {health_took:.2f} s while decisions waited on OPA"
    assert [a["allowed"] for a in answers] == [True, False] * 4
    assert {a["reason"] for a in answers} == {"allowed", "policy_denied"}


def test_a_dpop_proof_is_checked_once_by_the_decision_that_waits_on_opa(write_setup, opa, issuer):
    """The listener defers to a worker thread before any step: were the proof checked on the event loop
    first, the decision in the worker would find its jti seen, and deny a good request as a replay."""
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, dpop_key=key)
    document = {"method": "GET", "path": "/orders", "host": "api.test", "scheme": "https",
                "headers": {"authorization": f"DPoP {token}",
                            "dpop": key.proof("GET", "https://api.test/orders", token)}}
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, _):
        first = httpx.post(f"{url}/v1/check", json=document, timeout=10).json()
        replayed = httpx.post(f"{url}/v1/check", json=document, timeout=10).json()
    assert (first["allowed"], first["reason"]) == (True, "allowed"), first
    assert (replayed["allowed"], replayed["reason"]) == (False, "dpop_proof_invalid")
    assert len(opa.asked) == 1 and opa.asked[0]["input"]["binding"]["method"] == "dpop"


def test_the_served_grpc_listener_decides(write_setup, opa):
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (_, service), \
            grpc.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = stub.Check(envoy_request(method="GET"), timeout=10)
        denied = stub.Check(envoy_request(method="POST"), timeout=10)
        opa.mode = "500"
        unavailable = stub.Check(envoy_request(method="GET"), timeout=10)
    assert allowed.status.code == code_pb2.OK
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert (unavailable.status.message, unavailable.denied_response.status.code) == ("policy_unavailable", 503)


# -- /readyz

def test_readyz_names_the_revision_and_is_503_while_opa_does_not_answer(write_setup, opa):
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, service):
        assert isinstance(service.pdp.policy, RemoteEngine)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["opa"] == {"ok": True, "revision": None, "last_decision_error": None}
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        assert httpx.get(f"{url}/readyz", timeout=10).json()["opa"]["revision"] == "rev-1"
        opa.healthy = False
        time.sleep(1.1)  # the probe is asked again at most once a second
        down = httpx.get(f"{url}/readyz", timeout=10)
        assert down.status_code == 503
        body = down.json()
        assert body["ready"] is False and body["engine"] == "opa"
        assert body["opa"] == {"ok": False, "revision": "rev-1", "last_decision_error": None,
                               "error": "the policy engine does not answer"}
        assert str(opa.port) not in down.text


# -- configuration

@pytest.mark.parametrize(("extra", "key"), [
    ("", "policy.opa.url"),
    ('[policy.opa]\nurl = "ftp://127.0.0.1:8181"\n', "policy.opa.url"),
    ('[policy.opa]\nurl = "http://user:pw@127.0.0.1:8181"\n', "policy.opa.url"),
    ('[policy.opa]\nurl = "http://127.0.0.1:99999"\n', "policy.opa.url"),
    ('[policy.opa]\nurl = "http://127.0.0.1:8181"\ntimeout = -1\n', "policy.opa.timeout"),
    ('[policy.opa]\nurl = "http://127.0.0.1:8181"\nca = "ca.pem"\n', "policy.opa.ca"),
    ('[policy.opa]\nurl = "http://127.0.0.1:8181"\nurll = "x"\n', "policy.opa.urll"),
])
def test_configuration_errors_name_the_key(write_setup, extra, key):
    with pytest.raises(ConfigError) as raised:
        load_config(write_setup(engine="opa", extra=extra))
    assert raised.value.key == key


def test_a_decision_path_that_is_not_rego_names_is_refused(write_setup):
    path = opa_config(write_setup, "http://127.0.0.1:8181", decision="pdp/authz/../x?y")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.key == "policy.decision"


def test_a_missing_token_file_is_a_load_error_naming_the_key(write_setup, tmp_path):
    config = load_config(opa_config(write_setup, "http://127.0.0.1:8181", more='token_file = "missing.token"\n'))
    with pytest.raises(ConfigError) as raised:
        build_pdp(config)
    assert raised.value.key == "policy.opa.token_file" and "missing.token" in str(raised.value)


# -- OPA's authentication: a bearer token, TLS with a CA of its own, a new token on reload

def test_the_token_is_sent_and_a_rotated_token_file_is_used_after_a_reload(write_setup, opa, tmp_path):
    (tmp_path / "opa.token").write_text("first-token\n")
    config = load_config(opa_config(write_setup, opa.url, more='token_file = "opa.token"\n'))
    with serve_pdp(config) as (url, service):
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        (tmp_path / "opa.token").write_text("second-token\n")
        service.reloader.check(force=True)
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
    assert [a["authorization"] for a in opa.asked] == ["Bearer first-token", "Bearer second-token"]


def test_https_with_the_configured_ca_and_refused_without_it(write_setup, tmp_path):
    ca = make_ca("opa test CA")
    server = make_client(ca, spiffe_id=None, common_name="opa", dns=("localhost",), ips=("127.0.0.1",),
                         client_auth=False)
    (tmp_path / "opa.pem").write_bytes(server.pem + server.key_pem)
    (tmp_path / "opa-ca.pem").write_bytes(ca.pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "opa.pem")
    with OpaStandIn(tls=context) as opa:
        trusted = build_pdp(load_config(opa_config(write_setup, opa.url, more='ca = "opa-ca.pem"\n')))
        untrusted = build_pdp(load_config(opa_config(write_setup, opa.url)))  # the default CA bundle
        try:
            assert decide(trusted).allowed is True
            refused = decide(untrusted)
        finally:
            trusted.close()
            untrusted.close()
    assert (refused.allowed, refused.reason) == (False, "policy_unavailable")
    assert "TLS" in refused.message


# -- answers read whole, however they arrive, and only as sent

ALLOW_ANSWER = json.dumps({"result": {"allowed": True, "reason": "allowed"},
                           "provenance": {"revision": "rev-1"}}).encode()


def _head(version: str, body: bytes, *more: str) -> bytes:
    lines = [f"HTTP/{version} 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *more]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PADDED = json.dumps({"result": {"allowed": True}, "padding": "x" * 20_000}).encode()
ANSWER_SHAPES = {
    "connection-close-one-write": [(0.0, _head("1.1", ALLOW_ANSWER, "Connection: close") + ALLOW_ANSWER)],
    "connection-close-body-later": [(0.0, _head("1.1", ALLOW_ANSWER, "Connection: close")), (0.02, ALLOW_ANSWER)],
    "connection-close-20-kb": [(0.0, _head("1.1", PADDED, "Connection: close")), (0.02, PADDED)],
    "http-1.0-with-length-body-later": [(0.0, _head("1.0", ALLOW_ANSWER)), (0.02, ALLOW_ANSWER)],
    "keep-alive-body-later": [(0.0, _head("1.1", ALLOW_ANSWER)), (0.02, ALLOW_ANSWER)],
}


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """Every CPU busy while the test runs (a process spinning on each) and a thread of the test's own
    process spinning too: pdp's threads and the stand-in's get the CPU, and the GIL, late and in any order."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.mark.parametrize("shape", ANSWER_SHAPES)
def test_an_answer_that_closes_the_connection_is_read_to_its_end(write_setup, opa, shape, busy_cpu):
    """http.client closes the socket of a ``Connection: close`` answer before its body is read: the
    answer's reader keeps the descriptor open until it is done. Under load, the stand-in's close of a
    keep-alive answer may reach pdp before or after the next decision's request: both are allowed."""
    opa.mode, opa.pieces = "raw", ANSWER_SHAPES[shape]
    with opa_pdp(write_setup, opa.url, timeout=5.0) as pdp:
        decisions = [decide(pdp) for _ in range(3)]
    assert [(d.allowed, d.reason) for d in decisions] == [(True, "allowed")] * 3, decisions[0].message


# -- kept connections the server closed: replaced, never a refused decision

def _asked_again(caplog: pytest.LogCaptureFixture) -> int:
    return sum("asking on a new one" in record.getMessage() for record in caplog.records)


def _wait_until(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the stand-in did not get there in 5 s"
        time.sleep(0.01)


def test_a_kept_connection_the_server_closed_is_replaced_before_the_request_is_sent(write_setup, opa, caplog):
    """The stand-in closes each connection right after its answer (a keep-alive answer, no ``Connection:
    close``); the next decision comes once its FIN has arrived: seen, and a new connection carries it."""
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    opa.mode, opa.pieces = "raw", [(0.0, _head("1.1", ALLOW_ANSWER) + ALLOW_ANSWER)]
    with opa_pdp(write_setup, opa.url) as pdp:
        decisions = []
        for n in range(1, 4):
            decisions.append(decide(pdp))
            _wait_until(lambda: opa.server.closed == n)  # noqa: B023 -- called before n changes
            time.sleep(0.05)  # the FIN on its way over loopback
    assert [(d.allowed, d.reason) for d in decisions] == [(True, "allowed")] * 3, decisions[-1].message
    assert opa.connections == 3 and len(opa.asked) == 3
    assert _asked_again(caplog) == 0  # seen before the request went out: nothing was sent twice


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_kept_connection_closed_as_the_request_arrives_is_asked_again_on_a_new_one(write_setup, opa, caplog,
                                                                                     reset):
    """The stand-in reads the request and closes the connection without an answer: nothing showed before
    the request was sent, so the request goes once more, on a new connection."""
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    with opa_pdp(write_setup, opa.url) as pdp:
        first = decide(pdp)
        opa.hang_ups, opa.hang_up_reset = 1, reset
        second, third = decide(pdp), decide(pdp)
    assert [(d.allowed, d.reason) for d in (first, second, third)] == [(True, "allowed")] * 3, second.message
    # first, the one hung up, the same asked again on a new connection, third on that connection, kept
    assert len(opa.asked) == 4 and opa.connections == 2
    assert _asked_again(caplog) == 1


def test_a_request_is_asked_again_once_at_most(write_setup, opa, caplog):
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    with opa_pdp(write_setup, opa.url) as pdp:
        assert decide(pdp).allowed is True
        opa.hang_ups = 2  # the kept connection, then the new one
        decision = decide(pdp)
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert decision.message == "the policy engine cannot be reached"
    assert len(opa.asked) == 3 and opa.connections == 2
    assert _asked_again(caplog) == 1


def test_a_request_that_fails_on_a_new_connection_is_not_asked_again(write_setup, opa, caplog):
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    opa.hang_ups = 1
    with opa_pdp(write_setup, opa.url) as pdp:
        decision = decide(pdp)
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert len(opa.asked) == 1 and opa.connections == 1
    assert _asked_again(caplog) == 0


@pytest.mark.parametrize("piece", [b"HTTP/1.1 2", _head("1.1", ALLOW_ANSWER), _head("1.1", ALLOW_ANSWER) + b"{"],
                         ids=["part-of-the-status-line", "head-without-body", "part-of-the-body"])
def test_a_kept_connection_that_fails_after_a_byte_of_the_answer_is_not_asked_again(write_setup, opa, caplog,
                                                                                      piece):
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    with opa_pdp(write_setup, opa.url) as pdp:
        first = decide(pdp)
        opa.mode, opa.pieces = "raw", [(0.0, piece)]  # then the connection closes
        second = decide(pdp)
    assert (first.allowed, first.reason) == (True, "allowed")
    assert (second.allowed, second.reason) == (False, "policy_unavailable")
    assert len(opa.asked) == 2 and opa.connections == 1
    assert _asked_again(caplog) == 0


@pytest.mark.parametrize(("hang_up_after", "asked_again"), [(0.3, 1), (0.8, 0)],
                         ids=["within-the-timeout", "past-the-timeout"])
def test_asking_again_never_passes_the_timeout(write_setup, opa, caplog, hang_up_after, asked_again):
    """A kept connection closed unanswered 0.3 s into a 0.5 s exchange: the request asked again on a new
    connection has the 0.2 s left, not a timeout of its own. Closed after 0.5 s: the exchange is over."""
    caplog.set_level(logging.DEBUG, logger="pdp.policy")
    with opa_pdp(write_setup, opa.url, timeout=0.5) as pdp:
        assert decide(pdp).allowed is True
        opa.hang_ups, opa.hang_up_wait, opa.delay = 1, hang_up_after, 2.0
        started = time.monotonic()
        decision = decide(pdp)
        took = time.monotonic() - started
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert decision.message == "the policy engine did not answer within 0.5 s"
    assert 0.45 < took < 0.8
    assert _asked_again(caplog) == asked_again
    assert len(opa.asked) == 2 + asked_again and opa.connections == 1 + asked_again


def test_a_compressed_answer_is_refused_unread_and_identity_is_asked_for(write_setup, opa):
    bomb = gzip.compress(b" " * 20_000_000)  # 20 MB of JSON whitespace in ~20 KB on the wire
    opa.mode = "raw"
    opa.pieces = [(0.0, _head("1.1", bomb, "Content-Encoding: gzip") + bomb)]
    with opa_pdp(write_setup, opa.url) as pdp:
        decision = decide(pdp)
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert decision.message == "the policy engine answered with a Content-Encoding other than identity"
    assert opa.asked[0]["accept-encoding"] == "identity"


NOT_STRICT_JSON = {
    "duplicate-member": (b'{"result": {"allowed": false}, "result": {"allowed": true}}',
                         "answered with JSON holding a duplicate member"),
    "nan": (b'{"result": {"allowed": false, "dynamic_metadata": {"n": NaN}}}',
            "answered with JSON holding a number that is not finite"),
    "overflowing-number": (b'{"result": {"allowed": false, "dynamic_metadata": {"n": 1e999}}}',
                           "answered with JSON holding a number that is not finite"),
    "not-utf-8": (b'{"result": {"allowed": true, "reason": "allowed", "x": "\xff"}}',
                  "answered with text that is not UTF-8"),
    "byte-order-mark": (b'\xef\xbb\xbf{"result": {"allowed": true}}', "answered with something that is not JSON"),
}


@pytest.mark.parametrize("name", NOT_STRICT_JSON)
def test_an_answer_that_is_not_strict_json_is_policy_unavailable(write_setup, opa, name):
    opa.mode, (opa.body, message) = "body", NOT_STRICT_JSON[name]
    with opa_pdp(write_setup, opa.url) as pdp:
        decision = decide(pdp)
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert decision.message == f"the policy engine {message}"


def test_a_nan_in_the_answer_is_a_deny_on_every_listener_never_a_500(write_setup, opa):
    opa.mode, opa.body = "body", NOT_STRICT_JSON["nan"][0]
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, _):
        answer = httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
    assert answer.status_code == 200
    assert (answer.json()["allowed"], answer.json()["reason"]) == (False, "policy_unavailable")


# -- connections: bounded however many threads come and go

def test_threads_coming_and_going_leave_at_most_the_idle_bound_of_connections(write_setup, opa):
    opa.delay = 0.02  # the threads' decisions overlap
    results: list[str] = []
    engine = build_pdp(load_config(opa_config(write_setup, opa.url)))
    try:
        for _ in range(3):  # as anyio's worker threads: a crowd decides, retires, and new threads come
            threads = [threading.Thread(target=lambda: results.extend(decide(engine).reason for _ in range(2)))
                       for _ in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            deadline = time.monotonic() + 2
            while opa.open > OpaConfig.max_connections and time.monotonic() < deadline:
                time.sleep(0.02)
            assert opa.open <= OpaConfig.max_connections
        assert results == ["allowed"] * 240 and len(opa.asked) == 240
    finally:
        engine.close()


def test_closing_the_engine_and_replacing_it_on_reload_close_its_connections(write_setup, opa):
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, service):
        for _ in range(3):
            httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        old = service.pdp.policy
        service.reloader.check(force=True)
        assert service.pdp.policy is not old
        deadline = time.monotonic() + 2
        while opa.open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert opa.open == 0


# -- /readyz and the policy version

def test_readyz_is_503_while_decisions_are_refused_though_opa_health_answers(write_setup, opa):
    opa.mode, opa.status, opa.body = "body", 401, b'{"code": "unauthorized"}'
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, _):
        check = httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        assert check.json()["reason"] == "policy_unavailable"
        down = httpx.get(f"{url}/readyz", timeout=10)
        opa.mode = "ok"
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        up = httpx.get(f"{url}/readyz", timeout=10)
    assert down.status_code == 503 and down.json()["opa"] == {
        "ok": False, "revision": None, "error": "the policy engine answered HTTP 401 to the last decision",
        "last_decision_error": "the policy engine answered HTTP 401 to the last decision"}
    assert str(opa.port) not in down.text
    assert up.status_code == 200 and up.json()["opa"]["last_decision_error"] is None


def test_the_policy_version_of_readyz_and_metrics_follows_the_latest_revision(write_setup, opa):
    with serve_pdp(load_config(opa_config(write_setup, opa.url))) as (url, _), \
            ThreadPoolExecutor(8) as pool:
        def check(_: int) -> None:
            httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)

        list(pool.map(check, range(16)))
        opa.provenance = {"revision": "rev-2"}
        check(0)
        versions = set(pool.map(lambda _: httpx.get(f"{url}/readyz", timeout=10).json()["policy_version"],
                                range(16)))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert versions == {"rev-2"}
    assert 'pdp_policy_info{engine="opa",version="rev-2"} 1.0' in metrics


def test_a_policy_unavailable_decision_is_logged_without_another_decisions_revision(write_setup, opa, caplog):
    caplog.set_level(logging.INFO, logger="pdp.decisions")
    with opa_pdp(write_setup, opa.url) as pdp:
        first = decide(pdp)
        opa.mode = "500"
        failed = decide(pdp)
    lines = decision_lines(caplog)
    assert lines[first.decision_id]["policy_version"] == "rev-1"
    assert lines[failed.decision_id]["policy_version"] == "unknown"


def test_the_explanation_says_the_facts_of_a_remote_policy_are_unknown(write_setup, opa):
    with opa_pdp(write_setup, opa.url) as pdp:
        with explain.recording(pdp.policy) as evaluations:
            decision = decide(pdp)
        shown = explain.explanation(pdp.policy.bundle, evaluations, decision)
        text = explain.explanation_lines(pdp.policy.bundle, evaluations, decision)
    assert shown["evaluated"] is True and shown["facts"] is None
    assert "facts the policy read: unknown (the remote policy may read anything in input, and data pdp does " \
           "not see)" in text


# -- configuration: the URL and the decision

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8181?", "http://127.0.0.1:8181#", "http://127.0.0.1:8181/v1", "http://127.0.0.1:8181/v1/",
    " http://127.0.0.1:8181", "http://127.0.0.1:8181\\n", "http://127.0.0.1:8181/a b",
    "http://127.0.0.1:8181/%2e%2e/x", "http://127.0.0.1:8181/../x", "http://127.0.0.1:8181//x",
])
def test_a_url_with_a_query_fragment_space_or_odd_path_is_refused(write_setup, url):
    with pytest.raises(ConfigError) as raised:
        load_config(opa_config(write_setup, url))
    assert raised.value.key == "policy.opa.url"


def test_the_whole_data_tree_is_no_decision(write_setup):
    with pytest.raises(ConfigError) as raised:
        load_config(opa_config(write_setup, "http://127.0.0.1:8181", decision="data"))
    assert raised.value.key == "policy.decision" and "whole data tree" in str(raised.value)


def test_an_upper_case_scheme_is_read_as_http_and_warned_of_with_a_token(write_setup, tmp_path, caplog):
    (tmp_path / "opa.token").write_text("a-token\n")
    config = load_config(opa_config(write_setup, "HTTP://127.0.0.1:8181", more='token_file = "opa.token"\n'))
    assert config.policy.opa is not None and config.policy.opa.url == "http://127.0.0.1:8181"
    with caplog.at_level(logging.WARNING, logger="pdp.policy"):
        build_pdp(config).close()
    assert any("over plain http" in r.getMessage() for r in caplog.records)


def test_a_base_path_is_kept_before_v1(write_setup, opa):
    with opa_pdp(write_setup, f"{opa.url}/opa/", decision="pdp/authz/result") as pdp:
        assert decide(pdp).allowed is True
    assert opa.asked[0]["path"] == "/opa/v1/data/pdp/authz/result"


# -- policy.opa.max_connections: never more connections open at once

def test_concurrent_decisions_never_open_more_than_max_connections(write_setup, opa):
    opa.delay = 0.02  # the decisions overlap
    with opa_pdp(write_setup, opa.url, timeout=2.0, more="max_connections = 2\n") as pdp:
        with ThreadPoolExecutor(8) as pool:
            reasons = list(pool.map(lambda _: decide(pdp).reason, range(80)))
    assert reasons == ["allowed"] * 80 and len(opa.asked) == 80
    assert opa.peak <= 2 and opa.connections == 2  # both used, kept open, none more


def test_a_decision_that_finds_no_free_connection_in_its_time_is_policy_unavailable(write_setup, opa):
    with opa_pdp(write_setup, opa.url, timeout=0.3, more="max_connections = 1\n") as pdp:
        engine = pdp.policy
        assert isinstance(engine, RemoteEngine)
        held = engine._pool.take(time.monotonic() + 1)  # as a decision would, for longer than the next one's time
        started = time.monotonic()
        busy = decide(pdp)
        took = time.monotonic() - started
        engine._pool.give(held, reusable=True)
        after = decide(pdp)
    assert (busy.allowed, busy.reason) == (False, "policy_unavailable")
    assert busy.message == "the policy engine was busy: no connection free within 0.3 s (policy.opa.max_connections)"
    assert 0.25 < took < 0.6
    assert after.allowed is True and opa.connections == 1 and len(opa.asked) == 1


def test_a_decision_waits_for_a_connection_given_back_within_its_time(write_setup, opa):
    opa.delay = 0.05
    with opa_pdp(write_setup, opa.url, timeout=1.0, more="max_connections = 1\n") as pdp:
        with ThreadPoolExecutor(4) as pool:
            reasons = list(pool.map(lambda _: decide(pdp).reason, range(8)))
    assert reasons == ["allowed"] * 8 and opa.connections == 1


@pytest.mark.parametrize("value", ["0", "1025", "2.5", "true", '"4"'])
def test_max_connections_out_of_range_is_refused(write_setup, value):
    with pytest.raises(ConfigError) as raised:
        load_config(opa_config(write_setup, "http://127.0.0.1:8181", more=f"max_connections = {value}\n"))
    assert raised.value.key == "policy.opa.max_connections"


# -- name resolution: within the exchange's deadline, on bounded threads

class HangingResolver:
    """``socket.getaddrinfo`` (the OS boundary) for names ending in ``.test``: hangs until released, or
    answers 127.0.0.1 at once once ``answer`` is set; every other name or address goes to the OS."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = threading.Event()
        self.asked: list[str] = []
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            self.asked.append(host)
            self.released.wait(30)
            return self.real("127.0.0.1", port, *args, **kwargs)
        return self.real(host, port, *args, **kwargs)


def resolver_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "pdp-opa-resolver")


@pytest.fixture
def hanging(monkeypatch: pytest.MonkeyPatch) -> Iterator[HangingResolver]:
    resolver = HangingResolver(monkeypatch)
    try:
        yield resolver
    finally:
        resolver.released.set()
        deadline = time.monotonic() + 5
        while RESOLVER.running() and time.monotonic() < deadline:
            time.sleep(0.01)


def test_a_hung_name_lookup_is_a_policy_unavailable_deny_within_the_timeout(write_setup, opa, hanging):
    named = build_pdp(load_config(opa_config(write_setup, f"http://opa.test:{opa.port}", timeout=0.3)))
    by_address = build_pdp(load_config(opa_config(write_setup, opa.url, timeout=0.3)))
    try:
        started = time.monotonic()
        first = decide(named)
        took = time.monotonic() - started
        # More decisions while the lookup hangs: each waits its own time, none starts another lookup.
        with ThreadPoolExecutor(8) as pool:
            later = list(pool.map(lambda _: decide(named), range(16)))
        assert resolver_threads() == 1 and hanging.asked == ["opa.test"]
        # The process stays responsive: a server named by its address is asked as ever meanwhile.
        started = time.monotonic()
        assert decide(by_address).allowed is True
        assert time.monotonic() - started < 0.2
        # Once the resolver answers again, so does the named server.
        hanging.released.set()
        deadline = time.monotonic() + 5
        while RESOLVER.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        recovered = decide(named)
    finally:
        named.close()
        by_address.close()
    assert (first.allowed, first.reason) == (False, "policy_unavailable")
    assert first.message == "the policy engine did not answer within 0.3 s"
    assert 0.25 < took < 0.6, f"{took:.2f} s with a 0.3 s timeout"
    assert {(d.reason, d.message) for d in later} == {("policy_unavailable", first.message)}
    assert recovered.allowed is True


def test_hung_lookups_are_bounded_and_one_past_the_bound_fails_at_once(write_setup, opa, hanging):
    engines = [build_pdp(load_config(opa_config(write_setup, f"http://opa-{i}.test:{opa.port}", timeout=0.2)))
               for i in range(RESOLVER_THREADS + 1)]
    try:
        hung = [decide(pdp) for pdp in engines[:RESOLVER_THREADS]]
        assert resolver_threads() == RESOLVER_THREADS
        started = time.monotonic()
        refused = decide(engines[-1])
        took = time.monotonic() - started
        assert resolver_threads() == RESOLVER_THREADS
    finally:
        for pdp in engines:
            pdp.close()
    assert {d.message for d in hung} == {"the policy engine did not answer within 0.2 s"}
    assert (refused.reason, refused.message) == ("policy_unavailable", "the policy engine cannot be reached")
    assert took < 0.1, f"{took:.2f} s: a lookup past the bound must fail at once"


def test_a_name_the_os_resolves_is_asked(write_setup, opa):
    """localhost through the real resolver (it may name ::1 first, where nothing listens: the next
    address is tried)."""
    with opa_pdp(write_setup, f"http://localhost:{opa.port}") as pdp:
        assert decide(pdp).allowed is True


# -- policy.opa.unready_after_failure

def test_readyz_is_ready_again_after_unready_after_failure(write_setup, opa):
    opa.mode = "500"
    with opa_pdp(write_setup, opa.url, more="unready_after_failure = 0.3\n") as pdp:
        assert isinstance(pdp.policy, RemoteEngine)
        assert decide(pdp).reason == "policy_unavailable"
        down = pdp.policy.health()
        time.sleep(0.35)
        up = pdp.policy.health()
    assert down["ok"] is False and down["error"] == "the policy engine answered HTTP 500 to the last decision"
    assert up["ok"] is True and up["last_decision_error"] == down["error"]


@pytest.mark.parametrize("value", ["-1", '"5"'])
def test_unready_after_failure_must_be_a_number_of_seconds(write_setup, value):
    with pytest.raises(ConfigError) as raised:
        load_config(opa_config(write_setup, "http://127.0.0.1:8181", more=f"unready_after_failure = {value}\n"))
    assert raised.value.key == "policy.opa.unready_after_failure"
