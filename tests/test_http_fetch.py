"""HttpFetch against raw loopback servers: the whole-exchange deadline, content codings, size, the environment."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import free_port

from pdp.credentials.http_fetch import FetchError, HttpFetch

Script = Callable[[socket.socket, bytes], None]


class RawServer:
    """A loopback TCP server: every connection's request is read (``requests`` keeps them) and then answered by
    ``script(conn, request)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/doc"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2.0)
            try:
                request = conn.recv(65536)
                self.requests.append(request)
                self.script(conn, request)
            except OSError:
                pass

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def answer(head: bytes, body: bytes = b"") -> Script:
    return lambda conn, request: conn.sendall(head + body)


@pytest.fixture
def fetch() -> Iterator[HttpFetch]:
    client = HttpFetch(2.0)
    yield client
    client.close()


def test_identity_is_asked_for_and_a_compressed_answer_refused(fetch: HttpFetch) -> None:
    """A small gzip answer would pass a size limit that counts what arrives; it is refused before it is read."""
    with RawServer(answer(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\n", b"\x1f\x8b\0\0"),
                   ) as raw:
        with pytest.raises(FetchError) as err:
            fetch.get(raw.url, accept="application/pkix-crl", timeout=2.0, max_bytes=1024)
    assert err.value.kind == "unsupported"
    assert b"\r\naccept-encoding: identity\r\n" in raw.requests[0].lower()


def test_an_identity_answer_is_returned_as_sent(fetch: HttpFetch) -> None:
    body = b"\x30\x03\x02\x01\x00"
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: identity\r\ncontent-length: %d\r\n\r\n" % len(body)
    with RawServer(answer(head, body)) as raw:
        assert fetch.post(raw.url, b"q", content_type="application/ocsp-request", accept="application/ocsp-response",
                          timeout=2.0, max_bytes=1024) == body


def test_a_declared_length_over_the_limit_is_refused_before_the_body_comes(fetch: HttpFetch) -> None:
    def stall(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n")
        raw.wait(10)

    with RawServer(stall) as raw:
        started = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetch.get(raw.url, accept="*/*", timeout=5.0, max_bytes=64 * 1024)
        assert time.monotonic() - started < 4.0  # not the 5 s timeout: nothing of the body was waited for
    assert err.value.kind == "too_large"


def test_a_server_that_never_answers_is_left_at_the_deadline(fetch: HttpFetch) -> None:
    with RawServer(lambda conn, request: raw.wait(10)) as raw:
        started = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetch.get(raw.url, accept="*/*", timeout=0.5, max_bytes=1024)
        assert time.monotonic() - started < 3.0
    assert err.value.kind == "timeout"


def test_proxies_and_credentials_from_the_environment_are_not_used(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """A proxy variable or a ~/.netrc entry on the host must not reroute, or add credentials to, the requests that
    decide revocation and key sets."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login pdp password secret\n")
    netrc.chmod(0o600)
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = HttpFetch(2.0)
    try:
        with RawServer(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}")) as raw:
            assert client(raw.url) == b"{}"
    finally:
        client.close()
    assert b"authorization" not in raw.requests[0].lower()
