"""``io.jwt.encode_sign`` and ``io.jwt.encode_sign_raw``: tokens signed in a policy verify with pyjwt and
with ``io.jwt.verify_*``; randomized signatures (ES*, PS*) are verified, not compared. OPA's own fixed
cases are in tests/data/opa_builtin_cases.yaml."""

from __future__ import annotations

import base64
import json
import re
from functools import cache
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pdp.policy import callcheck, rego_ast
from pdp.policy.builtins.jwt_sign import go_json
from pdp.policy.decision_cache import DecisionCache
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError

SECRET = "an HMAC secret that is long enough for HS512, sixty-four bytes.."


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key(curve: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key({"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[curve])


@cache
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_jwk(alg: str) -> dict[str, Any]:
    if alg.startswith("HS"):
        return {"kty": "oct", "k": b64url(SECRET.encode())}
    if alg.startswith(("RS", "PS")):
        return dict(RSAAlgorithm.to_jwk(rsa_key(), as_dict=True))
    if alg.startswith("ES"):
        return dict(ECAlgorithm.to_jwk(ec_key({"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]),
                                       as_dict=True))
    return dict(OKPAlgorithm.to_jwk(ed_key(), as_dict=True))


def public_key(alg: str) -> Any:
    if alg.startswith("HS"):
        return SECRET.encode()
    if alg.startswith(("RS", "PS")):
        return rsa_key().public_key()
    if alg.startswith("ES"):
        return ec_key({"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]).public_key()
    return ed_key().public_key()


def public_pem(alg: str) -> str:
    key = public_key(alg)
    if isinstance(key, bytes):
        return key.decode()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def evaluate(expr: str, data: dict[str, Any]) -> Any:
    source = f"package t\n\nimport rego.v1\n\nx := {expr}\n"
    return PolicyEngine(PolicyBundle((("t.rego", source),), data, "data.t.x", "regorus")).evaluate({})


ALGORITHMS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA"]


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_a_token_signed_in_the_policy_verifies(alg: str) -> None:
    claims = {"sub": "alice", "aud": ["a", "b"], "n": 1}
    data = {"jwk": private_jwk(alg), "claims": claims, "alg": alg, "key": public_pem(alg)}
    token = evaluate('io.jwt.encode_sign({"alg": data.alg, "typ": "JWT"}, data.claims, data.jwk)', data)
    assert pyjwt.decode(token, public_key(alg), algorithms=[alg], audience="a") == claims
    verify = f"io.jwt.verify_{alg.lower()}"
    assert evaluate(f"{verify}(data.token, data.key)", {**data, "token": token}) is True
    # The header is written as Go writes it for OPA: members sorted, no spaces.
    assert base64.urlsafe_b64decode(token.split(".")[0] + "==") == f'{{"alg":"{alg}","typ":"JWT"}}'.encode()


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
def test_randomized_signatures_differ_and_each_verifies(alg: str) -> None:
    data = {"jwk": json.dumps(private_jwk(alg))}
    expr = f'io.jwt.encode_sign_raw(`{{"alg":"{alg}"}}`, `{{"sub":"alice"}}`, data.jwk)'
    first, second = evaluate(expr, data), evaluate(expr, data)
    assert first != second
    for token in (first, second):
        assert pyjwt.decode(token, public_key(alg), algorithms=[alg]) == {"sub": "alice"}


def test_the_first_key_of_a_jwk_set_signs() -> None:
    first, second = private_jwk("ES256"), dict(ECAlgorithm.to_jwk(ec_key("P-384"), as_dict=True))
    data = {"jwks": json.dumps({"keys": [first, second]})}
    token = evaluate('io.jwt.encode_sign_raw(`{"alg":"ES256"}`, `{}`, data.jwks)', data)
    assert pyjwt.decode(token, public_key("ES256"), algorithms=["ES256"]) == {}
    with pytest.raises(PolicyEvalError, match="no keys found in JWK set"):
        evaluate('io.jwt.encode_sign_raw(`{"alg":"ES256"}`, `{}`, `{"keys": []}`)', {})


@pytest.mark.parametrize(("alg", "jwk_of", "error"), [
    ("ES256", "RS256", "ES256 needs an EC private key on secp256r1"),
    ("ES256", "ES384", "ES256 needs an EC private key on secp256r1"),
    ("HS256", "ES256", "HS256 needs an oct (secret) key"),
    ("RS256", "HS256", "RS256 needs an RSA private key"),
    ("EdDSA", "ES256", "EdDSA needs an Ed25519 private key"),
])
def test_a_key_of_another_kind_than_the_algorithm_is_an_error(alg: str, jwk_of: str, error: str) -> None:
    data = {"jwk": private_jwk(jwk_of), "alg": alg}
    with pytest.raises(PolicyEvalError, match=re.escape(f"io.jwt.encode_sign: failed to sign payload: {error}")):
        evaluate('io.jwt.encode_sign({"alg": data.alg}, {}, data.jwk)', data)


def test_a_public_key_cannot_sign() -> None:
    jwk = {k: v for k, v in private_jwk("ES256").items() if k != "d"}
    with pytest.raises(PolicyEvalError, match="ES256 needs an EC private key"):
        evaluate('io.jwt.encode_sign({"alg": "ES256"}, {}, data.jwk)', {"jwk": jwk})


@pytest.mark.parametrize(("expr", "error"), [
    ('io.jwt.encode_sign_raw(1, "{}", 2)', "io.jwt.encode_sign_raw: operand 3 must be string but got number"),
    ('io.jwt.encode_sign_raw(1, "{}", data.jwk_text)',
     "io.jwt.encode_sign_raw: operand 1 must be string but got number"),
    ('io.jwt.encode_sign_raw(`{"alg":"HS256"}`, "{}", "not json")', "failed to parse JWK"),
    ('io.jwt.encode_sign_raw(`{"alg":1}`, "{}", data.jwk_text)', "missing or invalid 'alg' header"),
    ('io.jwt.encode_sign_raw(`{"alg":"none"}`, "{}", data.jwk_text)', "unknown JWS algorithm: none"),
    ('io.jwt.encode_sign_raw(`{"alg":"HS256","typ":"JWT"}`, "NaN", data.jwk_text)',
     "type is JWT but payload is not JSON"),
    ('io.jwt.encode_sign({"alg": "HS256"}, {1: "a"}, data.jwk)', "failed to prepare JWT payload for marshalling"),
])
def test_errors(expr: str, error: str) -> None:
    jwk = private_jwk("HS256")
    with pytest.raises(PolicyEvalError) as info:
        evaluate(expr, {"jwk": jwk, "jwk_text": json.dumps(jwk)})
    assert error in str(info.value)


def test_a_payload_of_another_type_than_jwt_need_not_be_json() -> None:
    data = {"jwk": json.dumps(private_jwk("HS256"))}
    token = evaluate('io.jwt.encode_sign_raw(`{"alg":"HS256","typ":"text/plain"}`, "not json", data.jwk)', data)
    assert base64.urlsafe_b64decode(token.split(".")[1] + "==") == b"not json"
    assert evaluate("io.jwt.verify_hs256(data.token, data.secret)", {"token": token, "secret": SECRET}) is True


def test_values_are_written_as_go_writes_them_for_opa() -> None:
    value = {"z": [1, 2.5, True, None], "a": "<b>&\u2028é", "set": {3, 1, "x", False, None}}
    assert go_json(value, "payload") == (
        '{"a":"\\u003cb\\u003e\\u0026\\u2028é","set":[null,false,1,3,"x"],"z":[1,2.5,true,null]}').encode()
    data = {"jwk": private_jwk("HS256")}
    token = evaluate('io.jwt.encode_sign({"typ": "JWT", "alg": "HS256"}, {"m": "<&>", "s": {2, 1}}, data.jwk)', data)
    assert base64.urlsafe_b64decode(token.split(".")[1] + "==") == b'{"m":"\\u003c\\u0026\\u003e","s":[1,2]}'


def test_a_policy_that_signs_is_never_cached_and_passes_the_load_checks() -> None:
    source = ("package t\n\nimport rego.v1\n\n"
              "token := io.jwt.encode_sign({\"alg\": \"ES256\"}, {\"sub\": input.user}, data.jwk)\n")
    assert DecisionCache.for_modules([source], 100) is None
    tree = rego_ast.parse((("t.rego", source),))
    assert callcheck.find(tree) == []
