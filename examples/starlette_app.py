"""A small Starlette app protected by pdp's ASGI middleware, over mutual TLS.

    pdp dev init dev
    python examples/starlette_app.py --dev dev --port 8443
    curl --cacert dev/ca.pem --cert dev/client.pem --key dev/client.key \\
         -H "authorization: Bearer $(cat dev/token.jwt)" https://localhost:8443/orders

The middleware decides on every request in process (no network hop) with the
dev setup's config; the app reads what pdp verified from ``request.state.pdp``.
uvicorn runs with pdp's TLS protocol classes, which hand the client
certificate to the app as the ASGI TLS extension (HTTP and websockets).
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import uvicorn
from pdp.adapters.asgi import PdpMiddleware, PdpState
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pdp.service.listener_tls import ListenerTls, tls_protocols, uvicorn_ssl_options


async def orders(request: Request) -> JSONResponse:
    state: PdpState = request.state.pdp
    return JSONResponse({"orders": [], "caller": state.spiffe_id, "user": state.subject,
                         "decision_id": state.decision_id,
                         "authorization_seen_by_app": "authorization" in request.headers})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def feed(websocket: WebSocket) -> None:
    await websocket.accept()
    state: PdpState = websocket.state.pdp
    await websocket.send_json({"hello": state.spiffe_id})
    await websocket.close()


def create_app(config: Path) -> PdpMiddleware:
    app = Starlette(routes=[Route("/orders", orders, methods=["GET", "POST"]), Route("/healthz", health),
                            WebSocketRoute("/feed", feed)])
    return PdpMiddleware(app, config=config)


def uvicorn_config(dev: Path, host: str, port: int) -> uvicorn.Config:
    tls = ListenerTls(cert=dev / "pdp-server.pem", key=dev / "pdp-server.key", client_ca=dev / "ca.pem")
    options = uvicorn_ssl_options(tls)
    # The client certificate is optional at the TLS layer, so the policy can answer cert_required itself.
    options["ssl_cert_reqs"] = ssl.CERT_OPTIONAL
    # proxy_headers=False: the middleware trusts proxies by the transport peer, which X-Forwarded-For
    # must not rewrite (uvicorn's default would let a local caller claim a trusted proxy's address).
    return uvicorn.Config(create_app(dev / "pdp.toml"), host=host, port=port, log_level="warning",
                          proxy_headers=False, **options, **tls_protocols())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev", type=Path, default=Path("dev"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    args = parser.parse_args()
    uvicorn.Server(uvicorn_config(args.dev, args.host, args.port)).run()


if __name__ == "__main__":
    main()
