"""The gRPC listener under hostile or unlucky callers: what it answers, what it refuses, how it stops.

Every ``Check`` that reaches pdp gets a deny *answer*, never an RPC error that a ``failure_mode_allow: true``
gateway would let through; the caller gate refuses before any decision; a stop is clean and bounded. Real
grpcio clients (and ``nghttp`` for frames grpcio will not send) against real listeners on loopback.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import AUDIENCE, Pki, bound_token
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdp.adapters.envoy_grpc import AUTHORIZATION_SERVICE, MAX_CHECK_REQUEST_BYTES
from servers import free_port
from test_envoy_grpc import envoy_request
from test_grpc_network_wait import _HeldJwks
from test_listener_tls import GATEWAY_ID, _grpc_channel, gateway_pki, write  # noqa: F401  (fixture)
from test_service import _remote_config

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devpki import TokenIssuer
from pdp.pipeline import Pdp
from pdp.service.grpc_listener import GrpcListener, ListenError
from pdp.service.listener_tls import ListenerTls
from pdp.service.server import Service

pytestmark = pytest.mark.integration

CHECK = f"/{AUTHORIZATION_SERVICE}/Check"


def _raw(channel: grpc.Channel) -> Any:
    """``Check`` sending and receiving bytes as they are (no message classes in between)."""
    return channel.unary_unary(CHECK)


def _answer(data: bytes) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(data)


def _reason(response: external_auth_pb2.CheckResponse) -> str:
    return str(json.loads(response.denied_response.body)["reason"])


def _pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("pdp-grpc") and t.name != "pdp-grpc-loop"}


@pytest.fixture
def listen() -> Iterator[Callable[..., tuple[GrpcListener, grpc.Channel]]]:
    """Start a listener for a ``Pdp`` getter; stopped (and its channel closed) afterwards."""
    opened: list[tuple[GrpcListener, grpc.Channel]] = []

    def start(pdp: Callable[[], Pdp], **kw: Any) -> tuple[GrpcListener, grpc.Channel]:
        listener = GrpcListener(pdp, kw.pop("address", "127.0.0.1:0"), **kw)
        listener.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{listener.port}")
        opened.append((listener, channel))
        return listener, channel

    yield start
    for listener, channel in opened:
        channel.close()
        listener.stop(0)


@pytest.fixture
def local_pdp(write_setup: Any) -> Iterator[Pdp]:
    pdp = build_pdp(load_config(write_setup()), probe=False)
    yield pdp
    pdp.close()


# -- every Check that reaches pdp is answered, and a failure is a deny answer ------------------------------

@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",                      # not protobuf at all
    b"\x0a\x80\x80\x80\x80\x10",               # a length past the end
    b"\x0a\x05\x12\x03\x0a\x01",               # nested message cut short
    b"\x08" + b"\xff" * 11,                    # a varint too long
    b"\x0b",                                   # a group never ended
])
def test_a_message_that_is_not_a_check_request_is_a_deny_answer(listen, local_pdp, payload):
    _, channel = listen(lambda: local_pdp)
    response = _answer(_raw(channel)(payload, timeout=5))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert _reason(response) == "request_invalid"


def test_a_message_over_the_limit_is_denied_unread(listen, local_pdp):
    _, channel = listen(lambda: local_pdp)
    response = _answer(_raw(channel)(bytes(MAX_CHECK_REQUEST_BYTES + 1), timeout=20))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert _reason(response) == "request_too_large"


def test_a_compressed_request_is_decided_or_refused_but_never_passed_undecided(listen, local_pdp, pki, issuer):
    """A gateway sends no compressed message; one that comes is decided like any other, or refused as a
    compression the listener does not take (``UNIMPLEMENTED``)."""
    _, channel = listen(lambda: local_pdp)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    for request, expected in ((envoy_request(pki, bound_token(issuer, pki.client)), code_pb2.OK),
                              (envoy_request(None), code_pb2.PERMISSION_DENIED)):
        for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            try:
                assert stub.Check(request, timeout=5, compression=compression).status.code == expected
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED


def test_many_concurrent_calls_are_each_answered(listen, local_pdp):
    _, channel = listen(lambda: local_pdp)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    calls = [stub.Check.future(envoy_request(None), timeout=15) for _ in range(1000)]
    codes = {call.result().status.code for call in calls}
    assert codes == {code_pb2.PERMISSION_DENIED}


def _nghttp(port: int, body: bytes, headers: tuple[str, ...], tmp_path: Path, name: str = "frames",
            wait: int = 2) -> str:
    """Send one gRPC request of raw frames; the response headers and trailers nghttp saw."""
    data = tmp_path / name
    data.write_bytes(body)
    command = ["nghttp", "-v", "-t", str(wait), "-d", str(data), "-H", "content-type: application/grpc",
               "-H", "te: trailers", *(a for h in headers for a in ("-H", h)), f"http://127.0.0.1:{port}{CHECK}"]
    out = subprocess.run(command, capture_output=True, timeout=10, check=False).stdout.decode(errors="replace")
    return "\n".join(line for line in out.splitlines() if "grpc-status" in line or "grpc-message" in line)


def _frame(data: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(data)) + data


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp is not installed")
def test_broken_frames_leave_the_listener_answering(listen, local_pdp, tmp_path):
    """Frames no gateway sends (a compressed flag without an encoding, an unknown encoding, gzip that is
    not gzip, a message cut short, no message) are refused by gRPC itself; the listener goes on answering."""
    listener, channel = listen(lambda: local_pdp)
    request = envoy_request(None).SerializeToString()
    assert "grpc-status: 0" in _nghttp(listener.port, _frame(request), (), tmp_path)
    gzipped = _nghttp(listener.port, _frame(_gzip(request), compressed=True), ("grpc-encoding: gzip",), tmp_path)
    assert "grpc-status: 0" in gzipped or "grpc-status: 12" in gzipped, gzipped
    broken = [(_frame(request, compressed=True), ()),
              (_frame(b"not gzip", compressed=True), ("grpc-encoding: gzip",)),
              (_frame(b"xx", compressed=True), ("grpc-encoding: snappy",)),
              (struct.pack(">BI", 0, 1000) + request[:10], ()),
              (b"", ())]
    with concurrent.futures.ThreadPoolExecutor(len(broken)) as senders:
        seen = list(senders.map(lambda sent: _nghttp(listener.port, *sent[1], tmp_path, f"frames-{sent[0]}", 1),
                                enumerate(broken)))
    # refused by gRPC before pdp: an RPC error, which only a caller that is not a gateway ever sees
    assert all("grpc-status: 13" in answer or "grpc-status: 12" in answer for answer in seen[:3]), seen
    response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(envoy_request(None), timeout=5)
    assert response.status.code == code_pb2.PERMISSION_DENIED


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


# -- decisions that wait on the network --------------------------------------------------------------------

class _Held:
    """A key-set fetch held at the JWKS server: a token with a kid pdp has not seen waits on it."""

    def __init__(self, tmp_path: Path, pki: Pki) -> None:
        self.jwks = _HeldJwks()
        self.jwks.__enter__()
        known = TokenIssuer.generate(self.jwks.issuer, kid="old")
        self.unseen = TokenIssuer(self.jwks.issuer, TokenIssuer.generate(kid="x").key, "new")
        self.jwks.jwks = {"keys": [known.jwk, self.unseen.jwk]}
        self.service = Service(load_config(_remote_config(tmp_path, pki, self.jwks.issuer, "jwks_url")))
        self.pki = pki
        self.jwks.hold.set()

    def request(self) -> external_auth_pb2.CheckRequest:
        token = self.unseen.mint(audience=AUDIENCE, bound_to=self.pki.client)
        return envoy_request(self.pki, token, certificate=urllib.parse.quote(self.pki.chain_pem(), safe=""))

    def close(self) -> None:
        self.jwks.release.set()
        self.jwks.stop()
        self.service.pdp.close()


@pytest.fixture
def held(tmp_path: Path, pki: Pki) -> Iterator[_Held]:
    held = _Held(tmp_path, pki)
    yield held
    held.close()


def test_a_cancelled_call_frees_its_wait_and_the_listener_goes_on(listen, held):
    _, channel = listen(lambda: held.service.pdp, workers=1)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    waiting = stub.Check.future(held.request(), timeout=10)
    assert held.jwks.waiting.wait(5)
    waiting.cancel()
    assert stub.Check(envoy_request(None), timeout=5).status.code == code_pb2.PERMISSION_DENIED  # loop free
    held.jwks.release.set()
    assert stub.Check(held.request(), timeout=5).status.code == code_pb2.OK  # the one thread is free again


def test_a_decision_still_waiting_at_the_callers_deadline_is_a_deny_answer(listen, held):
    _, channel = listen(lambda: held.service.pdp, workers=1)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    try:
        response = stub.Check(held.request(), timeout=1.0)
    except grpc.RpcError as exc:
        pytest.fail(f"an RPC error ({exc.code()}) that failure_mode_allow lets through")
    assert response.status.code != code_pb2.OK
    assert json.loads(response.denied_response.body)["reason"] == "decision_timeout"


def test_stop_answers_a_waiting_call_within_its_grace(listen, held):
    listener, channel = listen(lambda: held.service.pdp, workers=1)
    waiting = external_auth_pb2_grpc.AuthorizationStub(channel).Check.future(held.request(), timeout=10)
    assert held.jwks.waiting.wait(5)
    threading.Timer(0.2, held.jwks.release.set).start()
    started = time.monotonic()
    listener.stop(3)
    assert time.monotonic() - started < 2.5
    assert waiting.result().status.code == code_pb2.OK


def test_stop_past_its_grace_ends_a_waiting_call_and_does_not_hang(listen, held):
    listener, channel = listen(lambda: held.service.pdp, workers=1)
    waiting = external_auth_pb2_grpc.AuthorizationStub(channel).Check.future(held.request(), timeout=10)
    assert held.jwks.waiting.wait(5)
    started = time.monotonic()
    listener.stop(0.2)
    assert time.monotonic() - started < 1.5
    with pytest.raises(grpc.RpcError):  # the server shutting down: the one RPC error allowed
        waiting.result()


def test_stop_leaves_no_pool_thread_behind(listen, held):
    before = _pool_threads()
    listener, channel = listen(lambda: held.service.pdp, workers=1)
    waiting = external_auth_pb2_grpc.AuthorizationStub(channel).Check.future(held.request(), timeout=10)
    assert held.jwks.waiting.wait(5)
    listener.stop(0.2)
    with pytest.raises(grpc.RpcError):
        waiting.result()
    assert _pool_threads() - before == set()


# -- stop ---------------------------------------------------------------------------------------------------

def test_stop_is_idempotent_and_may_come_before_start(local_pdp):
    unstarted = GrpcListener(lambda: local_pdp, "127.0.0.1:0")
    unstarted.stop()
    unstarted.stop()
    started = GrpcListener(lambda: local_pdp, "127.0.0.1:0")
    started.start()
    started.stop()
    started.stop(0)
    assert not [t for t in threading.enumerate() if t.name == "pdp-grpc-loop"]


def test_a_stop_while_another_is_under_way_returns_in_both(local_pdp):
    listener = GrpcListener(lambda: local_pdp, "127.0.0.1:0")
    listener.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{listener.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # an open stream: a stop waits its grace
    outcomes: dict[str, str] = {}

    def stop(name: str, grace: float) -> None:
        try:
            listener.stop(grace)
            outcomes[name] = "returned"
        except BaseException as exc:
            outcomes[name] = repr(exc)

    first = threading.Thread(target=stop, args=("first", 0.5), daemon=True)
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=stop, args=("second", 0), daemon=True)
    second.start()
    first.join(2)
    second.join(0.5)
    channel.close()
    assert outcomes == {"first": "returned", "second": "returned"}


_CLEAN_STOP = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc
    from pdp.assemble import build_pdp
    from pdp.config import load_config
    from pdp.service.grpc_listener import GrpcListener
    sys.path.insert(0, sys.argv[2])
    from test_envoy_grpc import envoy_request
    pdp = build_pdp(load_config(Path(sys.argv[1])), probe=False)
    for _ in range(int(sys.argv[3])):  # rounds: what goes wrong here goes wrong at some stops only
        listener = GrpcListener(lambda: pdp, "127.0.0.1:0", workers=2)
        listener.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{listener.port}")
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        stub.Check(envoy_request(None), timeout=5)
        calls = [stub.Check.future(envoy_request(None), timeout=10) for _ in range(300)]
        listener.stop(0)  # with calls in flight
        for call in calls:
            try:
                call.result()
            except grpc.RpcError:
                pass
        channel.close()
        listener.stop()
    pdp.close()
    print("threads:", sorted(t.name for t in threading.enumerate()))
""")


def _run_clean_stop(write_setup: Any, tmp_path: Path, rounds: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "clean_stop.py"
    script.write_text(_CLEAN_STOP)
    return subprocess.run([sys.executable, str(script), str(write_setup()), str(Path(__file__).parent), str(rounds)],
                          capture_output=True, text=True, timeout=30, check=False,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "GRPC_VERBOSITY": "ERROR"})


def test_a_stop_with_calls_in_flight_returns_and_leaves_no_thread(write_setup, tmp_path):
    done = _run_clean_stop(write_setup, tmp_path, 2)
    assert done.returncode == 0, done.stderr
    assert "threads: ['MainThread']" in done.stdout, done.stdout


def test_a_stop_with_calls_in_flight_is_quiet(write_setup, tmp_path):
    done = _run_clean_stop(write_setup, tmp_path, 10)
    for noise in ("Exception ignored", "Traceback", "Task was destroyed", "never awaited", "Warning"):
        assert noise not in done.stderr, done.stderr


_BOMB_SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pdp.assemble import build_pdp
    from pdp.config import load_config
    from pdp.service.grpc_listener import GrpcListener
    pdp = build_pdp(load_config(Path(sys.argv[1])), probe=False)
    listener = GrpcListener(lambda: pdp, "127.0.0.1:0", workers=2)
    listener.start()

    def peak() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    print(listener.port, peak(), flush=True)
    sys.stdin.readline()
    print(peak(), flush=True)
    listener.stop(0)
    pdp.close()
""")


@pytest.mark.skipif(shutil.which("nghttp") is None or not Path("/proc/self/status").exists(),
                    reason="needs nghttp and /proc")
def test_a_small_compressed_message_cannot_make_the_listener_take_much_memory(write_setup, tmp_path):
    script = tmp_path / "bomb_server.py"
    script.write_text(_BOMB_SERVER)
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(64 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(4)) + packer.flush()  # 256 MiB in ~1 MiB
    with subprocess.Popen([sys.executable, str(script), str(write_setup())], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "GRPC_VERBOSITY": "NONE"}) as server:
        assert server.stdout is not None and server.stdin is not None
        try:
            port, before = map(int, server.stdout.readline().split())
            _nghttp(port, _frame(bomb, compressed=True), ("grpc-encoding: gzip",), tmp_path)
            server.stdin.write("\n")
            server.stdin.flush()
            after = int(server.stdout.readline())
        finally:
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    grown_mib = (after - before) / 1024
    assert grown_mib < 128, f"{len(bomb) >> 10} KiB on the wire grew the listener by {grown_mib:.0f} MiB"


# -- the caller gate ----------------------------------------------------------------------------------------

@pytest.fixture
def gated(tmp_path, gateway_pki, write_setup) -> Iterator[tuple[Service, ListenerTls]]:  # noqa: F811
    cert, key = write(tmp_path / "server", gateway_pki["server"])
    (tmp_path / "gateway-ca.pem").write_bytes(gateway_pki["ca"].pem)
    tls = ListenerTls(cert=Path(cert), key=Path(key), client_ca=tmp_path / "gateway-ca.pem",
                      allowed_callers=(GATEWAY_ID,))
    service = Service(load_config(write_setup()))
    yield service, tls
    service.pdp.close()


def test_the_gate_refuses_a_stranger_whatever_it_sends_and_makes_no_decision(listen, gated, gateway_pki,  # noqa: F811
                                                                             pki, issuer):
    service, tls = gated
    listener, _ = listen(lambda: service.pdp, tls=tls)
    good = envoy_request(pki, bound_token(issuer, pki.client)).SerializeToString()
    sends: list[tuple[bytes, grpc.Compression | None]] = [
        (good, None), (good, grpc.Compression.Gzip), (b"\xff\xff", None), (bytes(MAX_CHECK_REQUEST_BYTES + 1), None)]
    with _grpc_channel(listener.port, gateway_pki, "stranger") as channel:
        for payload, compression in sends:
            with pytest.raises(grpc.RpcError) as refused:
                _raw(channel)(payload, timeout=20, compression=compression)
            assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)
        # the health service is not the gate's: it tells a stranger only whether pdp serves
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "pdp_decisions_total{" not in service.metrics.render().decode()
    with _grpc_channel(listener.port, gateway_pki, "gateway") as channel:
        assert _answer(_raw(channel)(good, timeout=5)).status.code == code_pb2.OK
        broken = _answer(_raw(channel)(b"\xff\xff", timeout=5))  # an admitted caller's garbage: a deny answer
        assert broken.status.code == code_pb2.PERMISSION_DENIED and _reason(broken) == "request_invalid"


def test_a_caller_without_a_certificate_cannot_reach_the_gated_listener(listen, gated, gateway_pki):  # noqa: F811
    service, tls = gated
    listener, _ = listen(lambda: service.pdp, tls=tls)
    anonymous = grpc.ssl_channel_credentials(root_certificates=gateway_pki["ca"].pem)
    with grpc.secure_channel(f"127.0.0.1:{listener.port}", anonymous) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        _raw(channel)(envoy_request(None).SerializeToString(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{listener.port}") as plain, pytest.raises(grpc.RpcError):
        _raw(plain)(envoy_request(None).SerializeToString(), timeout=5)


# -- reload, ports, health -------------------------------------------------------------------------------------

def test_a_swapped_pdp_decides_the_next_call(listen, write_setup, tmp_path, pki, issuer):
    trusting = build_pdp(load_config(write_setup()), probe=False)
    path = write_setup()
    (tmp_path / "jwks.json").write_text(json.dumps(TokenIssuer.generate(issuer.issuer, kid="k1").jwks))
    rotated = build_pdp(load_config(path), probe=False)  # the issuer's key is another one now
    current = [trusting]
    try:
        _, channel = listen(lambda: current[0])
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = envoy_request(pki, bound_token(issuer, pki.client))
        assert stub.Check(request, timeout=5).status.code == code_pb2.OK
        current[0] = rotated
        assert stub.Check(request, timeout=5).status.code == code_pb2.UNAUTHENTICATED
        current[0] = trusting
        assert stub.Check(request, timeout=5).status.code == code_pb2.OK
    finally:
        trusting.close()
        rotated.close()


def test_listeners_share_a_port_only_when_asked(listen, local_pdp):
    port = free_port()
    first, first_channel = listen(lambda: local_pdp, address=f"127.0.0.1:{port}", reuse_port=True)
    second, second_channel = listen(lambda: local_pdp, address=f"127.0.0.1:{port}", reuse_port=True)
    assert first.port == second.port == port
    for channel in (first_channel, second_channel):
        assert external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            envoy_request(None), timeout=5).status.code == code_pb2.PERMISSION_DENIED
    with pytest.raises(ListenError):
        GrpcListener(lambda: local_pdp, f"127.0.0.1:{port}")


def test_health_serves_once_started_and_says_not_serving_on_the_way_down(local_pdp):
    listener = GrpcListener(lambda: local_pdp, "127.0.0.1:0")
    listener.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{listener.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", AUTHORIZATION_SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=listener.stop, args=(1,))
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(5)
        assert not stopper.is_alive()
    finally:
        channel.close()
        listener.stop()
