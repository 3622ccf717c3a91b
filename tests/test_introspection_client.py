"""The introspection client against raw loopback servers: an authorization server (or whatever answers in its
place) cannot inflate a compressed answer, send an endless one, trickle one to hold a thread past the
timeout, nor have the token and the client's secret sent through a proxy named in the environment."""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import time
from pathlib import Path

import pytest
from test_http_fetch import RawServer, answer

from pdp.credentials.introspection_client import IntrospectionClient, IntrospectionError

ACTIVE = json.dumps({"active": True, "sub": "alice", "exp": 4102444800}).encode()


def client(url: str, timeout: float = 2.0) -> IntrospectionClient:
    return IntrospectionClient(url, client_id="rs", auth_method="client_secret_basic", client_secret="s3cret",
                               timeout=timeout)


def assert_refused(url: str, why: str, timeout: float = 2.0) -> None:
    """Introspecting at ``url`` raises ``IntrospectionError`` matching ``why``."""
    introspect = client(url, timeout)
    try:
        with pytest.raises(IntrospectionError, match=why):
            introspect("opaque-token")
    finally:
        introspect.close()


def test_an_answer_is_read_with_the_clients_authentication() -> None:
    asked: list[bytes] = []

    def whole_request_then_answer(conn: socket.socket, request: bytes) -> None:
        head, _, body = request.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:  # the body may come in a segment of its own
            body += conn.recv(65536)
        asked.append(head + b"\r\n\r\n" + body)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(ACTIVE)).encode() + b"\r\n\r\n" + ACTIVE)

    with RawServer(whole_request_then_answer) as raw:
        introspect = client(raw.url)
        try:
            assert introspect("opaque-token")["sub"] == "alice"
        finally:
            introspect.close()
    head, _, body = asked[0].partition(b"\r\n\r\n")
    start, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert start.startswith("POST /doc ")
    assert headers["authorization"] == "Basic " + base64.b64encode(b"rs:s3cret").decode()
    assert headers["accept-encoding"] == "identity" and headers["accept"] == "application/json"
    assert body == b"token=opaque-token&token_type_hint=access_token"


def test_a_compressed_answer_is_refused_unread() -> None:
    """64 MiB of zeros compress to 64 KiB: counted as it arrives it passes, inflated it would not."""
    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", compresslevel=9)
    assert len(bomb) < 128 * 1024
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n" \
           f"content-length: {len(bomb)}\r\n\r\n".encode()
    with RawServer(answer(head, bomb)) as raw:
        assert_refused(raw.url, "content-encoding")


def test_an_endless_answer_is_refused_past_the_limit() -> None:
    def endless(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{")
        for _ in range(1024):
            conn.sendall(b" " * 4096)

    with RawServer(endless) as raw:
        assert_refused(raw.url, "larger than")


def test_a_trickled_answer_ends_at_the_timeout() -> None:
    """Each byte comes well within a read timeout; the whole answer never comes within the exchange's."""
    def trickle(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
        for _ in range(100):
            conn.sendall(b" ")
            time.sleep(0.1)

    with RawServer(trickle) as raw:
        started = time.monotonic()
        assert_refused(raw.url, "within", timeout=0.8)
    assert time.monotonic() - started < 3


def test_no_proxy_or_netrc_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy named in the environment would receive the token and the client's secret; a netrc entry
    would put its own credentials in their place."""
    with RawServer(answer(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")) as proxy, \
            RawServer(answer(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(ACTIVE)).encode() + b"\r\n\r\n", ACTIVE)) as server:
        proxy_url = proxy.url.removesuffix("/doc")
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        netrc = tmp_path / ".netrc"
        netrc.write_text("machine 127.0.0.1 login intruder password from-netrc\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        monkeypatch.setenv("HOME", str(tmp_path))
        introspect = IntrospectionClient(server.url, client_id="rs", auth_method="tls_client_auth", timeout=2.0)
        try:
            assert introspect("opaque-token")["active"] is True
        finally:
            introspect.close()
    assert proxy.requests == []
    assert b"authorization" not in server.requests[0].lower()
