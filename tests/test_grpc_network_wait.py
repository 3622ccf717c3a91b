"""The gRPC listener decides on its event loop, and a call that must wait on the network (here a key-set
fetch that the JWKS server holds back) waits in a thread of its own: other clients' decisions go on while
it waits, even with a single such thread."""

from __future__ import annotations

import threading
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
from conftest import AUDIENCE, Pki
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from servers import JwksServer
from test_envoy_grpc import envoy_request as _envoy_request
from test_service import _remote_config

from pdp.config import load_config
from pdp.devpki import TokenIssuer
from pdp.service.grpc_listener import GrpcListener
from pdp.service.server import Service

pytestmark = pytest.mark.integration


def envoy_request(pki: Pki, token: str) -> object:
    """Envoy's CheckRequest with the client's chain (leaf and intermediate) as the peer certificate."""
    return _envoy_request(pki, token, certificate=urllib.parse.quote(pki.chain_pem(), safe=""))


class _HeldJwks(JwksServer):
    """A JWKS server whose answers wait until ``release`` is set, once ``hold`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.release = threading.Event()
        self.waiting = threading.Event()
        handler = self.httpd.RequestHandlerClass
        outer = self
        get = handler.do_GET  # type: ignore[attr-defined]

        def do_get(this: object) -> None:
            if outer.hold.is_set():
                outer.waiting.set()
                outer.release.wait(10)
            get(this)

        handler.do_GET = do_get  # type: ignore[attr-defined]


def test_a_decision_waiting_on_the_network_does_not_hold_up_others(tmp_path: Path, pki: Pki) -> None:
    with _HeldJwks() as jwks:
        old = TokenIssuer.generate(jwks.issuer, kid="old")
        new = TokenIssuer(jwks.issuer, TokenIssuer.generate(kid="x").key, "new")
        jwks.jwks = {"keys": [old.jwk]}
        service = Service(load_config(_remote_config(tmp_path, pki, jwks.issuer, "jwks_url")))
        listener = GrpcListener(lambda: service.pdp, "127.0.0.1:0", workers=1)
        listener.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{listener.port}")
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            known = old.mint(audience=AUDIENCE, bound_to=pki.client)
            assert stub.Check(envoy_request(pki, known), timeout=10).status.code == code_pb2.OK  # keys loaded

            # A token with a kid pdp has not seen: its decision waits on a key-set fetch held at the server.
            jwks.jwks = {"keys": [old.jwk, new.jwk]}
            jwks.hold.set()
            waiting = stub.Check.future(envoy_request(pki, new.mint(audience=AUDIENCE, bound_to=pki.client)),
                                        timeout=20)
            assert jwks.waiting.wait(10), "the fetch never reached the JWKS server"
            started = time.monotonic()
            answers = [stub.Check(envoy_request(pki, known), timeout=5).status.code for _ in range(5)]
            others_took = time.monotonic() - started
            assert not waiting.done()  # still waiting on the network while the others were decided
            jwks.release.set()
            assert waiting.result().status.code == code_pb2.OK
        finally:
            jwks.release.set()
            channel.close()
            listener.stop(0)
            service.pdp.close()
    assert answers == [code_pb2.OK] * 5
    assert others_took < 5, others_took
