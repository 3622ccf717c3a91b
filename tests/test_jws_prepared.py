"""pdp.credentials.jws: what is kept between verifications (decoded headers, each key's prepared check)
changes no answer: a key set verifying many tokens decides each as a fresh one would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from pdp.credentials.jose import b64url_decode, b64url_encode
from pdp.credentials.jwks import KeySet, parse_jwks
from pdp.credentials.jws import ASYMMETRIC_ALGORITHMS, JwsError, parse_compact, verify

ALL = frozenset(ASYMMETRIC_ALGORITHMS)
PYJWT = get_default_algorithms()


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(private_key: Any, **members: Any) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        out = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        out = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        out = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**out, **members}


def sign(header: dict[str, Any] | bytes, payload: dict[str, Any], key: Any, alg: str) -> str:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    signing_input = f"{b64url_encode(head)}.{b64url_encode(json.dumps(payload).encode())}".encode()
    return f"{signing_input.decode()}.{b64url_encode(PYJWT[alg].sign(signing_input, key))}"


def kind(token: str, keys: KeySet, algorithms: frozenset[str] = ALL) -> str:
    with pytest.raises(JwsError) as info:
        verify(parse_compact(token), keys, algorithms)
    return info.value.kind


def test_a_decoded_header_is_handed_out_as_a_copy(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}, {"n": 1}, p256, "ES256")
    parse_compact(token).header["alg"] = "none"
    assert parse_compact(token).header == {"alg": "ES256", "kid": "k1", "typ": "at+jwt"}


def test_a_header_with_a_repeated_member_is_refused_every_time(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign(b'{"alg":"ES256","kid":"k1","kid":"k2"}', {"n": 1}, p256, "ES256")
    for _ in range(3):
        with pytest.raises(JwsError) as info:
            parse_compact(token)
        assert info.value.kind == JwsError.MALFORMED and "duplicate" in str(info.value)


def test_the_same_header_text_carries_crit_refusal_every_time(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign({"alg": "ES256", "crit": ["exp"], "exp": 1}, {"n": 1}, p256, "ES256")
    for _ in range(3):
        with pytest.raises(JwsError):
            parse_compact(token)


def test_many_tokens_of_one_key_set_each_verify_or_fail_on_their_own(p256: ec.EllipticCurvePrivateKey) -> None:
    keys = parse_jwks({"keys": [jwk(p256, kid="k1")]})
    other = ec.generate_private_key(ec.SECP256R1())
    for n in range(5):
        good = sign({"alg": "ES256", "kid": "k1"}, {"n": n}, p256, "ES256")
        assert verify(parse_compact(good), keys, ALL).kid == "k1"
        forged = sign({"alg": "ES256", "kid": "k1"}, {"n": n}, other, "ES256")
        assert kind(forged, keys) == JwsError.SIGNATURE
        head, payload, signature = good.split(".")
        short = b64url_encode(b64url_decode(signature)[:-1])
        assert kind(f"{head}.{payload}.{short}", keys) == JwsError.SIGNATURE  # one byte short


def test_a_key_prepared_for_one_algorithm_is_not_used_for_another(p256: ec.EllipticCurvePrivateKey) -> None:
    keys = parse_jwks({"keys": [jwk(p256, kid="k1")]})
    assert verify(parse_compact(sign({"alg": "ES256", "kid": "k1"}, {}, p256, "ES256")), keys, ALL)
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert kind(sign({"alg": "ES384", "kid": "k1"}, {}, p384, "ES384"), keys) == JwsError.KEY_UNKNOWN
    assert kind(sign({"alg": "ES256", "kid": "k1"}, {}, p256, "ES256"), keys, frozenset({"RS256"})) \
        == JwsError.ALGORITHM


def test_made_up_kids_leave_nothing_behind(p256: ec.EllipticCurvePrivateKey) -> None:
    keys = parse_jwks({"keys": [jwk(p256, kid="k1")]})
    for n in range(50):
        assert kind(sign({"alg": "ES256", "kid": f"made-up-{n}"}, {}, p256, "ES256"), keys) == JwsError.KEY_UNKNOWN
    assert keys.prepared == {}
    verify(parse_compact(sign({"alg": "ES256", "kid": "k1"}, {}, p256, "ES256")), keys, ALL)
    assert list(keys.prepared) == [("k1", "ES256")]


def test_prepared_checks_do_not_change_key_set_equality(p256: ec.EllipticCurvePrivateKey) -> None:
    # A refreshed key set with the same keys is "the same set": tokens it verified stay cached.
    used, fresh = parse_jwks({"keys": [jwk(p256, kid="k1")]}), parse_jwks({"keys": [jwk(p256, kid="k1")]})
    verify(parse_compact(sign({"alg": "ES256", "kid": "k1"}, {}, p256, "ES256")), used, ALL)
    assert used == fresh


@pytest.mark.parametrize("alg", ["RS256", "PS256", "PS512", "EdDSA", "Ed25519"])
def test_each_key_type_verifies_again_with_its_prepared_check(alg: str) -> None:
    private: Any = ed25519.Ed25519PrivateKey.generate() if alg.startswith("Ed") else \
        rsa.generate_private_key(65537, 2048)
    keys = parse_jwks({"keys": [jwk(private, kid="k")]})
    signer = "EdDSA" if alg == "Ed25519" else alg
    for n in range(3):
        token = sign({"alg": alg, "kid": "k"}, {"n": n}, private, signer)
        assert verify(parse_compact(token), keys, ALL).kid == "k"
        head, _, signature = token.split(".")
        tampered = f"{head}.{b64url_encode(json.dumps({'n': n + 1}).encode())}.{signature}"
        assert kind(tampered, keys) == JwsError.SIGNATURE
