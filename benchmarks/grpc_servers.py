"""Envoy ext_authz ``Check`` throughput: grpcio's sync server (what pdp serves) against ``grpc.aio``.

    .venv/bin/python benchmarks/grpc_servers.py [--requests 4000] [--clients 8]

Both servers run the same servicer logic on the same ``Pdp`` (a dev setup from ``pdp dev init``,
regorus engine) in this process; clients run in a child process so that they do not share this
process's GIL. Prints requests per second for each. Bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import socket
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from pdp.adapters.envoy_grpc import EnvoyAuthorization

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devinit import dev_init
from pdp.service.grpc_listener import GrpcListener


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(dev: Path) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders", host="api.example.org")
    http.headers["authorization"] = "Bearer " + (dev / "token.jwt").read_text().strip()
    source = attribute_context_pb2.AttributeContext.Peer(
        certificate=urllib.parse.quote((dev / "client.pem").read_text(), safe=""))
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))


def _client(port: int, payload: bytes, count: int, clients: int, out: Any) -> None:
    message = external_auth_pb2.CheckRequest.FromString(payload)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        assert stub.Check(message).status.code == 0
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(lambda _: stub.Check(message).status.code, range(count)))
        out.put((count / (time.perf_counter() - start), codes.count(0)))


def measure(port: int, message: external_auth_pb2.CheckRequest, count: int, clients: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_client, args=(port, message.SerializeToString(), count, clients, queue))
    proc.start()
    rate, ok = queue.get(timeout=600)
    proc.join(timeout=30)
    assert ok == count, f"{ok} of {count} allowed"
    return float(rate)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    dev = Path(tempfile.mkdtemp(prefix="pdp-bench-")) / "dev"
    dev_init(dev)
    pdp = build_pdp(load_config(dev / "pdp.toml"))
    pdp.decision_log.enabled = False
    message = request(dev)

    port = free_port()
    sync = GrpcListener(lambda: pdp, f"127.0.0.1:{port}", workers=8)
    sync.start()
    try:
        sync_rate = measure(port, message, args.requests, args.clients)
    finally:
        sync.stop()

    port = free_port()
    servicer = EnvoyAuthorization(lambda: pdp)

    class AioAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(self, request, context):
            return servicer.Check(request, context)

    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AioAuthorization(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop.append(asyncio.Event())
        ready.set()
        await stop[0].wait()
        await server.stop(1)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(30)
    try:
        aio_rate = measure(port, message, args.requests, args.clients)
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=10)

    print(f"grpcio sync server (pdp's): {sync_rate:,.0f} Check/s")
    print(f"grpc.aio server:            {aio_rate:,.0f} Check/s")
    print(f"sync / aio:                 {sync_rate / aio_rate:.2f}x")


if __name__ == "__main__":
    main()
