"""``store.secret``: the secret that authenticates the introspection answers replicas share through the store
(``pdp.credentials.shared_introspection``), how it is configured, and how ``pdp serve --workers N`` without
``store.url`` gives its workers one.

Real sealed documents; the config loader on real TOML; the real ``pdp serve --workers 2`` against a real
introspection endpoint on a loopback port.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import AUDIENCE
from servers import free_port, wait_for
from test_shared_introspection import AS_ISSUER, SECRET, IntrospectionServer

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.credentials.shared_introspection import SHARED_VERSION, SharedAnswers, decode_secret
from pdp.credentials.tokens import token_digest
from pdp.errors import ConfigError

PDP = str(Path(sys.executable).parent / "pdp")
RAW = bytes(range(32, 64))  # 32 bytes
DIGEST = token_digest("an-opaque-token")


# -- configuring it

@pytest.mark.parametrize("text", [
    RAW.hex(), RAW.hex().upper(), base64.b64encode(RAW).decode(), base64.b64encode(RAW).decode().rstrip("="),
    base64.urlsafe_b64encode(RAW).decode(), base64.urlsafe_b64encode(RAW).decode().rstrip("="),
])
def test_a_secret_is_given_in_hex_or_base64(text: str) -> None:
    assert decode_secret(text) == RAW


def test_the_config_reads_the_secret_and_never_shows_it(write_setup) -> None:
    config = load_config(write_setup(extra=f'[store]\nsecret = "{RAW.hex()}"\n'))
    assert config.store.secret == RAW
    for shown in (repr(config), repr(config.store), str(config.store), repr(SharedAnswers(RAW))):
        assert RAW.hex() not in shown.lower() and repr(RAW) not in shown


@pytest.mark.parametrize(("text", "why"), [
    ("00" * 31, "at least 32 bytes"),
    (base64.b64encode(bytes(31)).decode(), "at least 32 bytes"),
    ("", "non-empty"),
    ("a secret with spaces that is long enough", "neither hex nor base64"),
    ("xyz" * 20 + "x", "neither hex nor base64"),  # 61 base64 characters: no whole number of bytes
    ("0" * 63, "odd number of hex digits"),  # a digit lost, not base64 of 47 bytes
])
def test_a_short_or_unreadable_secret_is_a_start_up_error_naming_the_key(write_setup, text: str, why: str) -> None:
    path = write_setup(extra=f'[store]\nsecret = "{text}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "store.secret" and why in err.value.message
    if text:
        assert text not in str(err.value)


def test_building_a_replica_logs_nothing_of_the_secret(write_setup, caplog) -> None:
    server = IntrospectionServer()
    extra = (f'[store]\nurl = "redis://127.0.0.1:6379/0"\nprefix = "pdp-test-secret:"\nsecret = "{RAW.hex()}"\n'
             f'[[tokens.issuers]]\nissuer = "{AS_ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
             f'introspection_endpoint = "{server.url}"\nintrospection_client_id = "rs"\n'
             f'introspection_client_secret = "{SECRET}"\n')
    try:
        with caplog.at_level(logging.DEBUG):
            build_pdp(load_config(write_setup(extra=extra)), probe=False).close()
    finally:
        server.stop()
    assert RAW.hex() not in caplog.text.lower()


# -- what the secret does

def test_the_store_key_depends_on_every_part_of_who_asked_and_on_the_secret() -> None:
    shared = SharedAnswers(RAW)
    key = shared.key("https://as.test", "https://as.test/introspect", "rs", DIGEST)
    assert key.startswith("introspection:")
    others = {
        shared.key("https://other.test", "https://as.test/introspect", "rs", DIGEST),
        shared.key("https://as.test", "https://as.test/introspect-2", "rs", DIGEST),
        shared.key("https://as.test", "https://as.test/introspect", "rs-2", DIGEST),
        shared.key("https://as.test", "https://as.test/introspect", "rs", token_digest("another")),
        SharedAnswers(bytes(32)).key("https://as.test", "https://as.test/introspect", "rs", DIGEST),
        # The parts are not run together: moving a character from one to the next is another key.
        shared.key("https://as.tes", "thttps://as.test/introspect", "rs", DIGEST),
        shared.key("https://as.test", "https://as.test/introspectr", "s", DIGEST),
    }
    assert key not in others and len(others) == 7
    assert DIGEST.hex() not in key


def test_a_sealed_document_opens_only_under_its_key_with_the_secret_and_unaltered() -> None:
    shared = SharedAnswers(RAW)
    key = shared.key(AS_ISSUER, "https://as.test/introspect", "rs", DIGEST)
    other_key = shared.key(AS_ISSUER, "https://as.test/introspect", "rs", token_digest("x"))
    document = {"v": SHARED_VERSION, "iss": AS_ISSUER, "until": 1e9 + 0.25,
                "answer": {"active": True, "scope": "read", "exp": 1_000_000_060, "aud": ["a", "ü"]}}
    sealed = shared.seal(key, document)
    assert shared.open(key, sealed) == document
    assert shared.open(other_key, sealed) is None  # moved to another token's key
    assert SharedAnswers(bytes(32)).open(key, sealed) is None  # sealed under another secret
    altered = json.loads(sealed)
    altered["answer"]["scope"] = "read admin"
    assert shared.open(key, json.dumps(altered).encode()) is None
    unsealed = {k: v for k, v in json.loads(sealed).items() if k != "mac"}
    assert shared.open(key, json.dumps(unsealed).encode()) is None
    for junk in (b"", b"[]", b"not json", b'{"mac": 1}', b'{"mac": "\\u00e9"}'):
        assert shared.open(key, junk) is None


def test_a_secret_shorter_than_the_mac_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SharedAnswers(bytes(31))


# -- pdp serve --workers N without store.url: the parent draws a secret and hands it to its workers

def _serve_workers(config: Path, port: int, tmpdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.Popen([PDP, "serve", "--config", str(config), "--workers", "2", "--http", f"127.0.0.1:{port}",
                             "--grpc", "", "--log-level", "debug"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _decisions_by_worker(base: str) -> dict[str, float]:
    """Each live worker's share of the decisions (``pdp_worker_decisions{pid}``), whichever worker answers."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("pdp_worker_decisions{"):
            found[line.split('pid="', 1)[1].split('"', 1)[0]] = float(line.split()[-1])
    return found


@pytest.mark.integration
def test_the_workers_share_introspection_answers_with_a_secret_the_parent_drew(write_setup, pki, tmp_path):
    server = IntrospectionServer()
    extra = (f'[[tokens.issuers]]\nissuer = "{AS_ISSUER}"\naudiences = ["{AUDIENCE}"]\n'
             f'introspection_endpoint = "{server.url}"\nintrospection_client_id = "rs"\n'
             f'introspection_client_secret = "{SECRET}"\n')
    config = write_setup(engine="regorus", extra=extra)
    assert load_config(config).store.secret is None and not load_config(config).store.url
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    doc = {"method": "GET", "path": "/orders", "host": "api.test", "client_cert": pki.chain_pem()}
    proc = _serve_workers(config, port, tmp_path)
    try:
        wait_for(f"{base}/healthz", timeout=60)
        # A token per round, asked one request after another (each on a new connection, which the kernel
        # spreads over the workers), until both workers answered within one round: the authorization
        # server is asked once per token, by the first worker; the other reads the answer from the store.
        for round_ in range(10):
            token = f"opaque-{round_}"
            server.active(token, pki.client.thumbprint)
            calls, shares = server.calls, _decisions_by_worker(base)
            for _ in range(8):
                body = httpx.post(f"{base}/v1/check", json={**doc, "headers": {"authorization": f"Bearer {token}"}},
                                  timeout=30).json()
                assert body["allowed"] is True, body
            assert server.calls == calls + 1, f"{server.calls - calls} calls for one token"
            after = _decisions_by_worker(base)
            if len([pid for pid, n in after.items() if n > shares.get(pid, 0)]) >= 2:
                break
        else:
            pytest.fail("one worker answered every request of each round: the test proves nothing")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        server.stop()
    assert b"Traceback" not in err, err.decode()
