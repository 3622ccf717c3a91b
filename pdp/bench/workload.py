"""What the benchmark sends: a ``pdp dev init`` setup, and one allowed request in each protocol's form.

The request is the same everywhere: ``GET /orders`` on ``api.example.org`` from the dev client
certificate, with the token bound to it and the headers a browser or a service would send. In process it
is a ``CheckRequest``; over gRPC an Envoy ``CheckRequest`` (the certificate URL-encoded in
``attributes.source.certificate``, as Envoy sends it); on ``/v1/check`` a JSON document; on
``/ext_authz`` a sub-request with the certificate in ``x-forwarded-client-cert`` from a trusted proxy.
Fresh certificates and tokens are minted here too, from the setup's own CA and issuer keys.
"""

from __future__ import annotations

import json
import struct
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography import x509

from pdp.certificates.pem import pem_to_der_chain
from pdp.devinit import AUDIENCE, CLIENT_ID, ISSUER, dev_init
from pdp.devpki import Issued, TokenIssuer, load_private_key, make_client
from pdp.request import CheckRequest

METHOD, PATH, HOST = "GET", "/orders", "api.example.org"
#: The gRPC method h2load calls.
GRPC_PATH = "/envoy.service.auth.v3.Authorization/Check"
#: Besides the credential: what a client's request carries.
HEADERS = {"accept": "application/json", "user-agent": "pdp-bench/1", "x-request-id": "4f1c2b7e-9d3a",
           "x-forwarded-proto": "https"}
#: What the benchmark adds to the dev setup's pdp.toml: the HTTP ext_authz endpoint believes
#: certificate headers (Envoy's XFCC) from loopback, where the load generators run.
GATEWAY = '\n[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "xfcc"\n'


@dataclass(frozen=True)
class Workload:
    folder: Path
    config: Path
    ca: Issued
    client: Issued
    issuer: TokenIssuer
    token: str

    @property
    def chain(self) -> tuple[bytes, ...]:
        return (self.client.der,)

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}", **HEADERS}

    # -- in process
    def check_request(self, path: str = PATH, *, chain: tuple[bytes, ...] | None = None,
                      token: str | None = None) -> CheckRequest:
        headers: Mapping[str, str] = MappingProxyType(self.headers(token))
        return CheckRequest(method=METHOD, path=path, host=HOST, time=time.time(), headers=headers,
                            client_cert_chain=self.chain if chain is None else chain)

    def new_token(self, client: Issued | None = None) -> str:
        return self.issuer.mint(audience=AUDIENCE, subject="demo-user", client_id="demo-client",
                                scope="read write", bound_to=client or self.client)

    def new_client(self) -> Issued:
        return make_client(self.ca, spiffe_id=CLIENT_ID, common_name="demo client")

    # -- on the wire
    def check_document(self) -> bytes:
        """The ``POST /v1/check`` body."""
        return json.dumps({"method": METHOD, "path": PATH, "host": HOST, "headers": self.headers(),
                           "client_cert": self.client.pem.decode()}).encode()

    def grpc_message(self) -> bytes:
        """Envoy's ``CheckRequest``, serialized."""
        from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

        context = attribute_context_pb2.AttributeContext
        http = context.HttpRequest(method=METHOD, path=PATH, host=HOST, scheme="https", protocol="HTTP/1.1")
        for name, value in self.headers().items():
            http.headers[name] = value
        source = context.Peer(certificate=urllib.parse.quote(self.client.pem.decode(), safe=""))
        message = external_auth_pb2.CheckRequest(attributes=context(
            source=source, request=context.Request(http=http)))
        data: bytes = message.SerializeToString()
        return data

    def grpc_frame(self) -> bytes:
        """The gRPC request body: the message with its 5-byte prefix (not compressed, length)."""
        message = self.grpc_message()
        return struct.pack(">BI", 0, len(message)) + message

    def ext_authz_headers(self) -> dict[str, str]:
        """The headers of Envoy's HTTP ext_authz sub-request (``GET /ext_authz/orders``)."""
        xfcc = f'Cert="{urllib.parse.quote(self.client.pem.decode(), safe="")}"'
        return {"host": HOST, **self.headers(), "x-forwarded-client-cert": xfcc}


def prepare(folder: Path) -> Workload:
    """``pdp dev init`` into ``folder``, with the gateway settings the HTTP ext_authz endpoint needs."""
    dev_init(folder)
    config = folder / "pdp.toml"
    config.write_text(config.read_text() + GATEWAY)

    def issued(name: str) -> Issued:
        cert = x509.load_der_x509_certificate(pem_to_der_chain((folder / f"{name}.pem").read_bytes())[0])
        return Issued(cert, load_private_key((folder / f"{name}.key").read_bytes()))

    issuer = TokenIssuer(ISSUER, load_private_key((folder / "issuer.key").read_bytes()), "dev-1")
    return Workload(folder=folder, config=config, ca=issued("ca"), client=issued("client"), issuer=issuer,
                    token=(folder / "token.jwt").read_text().strip())
