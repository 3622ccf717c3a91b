"""Fuzz Envoy's gRPC ext_authz conversion: a ``CheckRequest`` message read from the wire, turned into
pdp's request and decided.

The input is the serialized ``envoy.service.auth.v3.CheckRequest``, read by the service's own
deserializer (``read_message``). A message the conversion cannot take is denied by the servicer (never
an RPC error nor an internal error); the decision on one it takes never fails internally nor allows an
invalid credential (``_harness.judge``).
"""

from __future__ import annotations

import urllib.parse

import _harness
import atheris
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters import envoy_grpc

WORLD = _harness.world()
PDP = _harness.decision_point()
#: the conversion, under the name it has had in turn (the adapter reads through the one reader now)
CONVERT = getattr(envoy_grpc, "to_raw_request", None) or envoy_grpc.to_check_request
SERVICER = envoy_grpc.EnvoyAuthorization(lambda: PDP)


def _message(method: str, path: str, headers: dict[str, str], cert: bytes = b"", *, query: str = "",
             raw_headers: tuple[tuple[str, bytes], ...] = (), metadata: bool = False) -> bytes:
    message = external_auth_pb2.CheckRequest()
    http = message.attributes.request.http
    http.method, http.path, http.host, http.scheme, http.query = method, path, _harness.HOST, "https", query
    http.protocol = "HTTP/2"
    http.headers.update(headers)
    for key, value in raw_headers:
        http.header_map.headers.add(key=key, raw_value=value)
    if cert:
        message.attributes.source.certificate = urllib.parse.quote(cert.decode(), safe="")
    message.attributes.source.address.socket_address.address = "10.0.0.9"
    message.attributes.source.principal = "spiffe://example.org/ns/edge/sa/envoy"
    message.attributes.context_extensions["route"] = "orders"
    if metadata:
        filter_metadata = struct_pb2.Struct()
        filter_metadata.update({"a": [1.5, None, {"b": "c"}]})
        message.attributes.metadata_context.filter_metadata["envoy.filters"].CopyFrom(filter_metadata)
    return bytes(message.SerializeToString())


def seeds() -> list[bytes]:
    client = WORLD.leaves["client"].pem + WORLD.intermediate.pem
    return [
        _message("GET", "/orders", {"authorization": f"Bearer {WORLD.tokens['client']}"}, client, metadata=True),
        _message("POST", "/orders", {}, raw_headers=(("authorization", f"DPoP {WORLD.tokens['dpop']}".encode()),
                                                     ("dpop", WORLD.proofs["fuzz-POST"].encode()))),
        _message("get", "/admin", {"authorization": f"Bearer {WORLD.tokens['admin']}"}, WORLD.leaves["admin"].pem,
                 query="x=1"),
        _message("GET", "/public/x", {"x-forwarded-client-cert": "By=x;Hash=00"}, b"-----BEGIN CERTIFICATE-----"),
    ]


def test_one_input(data: bytes) -> None:
    message = envoy_grpc.read_message(data)
    if not isinstance(message, external_auth_pb2.CheckRequest):
        return
    try:
        raw = CONVERT(message, now=_harness.FUZZ_NOW)
    except Exception:  # the servicer answers a message it cannot convert with a deny: check that it does
        answer = SERVICER.Check(message, None)
        response = external_auth_pb2.CheckResponse.FromString(answer)
        if response.status.code == code_pb2.OK or answer == envoy_grpc.INTERNAL_ERROR_BYTES:
            raise
        return
    request, decision = _harness.decide(PDP, raw)
    if request is not None:
        _harness.judge(request, decision)


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
