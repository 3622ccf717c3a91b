"""Remote key sets that change: a key the issuer removes stops verifying within ``jwks_refresh_interval``, and
tokens with made-up ``kid`` values cannot keep a newly published key out for longer than
``jwks_min_refresh_interval``. A real JWKS server on a loopback port whose key set the tests change."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from conftest import AUDIENCE, check_request
from servers import serve_pdp

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.credentials.http_fetch import HttpFetch
from pdp.credentials.jwks import DISCOVERY_FAILED, RETRY_FLOOR, RemoteKeySource, refresh_wait
from pdp.devpki import TokenIssuer
from pdp.pipeline import Pdp
from pdp.service.server import Service

pytestmark = pytest.mark.integration


class KeySetServer:
    """GET /jwks.json: ``jwks`` as it is now; counts fetches; ``delay`` seconds before each answer."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self.times: list[float] = []
        self.delay = 0.0
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                outer.times.append(time.monotonic())
                time.sleep(outer.delay)
                if outer.fail or self.path != "/jwks.json":
                    self.send_error(503)
                    return
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.issuer}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, *issuers: TokenIssuer) -> None:
        self.jwks = {"keys": [i.jwk for i in issuers]}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[KeySetServer]:
    server = KeySetServer()
    yield server
    server.stop()


def _signer(server: KeySetServer, kid: str) -> TokenIssuer:
    return TokenIssuer(server.issuer, TokenIssuer.generate(kid="x").key, kid)


def _issuer_toml(server: KeySetServer, *, interval: float, min_interval: float) -> str:
    return (f'[[tokens.issuers]]\nissuer = "{server.issuer}"\naudiences = ["{AUDIENCE}"]\nalgorithms = ["ES256"]\n'
            f'jwks_url = "{server.url}"\njwks_timeout = 2\njwks_refresh_interval = {interval}\n'
            f"jwks_min_refresh_interval = {min_interval}\n")


def _source(server: KeySetServer, *, interval: float, min_interval: float) -> RemoteKeySource:
    url = server.url
    return RemoteKeySource(lambda: url, HttpFetch(2.0), min_interval=min_interval, max_age=interval, name="t")


def test_the_refresher_is_due_when_the_set_turns_stale_and_retries_a_failure_soon(jwks_server):
    jwks_server.publish(_signer(jwks_server, "a"))
    source = _source(jwks_server, interval=300, min_interval=30)
    assert source.due() == float("-inf")  # nothing loaded: at once
    source.refresh(1000.0)
    assert source.due() == 1300.0
    assert refresh_wait([source], 1100.0) == 200.0
    jwks_server.fail = True
    source.refresh(1040.0)  # an unknown kid's fetch fails: the set in force is not stale, nothing to retry
    assert source.due() == 1300.0
    source.refresh(1300.0)  # the scheduled fetch fails: again after the rate limit
    assert source.due() == 1330.0
    quick = _source(jwks_server, interval=5, min_interval=0)
    quick.refresh(1000.0)
    assert quick.due() == 1000.0 + RETRY_FLOOR  # a failing endpoint is not hammered
    assert refresh_wait([quick], 2000.0) == 0.01


def test_an_unchanged_set_stays_the_same_set(jwks_server):
    jwks_server.publish(_signer(jwks_server, "a"))
    source = _source(jwks_server, interval=300, min_interval=0)
    source.refresh(1.0)
    first = source.current()
    assert source.refresh(2.0) is False and source.current() is first  # tokens it verified stay cached


def _check(url: str, pki: Any, token: str) -> dict[str, Any]:
    return dict(httpx.post(f"{url}/v1/check", json={
        "method": "GET", "path": "/orders", "host": "api.test", "client_cert": pki.chain_pem(),
        "headers": {"authorization": f"Bearer {token}"}}).json())


def test_a_removed_key_stops_verifying_within_the_refresh_interval(write_setup, pki, jwks_server):
    old, new = _signer(jwks_server, "old"), _signer(jwks_server, "new")
    jwks_server.publish(old, new)
    # The old token's kid stays known until a fetch: only the refresher's schedule brings the removal in.
    config = load_config(write_setup(extra=_issuer_toml(jwks_server, interval=1, min_interval=0.5)))
    with serve_pdp(config) as (url, _):
        token = old.mint(audience=AUDIENCE, bound_to=pki.client)
        assert _check(url, pki, token)["allowed"] is True
        time.sleep(0.5)
        jwks_server.publish(new)
        removed, fetches = time.monotonic(), jwks_server.fetches
        while _check(url, pki, token)["allowed"]:
            assert time.monotonic() - removed < 10, "the removed key is still accepted"
            time.sleep(0.05)
        took = time.monotonic() - removed
        # The interval (1 s) and the fetch, with a margin for a loaded machine: well below the 5 s the
        # refresher once slept between looks.
        assert took < 1 + 2.0, took
        assert _check(url, pki, new.mint(audience=AUDIENCE, bound_to=pki.client))["allowed"] is True
        time.sleep(2.5)
        elapsed = time.monotonic() - removed
        assert jwks_server.fetches - fetches <= elapsed / 1 + 3  # on schedule, not spinning
        assert _check(url, pki, token)["reason"] == "token_key_unknown"
    # One fetch every interval (1 s), give or take a loaded machine; never the 5 s it once slept.
    gaps = [b - a for a, b in zip(jwks_server.times, jwks_server.times[1:], strict=False)]
    assert len(gaps) >= 3 and max(gaps) < 2.5, gaps


@pytest.fixture
def replica(write_setup, jwks_server) -> Iterator[Pdp]:
    pdp = build_pdp(load_config(write_setup(extra=_issuer_toml(jwks_server, interval=300, min_interval=30))),
                    probe=False)
    yield pdp
    pdp.close()


def _at(pdp: Pdp, pki: Any, token: str, now: float) -> Any:
    return pdp.decide(check_request(chain=pki.chain(), token=token, now=now))


def test_made_up_kids_keep_a_new_key_out_no_longer_than_the_min_refresh_interval(replica, pki, jwks_server):
    """Decisions at chosen times (``now``), against the real server: the rate limit is judged on them."""
    legit = _signer(jwks_server, "k1")
    jwks_server.publish(legit)
    t0 = time.time()
    assert _at(replica, pki, legit.mint(audience=AUDIENCE, bound_to=pki.client), t0).allowed
    assert jwks_server.fetches == 1

    def attack(now: float) -> None:
        forged = _signer(jwks_server, uuid.uuid4().hex).mint(audience=AUDIENCE, bound_to=pki.client)
        assert _at(replica, pki, forged, now).reason == "token_key_unknown"

    for offset in (1, 5, 10, 29):  # within the rate limit: no fetch at all
        attack(t0 + offset)
    assert jwks_server.fetches == 1
    attack(t0 + 31)  # past it: one fetch
    assert jwks_server.fetches == 2

    rotated = _signer(jwks_server, "k2")
    jwks_server.publish(legit, rotated)
    fresh = rotated.mint(audience=AUDIENCE, bound_to=pki.client)
    assert _at(replica, pki, fresh, t0 + 32).reason == "token_key_unknown"  # the attacker's fetch was earlier
    for offset in (35, 45, 60):
        attack(t0 + offset)
    assert jwks_server.fetches == 2
    # min_interval after the attacker's fetch, the new kid makes its own fetch and verifies with it.
    assert _at(replica, pki, fresh, t0 + 61.5).allowed
    assert jwks_server.fetches == 3


def test_a_kid_in_a_set_someone_else_fetched_verifies_at_once(replica, pki, jwks_server):
    legit = _signer(jwks_server, "k1")
    jwks_server.publish(legit)
    t0 = time.time()
    assert _at(replica, pki, legit.mint(audience=AUDIENCE, bound_to=pki.client), t0).allowed
    rotated = _signer(jwks_server, "k2")
    jwks_server.publish(legit, rotated)
    forged = _signer(jwks_server, "made-up").mint(audience=AUDIENCE, bound_to=pki.client)
    assert _at(replica, pki, forged, t0 + 31).reason == "token_key_unknown"  # fetched the set with k2
    assert _at(replica, pki, rotated.mint(audience=AUDIENCE, bound_to=pki.client), t0 + 32).allowed
    assert jwks_server.fetches == 2  # no fetch of its own was needed

    # A fetch under way when the new kid arrives: the request waits for it and uses what it brought.
    newest = _signer(jwks_server, "k3")
    jwks_server.publish(legit, rotated, newest)
    jwks_server.delay = 0.5
    attacker = threading.Thread(target=lambda: _at(replica, pki, forged, t0 + 62))
    attacker.start()
    time.sleep(0.2)
    assert _at(replica, pki, newest.mint(audience=AUDIENCE, bound_to=pki.client), t0 + 62.1).allowed
    attacker.join()
    assert jwks_server.fetches == 3


def test_an_https_issuers_discovered_http_key_set_is_a_counted_refresh_failure(write_setup):
    """RFC 8414 §2: an https issuer's metadata that names an http ``jwks_uri`` is refused; the refresher
    counts the failure, ``/readyz`` names it in its fixed words, and the http URL is never fetched."""
    issuer = "https://idp.test"
    fetched: list[str] = []

    def fetch(url: str) -> bytes:  # the service's fetch, as HttpFetch would answer over https
        fetched.append(url)
        if url == f"{issuer}/.well-known/oauth-authorization-server":
            return json.dumps({"issuer": issuer, "jwks_uri": "http://idp.test/keys"}).encode()
        raise OSError(f"GET {url}: HTTP 404")

    extra = (f'[[tokens.issuers]]\nissuer = "{issuer}"\naudiences = ["{AUDIENCE}"]\nalgorithms = ["ES256"]\n'
             'discovery = true\n')
    service = Service(load_config(write_setup(extra=extra)), fetch=fetch)
    try:
        service.refresh_keys()
        failures = [line for line in service.metrics.render().decode().splitlines()
                    if line.startswith("pdp_jwks_refresh_failures_total{")]
        assert failures == [f'pdp_jwks_refresh_failures_total{{issuer="{issuer}"}} 1.0'], failures
        state = service.readiness()["issuers"][issuer]
        assert state == {"keys": None, "error": DISCOVERY_FAILED}
        assert "http://idp.test/keys" not in fetched
    finally:
        service.stop()
