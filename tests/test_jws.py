"""pdp.credentials.jws: compact JWS parsing and verification (RFC 7515, RFC 7518, RFC 8037, RFC 8725),
real signatures and the Wycheproof JWS/JWK vectors."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from pdp.credentials.jose import b64url_decode, b64url_encode
from pdp.credentials.jwks import JsonWebKey, KeySet, KeySetError, parse_jwks
from pdp.credentials.jws import ASYMMETRIC_ALGORITHMS, MAX_TOKEN_LENGTH, JwsError, ParsedJws, parse_compact, verify

ALL_ASYMMETRIC = frozenset(ASYMMETRIC_ALGORITHMS)
PYJWT = get_default_algorithms()


# -- keys and helpers


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    rsa2: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p256b: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey
    p521: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey
    ed448: ed448.Ed448PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(65537, 2048),
        rsa2=rsa.generate_private_key(65537, 2048),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p256b=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
        p521=ec.generate_private_key(ec.SECP521R1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        ed448=ed448.Ed448PrivateKey.generate(),
    )


def public_jwk(private_key: Any, **members: Any) -> dict[str, Any]:
    """The public JWK of a private key, as pyjwt writes it, plus ``members`` (kid, alg, use...)."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(members)
    return jwk


def keyset(*jwks: dict[str, Any]) -> KeySet:
    return parse_jwks({"keys": list(jwks)})


def sign_compact(header: dict[str, Any] | bytes, payload: bytes, key: Any, alg: str) -> str:
    """A compact JWS over exactly these header and payload octets, signed with pyjwt's algorithm ``alg``."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    signing_input = f"{b64url_encode(header_bytes)}.{b64url_encode(payload)}".encode()
    signature = PYJWT[alg].sign(signing_input, key)
    return f"{signing_input.decode()}.{b64url_encode(signature)}"


def parts(token: str) -> list[str]:
    return token.split(".")


def with_signature(token: str, signature: bytes) -> str:
    h, p, _ = parts(token)
    return f"{h}.{p}.{b64url_encode(signature)}"


def reject(token: str, ks: KeySet, algorithms: frozenset[str] = ALL_ASYMMETRIC) -> JwsError:
    with pytest.raises(JwsError) as info:
        verify(parse_compact(token), ks, algorithms)
    return info.value


PAYLOAD = {"iss": "https://issuer.test", "sub": "alice"}


# -- parse_compact


def test_parse_compact_splits_and_decodes_a_signed_token(keys: Keys) -> None:
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"})
    parsed = parse_compact(token)
    assert isinstance(parsed, ParsedJws)
    assert parsed.header["alg"] == "ES256" and parsed.header["kid"] == "k1"
    assert json.loads(parsed.payload) == PAYLOAD
    h, p, s = parts(token)
    assert parsed.signing_input == f"{h}.{p}".encode()
    assert parsed.signature == b64url_decode(s) and len(parsed.signature) == 64


def test_parse_compact_refuses_jwe(keys: Keys) -> None:
    # Five parts: an encrypted token (RFC 7516 compact serialization) is never treated as a JWS.
    jwe = ".".join([b64url_encode(b'{"alg":"RSA-OAEP","enc":"A256GCM"}'), "AAAA", "AAAA", "AAAA", "AAAA"])
    with pytest.raises(JwsError) as info:
        parse_compact(jwe)
    assert info.value.kind == JwsError.MALFORMED
    assert "JWE" in str(info.value)


@pytest.mark.parametrize("count", [1, 2, 4, 6, 7])
def test_parse_compact_refuses_wrong_part_counts(keys: Keys, count: int) -> None:
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256")
    h, p, s = parts(token)
    pieces = ([h, p, s] + ["AAAA"] * 10)[:count]
    with pytest.raises(JwsError) as info:
        parse_compact(".".join(pieces))
    assert info.value.kind == JwsError.MALFORMED


@pytest.mark.parametrize("token", ["", ".", "..", "...", "a.b.c", "e30.e30.AAA=", "e30=.e30.AAAA"])
def test_parse_compact_refuses_empty_and_non_base64url_parts(token: str) -> None:
    with pytest.raises(JwsError) as info:
        parse_compact(token)
    assert info.value.kind == JwsError.MALFORMED


@pytest.mark.parametrize("header", [b"[]", b'"alg"', b"null", b"not json", b'{"alg":"ES256","alg":"none"}',
                                    b'{"alg":NaN}'])
def test_parse_compact_refuses_a_header_that_is_not_a_strict_json_object(header: bytes) -> None:
    token = f"{b64url_encode(header)}.{b64url_encode(b'{}')}.{b64url_encode(bytes(64))}"
    with pytest.raises(JwsError) as info:
        parse_compact(token)
    assert info.value.kind == JwsError.MALFORMED


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "b64"])
def test_parse_compact_refuses_crit(keys: Keys, crit: Any) -> None:
    # RFC 7515 §4.1.11: a recipient that does not understand a listed extension must reject the JWS;
    # pdp understands none, so any 'crit' (even empty, which is itself invalid) is refused.
    token = sign_compact({"alg": "ES256", "crit": crit, "exp": 1}, b"{}", keys.p256, "ES256")
    with pytest.raises(JwsError) as info:
        parse_compact(token)
    assert info.value.kind == JwsError.MALFORMED
    assert "crit" in str(info.value)


@pytest.mark.parametrize("b64", [False, "false", 0, None])
def test_parse_compact_refuses_unencoded_payload_option(keys: Keys, b64: Any) -> None:
    # RFC 7797 b64=false changes what is signed; only the default (absent or true) is accepted.
    token = sign_compact({"alg": "ES256", "b64": b64}, b"{}", keys.p256, "ES256")
    with pytest.raises(JwsError) as info:
        parse_compact(token)
    assert info.value.kind == JwsError.MALFORMED


def test_parse_compact_accepts_b64_true(keys: Keys) -> None:
    token = sign_compact({"alg": "ES256", "b64": True}, b"{}", keys.p256, "ES256")
    assert parse_compact(token).header["b64"] is True


def _token_of_length(length: int) -> str:
    """A syntactically valid (unsigned) compact JWS of exactly ``length`` characters."""
    header = b64url_encode(b'{"alg":"ES256"}')
    for sig_len in range(64, 70):
        sig = b64url_encode(bytes(sig_len))
        rest = length - len(header) - len(sig) - 2
        raw_len = rest * 3 // 4
        if len(b64url_encode(b"x" * raw_len)) == rest:
            return f"{header}.{b64url_encode(b'x' * raw_len)}.{sig}"
    raise AssertionError("no combination found")


def test_parse_compact_accepts_a_token_of_exactly_the_maximum_length() -> None:
    token = _token_of_length(MAX_TOKEN_LENGTH)
    assert len(token) == MAX_TOKEN_LENGTH
    assert parse_compact(token).payload == b"x" * len(parse_compact(token).payload)


@pytest.mark.parametrize("extra", [1, 2, 1000])
def test_parse_compact_refuses_an_over_long_token(extra: int) -> None:
    token = _token_of_length(MAX_TOKEN_LENGTH + extra)
    assert len(token) == MAX_TOKEN_LENGTH + extra
    with pytest.raises(JwsError) as info:
        parse_compact(token)
    assert info.value.kind == JwsError.MALFORMED
    assert "longer" in str(info.value)


@settings(database=None, deadline=None)
@given(st.one_of(st.text(max_size=120), st.lists(st.text(alphabet="eyJhbGciOiJFUzI1NiJ9AZ_-.=", max_size=30),
                                                  max_size=6).map(".".join)))
def test_parse_compact_returns_a_parsed_jws_or_raises_jws_error_only(text: str) -> None:
    try:
        parsed = parse_compact(text)
    except JwsError as exc:
        assert exc.kind in {JwsError.MALFORMED}
        return
    assert isinstance(parsed.header, dict)


# -- verify: the algorithm allowlist and the algorithms that do not exist here


def test_verify_refuses_an_algorithm_not_in_the_allowlist(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.rsa, kid="r"))
    token = jwt.encode(PAYLOAD, keys.rsa, algorithm="RS256", headers={"kid": "r"})
    assert verify(parse_compact(token), ks, frozenset({"RS256"})).kid == "r"   # control
    err = reject(token, ks, frozenset({"ES256", "PS256"}))
    assert err.kind == JwsError.ALGORITHM


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_verify_refuses_alg_none_even_when_listed(keys: Keys, alg: str) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    header = b64url_encode(json.dumps({"alg": alg, "kid": "k1"}).encode())
    token = f"{header}.{b64url_encode(json.dumps(PAYLOAD).encode())}."
    err = reject(token, ks, ALL_ASYMMETRIC | {alg})
    assert err.kind == JwsError.ALGORITHM


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_verify_never_verifies_hmac_even_when_listed(keys: Keys, alg: str) -> None:
    # The classic confusion: an HMAC keyed with the verifier's public key (as PEM) bytes.
    pem = keys.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    ks = keyset(public_jwk(keys.rsa, kid="r"))
    header = b64url_encode(json.dumps({"alg": alg, "kid": "r"}).encode())
    signing_input = f"{header}.{b64url_encode(json.dumps(PAYLOAD).encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(pem, signing_input.encode(), digest).digest()
    err = reject(f"{signing_input}.{b64url_encode(mac)}", ks, ALL_ASYMMETRIC | {"HS256", "HS384", "HS512"})
    assert err.kind == JwsError.ALGORITHM


@pytest.mark.parametrize("header", [{"kid": "k1"}, {"alg": None, "kid": "k1"}, {"alg": 256, "kid": "k1"},
                                    {"alg": ["ES256"], "kid": "k1"}])
def test_verify_refuses_a_missing_or_non_string_alg(keys: Keys, header: dict[str, Any]) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = sign_compact(header, b"{}", keys.p256, "ES256")
    assert reject(token, ks).kind == JwsError.MALFORMED


@pytest.mark.parametrize("kid", [1, ["k1"], {"k": "k1"}, True])
def test_verify_refuses_a_non_string_kid(keys: Keys, kid: Any) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = sign_compact({"alg": "ES256", "kid": kid}, b"{}", keys.p256, "ES256")
    assert reject(token, ks).kind == JwsError.MALFORMED


# -- verify: a key is used only with algorithms of its own type and curve


def test_verify_refuses_es256_token_against_an_rsa_key(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.rsa, kid="k1"))
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"})
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_refuses_rs256_token_against_an_ec_key(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = jwt.encode(PAYLOAD, keys.rsa, algorithm="RS256", headers={"kid": "k1"})
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_refuses_es384_alg_with_a_p256_key(keys: Keys) -> None:
    # The header claims ES384 (SHA-384) but the only key is on P-256: never mix curve and hash.
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = sign_compact({"alg": "ES384", "kid": "k1"}, b"{}", keys.p256, "ES384")
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_refuses_es256_alg_with_a_p384_key(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p384, kid="k1"))
    token = sign_compact({"alg": "ES256", "kid": "k1"}, b"{}", keys.p384, "ES256")
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_refuses_eddsa_token_against_an_ec_key(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = jwt.encode(PAYLOAD, keys.ed25519, algorithm="EdDSA", headers={"kid": "k1"})
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_refuses_ed448_key_for_the_ed25519_algorithm(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.ed448, kid="k1"))
    token = sign_compact({"alg": "Ed25519", "kid": "k1"}, b"{}", keys.ed448, "EdDSA")
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_uses_a_key_only_with_its_declared_alg(keys: Keys) -> None:
    # RFC 7517 §4.4 / RFC 8725 §3.1: a key whose 'alg' is RS256 does not verify PS256, even though
    # the RSA key itself could.
    ks = keyset(public_jwk(keys.rsa, kid="r", alg="RS256"))
    ps = jwt.encode(PAYLOAD, keys.rsa, algorithm="PS256", headers={"kid": "r"})
    assert reject(ps, ks).kind == JwsError.KEY_UNKNOWN
    rs = jwt.encode(PAYLOAD, keys.rsa, algorithm="RS256", headers={"kid": "r"})
    assert verify(parse_compact(rs), ks, ALL_ASYMMETRIC).kid == "r"


# -- verify: kid selection


def test_verify_selects_the_key_named_by_kid(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"), public_jwk(keys.p256b, kid="k2"))
    token = jwt.encode(PAYLOAD, keys.p256b, algorithm="ES256", headers={"kid": "k2"})
    key = verify(parse_compact(token), ks, ALL_ASYMMETRIC)
    assert key.kid == "k2"
    assert key is ks.keys[1]


def test_verify_does_not_fall_back_to_another_key_when_kid_names_one(keys: Keys) -> None:
    # Signed by k2's key but naming k1: only k1 is tried, and it fails.
    ks = keyset(public_jwk(keys.p256, kid="k1"), public_jwk(keys.p256b, kid="k2"))
    token = jwt.encode(PAYLOAD, keys.p256b, algorithm="ES256", headers={"kid": "k1"})
    assert reject(token, ks).kind == JwsError.SIGNATURE


def test_verify_reports_an_unknown_kid_as_key_unknown(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k9"})
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_does_not_match_a_kid_against_keys_without_kid(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256))
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"})
    assert reject(token, ks).kind == JwsError.KEY_UNKNOWN


def test_verify_without_kid_tries_every_fitting_key(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.rsa, kid="r"), public_jwk(keys.p256, kid="k1"),
                public_jwk(keys.p384, kid="k384"), public_jwk(keys.p256b, kid="k2"))
    token = jwt.encode(PAYLOAD, keys.p256b, algorithm="ES256")
    assert "kid" not in parse_compact(token).header
    assert verify(parse_compact(token), ks, ALL_ASYMMETRIC).kid == "k2"
    token1 = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256")
    assert verify(parse_compact(token1), ks, ALL_ASYMMETRIC).kid == "k1"


def test_verify_without_kid_fails_when_no_key_verifies(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.p256, kid="k1"), public_jwk(keys.p256b, kid="k2"))
    stranger = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(PAYLOAD, stranger, algorithm="ES256")
    assert reject(token, ks).kind == JwsError.SIGNATURE


def test_verify_with_an_empty_key_set_is_key_unknown(keys: Keys) -> None:
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256")
    assert reject(token, KeySet()).kind == JwsError.KEY_UNKNOWN


# -- verify: every supported algorithm with real keys


SIGNERS: list[tuple[str, str]] = [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"),
    ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "p256"), ("ES384", "p384"), ("ES512", "p521"),
    ("EdDSA", "ed25519"), ("EdDSA", "ed448"),
]


@pytest.mark.parametrize(("alg", "key_name"), SIGNERS)
def test_verify_accepts_a_real_signature(keys: Keys, alg: str, key_name: str) -> None:
    private = getattr(keys, key_name)
    ks = keyset(public_jwk(keys.rsa2, kid="other-rsa"), public_jwk(private, kid="signer", use="sig"))
    token = jwt.encode(PAYLOAD, private, algorithm=alg, headers={"kid": "signer"})
    key = verify(parse_compact(token), ks, frozenset({alg}))
    assert isinstance(key, JsonWebKey) and key.kid == "signer"


@pytest.mark.parametrize(("alg", "key_name"), SIGNERS)
def test_verify_rejects_a_modified_payload(keys: Keys, alg: str, key_name: str) -> None:
    private = getattr(keys, key_name)
    ks = keyset(public_jwk(private, kid="signer"))
    h, _, s = parts(jwt.encode(PAYLOAD, private, algorithm=alg, headers={"kid": "signer"}))
    forged = f"{h}.{b64url_encode(json.dumps({**PAYLOAD, 'sub': 'admin'}).encode())}.{s}"
    assert reject(forged, ks, frozenset({alg})).kind == JwsError.SIGNATURE


@pytest.mark.parametrize(("alg", "key_name"), SIGNERS)
def test_verify_rejects_a_signature_by_another_key_of_the_same_type(keys: Keys, alg: str, key_name: str) -> None:
    private = getattr(keys, key_name)
    other = {"rsa": keys.rsa2, "p256": keys.p256b, "p384": ec.generate_private_key(ec.SECP384R1()),
             "p521": ec.generate_private_key(ec.SECP521R1()), "ed25519": ed25519.Ed25519PrivateKey.generate(),
             "ed448": ed448.Ed448PrivateKey.generate()}[key_name]
    ks = keyset(public_jwk(private, kid="signer"))
    token = jwt.encode(PAYLOAD, other, algorithm=alg, headers={"kid": "signer"})
    assert reject(token, ks, frozenset({alg})).kind == JwsError.SIGNATURE


def test_verify_accepts_the_fully_specified_ed25519_algorithm(keys: Keys) -> None:
    # "Ed25519" (draft-ietf-jose-fully-specified-algorithms) is EdDSA restricted to Ed25519 keys.
    ks = keyset(public_jwk(keys.ed25519, kid="ed"))
    token = sign_compact({"alg": "Ed25519", "kid": "ed"}, json.dumps(PAYLOAD).encode(), keys.ed25519, "EdDSA")
    assert verify(parse_compact(token), ks, frozenset({"Ed25519"})).kid == "ed"
    assert reject(token, ks, frozenset({"EdDSA"})).kind == JwsError.ALGORITHM


@pytest.mark.parametrize("signature", [b"", bytes(63), bytes(65), bytes(128), b"\x30\x06\x02\x01\x01\x02\x01\x01"])
def test_verify_rejects_es256_signatures_of_the_wrong_shape(keys: Keys, signature: bytes) -> None:
    # Including a DER-encoded signature: JWS ECDSA signatures are raw r||s (RFC 7518 §3.4).
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = with_signature(jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"}), signature)
    assert reject(token, ks).kind == JwsError.SIGNATURE


def test_verify_rejects_the_psychic_signature(keys: Keys) -> None:
    # CVE-2022-21449: r = s = 0 verifies everything on a broken ECDSA implementation.
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = with_signature(jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"}), bytes(64))
    assert reject(token, ks).kind == JwsError.SIGNATURE


def test_verify_rejects_ecdsa_signature_with_r_and_s_equal_to_the_group_order(keys: Keys) -> None:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    token = jwt.encode(PAYLOAD, keys.p256, algorithm="ES256", headers={"kid": "k1"})
    sig = n.to_bytes(32, "big") * 2
    assert reject(with_signature(token, sig), ks).kind == JwsError.SIGNATURE


def test_verify_rejects_an_rsa_signature_with_a_leading_zero_byte_added(keys: Keys) -> None:
    ks = keyset(public_jwk(keys.rsa, kid="r"))
    token = jwt.encode(PAYLOAD, keys.rsa, algorithm="RS256", headers={"kid": "r"})
    sig = parse_compact(token).signature
    assert reject(with_signature(token, b"\x00" + sig), ks).kind == JwsError.SIGNATURE


def test_verify_ignores_jwk_jku_x5u_and_x5c_header_parameters(keys: Keys) -> None:
    # A key offered by the token itself is never used: the attacker's signature fails against the set.
    attacker = ec.generate_private_key(ec.SECP256R1())
    ks = keyset(public_jwk(keys.p256, kid="k1"))
    header = {"alg": "ES256", "kid": "k1", "jwk": public_jwk(attacker, kid="k1"),
              "jku": "https://attacker.test/jwks.json", "x5u": "https://attacker.test/cert.pem"}
    token = sign_compact(header, json.dumps(PAYLOAD).encode(), attacker, "ES256")
    assert reject(token, ks).kind == JwsError.SIGNATURE
    honest = sign_compact(header, json.dumps(PAYLOAD).encode(), keys.p256, "ES256")
    assert verify(parse_compact(honest), ks, ALL_ASYMMETRIC).kid == "k1"   # the headers are merely ignored


# -- Wycheproof: json_web_signature_test.json

# RFC 7517/7518 private members; whatever remains of a private JWK is its public part (nothing, for 'oct').
_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

# Wycheproof marks these "valid", but the key's 'alg' member names another algorithm than the token's
# header (a PS256 key verifying PS384, an "ES521" key verifying ES512; RFC 7520 §4.2/§4.3 vectors with
# an 'alg' Wycheproof added). pdp binds a key to its declared algorithm (RFC 7517 §4.4, RFC 8725 §3.1),
# which is the safer reading: these must be refused as KEY_UNKNOWN, and verify once 'alg' is removed.
_DECLARED_ALG_MISMATCH = {346, 347, 350, 351}


def _strip_private(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in _PRIVATE}


def _group_keyset_document(group: dict[str, Any]) -> dict[str, Any]:
    jwk = group.get("public")
    if jwk is None:
        private = group["private"]
        jwk = {"keys": [_strip_private(k) for k in private["keys"]]} if "keys" in private else _strip_private(private)
    return jwk if "keys" in jwk else {"keys": [jwk]}


def _is_symmetric(group: dict[str, Any]) -> bool:
    jwk = group.get("public") or group["private"]
    return any(k.get("kty") == "oct" for k in jwk.get("keys", [jwk]))


def _outcome(document: dict[str, Any], jws: str) -> JsonWebKey | JwsError | KeySetError:
    try:
        ks = parse_jwks(document)
    except KeySetError as exc:
        return exc
    try:
        return verify(parse_compact(jws), ks, ALL_ASYMMETRIC)
    except JwsError as exc:
        return exc


def _header_alg(jws: str) -> str | None:
    try:
        return parse_compact(jws).header.get("alg")
    except JwsError:
        return None


@pytest.fixture(scope="module")
def wycheproof_jws(corpora: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((corpora / "wycheproof" / "json_web_signature_test.json").read_text())
    assert data["numberOfTests"] == sum(len(g["tests"]) for g in data["testGroups"])
    return data


def _cases(data: dict[str, Any], keep: Callable[[dict[str, Any], dict[str, Any]], bool]):
    for group in data["testGroups"]:
        for case in group["tests"]:
            if keep(group, case):
                yield group, case


def test_wycheproof_jws_every_invalid_case_is_rejected(wycheproof_jws: dict[str, Any]) -> None:
    checked, accepted = 0, []
    for group, case in _cases(wycheproof_jws, lambda g, c: c["result"] == "invalid"):
        checked += 1
        outcome = _outcome(_group_keyset_document(group), case["jws"])
        if not isinstance(outcome, JwsError | KeySetError):
            accepted.append((case["tcId"], group["comment"], case["comment"]))
    assert checked > 300
    assert accepted == []


def test_wycheproof_jws_every_valid_asymmetric_case_verifies(wycheproof_jws: dict[str, Any]) -> None:
    checked, failed = 0, []
    for group, case in _cases(wycheproof_jws, lambda g, c: c["result"] == "valid" and not _is_symmetric(g)):
        if case["tcId"] in _DECLARED_ALG_MISMATCH:
            continue
        checked += 1
        assert _header_alg(case["jws"]) in ALL_ASYMMETRIC
        outcome = _outcome(_group_keyset_document(group), case["jws"])
        if not isinstance(outcome, JsonWebKey):
            failed.append((case["tcId"], group["comment"], case["comment"], str(outcome)))
        else:
            assert outcome.kid == _group_keyset_document(group)["keys"][0]["kid"]
    assert checked >= 30
    assert failed == []


def test_wycheproof_jws_valid_cases_whose_key_declares_another_alg_are_refused(
        wycheproof_jws: dict[str, Any]) -> None:
    found = set()
    for group, case in _cases(wycheproof_jws, lambda g, c: c["result"] == "valid" and not _is_symmetric(g)):
        document = _group_keyset_document(group)
        (jwk,) = document["keys"]
        if "alg" not in jwk or jwk["alg"] == _header_alg(case["jws"]):
            continue
        found.add(case["tcId"])
        outcome = _outcome(document, case["jws"])
        assert isinstance(outcome, JwsError) and outcome.kind == JwsError.KEY_UNKNOWN, case["tcId"]
        # The signature itself is good: without the 'alg' restriction the same key verifies it.
        unrestricted = {"keys": [{k: v for k, v in jwk.items() if k != "alg"}]}
        assert isinstance(_outcome(unrestricted, case["jws"]), JsonWebKey), case["tcId"]
    assert found == _DECLARED_ALG_MISMATCH


def test_wycheproof_jws_symmetric_key_groups_are_refused(wycheproof_jws: dict[str, Any]) -> None:
    groups = [g for g in wycheproof_jws["testGroups"] if _is_symmetric(g)]
    assert len(groups) >= 4
    for group in groups:
        with pytest.raises(KeySetError):
            parse_jwks(_group_keyset_document(group))          # the "public part" of an oct key
        private = group["private"]
        with pytest.raises(KeySetError):
            parse_jwks(private if "keys" in private else {"keys": [private]})   # the secret itself


def test_wycheproof_jws_valid_hmac_cases_are_rejected(wycheproof_jws: dict[str, Any]) -> None:
    checked = 0
    for group, case in _cases(wycheproof_jws, lambda g, c: c["result"] == "valid" and _is_symmetric(g)):
        checked += 1
        assert isinstance(_outcome(_group_keyset_document(group), case["jws"]), KeySetError), case["tcId"]
        # Even handed a key set and an allowlist naming HMAC, verify refuses the algorithm itself.
        try:
            parsed = parse_compact(case["jws"])
        except JwsError:
            continue
        with pytest.raises(JwsError) as info:
            verify(parsed, KeySet(), ALL_ASYMMETRIC | {"HS256", "HS384", "HS512"})
        assert info.value.kind == JwsError.ALGORITHM, case["tcId"]
    assert checked >= 10


def test_wycheproof_jws_every_case_is_covered(wycheproof_jws: dict[str, Any]) -> None:
    invalid = sum(1 for _ in _cases(wycheproof_jws, lambda g, c: c["result"] == "invalid"))
    valid = sum(1 for _ in _cases(wycheproof_jws, lambda g, c: c["result"] == "valid"))
    assert invalid + valid == wycheproof_jws["numberOfTests"] == 401


# -- Wycheproof: json_web_key_test.json

# What a security product must do with each key set, by tcId:
#   refused   parse_jwks raises KeySetError: the set holds a symmetric/private key (MixedKeySet), two keys
#             with one kid (DuplicateKid), or a key that is not a valid public key (e=1, point off the
#             curve, coordinates of the wrong curve, kty that does not match the members).
#   left_out  the set parses but the key is not in it (use=enc, or RSA under 2048 bits): a JWKS may
#             legitimately publish encryption keys next to signature keys, so skipping (not refusing the
#             whole set) is the right reading; the token then fails as KEY_UNKNOWN.
#   unusable  the key's 'alg' does not match its curve ("ES521"/"ES224" on P-256, flagged as
#             mismatchedAlgAndCurve). Ambiguous: pdp keeps the key but it fits no algorithm, so it can
#             never verify anything. We require exactly that (KEY_UNKNOWN for the token, for every alg).
#   roca      an RSA modulus with the ROCA fingerprint (CVE-2017-15361): must be refused.
#   valid     the set parses and the token verifies.
_JWK_EXPECTATIONS: dict[int, str] = {
    1: "refused", 2: "refused", 3: "refused", 4: "refused", 5: "valid", 6: "left_out", 7: "roca",
    8: "left_out", 9: "refused", 10: "refused", 11: "refused", 12: "refused", 13: "refused", 14: "refused",
    15: "refused", 16: "refused", 17: "refused", 18: "refused", 19: "unusable", 20: "unusable",
    21: "left_out", 22: "refused", 23: "refused", 24: "refused", 25: "refused", 26: "refused",
}


@pytest.fixture(scope="module")
def wycheproof_jwk(corpora: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    data = json.loads((corpora / "wycheproof" / "json_web_key_test.json").read_text())
    cases = [(g, c) for g in data["testGroups"] for c in g["tests"]]
    assert len(cases) == data["numberOfTests"]
    return cases


def _jwk_case_keyset(group: dict[str, Any]) -> dict[str, Any]:
    # The set a deployment would be handed: the public set when there is one, else the set as published
    # (symmetric keys have no public part; pdp must refuse them with their secret).
    return group.get("public") or group["private"]


def test_wycheproof_jwk_every_case_has_an_expectation(
        wycheproof_jwk: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    assert {c["tcId"] for _, c in wycheproof_jwk} == set(_JWK_EXPECTATIONS)
    for group, case in wycheproof_jwk:
        # Every case the corpus calls invalid has a rejecting expectation; the valid asymmetric one verifies.
        if case["result"] == "invalid":
            assert _JWK_EXPECTATIONS[case["tcId"]] != "valid", case["tcId"]
        elif not _is_symmetric(group):
            assert _JWK_EXPECTATIONS[case["tcId"]] == "valid", case["tcId"]


@pytest.mark.parametrize("expectation", ["refused", "left_out", "unusable", "valid"])
def test_wycheproof_jwk_key_sets(wycheproof_jwk: list[tuple[dict[str, Any], dict[str, Any]]],
                                 expectation: str) -> None:
    cases = [(g, c) for g, c in wycheproof_jwk if _JWK_EXPECTATIONS[c["tcId"]] == expectation]
    assert cases
    for group, case in cases:
        document = _jwk_case_keyset(group)
        tc = case["tcId"]
        if expectation == "refused":
            with pytest.raises(KeySetError):
                parse_jwks(document)
            continue
        ks = parse_jwks(document)
        if expectation == "valid":
            assert verify(parse_compact(case["jws"]), ks, ALL_ASYMMETRIC).kid == document["keys"][0]["kid"]
            continue
        kid = document["keys"][0]["kid"]
        if expectation == "left_out":
            assert ks.candidates(kid) == (), tc
        else:  # unusable
            assert len(ks.candidates(kid)) == 1, tc
        for alg in ALL_ASYMMETRIC:
            parsed = parse_compact(case["jws"])
            header = {**parsed.header, "alg": alg}
            retagged = ParsedJws(header, parsed.payload, parsed.signing_input, parsed.signature)
            with pytest.raises(JwsError) as info:
                verify(retagged, ks, ALL_ASYMMETRIC)
            assert info.value.kind == JwsError.KEY_UNKNOWN, (tc, alg)


def test_wycheproof_jwk_duplicate_kid_and_mixed_sets_are_refused_with_asymmetric_keys(
        wycheproof_jws: dict[str, Any]) -> None:
    # The corpus's DuplicateKid/MixedKeySet sets are made of oct keys, which pdp refuses anyway; rebuild the
    # same shapes from Wycheproof's own EC key so the duplicate/mixed rule itself is what refuses them.
    es256 = next(g for g in wycheproof_jws["testGroups"] if g["comment"] == "es256")
    public, private = es256["public"], es256["private"]
    assert len(parse_jwks({"keys": [public]})) == 1                           # control
    with pytest.raises(KeySetError, match="duplicate kid"):
        parse_jwks({"keys": [public, dict(public)]})
    with pytest.raises(KeySetError, match="private"):
        parse_jwks({"keys": [public, {**private, "kid": "other"}]})


def test_wycheproof_jwk_roca_vulnerable_key_is_refused(
        wycheproof_jwk: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    (group, case), = [(g, c) for g, c in wycheproof_jwk if _JWK_EXPECTATIONS[c["tcId"]] == "roca"]
    document = _jwk_case_keyset(group)
    try:
        ks = parse_jwks(document)
    except KeySetError:
        return
    with pytest.raises(JwsError):
        verify(parse_compact(case["jws"]), ks, ALL_ASYMMETRIC)
