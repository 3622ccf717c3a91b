"""The server processes of a benchmark run: ``pdp serve`` and the bare floors, started, checked, stopped.

Every process listens on loopback only, writes its output to a file in the run's folder, is told to stop
(SIGTERM, then SIGKILL) when the run ends however it ends, and gets SIGTERM from the kernel should the
benchmark itself be killed first (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

T = TypeVar("T")

#: How long a server may take to answer its first request.
START_SECONDS = 90.0
STOP_SECONDS = 15.0


class ServerError(RuntimeError):
    """A server did not come up, or answered other than the benchmark expects."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Server:
    """One started server (it may be several processes: ``--workers``, or floors sharing a port)."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    log: Path
    http: int = 0
    grpc: int = 0
    files: list[IO[Any]] = field(default_factory=list)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


class Servers:
    """Starts servers into a folder and stops every one of them in ``stop_all`` (use it as a context)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _spawn(self, server: Server, commands: list[list[str]]) -> Server:
        self.started.append(server)
        err = server.log.open("ab")
        server.files.append(err)
        for command in commands:
            # Decision lines (pdp serve's standard output) are written, as served, and thrown away.
            server.procs.append(subprocess.Popen(  # noqa: S603 (our own interpreter and modules)
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=_die_with_parent))
        return server

    def pdp(self, config: Path, workers: int) -> Server:
        """``pdp serve`` on fresh loopback ports, with ``workers`` processes."""
        http, grpc = free_port(), free_port()
        name = f"pdp-w{workers}"
        command = [sys.executable, "-m", "pdp.cli", "serve", "--config", str(config), "--http",
                   f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc}", "--workers", str(workers)]
        return self._spawn(Server(name, [], self.folder / f"{name}.log", http=http, grpc=grpc), [command])

    def grpc_floor(self, response: Path, workers: int, threads: int) -> Server:
        """The bare grpcio server; ``workers`` processes share the port (SO_REUSEPORT), as pdp's do."""
        port = free_port()
        name = f"grpc-floor-w{workers}"
        command = [sys.executable, "-m", "pdp.bench.floors", "grpc", "--port", str(port), "--response",
                   str(response), "--threads", str(threads)]
        if workers > 1:
            command.append("--reuse-port")
        return self._spawn(Server(name, [], self.folder / f"{name}.log", grpc=port), [command] * workers)

    def http_floor(self, spec: Path, workers: int) -> Server:
        port = free_port()
        name = f"http-floor-w{workers}"
        command = [sys.executable, "-m", "pdp.bench.floors", "http", "--port", str(port), "--spec", str(spec),
                   "--workers", str(workers)]
        return self._spawn(Server(name, [], self.folder / f"{name}.log", http=port), [command])

    def stop_all(self) -> None:
        for server in reversed(self.started):
            for proc in server.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in server.procs:
                try:
                    proc.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_SECONDS)
            for f in server.files:
                f.close()
        self.started.clear()


def wait_until(server: Server, probe: Callable[[], T], what: str) -> T:
    """Call ``probe`` until it returns, for at most ``START_SECONDS``; the server must stay up meanwhile."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        if not server.alive():
            raise ServerError(f"{server.name} exited before {what}:\n{server.log_tail()}")
        try:
            return probe()
        except (httpx.HTTPError, OSError, ServerError, _GrpcUnavailable) as exc:
            if time.monotonic() > deadline:
                raise ServerError(f"{server.name}: no {what} in {START_SECONDS:.0f} s ({exc}):\n"
                                  f"{server.log_tail()}") from exc
            time.sleep(0.2)


class _GrpcUnavailable(Exception):
    pass


def grpc_check(port: int, message: bytes) -> bytes:
    """One ``Check`` over gRPC; the serialized ``CheckResponse``, which must be OK (an allow)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            answer = stub.Check(external_auth_pb2.CheckRequest.FromString(message), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _GrpcUnavailable(str(exc.code())) from exc
            raise ServerError(f"Check failed: {exc.code()} {exc.details()}") from exc
    if answer.status.code != 0:
        raise ServerError(f"Check answered status {answer.status.code}, not OK: {answer}")
    data: bytes = answer.SerializeToString()
    return data


def http_check(port: int, body: bytes) -> bytes:
    """One ``POST /v1/check``; the answer's body, which must say allowed."""
    r = httpx.post(f"http://127.0.0.1:{port}/v1/check", content=body,
                   headers={"content-type": "application/json"}, timeout=5)
    if r.status_code != 200 or r.json().get("allowed") is not True:
        raise ServerError(f"/v1/check answered {r.status_code}: {r.text[:300]}")
    return r.content


def ext_authz(port: int, path: str, headers: dict[str, str]) -> dict[str, str]:
    """One HTTP ext_authz sub-request; the headers of the answer, which must be an allow (200)."""
    r = httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=5)
    if r.status_code != 200:
        raise ServerError(f"{path} answered {r.status_code}: {r.text[:300]}")
    return {k: v for k, v in r.headers.items() if k.startswith("x-")}
