"""An opa-python-client ``OpaClient`` whose every exchange is bounded in time and in the size of the answer.

``requests``, under ``OpaClient``, bounds each socket operation (``timeout=``), not an exchange: a server
that sends its answer a few bytes at a time holds a decision as long as it likes, and an answer is read
whole into memory before anyone can look at its size. Here the client's connections read their answers
through a file whose every ``recv`` waits at most until the exchange's deadline and which stops past
``max_bytes`` (status line and headers included): the exchange fails with ``TimeoutError`` or
``AnswerTooLarge`` inside, which ``requests`` reports as one of its ``RequestException``s, and
``Exchange`` says which it was.

Nothing else of ``requests`` changes what is sent: no retries (each would spend the same deadline), no
redirects (the input document holds a request's verified claims: it goes to the configured server
only), no proxy, ``.netrc`` or CA bundle taken from the environment. Answers are asked for and read as
sent (``Accept-Encoding: identity``; ``send`` refuses any other ``Content-Encoding`` unread): what is
bounded is what is parsed, never a compressed answer that inflates past it.

One client holds one connection and is used by one exchange at a time (``requests.Session`` is not safe
to share). ``ClientPool`` lends them: a client goes back after an exchange that ended well (its
connection stays open for the next one, HTTP/1.1 keep-alive), at most ``keep`` are kept idle, and the
others, and every client whose exchange failed (its connection may hold the rest of an answer), are
closed. Name resolution is outside the deadline (``getaddrinfo`` cannot be interrupted): name OPA by an
address, or by a name resolved locally.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import requests
import requests.adapters
from opa_client import OpaClient
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class AnswerTooLarge(OSError):
    """The answer passed the exchange's ``max_bytes``."""


class EncodedAnswer(ValueError):
    """The answer came with a ``Content-Encoding`` other than identity (it was not asked for)."""


@dataclass
class Exchange:
    """One exchange's limits, and what ended it (read by the caller once ``OpaClient`` returns or raises)."""

    deadline: float
    max_bytes: int
    read: int = 0
    timed_out: bool = False
    too_large: bool = False
    status: int | None = None


_CURRENT = threading.local()


@contextlib.contextmanager
def bounded(timeout: float, max_bytes: int) -> Iterator[Exchange]:
    """Within the block, this thread's exchange ends ``timeout`` seconds from now, or past ``max_bytes``."""
    exchange = Exchange(time.monotonic() + timeout, max_bytes)
    _CURRENT.exchange = exchange
    try:
        yield exchange
    finally:
        _CURRENT.exchange = None


class _BoundedReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, exchange: Exchange) -> None:
        super().__init__()
        self._sock = sock
        self._exchange = exchange
        # As ``socket.makefile``: the reader holds a reference on the socket, so that ``http.client``
        # closing the socket (``Connection: close``, HTTP/1.0) closes its descriptor only once the answer's
        # reader is closed too, not while its body is still to be read.
        cast(Any, sock)._io_refs += 1

    def close(self) -> None:
        if not self.closed:
            super().close()
            cast(Any, self._sock)._decref_socketios()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        exchange = self._exchange
        remaining = exchange.deadline - time.monotonic()
        if remaining <= 0:
            exchange.timed_out = True
            raise TimeoutError("the exchange's time is up")
        self._sock.settimeout(remaining)  # urllib3 sets its own again before the next response
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            exchange.timed_out = True
            raise
        exchange.read += n
        if exchange.read > exchange.max_bytes:
            exchange.too_large = True
            raise AnswerTooLarge(f"an answer larger than {exchange.max_bytes} bytes")
        return n


class _Socket:
    """What ``http.client.HTTPResponse`` takes of a socket: ``makefile``, here a bounded one."""

    def __init__(self, sock: socket.socket, exchange: Exchange) -> None:
        self._sock = sock
        self._exchange = exchange

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_BoundedReader(self._sock, self._exchange))


class _BoundedResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
        if exchange is not None:
            sock = cast(socket.socket, _Socket(sock, exchange))
        super().__init__(sock, debuglevel, method, url)


class _Connection(HTTPConnection):
    response_class = _BoundedResponse


class _TlsConnection(HTTPSConnection):
    response_class = _BoundedResponse


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """Connections that read through the bounded file; records each answer's status in the exchange."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().send(request, *args, **kwargs)
        exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
        if exchange is not None:
            exchange.status = response.status_code
        return response


def new_client(url: str, *, timeout: float, token: str | None = None, ca: Path | None = None) -> OpaClient:
    """An ``OpaClient`` for the OPA server at ``url`` (http or https, with or without a path prefix)."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    client = OpaClient(host=f"[{host}]" if ":" in host else host, port=parts.port or (443 if https else 80),
                       ssl=https, token=token, retries=0, timeout=timeout)
    # OpaClient builds its URLs from host and port: a prefix (OPA behind a reverse proxy) is kept this way.
    client.root_url = f"{url.rstrip('/')}/v1"
    session: requests.Session = client._session
    session.headers["Accept-Encoding"] = "identity"
    session.trust_env = False
    session.max_redirects = 0
    if ca is not None:
        session.verify = str(ca)
    adapter = _Adapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return client


def send(client: OpaClient, method: str, url: str, document: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One exchange on ``client``'s connection: the answer's status and its body as it was sent (never
    inflated). Within ``bounded``, the body is at most the exchange's ``max_bytes``; an answer with a
    ``Content-Encoding`` other than identity is ``EncodedAnswer``, its body unread."""
    session: requests.Session = client._session
    response = session.request(method, url, json=document, timeout=client.timeout, stream=True)
    try:
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise EncodedAnswer("an answer with a content encoding that was not asked for")
        body: bytes = response.raw.read(decode_content=False)
    finally:
        response.close()  # an answer not read to its end closes the connection with it
    return response.status_code, body


class ClientPool:
    """Clients lent one exchange at a time: at most ``keep`` idle, whatever threads come and go."""

    def __init__(self, make: Callable[[], OpaClient], keep: int) -> None:
        self._make = make
        self._keep = keep
        self._idle: list[OpaClient] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> OpaClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make()

    def give(self, client: OpaClient, *, reusable: bool) -> None:
        """Back into the pool after an exchange; closed instead when it failed, the pool is full or closed."""
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self._keep:
                self._idle.append(client)
                return
        _close(client)

    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close the idle clients; those lent out are closed when they come back."""
        with self._lock:
            self._closed = True
            closing, self._idle = self._idle, []
        for client in closing:
            _close(client)


def _close(client: OpaClient) -> None:
    try:
        client.close_connection()
    except Exception:  # a connection that will not close is not worth an error
        logging.getLogger("pdp.policy").debug("closing an OPA client failed", exc_info=True)
