"""The ASGI middleware, run as users run it: the example Starlette app under uvicorn with mutual TLS,
called by httpx and a websockets client with real client certificates."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
import websockets
from pdp.adapters.asgi import PdpMiddleware
from servers import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devinit import dev_init

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import starlette_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("asgi") / "dev"
    dev_init(target)
    return target


def _run(config: uvicorn.Config):
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def example(dev):
    port = free_port()
    server, thread = _run(starlette_app.uvicorn_config(dev, "127.0.0.1", port))
    yield f"https://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(timeout=10)


def tls_context(dev: Path, cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dev / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(dev / f"{cert}.pem"), str(dev / f"{cert}.key"))
    return ctx


def token(dev: Path) -> str:
    return (dev / "token.jwt").read_text().strip()


def test_an_allowed_request_reaches_the_app_with_the_verified_identity(example, dev):
    url, _ = example
    with httpx.Client(verify=tls_context(dev)) as client:
        r = client.get(f"{url}/orders", headers={"authorization": f"Bearer {token(dev)}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caller"] == "spiffe://example.org/demo/client" and body["user"] == "demo-user"
    assert body["decision_id"]
    assert body["authorization_seen_by_app"] is False  # the decision removed it before the app


def test_a_denied_request_is_answered_by_the_middleware(example, dev):
    url, _ = example
    with httpx.Client(verify=tls_context(dev, "other")) as client:
        r = client.get(f"{url}/orders", headers={"authorization": f"Bearer {token(dev)}"})
    assert r.status_code == 401
    assert r.json()["reason"] == "binding_mismatch"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_without_a_client_certificate_the_policy_says_cert_required(example, dev):
    url, _ = example
    with httpx.Client(verify=tls_context(dev, None)) as client:
        assert client.get(f"{url}/orders").json()["reason"] == "cert_required"
        assert client.get(f"{url}/healthz").status_code == 200  # a public path


def _ws(url: str, dev: Path, cert: str, with_token: bool) -> str:
    async def talk() -> str:
        headers = {"authorization": f"Bearer {token(dev)}"} if with_token else {}
        async with websockets.connect(url, ssl=tls_context(dev, cert), additional_headers=headers) as ws:
            return str(await ws.recv())

    return asyncio.run(talk())


def test_websockets_are_checked_at_the_handshake(example, dev):
    _, port = example
    url = f"wss://127.0.0.1:{port}/feed"
    assert json.loads(_ws(url, dev, "client", True)) == {"hello": "spiffe://example.org/demo/client"}
    with pytest.raises(websockets.exceptions.WebSocketException):
        _ws(url, dev, "other", True)


def test_lifespan_passes_through(dev):
    events: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    port = free_port()
    server, thread = _run(uvicorn.Config(PdpMiddleware(app, config=dev / "pdp.toml"), host="127.0.0.1", port=port,
                                         lifespan="on", log_level="warning"))
    server.should_exit = True
    thread.join(timeout=10)
    assert events == ["lifespan.startup", "lifespan.shutdown"]


def test_certificate_from_a_trusted_proxy_header_and_a_python_built_pdp(dev):
    """Behind a TLS-terminating proxy: the certificate arrives in XFCC; the Pdp is built in Python."""
    import hashlib
    import urllib.parse

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"caller": request.state.pdp.spiffe_id})

    behind_proxy = dev / "behind-proxy.toml"
    behind_proxy.write_text((dev / "pdp.toml").read_text()
                            + '\n[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "xfcc"\n')
    pdp = build_pdp(load_config(behind_proxy))
    app = PdpMiddleware(Starlette(routes=[Route("/orders", whoami)]), pdp=pdp)
    port = free_port()
    server, thread = _run(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    try:
        pem = (dev / "client.pem").read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        xfcc = f'Hash={hashlib.sha256(der).hexdigest()};Cert="{urllib.parse.quote(pem.decode(), safe="")}"'
        r = httpx.get(f"http://127.0.0.1:{port}/orders",
                      headers={"authorization": f"Bearer {token(dev)}", "x-forwarded-client-cert": xfcc})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"caller": "spiffe://example.org/demo/client"}


def test_middleware_needs_exactly_one_of_pdp_or_config(dev):
    with pytest.raises(ValueError, match="exactly one"):
        PdpMiddleware(lambda *a: None)  # type: ignore[arg-type]
