"""The HTTP listener's coalescing transport under hostile and unusual clients, over loopback with raw
sockets: pipelined requests, ``Expect: 100-continue``, HTTP/1.0 and ``Connection: close``, the errors
uvicorn writes itself, smuggling attempts (refused exactly as uvicorn's own h11 protocol refuses them),
clients that leave or never read, keep-alive timeouts, graceful shutdown, TLS, and the transport methods
the wrapper hands through."""

from __future__ import annotations

import asyncio
import pickle
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from servers import free_port, serve_uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdp.config import load_config
from pdp.devpki import make_ca, make_client
from pdp.service.coalescing import CoalescingH11Protocol, CoalescingTransport
from pdp.service.listener_tls import TlsH11Protocol
from pdp.service.server import Service, uvicorn_options

pytestmark = pytest.mark.integration

_BODY = b'{"method": "GET", "path": "/public/x"}'
_CHECK = (b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-type: application/json\r\n"
          b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


@contextmanager
def _serve(app: Any, **options: Any) -> Iterator[tuple[int, uvicorn.Server]]:
    """uvicorn on a free loopback port in a thread, with ``options`` (``http=`` the protocol class)."""
    port = free_port()
    options.setdefault("log_level", "critical")
    options.setdefault("timeout_graceful_shutdown", 2)
    with serve_uvicorn(uvicorn.Config(app, host="127.0.0.1", port=port, **options)) as server:
        yield port, server


@contextmanager
def _serve_pdp(config_path: Path, http: type[Any] = CoalescingH11Protocol,
               **options: Any) -> Iterator[tuple[int, uvicorn.Server]]:
    """pdp's own listener settings, with ``http`` as the protocol class (uvicorn's own for comparison)."""
    config = load_config(config_path)
    settings = {**uvicorn_options(config), **options}
    if settings["http"] in (CoalescingH11Protocol, TlsH11Protocol):
        settings["http"] = http if config.server.tls is None or http is H11Protocol else TlsH11Protocol
    with _serve(Service(config).asgi_app(), **settings) as served:
        yield served


# --- raw HTTP/1.1 on a socket ---------------------------------------------------------------------------

def _connect(port: int, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="localhost") if context is not None else sock


def _until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or ``limit`` seconds pass)."""
    data = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _parse(data: bytes, heads: frozenset[int] = frozenset()) -> tuple[list[tuple[int, bytes, bytes]], bytes]:
    """The complete responses in ``data`` in order ((status, head, body); interim 1xx included), and what
    is left over. ``heads``: indexes of the answers to HEAD requests (no body)."""
    answers: list[tuple[int, bytes, bytes]] = []
    final = 0
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                  for line in head.split(b"\r\n")[1:]}
        if 100 <= status < 200 or final in heads:
            body = b""
        elif b"content-length" in fields:
            length = int(fields[b"content-length"])
            if len(rest) < length:
                break
            body, rest = rest[:length], rest[length:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            body, cursor = b"", 0
            while True:
                line_end = rest.find(b"\r\n", cursor)
                if line_end < 0:
                    return answers, data
                size = int(rest[cursor:line_end], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return answers, data
                body += rest[line_end + 2:line_end + 2 + size]
                cursor = line_end + 2 + size + 2
                if size == 0:
                    break
            rest = rest[cursor:]
        else:
            body, rest = rest, b""
        answers.append((status, head, body))
        if status >= 200:
            final += 1
        data = rest
    return answers, data


def _read_answers(sock: socket.socket, count: int, heads: frozenset[int] = frozenset(),
                  limit: float = 5.0) -> list[tuple[int, bytes, bytes]]:
    """Read until ``count`` final answers are complete."""
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        answers, _ = _parse(data, heads)
        if sum(1 for status, _, _ in answers if status >= 200) >= count:
            return answers
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"fewer than {count} whole answers: {data[:300]!r}")


def _same(data: bytes) -> bytes:
    """An answer with its date left out (two listeners answer at different seconds)."""
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", data)


# --- pdp's listener --------------------------------------------------------------------------------------

def test_pipelined_requests_in_one_packet_are_answered_whole_and_in_order(write_setup) -> None:
    requests = (b"GET /healthz HTTP/1.1\r\nhost: pdp\r\n\r\n" + _CHECK
                + b"HEAD /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n"
                + b"GET /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n"
                + b"GET /no/such/thing HTTP/1.1\r\nhost: pdp\r\n\r\n" + _CHECK
                + b"GET /healthz HTTP/1.1\r\nhost: pdp\r\nconnection: close\r\n\r\n")
    with _serve_pdp(write_setup()) as (port, _), _connect(port) as sock:
        sock.sendall(requests)
        answers, left = _parse(_until_closed(sock), heads=frozenset({2}))
    assert left == b""
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 404, 200, 200]
    assert answers[0][2] == answers[6][2] == b'{"status":"ok"}'
    assert all(answers[i][2].startswith(b'{"allowed":true,') for i in (1, 5))
    head_length = re.search(rb"(?i)content-length: (\d+)", answers[2][1])
    assert head_length and answers[2][2] == b"" and int(head_length.group(1)) > 1000
    assert answers[3][2].startswith(b"# HELP") and b"connection: close" in answers[6][1].lower()


def test_expect_100_continue_gets_the_interim_answer_before_the_body(write_setup) -> None:
    head = (b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(_BODY))
    with _serve_pdp(write_setup()) as (port, _), _connect(port, timeout=3) as sock:
        sock.sendall(head)
        interim = sock.recv(65536)  # a client waiting for it must not wait forever
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(_BODY)
        [(status, _, body)] = _read_answers(sock, 1)
    assert status == 200 and b'"allowed":true' in body.replace(b" ", b"")


def test_http_1_0_and_connection_close_get_every_byte_before_the_close(write_setup) -> None:
    with _serve_pdp(write_setup()) as (port, _):
        for request, head_only in ((b"GET /metrics HTTP/1.0\r\n\r\n", False),
                                   (b"HEAD /metrics HTTP/1.0\r\n\r\n", True),
                                   (_CHECK.replace(b"host: pdp\r\n", b"host: pdp\r\nconnection: close\r\n"), False),
                                   (b"GET /metrics HTTP/1.1\r\nhost: pdp\r\nconnection: close\r\n\r\n", False)):
            with _connect(port) as sock:
                sock.sendall(request)
                answers, left = _parse(_until_closed(sock), heads=frozenset({0}) if head_only else frozenset())
            assert left == b"" and len(answers) == 1 and answers[0][0] == 200, request
            assert head_only == (answers[0][2] == b"")


_SMUGGLED = b"GET /healthz HTTP/1.1\r\nhost: pdp\r\nconnection: close\r\n\r\n"
_REFUSALS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no host
    b"GET / HTTP/1.1\r\nhost: pdp\r\nbad header: x\r\n\r\n",
    b"GET /" + b"a" * 400_000 + b" HTTP/1.1\r\nhost: pdp\r\n\r\n",  # past h11's head buffer
    b"GET / HTTP/1.1\r\nhost: pdp\r\nx-big: " + b"b" * 400_000 + b"\r\n\r\n",
    # request smuggling: doubled or disguised framing
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-length: -1\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n\r\n",
    # both framings (h11 takes Transfer-Encoding): pdp refuses it and closes (RFC 9112 §6.3), on every path
    b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /ext_authz/x HTTP/1.1\r\nhost: pdp\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nhost: pdp\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
]
# Taken by h11 (a bare LF ends the head, an obsolete folded line continues a header): answered as uvicorn's
# own protocol answers them, one answer a request.
_TOLERATED = [
    b"GET / HTTP/1.1\r\nhost: pdp\r\n\n\r\n",
    b"GET / HTTP/1.1\r\nhost: pdp\r\n folded: x\r\n\r\n",
]


def _answers_of(port: int, request: bytes) -> bytes:
    with _connect(port) as sock:
        try:
            sock.sendall(request + _SMUGGLED)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return re.sub(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", b"ID",
                      _same(_until_closed(sock)))


def test_malformed_and_smuggling_requests_are_refused_exactly_as_uvicorn_refuses_them(write_setup) -> None:
    config = write_setup()
    with _serve_pdp(config) as (port, _), _serve_pdp(config, http=H11Protocol) as (plain, _):
        for request in _REFUSALS + _TOLERATED:
            seen = _answers_of(port, request)
            assert seen == _answers_of(plain, request), request[:80]
            if request in _REFUSALS:
                assert seen.startswith(b"HTTP/1.1 400 "), request[:80]
                assert seen.count(b"HTTP/1.1 ") == 1, request[:80]  # nothing smuggled behind it


def test_clients_leaving_mid_request_or_mid_response_leave_the_listener_serving(write_setup) -> None:
    with _serve_pdp(write_setup()) as (port, server):
        for _ in range(10):
            with _connect(port) as sock:  # half a body, then gone
                sock.sendall(_CHECK[:-10])
            with _connect(port) as sock:  # asks for a large answer, then resets
                sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n" * 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with _connect(port) as sock:
            sock.sendall(_CHECK)
            assert _read_answers(sock, 1)[0][0] == 200
        deadline = time.monotonic() + 5
        while server.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.server_state.connections


def test_a_client_that_never_reads_holds_the_listener_back(write_setup) -> None:
    with _serve_pdp(write_setup()) as (port, server):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        with sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n" * 2000)  # ~12 MB of answers asked
            time.sleep(1.0)
            [protocol] = list(server.server_state.connections)
            buffered = protocol.transport.get_write_buffer_size()
            assert protocol.flow.write_paused and buffered < 256 * 1024, buffered
            assert server.server_state.total_requests < 1000


def test_keep_alive_timeout_closes_only_after_the_whole_answer(write_setup) -> None:
    with _serve_pdp(write_setup(), timeout_keep_alive=0.3) as (port, _), _connect(port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n")
        started = time.monotonic()
        answers, left = _parse(_until_closed(sock))
        assert 0.2 < time.monotonic() - started < 3
    assert left == b"" and [status for status, _, _ in answers] == [200]


def _answered_after_half_close(port: int, tries: int = 20) -> int:
    """How many of ``tries`` decisions are answered to a client that shuts its sending side after asking."""
    answered = 0
    for _ in range(tries):
        with _connect(port) as sock:
            sock.sendall(_CHECK)
            sock.shutdown(socket.SHUT_WR)
            answered += _until_closed(sock, limit=3).startswith(b"HTTP/1.1 200 ")
    return answered


def test_uvicorn_answers_a_client_that_half_closes_after_asking(write_setup) -> None:
    with _serve_pdp(write_setup(), http=H11Protocol) as (port, _):
        assert _answered_after_half_close(port) == 20


def test_pdp_answers_a_client_that_half_closes_after_asking(write_setup) -> None:
    with _serve_pdp(write_setup()) as (port, _):
        assert _answered_after_half_close(port) == 20


def test_a_websocket_upgrade_is_answered_as_uvicorn_answers_it(write_setup) -> None:
    upgrade = (b"GET /ws HTTP/1.1\r\nhost: pdp\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
               b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    config = write_setup()
    seen = []
    with _serve_pdp(config) as (port, _), _serve_pdp(config, http=H11Protocol) as (plain, _):
        for where in (port, plain):
            with _connect(where) as sock:
                sock.sendall(upgrade)
                seen.append(_same(_until_closed(sock, limit=3)))
    assert seen[0] == seen[1] and seen[0].startswith(b"HTTP/1.1 403 ")


# --- TLS listener ----------------------------------------------------------------------------------------

@pytest.fixture
def tls_pdp(write_setup, tmp_path) -> Iterator[tuple[int, ssl.SSLContext, ssl.SSLContext]]:
    """pdp on mutual TLS: its port, a client context with a gateway certificate, and one without."""
    ca = make_ca("gateway CA")
    server = make_client(ca, spiffe_id=None, common_name="pdp", dns=("localhost",), ips=("127.0.0.1",),
                         client_auth=False)
    gateway = make_client(ca, spiffe_id="spiffe://example.org/gateway", common_name="envoy")
    for name, issued in (("server", server), ("gateway", gateway)):
        (tmp_path / f"{name}.pem").write_bytes(issued.pem)
        (tmp_path / f"{name}.key").write_bytes(issued.key_pem)
    (tmp_path / "gateway-ca.pem").write_bytes(ca.pem)
    path = write_setup()
    tls = ('\n[server.tls]\ncert = "server.pem"\nkey = "server.key"\nclient_ca = "gateway-ca.pem"\n'
           'allowed_callers = ["spiffe://example.org/gateway"]\n')
    path.write_text(path.read_text().replace("\n[policy]", tls + "\n[policy]", 1))
    trusted = ssl.create_default_context(cadata=ca.pem.decode())
    anonymous = ssl.create_default_context(cadata=ca.pem.decode())
    trusted.load_cert_chain(str(tmp_path / "gateway.pem"), str(tmp_path / "gateway.key"))
    assert uvicorn_options(load_config(path))["http"] is TlsH11Protocol
    with _serve_pdp(path) as (port, _):
        yield port, trusted, anonymous


def test_tls_pipelined_and_closing_answers_are_whole(tls_pdp) -> None:
    port, trusted, _ = tls_pdp
    with _connect(port, trusted) as sock:
        sock.sendall(_CHECK + b"HEAD /metrics HTTP/1.1\r\nhost: pdp\r\n\r\n" + _CHECK
                     + b"GET /metrics HTTP/1.1\r\nhost: pdp\r\nconnection: close\r\n\r\n")
        answers, left = _parse(_until_closed(sock), heads=frozenset({1}))
    assert left == b"" and [status for status, _, _ in answers] == [200, 200, 200, 200]
    assert all(answers[i][2].startswith(b'{"allowed":true,') for i in (0, 2))
    assert answers[3][2].startswith(b"# HELP")
    with _connect(port, trusted) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answers, left = _parse(_until_closed(sock))
    assert left == b"" and answers[0][0] == 200 and answers[0][2].startswith(b"# HELP")


def test_tls_handshake_failures_leave_the_listener_serving(tls_pdp) -> None:
    port, trusted, anonymous = tls_pdp
    for _ in range(3):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with _connect(port, anonymous) as sock:
                sock.sendall(_CHECK)
                if not sock.recv(65536):
                    raise ConnectionError("closed")
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:  # not TLS at all
            raw.sendall(_CHECK)
            assert b"HTTP/1.1" not in _until_closed(raw, limit=3)
    with _connect(port, trusted) as sock:
        sock.sendall(_CHECK)
        assert _read_answers(sock, 1)[0][0] == 200


# --- the wrapper with small ASGI apps --------------------------------------------------------------------

def _streaming_app(sent: list[int], chunks: int, yield_between: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            sent.append(1)
            if yield_between:
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})

    return app


def _streamed_to_a_reader_that_never_reads(http: type[Any], yield_between: bool) -> int:
    """How many 64 KiB chunks a streaming app gets through in half a second when nothing is read."""
    sent: list[int] = []
    with _serve(_streaming_app(sent, 256, yield_between), http=http, lifespan="off") as (port, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: pdp\r\n\r\n")
            time.sleep(0.5)
            return len(sent)


def test_flow_control_holds_back_a_streaming_sender_that_yields() -> None:
    # What the kernel's socket buffers take (a few MiB on loopback), then the sender waits; uvicorn's own
    # protocol holds back even a sender that never yields.
    assert _streamed_to_a_reader_that_never_reads(CoalescingH11Protocol, yield_between=True) < 128
    assert _streamed_to_a_reader_that_never_reads(H11Protocol, yield_between=False) < 128


def test_flow_control_holds_back_a_streaming_sender_that_does_not_yield() -> None:
    assert _streamed_to_a_reader_that_never_reads(CoalescingH11Protocol, yield_between=False) < 128


def test_graceful_shutdown_sends_the_whole_answer_in_flight_and_closes_idle_connections() -> None:
    body = b"y" * (1 << 20)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    with _serve(app, http=CoalescingH11Protocol, lifespan="off") as (port, server):
        idle = _connect(port)
        busy = _connect(port)
        with idle, busy:
            busy.sendall(b"GET / HTTP/1.1\r\nhost: pdp\r\n\r\n")
            time.sleep(0.05)
            server.should_exit = True
            answers, left = _parse(_until_closed(busy))
            assert _until_closed(idle, limit=3) == b""
    assert left == b"" and len(answers) == 1 and answers[0][2] == body


def test_the_protocol_classes_pickle_by_reference() -> None:
    for cls in (CoalescingH11Protocol, TlsH11Protocol):
        assert pickle.loads(pickle.dumps(cls)) is cls


def test_transport_methods_are_handed_through_to_the_real_transport() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        transport, first = await loop.create_connection(asyncio.Protocol, sock=left)
        peer, _ = await loop.create_connection(asyncio.Protocol, sock=right)
        wrapper = CoalescingTransport(transport)  # type: ignore[arg-type]
        assert wrapper.get_extra_info("socket") is transport.get_extra_info("socket")
        assert wrapper.get_protocol() is first
        second = asyncio.Protocol()
        wrapper.set_protocol(second)
        assert transport.get_protocol() is second
        wrapper.pause_reading()
        assert not wrapper.is_reading()
        wrapper.resume_reading()
        assert wrapper.is_reading()
        wrapper.write(b"x" * 10)
        assert wrapper.get_write_buffer_size() == 10 and not wrapper.is_closing()
        wrapper.close()
        assert wrapper.is_closing() and transport.is_closing()
        wrapper.write(b"after")  # dropped, no error
        await asyncio.sleep(0.01)
        peer.close()

    asyncio.run(run())


def test_two_worker_processes_answer_pipelined_and_closing_clients_whole(write_setup, tmp_path) -> None:
    from servers import free_port, wait_for
    from test_worker_sockets import _serve, _stop

    port = free_port()
    server = _serve(write_setup, tmp_path, port)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", timeout=20)
        pool = [_connect(port) for _ in range(8)]
        for sock in pool:
            sock.sendall(_CHECK * 3 + b"GET /metrics HTTP/1.0\r\n\r\n")
        for sock in pool:
            with sock:
                answers, left = _parse(_until_closed(sock))
            assert left == b"" and [status for status, _, _ in answers] == [200, 200, 200, 200]
            assert all(answers[i][2].startswith(b'{"allowed":true,') for i in range(3))
            assert answers[3][2].startswith(b"# HELP")
    finally:
        _stop(server)
