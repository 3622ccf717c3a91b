"""RFC 7662 introspection answers shared between replicas through the store, authenticated.

Whoever can write to the store (a Redis reachable from elsewhere, a stolen
password, a neighbour on a shared instance) must not be able to make pdp take
a document for an authorization server's answer, which would mint tokens. So
every replica holds one secret (``store.secret``, or the one the parent of
``pdp serve --workers`` draws for its workers) and:

- the store key of an answer is HMAC-SHA256 under that secret over the
  issuer, the introspection endpoint, pdp's client_id there and the token's
  SHA-256: without the secret no one can aim a document at a token of their
  choosing, and the key gives nothing of the token away;
- the document carries an HMAC-SHA256 over its key and its content, checked
  in constant time before anything in it is read, so a document moved to
  another key or altered is not authentic.

The endpoint and the client_id are part of both because an authorization
server may tailor its answer to the protected resource that asks (RFC 7662
§2.2: it "MAY limit which scopes from a given token are returned"): only
replicas that ask the same endpoint as the same client share answers.

The secret is split (HMAC with fixed labels) into one key for store keys and
one for the MAC, so neither use can serve as the other; it is never logged,
and its object shows nothing of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from pdp.credentials.jose import DecodeError, json_object

#: The version of the shared document; another one is ignored (a replica of another release).
SHARED_VERSION = 2
#: The shortest secret accepted: as long as the HMAC-SHA256 output.
MIN_SECRET_BYTES = 32

_KEY_LABEL = b"pdp shared introspection answers: store key"
_MAC_LABEL = b"pdp shared introspection answers: document mac"
_MAC_MEMBER = "mac"


def decode_secret(text: str) -> bytes:
    """A secret as configured: hex (hex digits only), else base64 (standard or URL-safe alphabet, padding
    optional); at least ``MIN_SECRET_BYTES`` bytes. ``ValueError`` says what is wrong without quoting the
    secret."""
    if re.fullmatch(r"[0-9a-fA-F]+", text):
        if len(text) % 2:  # a digit lost in copying, rather than base64 that happens to look like hex
            raise ValueError("has an odd number of hex digits")
        secret = bytes.fromhex(text)
    elif re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", text):
        unpadded = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            secret = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
        except binascii.Error:
            raise ValueError("is neither hex nor base64") from None
    else:
        raise ValueError("is neither hex nor base64")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes (64 hex digits, or 44 base64 characters), "
                         f"not {len(secret)}: `openssl rand -hex 32` makes one")
    return secret


def _canonical(document: Mapping[str, Any]) -> bytes:
    """One spelling of a JSON object: what the MAC covers, written and read back the same."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _field(text: str) -> bytes:
    """A length-prefixed field: no choice of issuer, endpoint or client_id can shift into the next one."""
    data = text.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data


class SharedAnswers:
    """The store keys of shared answers and the MAC on them, under one secret all replicas hold."""

    __slots__ = ("_key_key", "_mac_key")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        self._key_key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        self._mac_key = hmac.new(secret, _MAC_LABEL, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "SharedAnswers(<secret>)"

    def key(self, issuer: str, endpoint: str, client_id: str, digest: bytes) -> str:
        """The store key of the answer ``client_id`` got at ``endpoint`` for the token whose SHA-256 is
        ``digest``."""
        context = _field(issuer) + _field(endpoint) + _field(client_id) + digest
        return "introspection:" + hmac.new(self._key_key, context, hashlib.sha256).hexdigest()

    def _mac(self, key: str, document: Mapping[str, Any]) -> bytes:
        return hmac.new(self._mac_key, key.encode("ascii") + b"\0" + _canonical(document), hashlib.sha256).digest()

    def seal(self, key: str, document: Mapping[str, Any]) -> bytes:
        """``document`` as stored under ``key``, with its MAC. Raises ``TypeError``/``ValueError`` for a
        document that is not JSON."""
        if _MAC_MEMBER in document:
            raise ValueError(f"a document to seal has no {_MAC_MEMBER!r} member of its own")
        mac = base64.urlsafe_b64encode(self._mac(key, document)).rstrip(b"=").decode("ascii")
        return _canonical({**document, _MAC_MEMBER: mac})

    def open(self, key: str, data: bytes) -> dict[str, Any] | None:
        """The document stored under ``key`` (without its MAC), or None when it is not one a holder of the
        secret sealed for this key: not a JSON object, no MAC, or a MAC that does not match."""
        try:
            document = json_object(data)
        except DecodeError:
            return None
        stated = document.pop(_MAC_MEMBER, None)
        if not isinstance(stated, str) or not stated.isascii():
            return None
        try:
            expected = base64.urlsafe_b64encode(self._mac(key, document)).rstrip(b"=").decode("ascii")
        except (TypeError, ValueError):  # a number JSON holds but cannot write again (no MAC was made of it)
            return None
        return document if hmac.compare_digest(stated, expected) else None
