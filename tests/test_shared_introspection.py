"""Introspection answers shared through the store: one replica's call to the authorization server serves the
others, for no longer than the answer's ``exp`` and the configured cache time; what the store gives back is
authenticated (``store.secret``) and checked again; a store that does not answer costs a call to the
authorization server, never a decision.

A real introspection endpoint on a loopback port (it counts its calls), real replicas (``Pdp`` objects built
from one config) sharing the real Redis on 6379 under a test prefix, and a Redis of the test's own where
the test stops or pauses it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from conftest import AUDIENCE, REDIS_URL, check_request
from redis_process import RedisProcess
from servers import serve_pdp

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.credentials.shared_introspection import SHARED_VERSION, SharedAnswers
from pdp.credentials.tokens import token_digest
from pdp.pipeline import Pdp

pytestmark = pytest.mark.integration

AS_ISSUER = "https://as.test"
SECRET = "rs-secret"
#: The replicas' store.secret (hex), and pdp's client_id at the introspection endpoint.
STORE_SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0"
CLIENT_ID = "rs"
SHARED = SharedAnswers(bytes.fromhex(STORE_SECRET))
#: See tests/test_store_outage.py: far below the pauses the tests cause, generous for a loaded machine.
SLOW = 1.5


class IntrospectionServer:
    """POST /introspect with client_secret_basic: ``answers`` by token, ``{"active": false}`` for others."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                outer.calls += 1
                if outer.fail:
                    self.send_error(503)
                    return
                body = json.dumps(outer.answers.get(form["token"][0], {"active": False})).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def active(self, token: str, thumbprint: str, *, lifetime: float = 300, **claims: Any) -> None:
        self.answers[token] = {"active": True, "iss": AS_ISSUER, "aud": AUDIENCE, "scope": "read",
                               "client_id": "demo-client", "token_type": "Bearer", "exp": int(time.time() + lifetime),
                               "cnf": {"x5t#S256": thumbprint}, **claims}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def auth_server() -> Iterator[IntrospectionServer]:
    server = IntrospectionServer()
    yield server
    server.stop()


def _extra(server: IntrospectionServer, store_url: str, prefix: str, *, cache_ttl: float = 300,
           negative_ttl: float = 10) -> str:
    return (f'[store]\nurl = "{store_url}"\nprefix = "{prefix}"\ntimeout = 0.2\nsecret = "{STORE_SECRET}"\n'
            f'[[tokens.issuers]]\nissuer = "{AS_ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
            f'introspection_endpoint = "{server.url}"\nintrospection_client_id = "{CLIENT_ID}"\n'
            f'introspection_client_secret = "{SECRET}"\nintrospection_cache_ttl = {cache_ttl}\n'
            f'introspection_negative_ttl = {negative_ttl}\nintrospection_timeout = 2\n')


@pytest.fixture
def replicas(write_setup, auth_server, prefix) -> Iterator[Any]:
    made: list[Pdp] = []

    def make(count: int = 2, **kw: Any) -> list[Pdp]:
        path = write_setup(extra=_extra(auth_server, REDIS_URL, prefix, **kw))
        for _ in range(count):
            made.append(build_pdp(load_config(path), probe=False))
        return made[-count:]

    yield make
    for pdp in made:
        pdp.close()


def _decide(pdp: Pdp, pki: Any, token: str) -> Any:
    return pdp.decide(check_request(chain=pki.chain(), token=token))


def _key(server: IntrospectionServer, token: str) -> str:
    """The store key (without the prefix) under which the replicas share the answer for ``token``."""
    return SHARED.key(AS_ISSUER, server.url, CLIENT_ID, token_digest(token))


def _stored(prefix: str, server: IntrospectionServer, token: str) -> tuple[bytes | None, int]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        key = prefix + _key(server, token)
        return client.get(key), int(client.pttl(key))
    finally:
        client.close()


def test_an_answer_one_replica_got_serves_another_without_a_second_call(replicas, auth_server, pki, prefix):
    first, second = replicas()
    auth_server.active("opaque-token-1", pki.client.thumbprint)
    assert _decide(first, pki, "opaque-token-1").allowed
    assert _decide(second, pki, "opaque-token-1").allowed
    assert auth_server.calls == 1
    value, ttl = _stored(prefix, auth_server, "opaque-token-1")
    assert value is not None and b"opaque-token-1" not in value  # the token never goes into the store
    assert 0 < ttl <= 300_000


def test_a_shared_answer_lives_no_longer_than_its_exp_nor_the_cache_time(replicas, auth_server, pki, prefix):
    (pdp,) = replicas(1, cache_ttl=60)
    auth_server.active("short-lived", pki.client.thumbprint, lifetime=5)
    auth_server.active("long-lived", pki.client.thumbprint, lifetime=3600)
    assert _decide(pdp, pki, "short-lived").allowed and _decide(pdp, pki, "long-lived").allowed
    assert 0 < _stored(prefix, auth_server, "short-lived")[1] <= 5_000
    assert 5_000 < _stored(prefix, auth_server, "long-lived")[1] <= 60_000


def test_an_inactive_answer_is_shared_only_briefly(replicas, auth_server, pki, prefix):
    first, second = replicas(negative_ttl=3)
    assert _decide(first, pki, "unknown-token").reason == "token_inactive"
    assert _decide(second, pki, "unknown-token").reason == "token_inactive"
    assert auth_server.calls == 1
    assert 0 < _stored(prefix, auth_server, "unknown-token")[1] <= 3_000


def _put(prefix: str, server: IntrospectionServer, token: str, value: bytes | dict[str, Any]) -> None:
    """Store ``value`` where the replicas look for ``token``'s answer: bytes as they are, a document sealed
    with the replicas' secret (as a replica would write it)."""
    key = _key(server, token)
    client = redis.Redis.from_url(REDIS_URL)
    client.set(prefix + key, value if isinstance(value, bytes) else SHARED.seal(key, value), px=60_000)
    client.close()


#: Stands for "30 s from now" in the documents below.
NOW = "NOW"
_ACTIVE = {"active": True, "aud": AUDIENCE, "exp": NOW, "scope": "admin"}


@pytest.mark.parametrize("stored", [
    # Not sealed with the replicas' secret: not even read.
    b"not json", b"[]", b"{}", b'{"v": 1}',
    json.dumps({"v": SHARED_VERSION, "iss": AS_ISSUER, "until": NOW, "answer": _ACTIVE}).encode(),
    json.dumps({"v": SHARED_VERSION, "iss": AS_ISSUER, "until": NOW, "answer": _ACTIVE, "mac": "AAAA"}).encode(),
    # Sealed, with a shape pdp does not write.
    {"v": 1}, {"v": 99, "iss": AS_ISSUER, "until": "soon", "answer": None},
    {"v": SHARED_VERSION, "iss": "https://other.test", "until": 0, "answer": None},
    {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": 1e12, "answer": None},  # too far
    {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": 1.0, "answer": None},  # past
    {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": NOW, "answer": ["active"]},
], ids=["not-json", "array", "empty", "no-until", "no-mac", "wrong-mac", "sealed-no-until", "other-version",
        "other-issuer", "too-far", "past", "list"])
def test_a_stored_document_pdp_did_not_write_is_ignored_and_the_server_asked(replicas, auth_server, pki, prefix,
                                                                              stored):
    (pdp,) = replicas(1)
    auth_server.active("tok", pki.client.thumbprint)
    soon = time.time() + 30
    if isinstance(stored, bytes):
        stored = stored.replace(b'"NOW"', str(soon).encode())
    else:
        stored = json.loads(json.dumps(stored).replace('"NOW"', str(soon)))
    _put(prefix, auth_server, "tok", stored)
    decision = _decide(pdp, pki, "tok")
    assert decision.allowed and "admin" not in decision.token.scopes
    assert auth_server.calls == 1


def test_an_authentic_document_moved_to_another_tokens_key_is_ignored(replicas, auth_server, pki, prefix):
    """A store writer copies the (sealed) answer for a token it holds to where another token's answer would
    be: the MAC covers the key, so the copy is no answer for the other token."""
    first, second = replicas(2)
    auth_server.active("mine", pki.client.thumbprint)
    assert _decide(first, pki, "mine").allowed and auth_server.calls == 1
    sealed, _ = _stored(prefix, auth_server, "mine")
    assert sealed is not None
    _put(prefix, auth_server, "not-issued", sealed)
    decision = _decide(second, pki, "not-issued")
    assert (decision.allowed, decision.reason) == (False, "token_inactive")
    assert auth_server.calls == 2


def test_a_stored_answer_is_checked_again_as_a_fresh_one(replicas, auth_server, pki, prefix):
    (pdp,) = replicas(1)
    now = time.time()
    for token, answer, reason in [
        ("other-aud", {"active": True, "aud": "https://elsewhere.test", "exp": now + 60}, "token_audience_invalid"),
        ("expired", {"active": True, "aud": AUDIENCE, "exp": now - 3600}, "token_expired"),
        ("no-exp", {"active": True, "aud": AUDIENCE}, "token_claims_invalid"),
        ("other-iss", {"active": True, "aud": AUDIENCE, "exp": now + 60, "iss": "https://x.test"},
         "token_issuer_unknown"),
    ]:
        _put(prefix, auth_server, token, {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": now + 30,
                                          "answer": answer})
        decision = _decide(pdp, pki, token)
        assert (decision.allowed, decision.reason) == (False, reason), token
    assert auth_server.calls == 0


def test_the_in_process_cache_answers_first(replicas, auth_server, pki, prefix):
    (pdp,) = replicas(1)
    auth_server.active("tok", pki.client.thumbprint)
    assert _decide(pdp, pki, "tok").allowed
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(prefix + _key(auth_server, "tok"))
    client.close()
    assert _decide(pdp, pki, "tok").allowed
    assert auth_server.calls == 1 and _stored(prefix, auth_server, "tok")[0] is None


def _doc(pki: Any, token: str) -> dict[str, Any]:
    return {"method": "GET", "path": "/orders", "host": "api.test", "client_cert": pki.chain_pem(),
            "headers": {"authorization": f"Bearer {token}"}}


def _fallbacks(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pdp_introspection_store_fallbacks_total "):
            return float(line.split()[1])
    raise AssertionError("no pdp_introspection_store_fallbacks_total")


def test_a_store_that_does_not_answer_costs_a_call_to_the_server_and_is_counted(write_setup, auth_server, pki,
                                                                                tmp_path):
    with RedisProcess(tmp_path) as rp:
        config = load_config(write_setup(extra=_extra(auth_server, rp.url, "pdp-x:")))
        auth_server.active("tok", pki.client.thumbprint)
        with serve_pdp(config) as (url, _):
            rp.stop()  # lost once pdp is up (what it read at start stays in force)
            body = httpx.post(f"{url}/v1/check", json=_doc(pki, "tok")).json()
            assert body["allowed"] is True, body
            assert auth_server.calls == 1 and _fallbacks(url) == 1
            # Neither the store nor the server: denied, with the reason.
            auth_server.fail = True
            body = httpx.post(f"{url}/v1/check", json=_doc(pki, "another")).json()
            assert (body["allowed"], body["reason"]) == (False, "introspection_unavailable")
            assert f":{rp.port}" not in json.dumps(body)


def test_a_paused_store_delays_an_opaque_token_no_more_than_its_timeout(write_setup, auth_server, pki, tmp_path):
    with RedisProcess(tmp_path) as rp:
        config = load_config(write_setup(extra=_extra(auth_server, rp.url, "pdp-x:")))
        auth_server.active("before", pki.client.thumbprint)
        auth_server.active("during", pki.client.thumbprint)
        with serve_pdp(config) as (url, _):
            assert httpx.post(f"{url}/v1/check", json=_doc(pki, "before")).json()["allowed"] is True
            rp.pause()
            try:
                started = time.monotonic()
                body = httpx.post(f"{url}/v1/check", json=_doc(pki, "during"), timeout=10).json()
                took = time.monotonic() - started
            finally:
                rp.resume()
            assert body["allowed"] is True and took < SLOW, (body, took)
            assert _fallbacks(url) == 1
        # What was shared before the pause is still there after it.
        client = rp.client()
        assert client.get("pdp-x:" + _key(auth_server, "before")) is not None
        client.close()
