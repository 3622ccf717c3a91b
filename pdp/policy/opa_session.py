"""An opa-python-client ``OpaClient`` whose every exchange is bounded in time and in the size of the answer.

``requests``, under ``OpaClient``, bounds each socket operation (``timeout=``), not an exchange: a server
that sends its answer a few bytes at a time holds a decision as long as it likes, and an answer is read
whole into memory before anyone can look at its size. Here the client's connections read their answers
through a file whose every ``recv`` waits at most until the exchange's deadline and which stops past
``max_bytes`` (status line and headers included): the exchange fails with ``TimeoutError`` or
``AnswerTooLarge`` inside, which ``requests`` reports as one of its ``RequestException``s, and
``Exchange`` says which it was.

Nothing else of ``requests`` changes what is sent: no retries of its own (each would spend the same
deadline), no redirects (the input document holds a request's verified claims: it goes to the configured server
only), no proxy, ``.netrc`` or CA bundle taken from the environment. Answers are asked for and read as
sent (``Accept-Encoding: identity``; ``send`` refuses any other ``Content-Encoding`` unread): what is
bounded is what is parsed, never a compressed answer that inflates past it.

An https server is reached through one ``ssl.SSLContext`` built at start-up (``tls_context``): its CAs,
and pdp's certificate and key for OPA's ``--authentication=tls``, are loaded once and presented on every
connection; ``requests`` adds nothing to it (no CA bundle, no certificate file read per connection).

One client holds one connection and is used by one exchange at a time (``requests.Session`` is not safe
to share). ``ClientPool`` lends them: at most ``size`` clients exist at once, lent or idle, so at most
``size`` connections are open to OPA; an exchange that finds them all lent waits for one within its
deadline (``NoFreeConnection`` past it). A client goes back after an exchange that ended well (its
connection stays open for the next one, HTTP/1.1 keep-alive); a client whose exchange failed (its
connection may hold the rest of an answer) is closed, and its place freed.

A kept connection may have been closed by the server meanwhile (OPA's Go server closes idle keep-alive
connections, a proxy on the way may too). Before a kept connection carries a request, ``urllib3`` looks
whether it became readable (``is_connection_dropped``: a poll with no wait; an idle connection has
nothing to say, so the server's FIN, RST or any stray byte means it is done) and opens a new one instead.
The close can still cross the request (it comes while the request is on its way, or the server reads the
request and hangs up): then, as Go's ``net/http`` does on a reused connection, the request is sent once
more, on a new connection of the same client (its place in the pool), within the same deadline, and only
when nothing of an answer was read and the failed connection was a kept one (``send``). A Data API query
changes nothing on OPA, so asking it twice is safe; a request that failed on a connection of its own, or
after any byte of an answer, is never sent again.

Name resolution is within the deadline too. ``getaddrinfo`` cannot be interrupted, so a name is looked
up on a thread of its own and the exchange waits for the answer at most until its deadline (then it
fails with ``TimeoutError``, and the thread is left to finish). The lookups are bounded: exchanges asking
for the same name while its lookup runs wait on that one lookup (a hung resolver holds one thread, however
many decisions come), at most ``RESOLVER_THREADS`` names are looked up at once, and a lookup past that
fails at once instead of starting another thread. Nothing is cached beyond the one lookup in flight
(the OS's resolver keeps what it keeps). An address in the URL is never looked up.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import requests
import requests.adapters
from opa_client import OpaClient
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

log = logging.getLogger("pdp.policy")

#: At most this many names are looked up at once (each on a thread of its own), in the whole process.
RESOLVER_THREADS = 4


class AnswerTooLarge(OSError):
    """The answer passed the exchange's ``max_bytes``."""


class EncodedAnswer(ValueError):
    """The answer came with a ``Content-Encoding`` other than identity (it was not asked for)."""


class NoFreeConnection(TimeoutError):
    """Every connection of the pool stayed lent until the exchange's deadline."""


@dataclass
class Exchange:
    """One exchange's limits, and what ended it (read by the caller once ``OpaClient`` returns or raises)."""

    deadline: float
    max_bytes: int
    read: int = 0
    timed_out: bool = False
    too_large: bool = False
    status: int | None = None
    opened: int = 0  # connections opened (or tried) for the exchange; none: it went on a kept one
    asked_again: bool = False  # the request was sent again after a kept connection failed


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


#: What ``getaddrinfo`` returns.
Addresses = Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]


class Resolver:
    """``getaddrinfo`` on threads of its own, waited for at most until a deadline (see the module's docstring)."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._lock = threading.Lock()
        self._running: dict[tuple[str, int, int], Future[Addresses]] = {}

    def running(self) -> int:
        """How many lookups run now (each on its own thread)."""
        return len(self._running)

    def resolve(self, host: str, port: int, family: int, deadline: float) -> Addresses:
        """The addresses of ``host`` (``socket.gaierror`` as ``getaddrinfo``'s, or when every thread is busy);
        ``TimeoutError`` when the lookup has not answered by ``deadline``."""
        key = (host, port, family)
        with self._lock:
            lookup = self._running.get(key)
            start = lookup is None
            if lookup is None:
                if len(self._running) >= self._threads:
                    raise socket.gaierror(socket.EAI_AGAIN, f"all {self._threads} name lookups are busy")
                lookup = self._running[key] = Future()
        if start:
            try:
                threading.Thread(target=self._look_up, args=(key, lookup), name="pdp-opa-resolver",
                                 daemon=True).start()  # daemon: a hung lookup never holds the process open
            except RuntimeError as exc:  # no thread can be started now
                with self._lock:
                    self._running.pop(key, None)
                raise socket.gaierror(socket.EAI_AGAIN, f"no name lookup can start: {exc}") from None
        try:
            return lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(f"looking up {host!r} took longer than the exchange's time") from None

    def _look_up(self, key: tuple[str, int, int], lookup: Future[Addresses]) -> None:
        host, port, family = key
        try:
            addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except BaseException as exc:
            with self._lock:
                self._running.pop(key, None)
            lookup.set_exception(exc)
        else:
            with self._lock:
                self._running.pop(key, None)
            lookup.set_result(addresses)


RESOLVER = Resolver(RESOLVER_THREADS)


def _open_socket(conn: HTTPConnection) -> socket.socket:
    """``urllib3``'s ``_new_conn`` with the name looked up by ``RESOLVER``, within the exchange's deadline."""
    exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
    timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
    deadline = exchange.deadline if exchange is not None else time.monotonic() + (timeout or 0.5)
    if exchange is not None:
        exchange.opened += 1  # from the name lookup on: whatever fails here failed on a new connection
    host, port = conn._dns_host.strip("[]"), conn.port or 0
    family = allowed_gai_family()
    try:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:  # a name: looked up on the resolver's thread
            addresses = RESOLVER.resolve(host, port, family, deadline)
        else:  # an address: getaddrinfo only parses it
            addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except TimeoutError as exc:
        if exchange is not None:
            exchange.timed_out = True
        raise ConnectTimeoutError(conn, f"looking up {conn.host} took longer than the exchange's time") from exc
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    error: OSError = OSError("getaddrinfo returns an empty list")
    for af, kind, proto, _, address in addresses:
        sock = socket.socket(af, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if exchange is not None:
                    exchange.timed_out = True
                raise ConnectTimeoutError(conn, f"connecting to {conn.host} took longer than the exchange's time")
            sock.settimeout(remaining if timeout is None else min(timeout, remaining))
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(address)
            sys.audit("http.client.connect", conn, conn.host, conn.port)
            return sock
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out") from exc
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")


class _Connection(HTTPConnection):
    response_class = _BoundedResponse

    def _new_conn(self) -> socket.socket:
        return _open_socket(self)


class _TlsConnection(HTTPSConnection):
    response_class = _BoundedResponse

    def _new_conn(self) -> socket.socket:
        return _open_socket(self)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """Connections that read through the bounded file; records each answer's status in the exchange."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self._tls = tls
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: Any,
                                             cert: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        if host["scheme"] == "https":  # the one context, verifying; nothing loaded per connection
            pool = {"ssl_context": self._tls, "cert_reqs": "CERT_REQUIRED"}
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would point every connection at its CA bundle (loaded into the context, beside the
        # configured CAs) and at certificate files: the context holds both already.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = conn.ca_cert_dir = conn.cert_file = conn.key_file = None

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().send(request, *args, **kwargs)
        exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
        if exchange is not None:
            exchange.status = response.status_code
        return response


def tls_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The context of every connection to an https OPA: server certificates verified against ``ca`` (else
    the CA bundle ``requests`` ships, certifi), host names checked, and ``cert`` with ``key`` presented to
    a server that asks. ``OSError`` or ``ssl.SSLError`` for a file that does not load (the caller names the
    key; an encrypted ``key`` must be refused before, or OpenSSL asks for its pass phrase on the terminal)."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else DEFAULT_CA_BUNDLE_PATH)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    return context


def new_client(url: str, *, timeout: float, token: str | None = None,
               tls: ssl.SSLContext | None = None) -> OpaClient:
    """An ``OpaClient`` for the OPA server at ``url`` (http or https, with or without a path prefix); an https
    one connects with ``tls`` (default: ``tls_context()``)."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    if https and tls is None:
        tls = tls_context()
    host = parts.hostname or ""
    client = OpaClient(host=f"[{host}]" if ":" in host else host, port=parts.port or (443 if https else 80),
                       ssl=https, token=token, retries=0, timeout=timeout)
    # OpaClient builds its URLs from host and port: a prefix (OPA behind a reverse proxy) is kept this way.
    client.root_url = f"{url.rstrip('/')}/v1"
    session: requests.Session = client._session
    session.headers["Accept-Encoding"] = "identity"
    session.trust_env = False
    session.max_redirects = 0
    adapter = _Adapter(tls)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return client


def send(client: OpaClient, method: str, url: str, document: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One exchange on ``client``'s connection: the answer's status and its body as it was sent (never
    inflated). Within ``bounded``, the body is at most the exchange's ``max_bytes``; an answer with a
    ``Content-Encoding`` other than identity is ``EncodedAnswer``, its body unread. A kept connection that
    fails before any byte of the answer is replaced by a new one and the request sent on it, once, within
    the deadline (see the module's docstring)."""
    exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
    try:
        return _send(client, method, url, document)
    except requests.ConnectionError as exc:
        if exchange is None or not _may_ask_again(exchange):
            raise
        log.debug("policy.opa: a kept connection to %s failed before any answer (%r): asking on a new one",
                  client.root_url, exc)
        exchange.asked_again = True
    # urllib3 closed the failed connection: the client's next request opens a new one.
    return _send(client, method, url, document)


def _may_ask_again(exchange: Exchange) -> bool:
    """Whether a request whose connection failed may be sent once more: it went on a kept connection (none
    was opened for it), nothing of an answer came (not a byte, no status), it was not sent again already,
    and the exchange has time left."""
    return (exchange.opened == 0 and exchange.read == 0 and exchange.status is None and not exchange.asked_again
            and not exchange.timed_out and not exchange.too_large and time.monotonic() < exchange.deadline)


def _send(client: OpaClient, method: str, url: str, document: dict[str, Any] | None) -> tuple[int, bytes]:
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
    """Clients lent one exchange at a time: at most ``size`` exist, lent or idle, whatever threads come and go."""

    def __init__(self, make: Callable[[], OpaClient], size: int) -> None:
        self._make = make
        self._size = size
        self._idle: list[OpaClient] = []
        self._made = 0  # clients that exist: lent or idle
        self._changed = threading.Condition(threading.Lock())
        self._closed = False

    def take(self, deadline: float) -> OpaClient:
        """An idle client, else a new one while fewer than ``size`` exist, else the first one given back
        before ``deadline`` (``NoFreeConnection`` after it)."""
        with self._changed:
            while not self._idle and self._made >= self._size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoFreeConnection(f"all {self._size} connections stayed in use")
                self._changed.wait(remaining)
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._make()
        except BaseException:
            self._forget()
            raise

    def give(self, client: OpaClient, *, reusable: bool) -> None:
        """Back into the pool after an exchange; closed instead (its place freed) when the exchange failed or
        the pool is closed."""
        with self._changed:
            if reusable and not self._closed:
                self._idle.append(client)
                self._changed.notify()
                return
        _close(client)
        self._forget()

    def _forget(self) -> None:
        with self._changed:
            self._made -= 1
            self._changed.notify()

    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close the idle clients; those lent out are closed when they come back."""
        with self._changed:
            self._closed = True
            closing, self._idle = self._idle, []
            self._made -= len(closing)
        for client in closing:
            _close(client)


def _close(client: OpaClient) -> None:
    try:
        client.close_connection()
    except Exception:  # a connection that will not close is not worth an error
        logging.getLogger("pdp.policy").debug("closing an OPA client failed", exc_info=True)
