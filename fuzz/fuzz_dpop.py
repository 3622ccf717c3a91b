"""Fuzz DPoP proof checking (RFC 9449): ``read_proof`` and ``check_proof``.

The first byte chooses how the rest is read. Bit 0 clear: it is the ``DPoP`` header. Bit 0 set: it
is a JOSE header, a newline and claims, which this target signs with the client's DPoP key, so that
any header and claims reach the checks after the signature. Bit 1 set: the server requires nonces.

Only ``Denied`` may escape. An unsigned proof passes ``check_proof`` only if the client made it for
this request; a signed one passes ``read_proof`` only with the thumbprint of the key that signed it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.credentials.rfc9449 import DpopSettings, NonceIssuer, check_proof, read_proof
    from pdp.errors import Denied
    from pdp.store import MemoryStore

WORLD = _harness.world()
TOKEN = WORLD.tokens["dpop"]
PLAIN = DpopSettings(nonce_secret=WORLD.nonce_secret)
NONCES = dataclasses.replace(PLAIN, require_nonce=True)
ISSUER = NonceIssuer(WORLD.nonce_secret, PLAIN.nonce_lifetime)
NONCE = ISSUER.issue(_harness.FUZZ_NOW)


def seeds() -> list[bytes]:
    key = WORLD.dpop_key
    claims = {"jti": "j", "htm": "GET", "htu": _harness.DPOP_URL, "iat": int(_harness.FUZZ_NOW),
              "ath": _harness.b64url(hashlib.sha256(TOKEN.encode()).digest()), "nonce": NONCE}
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk}
    with_nonce = key.proof("GET", _harness.DPOP_URL, TOKEN, iat=_harness.FUZZ_NOW, nonce=NONCE, jti="fuzz-nonce")
    return [*(b"\x00" + p.encode() for p in WORLD.proofs.values()), b"\x02" + with_nonce.encode(),
            b"\x01" + json.dumps(header).encode() + b"\n" + json.dumps(claims).encode(),
            b"\x03" + json.dumps({**header, "jwk": {**key.public_jwk, "kid": "k", "d": "x"}}).encode() + b"\n{}"]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    signed = data[0] & 1 == 1
    settings = NONCES if data[0] & 2 else PLAIN
    if signed:
        header, _, claims = data[1:].partition(b"\n")
        proof = _harness.sign_jws(header, claims, WORLD.dpop_key.key)
    else:
        proof = _harness.text(data[1:])
    try:
        verified = read_proof(proof, settings)
    except Denied:
        pass
    else:
        if signed and verified.jkt != WORLD.dpop_key.jkt:
            raise _harness.Violation(f"a proof signed by one key has the thumbprint {verified.jkt!r} of another")
    try:
        checked = check_proof(proof, method="GET", uri=_harness.DPOP_URL, access_token=TOKEN,
                              token_jkt=WORLD.dpop_key.jkt, now=_harness.FUZZ_NOW, settings=settings,
                              store=MemoryStore(), nonces=ISSUER)
    except Denied:
        return
    if not signed and checked.jti not in ("fuzz-GET", "fuzz-nonce"):
        raise _harness.Violation(f"a proof the client never made passed: {proof[:80]!r}")


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
