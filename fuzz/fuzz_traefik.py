"""Fuzz Traefik's ``X-Forwarded-Tls-Client-Cert`` parsing: ``traefik_chain`` and ``CertificateHeaders``.

The input is the header value: PEM bodies without their delimiters, comma-separated, URL-encoded.
Only ``CertHeaderError`` may escape the parser; the reader never raises.
"""

from __future__ import annotations

import base64
import urllib.parse

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.cert_headers import CertHeaderError, traefik_chain


def seeds() -> list[bytes]:
    w = _harness.world()
    bodies = [base64.b64encode(c.der).decode() for c in (w.leaves["client"], w.intermediate, w.root)]
    return [urllib.parse.quote(bodies[0], safe="").encode(), urllib.parse.quote(",".join(bodies), safe="").encode(),
            ",".join(bodies[:2]).encode(), b"AA==, ,%41%41%3D%3D"]


def test_one_input(data: bytes) -> None:
    value = _harness.text(data)
    try:
        _harness.check_chain(traefik_chain(value), "traefik_chain")
    except CertHeaderError:
        pass
    _harness.read_header("traefik", {"x-forwarded-tls-client-cert": value}, lambda: traefik_chain(value))


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
