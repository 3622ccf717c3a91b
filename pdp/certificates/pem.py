"""Certificate chains as they arrive: PEM text or DER bytes, leaf first."""

from __future__ import annotations

import base64
import binascii
import functools
import re

# The body class excludes "-", so a BEGIN without its END fails at the first dash instead of
# scanning to the end of the input (a lazy ".*?" made hostile input quadratic).
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n?([^-]*)-----END \1-----")
_B64_BODY = re.compile(rb"[A-Za-z0-9+/=\s]*")

#: A chain longer than this is refused before any parsing (no real client chain is this deep).
MAX_CHAIN_LENGTH = 10
MAX_CHAIN_BYTES = 64 * 1024


class PemError(ValueError):
    """The input is not a well-formed certificate chain."""


def pem_to_der_chain(data: bytes | str) -> tuple[bytes, ...]:
    """Decode every ``CERTIFICATE`` block of a PEM text, in order. Other block types are an error."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    if len(raw) > MAX_CHAIN_BYTES:
        raise PemError(f"certificate chain is larger than {MAX_CHAIN_BYTES} bytes")
    blocks = _PEM_BLOCK.findall(raw)
    if not blocks:
        raise PemError("no PEM certificate found")
    if raw.count(b"-----BEGIN") != len(blocks):
        raise PemError("truncated or unbalanced PEM block")
    if len(blocks) > MAX_CHAIN_LENGTH:
        raise PemError(f"more than {MAX_CHAIN_LENGTH} certificates in the chain")
    chain: list[bytes] = []
    for label, body in blocks:
        if label != b"CERTIFICATE":
            raise PemError(f"unexpected PEM block {label.decode('ascii', 'replace')!r}")
        if _B64_BODY.fullmatch(body) is None:
            raise PemError("PEM body is not base64")
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PemError(f"PEM body is not valid base64: {exc}") from exc
        if not der:
            raise PemError("empty PEM certificate")
        chain.append(der)
    return tuple(chain)


@functools.lru_cache(maxsize=1024)
def read_pem_chain(text: str) -> tuple[tuple[bytes, ...], str | None]:
    """``pem_to_der_chain`` for a chain handed over with every request: the chain, or why it is unreadable.
    A returning client sends the same text each time, so each text is decoded once (bounded)."""
    try:
        return pem_to_der_chain(text), None
    except PemError as exc:
        return (), str(exc)
