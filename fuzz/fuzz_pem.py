"""Fuzz PEM chain decoding: ``pem_to_der_chain`` on bytes and on text.

Only ``PemError`` may escape; a chain is 1 to ``MAX_CHAIN_LENGTH`` non-empty DER strings, and text
that is ASCII decodes as its bytes do.
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.certificates.pem import MAX_CHAIN_LENGTH, PemError, pem_to_der_chain


def seeds() -> list[bytes]:
    pems = _harness.pem_seeds()
    return [*pems, pems[1].replace(b"\n", b"\r\n"), b"x\n" + pems[0] + b"y\n",
            b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n-----BEGIN X-----"]


def _decode(data: bytes | str) -> tuple[bytes, ...] | None:
    try:
        chain: tuple[bytes, ...] = pem_to_der_chain(data)
    except PemError:
        return None
    _harness.check_chain(chain, "pem_to_der_chain")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise _harness.Violation(f"pem_to_der_chain returned {len(chain)} certificates")
    return chain


def test_one_input(data: bytes) -> None:
    from_bytes = _decode(data)
    from_text = _decode(_harness.text(data))
    if data.isascii() and from_bytes != from_text:
        raise _harness.Violation("pem_to_der_chain reads the same ASCII differently as bytes and as text")


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
