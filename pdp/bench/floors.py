"""The floors pdp is measured against: bare servers and the raw operations under each step.

- a bare grpcio sync server answering every ``Check`` with one constant OK ``CheckResponse`` (Envoy's
  protos from ``xds-protos``), with pdp's thread count and options;
- a bare uvicorn + starlette app answering ``POST /v1/check`` with a constant JSON body and
  ``/ext_authz/...`` with constant headers, both as large as pdp's answers, with pdp's uvicorn options;
- a raw ``cryptography`` ES256 verification, a raw ``cryptography.x509.verification`` chain verification,
  and the policy engine's own evaluation (regorus ``Engine.eval_rule`` with the input set).

The servers run in their own processes: ``python -m pdp.bench.floors grpc|http ...``. Each stops on
SIGTERM, and by itself once the process that started it is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import PolicyBuilder, Store

#: The environment variable that hands the HTTP floor its answers (a JSON file) in each worker process.
HTTP_FLOOR_ENV = "PDP_BENCH_HTTP_FLOOR"


# -- raw operations
def es256_verify(public_key: ec.EllipticCurvePublicKey, token: str) -> Callable[[], None]:
    """One ES256 verification of ``token``'s signature, the signature already in DER."""
    from pdp.credentials.jose import b64url_decode

    head, payload, signature = token.split(".")
    raw = b64url_decode(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    signed = f"{head}.{payload}".encode()
    algorithm = ec.ECDSA(hashes.SHA256())

    def verify() -> None:
        public_key.verify(der, signed, algorithm)

    verify()
    return verify


def chain_verify(root: x509.Certificate, leaf_der: bytes) -> Callable[[], None]:
    """Parse the leaf's DER and verify it against ``root`` as a client certificate (a 2-level chain)."""
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()

    def verify() -> None:
        verifier.verify(x509.load_der_x509_certificate(leaf_der), [])

    verify()
    return verify


def engine_eval(modules: tuple[tuple[str, str], ...], data: dict[str, Any], entrypoint: str,
                input_doc: dict[str, Any]) -> Callable[[], object]:
    """regorus ``Engine.eval_rule`` of ``entrypoint`` with ``input_doc`` set once beforehand."""
    import regorus

    engine = regorus.Engine()
    for name, source in modules:
        engine.add_policy(name, source)
    engine.add_data(data)
    engine.set_input(input_doc)

    def evaluate() -> object:
        return engine.eval_rule(entrypoint)

    if evaluate() is None:
        raise RuntimeError(f"{entrypoint} is undefined for the benchmark's input")
    return evaluate


# -- bare servers
def _watch_parent(stop: Callable[[], None]) -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop()

    threading.Thread(target=watch, name="floor-parent-watch", daemon=True).start()


def serve_grpc(port: int, response: bytes, *, threads: int, reuse_port: bool) -> None:
    """A bare grpcio sync server: every ``Check`` gets ``response`` (a serialized ``CheckResponse``)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    from pdp.adapters.envoy_grpc import SERVER_OPTIONS

    answer = external_auth_pb2.CheckResponse.FromString(response)

    class Constant(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        def Check(self, request: Any, context: Any) -> Any:
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         options=[("grpc.so_reuseport", 1 if reuse_port else 0), *SERVER_OPTIONS])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Constant(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    _watch_parent(done.set)
    server.start()
    done.wait()
    server.stop(0.5).wait(2)


def http_app() -> Any:
    """The bare starlette app (a uvicorn factory); its answers come from the file named in ``HTTP_FLOOR_ENV``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    spec = json.loads(Path(os.environ[HTTP_FLOOR_ENV]).read_text())
    body = spec["check_body"].encode()
    headers = spec["ext_authz_headers"]

    async def check(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    async def ext_authz(request: Request) -> Response:
        return Response(b"", headers=headers)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/v1/check", check, methods=["POST"]),
                             Route("/ext_authz/{rest:path}", ext_authz, methods=methods)])


def serve_http(port: int, spec: Path, *, workers: int) -> None:
    """The bare app under uvicorn with pdp's options, in ``workers`` processes sharing one socket; on uvicorn's
    own h11 protocol, which writes a response's head and body apart (pdp's listener gathers them:
    ``pdp.service.coalescing``)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from pdp.config import Config
    from pdp.service.server import uvicorn_options

    os.environ[HTTP_FLOOR_ENV] = str(spec)
    options = {**uvicorn_options(Config.defaults()), "lifespan": "off", "log_level": "warning", "http": "h11"}
    config = uvicorn.Config("pdp.bench.floors:http_app", factory=True, host="127.0.0.1", port=port,
                            workers=workers, **options)
    if workers == 1:
        server = uvicorn.Server(config)
        _watch_parent(lambda: setattr(server, "should_exit", True))
        server.run()
        return
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as pdp serve --workers does
    _watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    Multiprocess(config, sockets=[sock]).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdp.bench.floors")
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--response", type=Path, required=True, help="a serialized CheckResponse")
    g.add_argument("--threads", type=int, default=8)
    g.add_argument("--reuse-port", action="store_true")
    h = sub.add_parser("http")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--spec", type=Path, required=True, help="JSON: check_body, ext_authz_headers")
    h.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        serve_grpc(args.port, args.response.read_bytes(), threads=args.threads, reuse_port=args.reuse_port)
    else:
        serve_http(args.port, args.spec, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
