"""The gRPC listener of ``pdp serve``: Envoy's ext_authz ``Authorization`` service and ``grpc.health.v1``.

grpcio's synchronous server, by measurement: it answered ``Check`` about 1.8x
faster than ``grpc.aio`` on the machines pdp is built on. Each worker thread
decides with its own compiled policy copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdp.adapters.envoy_grpc import EnvoyAuthorization
from pdp.pipeline import Pdp

log = logging.getLogger("pdp")

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


class GrpcListener:
    def __init__(self, pdp: Callable[[], Pdp], address: str, *, workers: int = 8) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdp-grpc"),
                                  options=[("grpc.so_reuseport", 0)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(EnvoyAuthorization(pdp), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address} for gRPC")
        self.address = address

    def start(self) -> None:
        self.server.start()
        for service in ("", AUTHORIZATION_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC ext_authz listening on %s", self.address.rsplit(":", 1)[0] + f":{self.port}")

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
