"""Fuzz RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain`` parsing: ``rfc9440_chain`` and ``CertificateHeaders``.

The input is the ``Client-Cert`` value, then, after the first newline, the ``Client-Cert-Chain`` value.
Only ``CertHeaderError`` may escape the parser; the reader never raises.
"""

from __future__ import annotations

import base64

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.adapters.cert_headers import CertHeaderError, rfc9440_chain


def _item(der: bytes) -> bytes:
    return b":" + base64.b64encode(der) + b":"


def seeds() -> list[bytes]:
    w = _harness.world()
    leaf, inter, root = w.leaves["client"].der, w.intermediate.der, w.root.der
    return [_item(leaf), _item(leaf) + b"\n" + _item(inter), _item(leaf) + b"\n" + _item(inter) + b", " + _item(root),
            b" :AA==: \n:: , :=:"]


def test_one_input(data: bytes) -> None:
    cert, newline, rest = _harness.text(data).partition("\n")
    chain = rest if newline else None
    try:
        _harness.check_chain(rfc9440_chain(cert, chain), "rfc9440_chain")
    except CertHeaderError:
        pass
    headers = {"client-cert": cert} if chain is None else {"client-cert": cert, "client-cert-chain": chain}
    _harness.read_header("rfc9440", headers, lambda: rfc9440_chain(cert, chain))


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
