"""Real servers on loopback ports for the integration tests.

``serve_pdp`` runs the pdp service (uvicorn) in a thread; ``JwksServer`` is a
small real HTTP server standing in for an authorization server's metadata and
JWKS endpoints (RFC 8414 / RFC 7517).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import uvicorn

from pdp.config import Config
from pdp.service.server import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_uvicorn(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """Run ``config`` in a thread until the block ends; yield the started server."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the listener did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_pdp(config: Config) -> Iterator[tuple[str, Service]]:
    """Start the real service on a free loopback port; yield (base URL, service)."""
    service = Service(config)
    port = free_port()
    with serve_uvicorn(service.uvicorn_config("127.0.0.1", port, log_level="warning", timeout_graceful_shutdown=2)):
        yield f"{'https' if config.server.tls else 'http'}://127.0.0.1:{port}", service


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        time.sleep(0.1)


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up and went away (pdp past its timeout) is no error worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class JwksServer:
    """Serves ``/.well-known/oauth-authorization-server`` and ``/jwks.json``; counts JWKS fetches."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.fail:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/oauth-authorization-server":
                    body = json.dumps({"issuer": outer.issuer, "jwks_uri": f"{outer.issuer}/jwks.json"})
                elif self.path == "/jwks.json":
                    outer.fetches += 1
                    body = json.dumps(outer.jwks)
                else:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
