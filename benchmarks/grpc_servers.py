"""Envoy ext_authz ``Check`` throughput: pdp's listener (``grpc.aio``) against grpcio's sync server.

    .venv/bin/python benchmarks/grpc_servers.py [--requests 4000] [--clients 8]

Both servers run the same servicer logic on the same ``Pdp`` (a dev setup from ``pdp dev init``,
regorus engine) in this process; clients run in a child process so that they do not share this
process's GIL. Prints requests per second for each. Bounded in count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from pdp.adapters.envoy_grpc import AUTHORIZATION_SERVICE, EnvoyAuthorization, read_message

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
    listener = GrpcListener(lambda: pdp, f"127.0.0.1:{port}", workers=8)
    listener.start()
    try:
        aio_rate = measure(port, message, args.requests, args.clients)
    finally:
        listener.stop()

    port = free_port()
    servicer = EnvoyAuthorization(lambda: pdp)  # Check: the whole decision in the server's thread
    sync = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    handlers = {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=read_message, response_serializer=lambda answer: answer)}
    sync.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers),))
    sync.add_insecure_port(f"127.0.0.1:{port}")
    sync.start()
    try:
        sync_rate = measure(port, message, args.requests, args.clients)
    finally:
        sync.stop(1).wait(5)

    print(f"grpc.aio server (pdp's):    {aio_rate:,.0f} Check/s")
    print(f"grpcio sync server:         {sync_rate:,.0f} Check/s")
    print(f"aio / sync:                 {aio_rate / sync_rate:.2f}x")


if __name__ == "__main__":
    main()
