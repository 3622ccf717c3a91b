"""Fetching over HTTP for the core: JWKS and discovery documents, CRLs, OCSP and introspection answers; bounded
in time and size.

- **Time**: ``timeout`` bounds the whole exchange — connecting, the request,
  the response's headers and its body — not only each step: a watchdog shuts
  the connection's socket down when the deadline passes, so a server that
  trickles its headers or body a byte at a time cannot hold the caller. (Name
  resolution before the connection is bounded by the system resolver, not by
  the watchdog.)
- **Size**: the body is read as it arrives on the wire and refused past
  ``max_bytes`` (a ``content-length`` over it is refused before reading).
  Requests say ``accept-encoding: identity`` and a response in any other
  content coding is refused, so a small compressed answer cannot inflate into a
  large one.
- **Where**: the URL asked, nowhere else: no redirects, and no proxy or
  credentials taken from the environment or ``~/.netrc`` (``trust_env`` off).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any

import httpx

MAX_DOCUMENT_BYTES = 1024 * 1024


class FetchError(RuntimeError):
    """A fetch failed; ``kind`` says how: "timeout", "connect", "status", "too_large", "unsupported" (a content
    coding other than identity) or "transport"."""

    def __init__(self, message: str, kind: str = "transport") -> None:
        super().__init__(message)
        self.kind = kind


class _Watchdog:
    """Ends one exchange at its deadline by shutting its sockets down: a read blocked on them returns at once."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.name = "pdp-fetch-deadline"
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        with self._lock:
            return self._expired

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpx's ``trace`` extension: learn each socket the exchange connects (TCP, then TLS over it)."""
        stream = info.get("return_value") if event.endswith(".complete") else None
        get_extra_info = getattr(stream, "get_extra_info", None)
        if get_extra_info is None:
            return
        sock = get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sockets.append(sock)
            if self._expired and not self._done:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            for sock in self._sockets:
                _shut(sock)

    def stop(self) -> bool:
        """Disarm; whether the deadline had passed."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            return self._expired


def _shut(sock: socket.socket) -> None:
    # ``socket.socket.shutdown`` on an ``SSLSocket`` too: shut the descriptor down without touching the TLS state
    # another thread is reading with.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class HttpFetch:
    """A ``fetch(url) -> bytes`` for key sources: one GET, a timeout, no redirects, at most 1 MiB; and
    ``get``/``post`` with their own accepted type, timeout and size limit (revocation answers)."""

    def __init__(self, timeout: float, *, verify: ssl.SSLContext | bool = True) -> None:
        self.timeout = timeout
        # No keep-alive: every exchange connects afresh, so the watchdog learns the socket it must be able to shut.
        # Fetches here are rare (key sets, revocation answers, introspection once per token) and go to many hosts.
        self._http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=False, trust_env=False,
                                  limits=httpx.Limits(max_keepalive_connections=0),
                                  headers={"accept": "application/json, application/jwk-set+json",
                                           "accept-encoding": "identity"})

    def __call__(self, url: str) -> bytes:
        return self._exchange("GET", url, None, {}, self.timeout, MAX_DOCUMENT_BYTES)

    def get(self, url: str, *, accept: str, timeout: float, max_bytes: int) -> bytes:
        return self._exchange("GET", url, None, {"accept": accept}, timeout, max_bytes)

    def post(self, url: str, body: bytes, *, content_type: str, accept: str, timeout: float,
             max_bytes: int, headers: Mapping[str, str] | None = None) -> bytes:
        """POST ``body``; ``headers`` (an ``authorization``, say) are sent besides the content type and accept."""
        return self._exchange("POST", url, body, {**(headers or {}), "content-type": content_type, "accept": accept},
                              timeout, max_bytes)

    def _exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float,
                  max_bytes: int) -> bytes:
        watchdog = _Watchdog(timeout)
        late = FetchError(f"{method} {url}: no complete answer within {timeout:g} s", "timeout")
        try:
            with self._http.stream(method, url, content=body, headers=headers, timeout=timeout,
                                   extensions={"trace": watchdog.trace}) as response:
                try:
                    data = _read(method, url, response, max_bytes)
                finally:
                    expired = watchdog.stop()  # before the connection is closed and its descriptor reused
                if expired:
                    raise late
                return data
        except httpx.TimeoutException as exc:
            raise FetchError(f"{method} {url}: {type(exc).__name__}: {exc}", "timeout") from exc
        except httpx.ConnectError as exc:
            if watchdog.stop():
                raise late from exc
            raise FetchError(f"{method} {url}: {type(exc).__name__}: {exc}", "connect") from exc
        except httpx.HTTPError as exc:  # a socket shut by the watchdog ends in a protocol or read error
            if watchdog.stop():
                raise late from exc
            raise FetchError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        finally:
            watchdog.stop()

    def close(self) -> None:
        self._http.close()


def _read(method: str, url: str, response: httpx.Response, max_bytes: int) -> bytes:
    """The body of ``response`` as sent (no decoding), at most ``max_bytes``."""
    if response.status_code != 200:
        raise FetchError(f"{method} {url}: HTTP {response.status_code}", "status")
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise FetchError(f"{method} {url}: content-encoding {coding!r} refused (identity was asked for)",
                         "unsupported")
    length = response.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError(f"{method} {url}: larger than {max_bytes} bytes ({int(length)})", "too_large")
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) > max_bytes:
            raise FetchError(f"{method} {url}: larger than {max_bytes} bytes", "too_large")
    return bytes(data)
