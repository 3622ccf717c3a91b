"""Attacks on the state pdp shares between replicas and workers: introspection answers in the store, the
store's health and what ``/readyz`` shows, the remote key sets behind JWT verification, the decision
metrics, DPoP replay around a store outage, and whether the shipped Redis keeps what pdp puts in it.

Real replicas (``Pdp`` objects, or the real service on a loopback port), real introspection and JWKS
endpoints on loopback ports, the real Redis on 6379 under a test prefix, and a Redis of a test's own where
the test stops or pauses it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from conftest import AUDIENCE, REDIS_URL, check_request
from redis_process import RedisProcess
from servers import free_port, serve_pdp
from test_jwks_refresh import KeySetServer
from test_shared_introspection import AS_ISSUER, CLIENT_ID, SHARED, STORE_SECRET, IntrospectionServer, _decide, _extra
from test_store_outage import Caller
from test_store_outage import _config as _outage_config

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.credentials.jwks import KeySetError, discovered_jwks_url
from pdp.credentials.shared_introspection import SHARED_VERSION, SharedAnswers
from pdp.credentials.tokens import token_digest
from pdp.devpki import TokenIssuer
from pdp.pipeline import Pdp
from pdp.service.metrics import POLICY_REASONS
from pdp.service.server import Service
from pdp.store import RedisStore

pytestmark = pytest.mark.integration


@pytest.fixture
def auth_server() -> Iterator[IntrospectionServer]:
    server = IntrospectionServer()
    yield server
    server.stop()


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


def _write_shared(prefix: str, auth_server: IntrospectionServer, token: str, value: bytes) -> None:
    """What anyone who can write to the store can write, put where pdp looks for ``token``'s answer. (A
    writer without ``store.secret`` cannot compute that key for a token of its choosing: here it is given
    the key, the strongest writer there could be, to show that the document itself is not believed.)"""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.set(prefix + SHARED.key(AS_ISSUER, auth_server.url, CLIENT_ID, token_digest(token)), value,
                   px=60_000)
    finally:
        client.close()


# -- store poisoning

@pytest.mark.parametrize("sealed_with", [None, "another secret"])
def test_store_poisoning_a_forged_active_answer_does_not_mint_a_token(replicas, auth_server, pki, prefix,
                                                                      sealed_with):
    """The authorization server never issued this token (it answers ``active: false``). A document written
    straight into the store, under the key pdp reads for the token of the writer's choosing, with the
    claims of the writer's choosing, must not make pdp allow: the store's content is not the
    authorization server's word unless it can be told apart from a forgery (a MAC with a key the replicas
    share, and a keyed hash as the store key) — unsealed, or sealed with a secret other than the replicas'."""
    (pdp,) = replicas(1)
    now = time.time()
    forged = "made-up-token-the-as-never-issued"
    document = {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": now + 30, "answer": {
        "active": True, "aud": AUDIENCE, "exp": int(now + 60), "scope": "admin read write", "sub": "root",
        "client_id": "anyone", "cnf": {"x5t#S256": pki.client.thumbprint}}}
    key = SHARED.key(AS_ISSUER, auth_server.url, CLIENT_ID, token_digest(forged))
    value = json.dumps(document).encode() if sealed_with is None else \
        SharedAnswers(sealed_with.encode().ljust(32, b"!")).seal(key, document)
    _write_shared(prefix, auth_server, forged, value)
    decision = _decide(pdp, pki, forged)
    assert not decision.allowed, (decision.reason, "a forged store document was taken for the AS's answer")
    assert auth_server.calls == 1


def test_store_poisoning_without_a_store_secret_nothing_is_shared(write_setup, auth_server, pki, prefix):
    """``store.url`` without ``store.secret``: no replica can tell its peers' answers from a forgery, so none
    reads or writes shared answers at all (each asks the authorization server, and keeps its own)."""
    extra = _extra(auth_server, REDIS_URL, prefix).replace(f'secret = "{STORE_SECRET}"\n', "")
    assert "secret =" not in extra.split("[[tokens.issuers]]")[0]
    path = write_setup(extra=extra)
    first, second = (build_pdp(load_config(path), probe=False) for _ in range(2))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        auth_server.active("tok", pki.client.thumbprint)
        assert _decide(first, pki, "tok").allowed and _decide(second, pki, "tok").allowed
        assert auth_server.calls == 2
        assert _decide(first, pki, "tok").allowed and auth_server.calls == 2  # each keeps its own answer
        assert not [k for k in client.scan_iter(match=f"{prefix}introspection:*")]
    finally:
        client.close()
        first.close()
        second.close()


def test_store_poisoning_a_revoked_token_is_not_active_past_the_cache_time(replicas, auth_server, pki):
    """The authorization server revokes a token another replica's answer is shared for: no replica holds it
    active past ``introspection_cache_ttl`` after the answer was had, however the answer travels."""
    first, second = replicas(2, cache_ttl=2)
    auth_server.active("soon-revoked", pki.client.thumbprint)
    asked = time.monotonic()
    assert _decide(first, pki, "soon-revoked").allowed
    del auth_server.answers["soon-revoked"]  # revoked: active false from now on
    time.sleep(1.2)
    # Still within the cache time: the second replica may take the first one's answer (inherent).
    _decide(second, pki, "soon-revoked")
    time.sleep(max(0.0, 2.0 - (time.monotonic() - asked)) + 0.3)
    for pdp in (first, second):
        decision = _decide(pdp, pki, "soon-revoked")
        assert (decision.allowed, decision.reason) == (False, "token_inactive")


def test_key_sharing_a_deployment_with_a_longer_cache_time_cannot_stretch_a_shorter_one(
        write_setup, auth_server, pki, prefix):
    """Two deployments on one Redis prefix: the one with ``introspection_cache_ttl = 2`` does not keep an
    answer shared by the one with 300 s past its own 2 s; it asks the authorization server itself."""
    long_lived = build_pdp(load_config(write_setup(extra=_extra(auth_server, REDIS_URL, prefix))),
                           probe=False)
    short_lived = build_pdp(load_config(write_setup(extra=_extra(auth_server, REDIS_URL, prefix,
                                                                         cache_ttl=2))), probe=False)
    try:
        auth_server.active("tok", pki.client.thumbprint)
        assert _decide(long_lived, pki, "tok").allowed and auth_server.calls == 1
        assert _decide(short_lived, pki, "tok").allowed
        assert auth_server.calls == 2  # the 300 s answer was not taken: its 'until' is past 2 s + slack
    finally:
        long_lived.close()
        short_lived.close()


class TailoringServer:
    """An RFC 7662 endpoint that answers each protected resource (by its client_id, client_secret_basic)
    with the scopes that resource may learn of (RFC 7662 §2.2), and counts its calls by client."""

    def __init__(self, token: str, scopes: dict[str, str], thumbprint: str) -> None:
        self.calls: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                basic = base64.b64decode(self.headers.get("authorization", "Basic ")[6:]).decode()
                client = urllib.parse.unquote(basic.partition(":")[0])
                outer.calls[client] = outer.calls.get(client, 0) + 1
                answer: dict[str, Any] = {"active": False}
                if form.get("token") == [token] and client in scopes:
                    answer = {"active": True, "iss": AS_ISSUER, "aud": AUDIENCE, "scope": scopes[client],
                              "exp": int(time.time() + 300), "cnf": {"x5t#S256": thumbprint}}
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/introspect"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_key_sharing_one_resource_server_does_not_read_the_answer_tailored_to_another(write_setup, pki, prefix):
    """Two deployments (two protected resources, each with its own introspection client) share one Redis
    prefix. The authorization server tells each what it may know of a token (RFC 7662 §2.2: it "MAY limit
    which scopes from a given token are returned for each protected resource"): 'read' to one, 'read admin'
    to the other. The first must not act on the answer given to the second."""
    server = TailoringServer("shared-token", {"rs-narrow": "read", "rs-wide": "read admin"},
                             pki.client.thumbprint)

    def deployment(client_id: str) -> Pdp:
        extra = _opaque_issuer_endpoint(server.url, client_id, prefix)
        return build_pdp(load_config(write_setup(extra=extra)), probe=False)

    wide, narrow = deployment("rs-wide"), deployment("rs-narrow")
    try:
        assert "admin" in wide.tokens.verify("shared-token", time.time()).scopes
        scopes = narrow.tokens.verify("shared-token", time.time()).scopes
        assert "admin" not in scopes, f"rs-narrow acts on the scopes told to rs-wide: {scopes}, calls {server.calls}"
    finally:
        wide.close()
        narrow.close()
        server.stop()


def _opaque_issuer_endpoint(endpoint: str, client_id: str, prefix: str) -> str:
    # One organisation, one store secret: what keeps the answers apart is who asked.
    return (f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\ntimeout = 0.2\nsecret = "{STORE_SECRET}"\n'
            f'[[tokens.issuers]]\nissuer = "{AS_ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
            f'introspection_endpoint = "{endpoint}"\nintrospection_client_id = "{client_id}"\n'
            'introspection_client_secret = "rs-secret"\nintrospection_timeout = 2\n')


# -- /readyz: what it shows to whoever asks

def test_readyz_information_leak_names_no_jwks_address(write_setup):
    """/readyz answers without authentication on the decision listener. An issuer whose key set cannot be
    fetched is reported there; the JWKS URL's internal host, port and path (and the transport's error
    text) belong in the log, as the store's address does, not in what any caller is shown."""
    port = free_port()  # nothing listens there: connection refused
    extra = ('[[tokens.issuers]]\nissuer = "https://idp.example.org"\naudiences = ["https://api.test"]\n'
             f'algorithms = ["ES256"]\njwks_url = "http://127.0.0.1:{port}/internal/realm-7/keys"\n'
             'jwks_timeout = 0.5\njwks_refresh_interval = 60\njwks_min_refresh_interval = 1\n')
    with serve_pdp(load_config(write_setup(extra=extra))) as (url, _):
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(f"{url}/readyz", timeout=5)
            error = r.json()["issuers"]["https://idp.example.org"]["error"]
            if error is not None:
                break
            assert time.monotonic() < deadline, "the failed fetch never showed"
            time.sleep(0.1)
        for leak in (str(port), "/internal/realm-7/keys", "ConnectError", "Errno"):
            assert leak not in r.text, (leak, r.text)


class _CountingRedisStore(RedisStore):
    """The real Redis store, counting the reads a caller of /readyz can cause, by kind."""

    def __init__(self, url: str) -> None:
        super().__init__(url, prefix="pdp-advisory:", timeout=0.2)
        self.reads = {"get": 0, "map_size": 0}
        self._counting = threading.Lock()

    def _counted(self, kind: str) -> None:
        with self._counting:
            self.reads[kind] += 1

    def get(self, key: str) -> bytes | None:
        self._counted("get")
        return super().get(key)

    def map_size(self, name: str) -> int:
        self._counted("map_size")
        return super().map_size(name)


@contextmanager
def _serve_with_store(config: Any, store: RedisStore) -> Iterator[str]:
    service = Service(config, store=store)
    server = uvicorn.Server(service.uvicorn_config("127.0.0.1", free_port(), log_level="warning",
                                                  timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "pdp did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_readyz_flood_on_a_hung_store_makes_one_store_read_at_a_time(write_setup, tmp_path: Path):
    """A flood of /readyz (anyone can ask it) while Redis hangs: the store is asked once at a time, whoever
    asks how often, as the probe promises; no flood parks every worker thread on a store that does not
    answer, each for ``store.timeout``."""
    with RedisProcess(tmp_path) as rp:
        store = _CountingRedisStore(rp.url)
        config = load_config(write_setup(extra=f'[store]\nurl = "{rp.url}"\nprefix = "pdp-advisory:"\n'
                                               'timeout = 0.2\n'))
        with _serve_with_store(config, store) as url:
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # store and count read, Redis up
            counted = time.monotonic()
            rp.pause()
            # The flood runs across the moment the inventory count is due again (5 s after it was read).
            time.sleep(max(0.0, counted + 4.5 - time.monotonic()))
            before = dict(store.reads)
            stop = time.monotonic() + 1.5

            def flood() -> None:
                with httpx.Client(timeout=10) as client:
                    while time.monotonic() < stop:
                        assert client.get(f"{url}/readyz").status_code in (200, 503)  # 200: the last probe's

            threads = [threading.Thread(target=flood) for _ in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            reads = {kind: store.reads[kind] - before[kind] for kind in before}
            rp.resume()
        # The probe (GET, every 1 s at most) and the inventory count (HLEN, every 5 s at most), one at a time.
        assert reads["get"] <= 3, reads
        assert reads["map_size"] <= 2, f"{reads} store reads for a 1.5 s flood of /readyz on a hung store"


# -- JWKS refresh

class _Blackhole:
    """A TCP port that takes connections (the kernel's backlog) and never answers them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/jwks.json"

    def close(self) -> None:
        self.sock.close()


def test_jwks_refresh_an_unanswering_issuer_does_not_hold_back_another_issuers_removal(write_setup, pki):
    """Issuer A's JWKS endpoint takes connections and never answers (a black-holed host); issuer B removes
    a key. B's removal takes effect within B's ``jwks_refresh_interval`` (1 s) plus its fetch, not after A's
    timeout (3.5 s) on every pass of the one refresher thread."""
    hole, server = _Blackhole(), KeySetServer()
    try:
        old, new = (TokenIssuer(server.issuer, TokenIssuer.generate(kid="x").key, kid) for kid in ("old", "new"))
        server.publish(old, new)
        extra = (f'[[tokens.issuers]]\nissuer = "{server.issuer}"\naudiences = ["{AUDIENCE}"]\n'
                 f'algorithms = ["ES256"]\njwks_url = "{server.url}"\njwks_timeout = 2\n'
                 'jwks_refresh_interval = 1\njwks_min_refresh_interval = 0.5\n'
                 '[[tokens.issuers]]\nissuer = "https://unreachable.example.org"\naudiences = ["https://api.test"]\n'
                 f'algorithms = ["ES256"]\njwks_url = "{hole.url}"\njwks_timeout = 3.5\n'
                 'jwks_refresh_interval = 1\njwks_min_refresh_interval = 0.5\n')
        with serve_pdp(load_config(write_setup(extra=extra))) as (url, _):
            token = old.mint(audience=AUDIENCE, bound_to=pki.client)

            def allowed() -> bool:
                doc = {"method": "GET", "path": "/orders", "host": "api.test", "client_cert": pki.chain_pem(),
                       "headers": {"authorization": f"Bearer {token}"}}
                return bool(httpx.post(f"{url}/v1/check", json=doc, timeout=10).json()["allowed"])

            assert allowed()
            # Remove the key right after one of B's scheduled fetches: the refresher then turns to A.
            seen = server.fetches
            deadline = time.monotonic() + 15
            while server.fetches == seen:
                assert time.monotonic() < deadline, "B's key set was never fetched again"
                time.sleep(0.01)
            time.sleep(0.2)  # that fetch has its answer (the old set); the refresher has turned to A
            server.publish(new)
            removed = time.monotonic()
            try:
                while allowed():
                    assert time.monotonic() - removed < 12, "the removed key is still accepted"
                    time.sleep(0.05)
                took = time.monotonic() - removed
            finally:
                hole.close()  # the waiting fetch ends at once (reset): the service stops without waiting for it
            # B's interval (1 s, 0.8 s of it left) and its fetch, with a margin for a loaded machine; A's
            # timeout is 3.5 s.
            assert took < 0.8 + 1.4, f"B's removed key verified {took:.1f} s after its removal"
    finally:
        server.stop()
        hole.close()


@pytest.mark.parametrize("jwks_uri", ["http://idp.example.org/keys", "http://127.0.0.1:8080/keys"])
def test_jwks_refresh_discovery_of_an_https_issuer_does_not_downgrade_the_keys_to_http(jwks_uri: str):
    """RFC 8414 §2: ``jwks_uri`` MUST use https. An https issuer's metadata naming an http key set would have
    pdp fetch the keys that verify every token in clear text, where anyone on the path can swap them.
    (The metadata is handed over as the fetch's answer: the resolver does no I/O of its own.)"""
    issuer = "https://idp.example.org"
    metadata = json.dumps({"issuer": issuer, "jwks_uri": jwks_uri}).encode()
    resolve = discovered_jwks_url(issuer, lambda url: metadata)
    with pytest.raises(KeySetError, match="jwks_uri"):
        resolve()


# -- metrics: label cardinality

TENANT_REASON = ('package pdp.authz\nimport rego.v1\n'
                 'result := {"allowed": true, "reason": concat("_", ["tenant", '
                 'lower(input.attributes.request.http.headers["x-tenant"])])}\n')


def test_metrics_label_cardinality_a_reason_a_caller_chooses_adds_no_series(write_setup, tmp_path: Path, pki):
    """A policy names its allow after something the caller sends (a tenant header here). The reason may
    go to the log, but the ``reason`` label of ``pdp_decisions_total`` must stay within the codes pdp knows
    (as it does for a deny, where an unknown code counts as ``policy_denied``): otherwise each value a
    caller makes up is a series kept forever, in every worker's metrics file under ``--workers``."""
    (tmp_path / "tenant.rego").write_text(TENANT_REASON)
    service = Service(load_config(write_setup(engine="regorus", require_bound=False,
                                              policy_paths=[str(tmp_path / "tenant.rego")])))
    try:
        for i in range(200):
            decision = service.pdp.decide(check_request(chain=pki.chain(), headers={"x-tenant": f"t{i}"}))
            assert decision.allowed
        series = [line for line in service.metrics.render().decode().splitlines()
                  if line.startswith("pdp_decisions_total{")]
    finally:
        service.stop()
    # A policy's own first codes keep labels of their own (metrics.POLICY_REASONS); beyond, none is added.
    assert len(series) <= POLICY_REASONS + 1, f"{len(series)} series of pdp_decisions_total, one per tenant"


# -- DPoP replay around a store outage

def test_dpop_replay_a_proof_denied_during_an_outage_is_accepted_once_after_it(write_setup, pki, issuer,
                                                                                tmp_path: Path):
    """Redis stops: a proof is denied (``store_unavailable``), so it was never accepted and nothing recorded it.
    Redis comes back (empty: it keeps nothing on disk): pdp reconnects by itself, the proof is accepted once,
    and presented again it is a replay. (A proof accepted *before* a restart that loses the data can be
    replayed within its window: inherent to a store that keeps nothing, and why Redis must keep its data.)"""
    rp = RedisProcess(tmp_path).start()
    try:
        with serve_pdp(_outage_config(write_setup, rp.url)) as (url, _):
            caller = Caller(issuer, pki, url)
            assert caller.check()[0]["allowed"] is True
            rp.stop()
            held = caller.proof()
            body, _, text = caller.check(held)
            assert (body["allowed"], body["reason"]) == (False, "store_unavailable")
            assert str(rp.port) not in text
            rp.start()
            deadline = time.monotonic() + 15
            while (body := caller.check(held)[0])["reason"] == "store_unavailable":
                assert time.monotonic() < deadline, "pdp did not reconnect"
                time.sleep(0.1)
            assert body["allowed"] is True, body
            replay = caller.check(held)[0]
            assert (replay["allowed"], replay["reason"]) == (False, "dpop_proof_invalid")
    finally:
        rp.stop()


# -- the store's data outlives a Redis restart

ROOT = Path(__file__).resolve().parents[1]


def _redis_args() -> dict[str, list[str]]:
    import yaml

    found: dict[str, list[str]] = {}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text("utf-8"))
    found["compose.yaml"] = [str(a) for a in compose["services"]["redis"]["command"]]
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes/redis.yaml").read_text("utf-8")):
        if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["name"] == "redis":
                    found["deploy/kubernetes/redis.yaml"] = [str(a) for a in container["args"]]
    assert set(found) == {"compose.yaml", "deploy/kubernetes/redis.yaml"}, found
    return found


def test_store_persistence_the_shipped_redis_keeps_what_pdp_must_not_forget():
    """The revocation list lives in the store alone ("Run Redis with persistence: a Redis that restarts
    empty has forgotten the list", README), and so do the DPoP proofs already seen. The Redis that pdp
    ships (compose and the Kubernetes base) must therefore keep its data across a restart: with
    ``--save ""`` and ``--appendonly no`` a restarted Redis pod un-revokes every revoked certificate and
    token, and reopens every recent DPoP proof for replay."""
    for where, args in _redis_args().items():
        options = dict(zip(args[1::2], args[2::2], strict=False)) if args[:1] == ["redis-server"] else {}
        appendonly = options.get("--appendonly", "no") == "yes"
        snapshots = options.get("--save", "3600 1") != ""
        assert appendonly or snapshots, f"{where} runs Redis without persistence: {args}"
