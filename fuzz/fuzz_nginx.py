"""Fuzz nginx's ``$ssl_client_escaped_cert`` header parsing: ``nginx_chain`` and ``CertificateHeaders``.

The input is the header value. Only ``CertHeaderError`` may escape the parser; the reader never raises.
"""

from __future__ import annotations

import urllib.parse

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.cert_headers import CertHeaderError, nginx_chain


def seeds() -> list[bytes]:
    return [urllib.parse.quote(pem.decode(), safe="").encode() for pem in _harness.pem_seeds()] + [
        b"-----BEGIN%20CERTIFICATE-----%0AAA%3D%3D%0A-----END%20CERTIFICATE-----%0A"]


def test_one_input(data: bytes) -> None:
    value = _harness.text(data)
    try:
        _harness.check_chain(nginx_chain(value), "nginx_chain")
    except CertHeaderError:
        pass
    _harness.read_header("nginx", {"ssl-client-cert": value}, lambda: nginx_chain(value))


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
