"""Fuzz AWS ALB's ``X-Amzn-Mtls-Clientcert`` parsing: ``alb_chain`` and ``CertificateHeaders``.

The input is the header value: a URL-encoded PEM chain with ``+``, ``=`` and ``/`` left as they are.
Only ``CertHeaderError`` may escape the parser; the reader never raises.
"""

from __future__ import annotations

import urllib.parse

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.cert_headers import CertHeaderError, alb_chain


def seeds() -> list[bytes]:
    return [urllib.parse.quote(pem.decode(), safe="+=/").encode() for pem in _harness.pem_seeds()]


def test_one_input(data: bytes) -> None:
    value = _harness.text(data)
    try:
        _harness.check_chain(alb_chain(value), "alb_chain")
    except CertHeaderError:
        pass
    _harness.read_header("alb", {"x-amzn-mtls-clientcert": value}, lambda: alb_chain(value))


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
