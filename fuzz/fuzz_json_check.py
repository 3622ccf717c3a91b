"""Fuzz the ``/v1/check`` request document: ``parse_request``, then the decision on what it describes.

The input is the HTTP body. As the service does, a body that is not JSON is refused before
``parse_request``; ``parse_request`` may raise only ``RequestDocumentError`` (a ``ValueError``), and the
decision on its result never fails internally nor allows an invalid credential (``_harness.judge``).
"""

from __future__ import annotations

import json

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.json_check import parse_request

WORLD = _harness.world()
PDP = _harness.decision_point()


def seeds() -> list[bytes]:
    chain = (WORLD.leaves["client"].pem + WORLD.intermediate.pem).decode()
    host = _harness.HOST
    docs = [
        {"method": "GET", "path": "/orders?id=1", "host": host, "scheme": "https", "client_cert": chain,
         "headers": {"Authorization": f"Bearer {WORLD.tokens['client']}", "x-trace": ["a", "b"]},
         "source_address": "10.0.0.7", "protocol": "HTTP/2"},
        {"method": "post", "path": "/orders", "headers": {"host": host, "authorization": f"DPoP {WORLD.tokens['dpop']}",
                                                          "dpop": WORLD.proofs["fuzz-POST"]}},
        {"method": "GET", "path": "/admin", "host": host, "client_cert": WORLD.leaves["other"].pem.decode(),
         "headers": {"authorization": [f"Bearer {WORLD.tokens['client']}", "Bearer x"]}},
        {"method": "GET", "path": "/public/%2e%2e/admin", "headers": {":authority": host, "x-pdp-subject": "a\\ud800"}},
        {"method": "GET", "path": "/healthz", "client_cert": "-----BEGIN CERTIFICATE-----\nAA==\n"},
    ]
    return [json.dumps(doc).encode() for doc in docs] + [b'{"method": 1}', b"[]", b'{"headers": {"a": null}}']


def test_one_input(data: bytes) -> None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # the service answers 400 before parse_request
        return
    try:
        raw = parse_request(doc, now=_harness.FUZZ_NOW, peer_address="192.0.2.10")
    except ValueError:  # RequestDocumentError
        return
    request, decision = _harness.decide(PDP, raw)
    if request is not None:
        _harness.judge(request, decision)


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
