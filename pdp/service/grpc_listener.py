"""The gRPC listener of ``pdp serve``: Envoy's ext_authz ``Authorization`` service and ``grpc.health.v1``.

A ``grpc.aio`` server on an event loop of its own thread. Calls are decided on that thread, one at a
time; a decision that must wait on the network waits in a pool of ``server.grpc_workers`` threads. By
measurement (``pdp bench``'s request, h2load at 16 in flight, one process): on grpcio's synchronous
server with eight threads pdp cost 528-575 ms of CPU per 1000 calls, on ``grpc.aio`` 370-441 (with 2
threads, or without the limit on threads deciding at once, the synchronous server did no better): its
threads contended for the GIL with every decision.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdp.adapters.envoy_grpc import AUTHORIZATION_SERVICE, SERVER_OPTIONS, EnvoyAuthorization, add_to_server
from pdp.pipeline import Pdp
from pdp.service.listener_tls import ListenerTls, caller_refusal

log = logging.getLogger("pdp")


class ListenError(OSError):
    """A listener cannot have its address (in use, not on this host, no permission)."""

    def __init__(self, listener: str, address: str, why: str) -> None:
        super().__init__(f"cannot listen on {address} for {listener}: {why}")
        self.listener, self.address, self.why = listener, address, why

    @classmethod
    def of(cls, listener: str, address: str, failures: list[OSError]) -> ListenError:
        """The error for the bind attempts that failed: a taken port first, it is the usual one."""
        worst = next((f for f in failures if f.errno == errno.EADDRINUSE), failures[0] if failures else None)
        if worst is None:
            return cls(listener, address, "no address to bind")
        why = os.strerror(worst.errno) if worst.errno else str(worst)
        return cls(listener, address, why[:1].lower() + why[1:])


def check_bindable(listener: str, address: str) -> None:
    """Raise ``ListenError`` unless some address ``address`` names can be bound now, as a listener binds it
    (``SO_REUSEADDR``): grpcio would otherwise report a taken port as a ``RuntimeError`` and a core log line."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(listener, address, exc.strerror or str(exc)) from None
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                return
            except OSError as exc:
                failures.append(exc)
    raise ListenError.of(listener, address, failures)


class _GatedAuthorization(EnvoyAuthorization):
    """Admits only the allowed gateway identities whose certificates are not on pdp's revocation list
    (``caller_refusal``, as on the HTTP listener), before any decision is made."""

    def __init__(self, pdp: Callable[[], Pdp], allowed: tuple[str, ...], *, network: futures.Executor) -> None:
        super().__init__(pdp, network=network)
        self._allowed = allowed
        self._pdp_of = pdp

    async def check(self, request: Any, context: grpc.aio.ServicerContext[Any, bytes]) -> bytes:
        pems = context.auth_context().get("x509_pem_cert") or []
        der = None
        if pems:
            try:
                der = x509.load_pem_x509_certificate(pems[0]).public_bytes(serialization.Encoding.DER)
            except ValueError:
                der = None
        refusal = caller_refusal(self._allowed, der, self._pdp_of().revocations, time.time())
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal[1])
        return await super().check(request, context)


T = TypeVar("T")


class GrpcListener:
    """The listener, bound when made (``port``), serving from ``start`` until ``stop``."""

    def __init__(self, pdp: Callable[[], Pdp], address: str, *, workers: int = 8,
                 tls: ListenerTls | None = None, reuse_port: bool = False) -> None:
        # SO_REUSEPORT only where several pdp processes serve one port (pdp serve --workers N);
        # elsewhere a second listener on a taken port must fail, not silently share it.
        if not reuse_port:
            check_bindable("gRPC", address)
        self.address = address
        self._network = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdp-grpc")
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._loop = asyncio.new_event_loop()
        self._stopping = threading.Lock()  # one stop at a time: another waits for it, then finds it done
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdp-grpc-loop", daemon=True)
        self._thread.start()
        try:
            self.port = self._on_loop(self._bind(pdp, tls, reuse_port))
        except BaseException:
            self._close()
            raise

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _bind(self, pdp: Callable[[], Pdp], tls: ListenerTls | None, reuse_port: bool) -> int:
        # made on the loop: a grpc.aio server and the health servicer belong to the loop they are made on
        server = self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 1 if reuse_port else 0), *SERVER_OPTIONS])
        # Every caller with a certificate passes the gate (its revocation is checked even without a list).
        servicer = _GatedAuthorization(pdp, tls.allowed_callers, network=self._network) \
            if tls and (tls.allowed_callers or tls.client_ca) else EnvoyAuthorization(pdp, network=self._network)
        add_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port: int
            if tls is None:
                port = server.add_insecure_port(self.address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(tls.key.read_bytes(), tls.cert.read_bytes())],
                    root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
                    require_client_auth=tls.client_ca is not None)
                port = server.add_secure_port(self.address, credentials)
        except RuntimeError:  # grpcio's word for a port it could not bind (taken since the check above)
            port = 0
        if port == 0:
            await self._release()
            raise ListenError("gRPC", self.address, "the address cannot be bound")
        return port

    async def _start(self) -> None:
        assert self._server is not None and self._health is not None
        await self._server.start()
        for service in ("", AUTHORIZATION_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _stop(self, grace: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self._release()

    async def _release(self) -> None:
        """Let go of the server and what it left running, here on the loop: grpc.aio's objects are freed
        on the loop they belong to, while it still runs."""
        self._server = self._health = None
        others = {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
        if others:
            # grpc.aio's own tasks for the calls just ended finish by themselves (cancelled, some would print
            # a traceback): only what is still pending after a moment is cancelled.
            _, others = await asyncio.wait(others, timeout=1.0)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._loop.shutdown_asyncgens()

    def start(self) -> None:
        self._on_loop(self._start())
        log.info("gRPC ext_authz listening on %s", self.address.rsplit(":", 1)[0] + f":{self.port}")

    def stop(self, grace: float = 2.0) -> None:
        with self._stopping:
            if self._loop.is_closed():
                return
            try:
                self._on_loop(self._stop(grace))
            finally:
                self._close()

    def _close(self) -> None:
        # A decision still waiting on the network ends within its own timeout (key set, introspection,
        # revocation, store): wait for it, so that no thread outlives the listener and uses a closed Pdp.
        self._network.shutdown(wait=True, cancel_futures=True)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
