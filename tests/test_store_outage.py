"""When the shared store breaks: a real Redis of the test's own, down at start, stopped, paused and slowed.

What needs the store (the DPoP replay check, the introspection endpoint's lock-out counters) is denied with
its reason and no caller ever sees the store's address; ``/readyz`` says the store is down (503) while it
is; no request waits much past ``store.timeout``; pdp reconnects by itself; and what was recorded before an
outage (a DPoP proof's ``jti``) is still enforced after it.
"""

from __future__ import annotations

import base64
import hashlib
import time
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import AUDIENCE, Pki
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from redis_process import RedisProcess
from servers import free_port, serve_pdp

from pdp.config import load_config
from pdp.devpki import DpopKey, TokenIssuer

pytestmark = pytest.mark.integration

SECRET = "s3cret-of-the-orders-api"
#: Bounds on how long a request may take while Redis does not answer (store.timeout is 0.2 s): generous
#: for a loaded machine, and still far below the Redis pauses and sleeps the tests cause.
SLOW = 1.5


def _config(write_setup: Any, url: str, prefix: str = "pdp-outage:") -> Any:
    return load_config(write_setup(extra=(
        f'[store]\nurl = "{url}"\nprefix = "{prefix}"\ntimeout = 0.2\n'
        f'[introspection]\nenabled = true\nissuer = "https://pdp.example.org"\n'
        f'[[introspection.clients]]\nclient_id = "orders-api"\n'
        f'secret_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"\n')))


class Caller:
    """One DPoP key and token; a fresh proof for each request through /v1/check."""

    def __init__(self, issuer: TokenIssuer, pki: Pki, url: str) -> None:
        self.key = DpopKey.generate()
        self.token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=self.key)
        self.pki = pki
        self.url = url

    def proof(self, htu: str = "https://api.test/orders", method: str = "GET") -> str:
        return self.key.proof(method, htu, self.token)

    def check(self, proof: str | None = None) -> tuple[dict[str, Any], float, str]:
        doc = {"method": "GET", "path": "/orders", "host": "api.test", "client_cert": self.pki.chain_pem(),
               "headers": {"authorization": f"DPoP {self.token}", "dpop": proof or self.proof()}}
        started = time.monotonic()
        r = httpx.post(f"{self.url}/v1/check", json=doc, timeout=10)
        return r.json(), time.monotonic() - started, _everything(r)


def _everything(r: httpx.Response) -> str:
    return r.text + "".join(f"{k}: {v}\n" for k, v in r.headers.items())


def _no_address(text: str, port: int) -> None:
    for leak in (f":{port}", "Error 111", "connecting to", "redis:", "Timeout reading", "sqlite"):
        assert leak not in text, (leak, text)


def _wait(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.1)


def test_no_response_names_the_store_while_redis_is_down(write_setup, pki, issuer, tmp_path):
    """/v1/check, /ext_authz, gRPC Check, the introspection endpoint and /readyz, with Redis stopped."""
    with RedisProcess(tmp_path) as rp, serve_pdp(_config(write_setup, rp.url)) as (url, service):
        caller = Caller(issuer, pki, url)
        assert caller.check()[0]["allowed"] is True
        rp.stop()

        body, _, text = caller.check()
        assert (body["allowed"], body["reason"], body["status"]) == (False, "store_unavailable", 503)
        assert body["message"] == "the shared store is unavailable"
        _no_address(text, rp.port)

        # ext_authz: the sub-request names the original request; its htu is rebuilt from what it carries.
        r = httpx.get(f"{url}/ext_authz/orders", headers={
            "host": "api.test", "authorization": f"DPoP {caller.token}",
            "dpop": caller.proof("https://api.test/orders")})
        assert (r.status_code, r.headers["x-pdp-reason"]) == (503, "store_unavailable"), _everything(r)
        _no_address(_everything(r), rp.port)

        assert service.grpc is not None
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            answer = stub.Check(_envoy_request(pki, caller.token, caller.proof()), timeout=10)
        assert answer.denied_response.status.code == 503 and answer.status.message == "store_unavailable"
        _no_address(str(answer) + answer.SerializeToString().decode("latin-1"), rp.port)

        secret = base64.b64encode(f"orders-api:{SECRET}".encode()).decode()
        r = httpx.post(f"{url}/oauth2/introspect", data={"token": caller.token},
                       headers={"authorization": f"Basic {secret}"})
        assert (r.status_code, r.json()) == (503, {"error": "temporarily_unavailable"})
        _no_address(_everything(r), rp.port)

        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.json()["store"] == {"ok": False, "kind": "redis", "error": "the shared store is unavailable"}
        _no_address(_everything(r), rp.port)


def _envoy_request(pki: Pki, token: str, proof: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="GET", path="/orders", host="api.test", scheme="https", protocol="HTTP/2",
        headers={":authority": "api.test", ":method": "GET", ":path": "/orders",
                 "authorization": f"DPoP {token}", "dpop": proof})
    source = attribute_context_pb2.AttributeContext.Peer(
        certificate=urllib.parse.quote(pki.client.pem.decode(), safe=""), principal="spiffe://example.org/demo/client")
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))


def _metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


def test_redis_down_at_start_then_up_pdp_reconnects_and_readyz_follows(write_setup, pki, issuer, tmp_path):
    rp = RedisProcess(tmp_path)  # its port, with nothing listening yet
    with serve_pdp(_config(write_setup, rp.url)) as (url, service):
        caller = Caller(issuer, pki, url)
        body, took, _ = caller.check()
        assert (body["allowed"], body["reason"]) == (False, "store_unavailable") and took < SLOW

        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["store"]["ok"] is False
        assert _metric(url, "pdp_store_up") == 0
        assert _metric(url, 'pdp_store_failures_total{use="probe"}') >= 1

        # Asked often, the store is probed at most once a second.
        before, started = service.store_health.probes, time.monotonic()
        for _ in range(30):
            assert httpx.get(f"{url}/readyz").status_code == 503
        assert service.store_health.probes - before <= (time.monotonic() - started) / 1.0 + 2

        with rp:
            _wait(lambda: httpx.get(f"{url}/readyz").status_code == 200)
            assert httpx.get(f"{url}/readyz").json()["store"] == {"ok": True, "kind": "redis"}
            assert _metric(url, "pdp_store_up") == 1
            assert caller.check()[0]["allowed"] is True


def test_redis_paused_mid_traffic_denies_in_time_and_forgets_nothing(write_setup, pki, issuer, tmp_path):
    with RedisProcess(tmp_path) as rp, serve_pdp(_config(write_setup, rp.url)) as (url, _):
        caller = Caller(issuer, pki, url)
        seen = caller.proof()
        assert caller.check(seen)[0]["allowed"] is True

        rp.pause()
        try:
            for _ in range(3):
                body, took, text = caller.check()
                assert (body["allowed"], body["reason"]) == (False, "store_unavailable")
                assert took < SLOW, took
                _no_address(text, rp.port)
        finally:
            rp.resume()

        # Reconnected by itself, and the proof recorded before the outage is still a replay after it.
        _wait(lambda: caller.check()[0]["allowed"] is True)
        replay = caller.check(seen)[0]
        assert (replay["allowed"], replay["reason"]) == (False, "dpop_proof_invalid")


def test_a_slow_redis_costs_a_request_no_more_than_the_store_timeout(write_setup, pki, issuer, tmp_path):
    with RedisProcess(tmp_path) as rp, serve_pdp(_config(write_setup, rp.url)) as (url, _):
        caller = Caller(issuer, pki, url)
        assert caller.check()[0]["allowed"] is True
        sleeping = rp.sleep(4)
        body, took, _ = caller.check()
        assert (body["allowed"], body["reason"]) == (False, "store_unavailable")
        assert took < SLOW, took
        sleeping.join(timeout=10)
        _wait(lambda: caller.check()[0]["allowed"] is True)


def test_a_store_that_never_answers_is_named_nowhere_in_readyz(write_setup, tmp_path: Path):
    port = free_port()
    with serve_pdp(_config(write_setup, f"redis://127.0.0.1:{port}/0")) as (url, _):
        r = httpx.get(f"{url}/readyz")
    assert r.status_code == 503
    _no_address(_everything(r), port)


def test_requests_waiting_on_a_paused_redis_do_not_hold_up_the_event_loop(write_setup, pki, issuer, tmp_path):
    """A DPoP proof's jti goes to Redis: on the HTTP listener that wait happens in a worker thread, so a
    request that needs no store is answered while DPoP requests wait out the store timeout."""
    from concurrent.futures import ThreadPoolExecutor

    with RedisProcess(tmp_path) as rp, serve_pdp(_config(write_setup, rp.url)) as (url, _):
        caller = Caller(issuer, pki, url)
        assert caller.check()[0]["allowed"] is True
        plain = {"method": "GET", "path": "/healthz", "host": "api.test"}
        rp.pause()
        try:
            with ThreadPoolExecutor(8) as pool:
                waiting = [pool.submit(caller.check) for _ in range(8)]
                time.sleep(0.1)  # the DPoP requests are in, each waiting up to store.timeout (0.2 s)
                started = time.monotonic()
                answer = httpx.post(f"{url}/v1/check", json=plain, timeout=10).json()
                plain_took = time.monotonic() - started
                dpop_answers = [f.result()[0] for f in waiting]
        finally:
            rp.resume()
    assert answer["decision_id"] and "allowed" in answer
    assert all((a["allowed"], a["reason"]) == (False, "store_unavailable") for a in dpop_answers)
    # Inline on the loop, the eight waits (1.6 s) would come before it; in threads it is not held up.
    assert plain_took < 0.8, plain_took
