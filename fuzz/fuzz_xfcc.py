"""Fuzz Envoy's ``x-forwarded-client-cert`` parsing: ``parse_xfcc``, ``xfcc_chain`` and ``CertificateHeaders``.

The input is the header value. Only ``CertHeaderError`` may escape the parsers; the reader never raises.
"""

from __future__ import annotations

import hashlib
import urllib.parse

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.cert_headers import CertHeaderError, hex_hash_to_x5t, parse_xfcc, xfcc_chain


def seeds() -> list[bytes]:
    w = _harness.world()
    leaf, inter = w.leaves["client"], w.intermediate
    cert = urllib.parse.quote(leaf.pem.decode(), safe="")
    chain = urllib.parse.quote((leaf.pem + inter.pem).decode(), safe="")
    digest = hashlib.sha256(leaf.der).hexdigest()
    by = _harness.XFCC_BY
    return [
        f'By={by};Hash={digest};Cert="{cert}";Subject="CN=demo client,O=pdp dev";URI=spiffe://example.org/demo/client'
        .encode(),
        f"By={by};Hash={digest};Chain={chain};DNS=a.example;DNS=b.example".encode(),
        f'By=spiffe://x/outer;Cert={cert},By={by};Hash={digest};Cert="{cert}";Chain="{chain}"'.encode(),
        b'Hash=00;Subject="a\\"b,c";URI=;DNS=x',
    ]


def test_one_input(data: bytes) -> None:
    value = _harness.text(data)
    try:
        elements = parse_xfcc(value)
    except CertHeaderError:
        elements = []
    for element in elements:
        if element.hash is not None:
            try:
                hex_hash_to_x5t(element.hash)
            except CertHeaderError:
                pass
    for which, by in (("last", _harness.XFCC_BY), ("first", None)):
        try:
            _harness.check_chain(xfcc_chain(value, which, by), "xfcc_chain")
        except CertHeaderError:
            pass
    _harness.read_header("xfcc", {"x-forwarded-client-cert": value},
                         lambda: xfcc_chain(value, "last", _harness.XFCC_BY))


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
