"""Fuzz JWS/JWT parsing and verification: ``json_object``, ``parse_compact`` and ``TokenVerifier.verify``.

The first byte chooses how the rest is read. Even: it is the token (and, as bytes, a JSON text).
Odd: it is a JOSE header, a newline and a payload, which this target signs with the issuer's ES256
key, so that any header and claims, however odd, reach the claim checks as a validly signed token.

Only ``DecodeError``, ``JwsError`` and ``Denied`` may escape their functions. An unsigned input
verifies only as a token the issuer minted as valid; a verified token's policy view serialises as JSON.
"""

from __future__ import annotations

import json

import _harness
import atheris
from cryptography.hazmat.primitives.asymmetric import ec

with atheris.instrument_imports(include=["pdp"]):
    from pdp.credentials.jose import DecodeError, json_object
    from pdp.credentials.jwks import StaticKeySource, parse_jwks
    from pdp.credentials.jws import JwsError, parse_compact
    from pdp.credentials.tokens import Issuer, TokenVerifier
    from pdp.errors import Denied

WORLD = _harness.world()
P384 = _harness.ec_key("issuer P-384", "P-384")


def _jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    size = (key.curve.key_size + 7) // 8
    numbers = key.public_key().public_numbers()
    x, y = (_harness.b64url(n.to_bytes(size, "big")) for n in (numbers.x, numbers.y))
    return {"kty": "EC", "crv": f"P-{key.curve.key_size}", "kid": kid, "x": x, "y": y}


KEYS = parse_jwks({"keys": [WORLD.issuer.jwk, _jwk(P384, "k384")]})
VERIFIER = TokenVerifier([Issuer(issuer=_harness.ISSUER, audiences=frozenset({_harness.AUDIENCE}),
                                 algorithms=frozenset({"ES256", "ES384", "EdDSA"}), keys=StaticKeySource(KEYS))],
                         leeway=_harness.LEEWAY)
CLAIMS = {"iss": _harness.ISSUER, "sub": "s", "aud": [_harness.AUDIENCE], "client_id": "c", "jti": "fuzz-es384",
          "iat": int(_harness.FUZZ_NOW), "exp": int(_harness.FUZZ_NOW) + 600, "scope": "read",
          "cnf": {"x5t#S256": WORLD.leaves["client"].thumbprint}}
ES384 = _harness.sign_jws(json.dumps({"alg": "ES384", "typ": "at+jwt", "kid": "k384"}).encode(),
                          json.dumps(CLAIMS).encode(), P384)
#: the tokens that may verify without being signed here, told by their jti (the same in every process)
VALID_JTIS = {*WORLD.valid_jtis, "fuzz-es384"}


def seeds() -> list[bytes]:
    claims = CLAIMS
    header = {"alg": "ES256", "typ": "at+jwt", "kid": "k1"}
    raw = [b"\x00" + t.encode() for t in (*WORLD.tokens.values(), ES384)]
    signed = [b"\x01" + json.dumps(header).encode() + b"\n" + json.dumps(claims).encode(),
              b"\x01" + json.dumps({**header, "crit": ["b64"], "b64": False}).encode() + b"\n" + b'{"iss":1e999}']
    return [*raw, *signed, b"\x00eyJhbGciOiJub25lIn0.e30.", b'\x00{"a":1,"a":2}']


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        header, _, payload = data[1:].partition(b"\n")
        token = _harness.sign_jws(header, payload, WORLD.issuer.key)
    else:
        token = _harness.text(data[1:])
        try:
            json_object(data[1:])
        except DecodeError:
            pass
    try:
        parse_compact(token)
    except JwsError:
        pass
    try:
        verified = VERIFIER.verify(token, _harness.FUZZ_NOW)
    except Denied:
        return
    if not data[0] & 1 and (_harness.claims_of(token) or {}).get("jti") not in VALID_JTIS:
        raise _harness.Violation(f"a token that is not valid verified: {token[:80]!r}")
    json.dumps(verified.policy_view)


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
