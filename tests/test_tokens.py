"""pdp.credentials.tokens.TokenVerifier: every rule, each test named after it, asserting the reason code.

Tokens are real ES256/RS256 tokens signed by real keys; key sets are real JWKS documents. Remote key
sources get a plain ``fetch`` function (their documented injection point) serving those documents.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from conftest import AUDIENCE, ISSUER
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm, get_default_algorithms

from pdp import reasons
from pdp.credentials.jose import b64url_decode, b64url_encode
from pdp.credentials.jwks import KeySet, RemoteKeySource, StaticKeySource, parse_jwks
from pdp.credentials.rfc9068 import PLAIN_REQUIRED_CLAIMS, PROFILE_REQUIRED_CLAIMS
from pdp.credentials.tokens import CACHE_MARGIN_SECONDS, Issuer, TokenVerifier, VerifiedToken
from pdp.devpki import TokenIssuer
from pdp.errors import Denied, NeedsNetwork
from pdp.reasons import Reason

PYJWT = get_default_algorithms()
REMOVE = object()
X5T = "x4vpcsJ5Lfw7tdgf2cKBvgN4uEuAFdajC9vJ52IHTeQ"


# -- helpers


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture
def now() -> float:
    return float(int(time.time()))


def claims_for(token_issuer: TokenIssuer, now: float, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": token_issuer.issuer, "sub": "alice", "aud": AUDIENCE, "client_id": "client-1",
        "scope": "read write", "iat": int(now), "nbf": int(now), "exp": int(now) + 3600, "jti": uuid.uuid4().hex,
        "cnf": {"x5t#S256": X5T},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not REMOVE}


def sign_compact(header: dict[str, Any] | bytes, payload: bytes, key: Any, alg: str = "ES256") -> str:
    """A compact JWS over exactly these header and payload octets, signed with pyjwt's ``alg``."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    signing_input = f"{b64url_encode(header_bytes)}.{b64url_encode(payload)}".encode()
    return f"{signing_input.decode()}.{b64url_encode(PYJWT[alg].sign(signing_input, key))}"


def sign(token_issuer: TokenIssuer, claims: dict[str, Any] | bytes, *, key: Any = None, alg: str = "ES256",
         **header: Any) -> str:
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    full_header = {"alg": alg, "typ": "at+jwt", "kid": token_issuer.kid, **header}
    full_header = {k: v for k, v in full_header.items() if v is not REMOVE}
    return sign_compact(full_header, payload, key if key is not None else token_issuer.key, alg)


def token_for(token_issuer: TokenIssuer, now: float, **overrides: Any) -> str:
    return sign(token_issuer, claims_for(token_issuer, now, **overrides))


def static_keys(*token_issuers: TokenIssuer) -> StaticKeySource:
    return StaticKeySource(parse_jwks({"keys": [t.jwk for t in token_issuers]}))


def issuer_config(token_issuer: TokenIssuer, keys: Any = None, **kw: Any) -> Issuer:
    kw.setdefault("audiences", frozenset({AUDIENCE}))
    kw.setdefault("algorithms", frozenset({"ES256"}))
    return Issuer(issuer=token_issuer.issuer, keys=keys if keys is not None else static_keys(token_issuer), **kw)


def verifier_for(token_issuer: TokenIssuer, keys: Any = None, *, leeway: float = 30.0, **kw: Any) -> TokenVerifier:
    return TokenVerifier([issuer_config(token_issuer, keys, **kw)], leeway=leeway)


def denied(verifier: TokenVerifier, token: str, now: float, reason: Reason) -> Denied:
    with pytest.raises(Denied) as info:
        verifier.verify(token, now)
    assert info.value.reason.code == reason.code, info.value
    return info.value


@dataclass
class Server:
    """The fetch callable's world: one JWKS document (or a failure) and the URLs it was asked for."""

    document: bytes | None = None
    failure: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def fetch(self, url: str) -> bytes:
        self.calls.append(url)
        if self.failure is not None:
            raise self.failure
        assert self.document is not None
        return self.document


def jwks_document(*token_issuers: TokenIssuer) -> bytes:
    return json.dumps({"keys": [t.jwk for t in token_issuers]}).encode()


def remote_keys(server: Server, *, min_interval: float = 30.0) -> RemoteKeySource:
    return RemoteKeySource(lambda: f"{ISSUER}/jwks.json", server.fetch, min_interval=min_interval,
                           max_age=300.0, name=ISSUER)


# -- the control: a good token verifies, and what it yields


def test_a_valid_token_verifies_into_its_claims(issuer: TokenIssuer, now: float) -> None:
    claims = claims_for(issuer, now, scp=["admin", "read"])
    token = sign(issuer, claims)
    verified = verifier_for(issuer).verify(token, now)
    assert isinstance(verified, VerifiedToken)
    assert verified.issuer == ISSUER
    assert verified.claims == claims
    assert verified.scopes == ("read", "write", "admin")
    assert verified.alg == "ES256" and verified.kid == issuer.kid
    assert verified.exp == claims["exp"]
    assert verified.x5t_s256 == X5T and verified.jkt is None
    assert verified.jti == claims["jti"]
    assert verified.policy_view["sub"] == "alice" and verified.policy_view["client_id"] == "client-1"


def test_a_token_minted_by_the_dev_issuer_verifies(issuer: TokenIssuer, now: float) -> None:
    token = issuer.mint(audience=AUDIENCE, now=now)
    assert verifier_for(issuer).verify(token, now).claims["sub"] == "demo-user"


# -- parsing


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "a.b.c.d.e", "!!!.e30.AAAA", "e30=.e30.AAAA",
                                   "x" * 20000])
def test_token_malformed(issuer: TokenIssuer, now: float, token: str) -> None:
    denied(verifier_for(issuer), token, now, reasons.TOKEN_MALFORMED)


def test_token_malformed_when_the_signature_part_has_padding(issuer: TokenIssuer, now: float) -> None:
    token = token_for(issuer, now)
    # An ES256 signature is 64 bytes: its base64url form needs one '=' of padding, which must not appear.
    denied(verifier_for(issuer), token + "=", now, reasons.TOKEN_MALFORMED)


def test_token_malformed_when_the_header_has_a_duplicate_member(issuer: TokenIssuer, now: float) -> None:
    header = b'{"alg":"ES256","typ":"at+jwt","kid":"k1","kid":"other"}'
    token = sign_compact(header, json.dumps(claims_for(issuer, now)).encode(), issuer.key)
    denied(verifier_for(issuer), token, now, reasons.TOKEN_MALFORMED)


def test_token_malformed_when_crit_is_present(issuer: TokenIssuer, now: float) -> None:
    token = sign(issuer, claims_for(issuer, now), crit=["exp"])
    denied(verifier_for(issuer), token, now, reasons.TOKEN_MALFORMED)


@pytest.mark.parametrize("payload", [b"[]", b"not json", b'"claims"', b"", b'{"exp": NaN}'])
def test_token_claims_invalid_when_the_payload_is_not_a_json_object(issuer: TokenIssuer, now: float,
                                                                    payload: bytes) -> None:
    denied(verifier_for(issuer), sign(issuer, payload), now, reasons.TOKEN_CLAIMS_INVALID)


# -- issuer


def test_token_issuer_unknown(issuer: TokenIssuer, now: float) -> None:
    # Signed with the configured issuer's own key: only the 'iss' is wrong.
    token = token_for(issuer, now, iss="https://other.test")
    denied(verifier_for(issuer), token, now, reasons.TOKEN_ISSUER_UNKNOWN)


def test_token_issuer_unknown_for_a_trailing_slash_variant(issuer: TokenIssuer, now: float) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, iss=ISSUER + "/"), now, reasons.TOKEN_ISSUER_UNKNOWN)


@pytest.mark.parametrize("iss", [REMOVE, None, 1, [ISSUER], {"iss": ISSUER}])
def test_token_claims_invalid_without_an_iss_string(issuer: TokenIssuer, now: float, iss: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, iss=iss), now, reasons.TOKEN_CLAIMS_INVALID)


def test_each_issuer_verifies_with_its_own_keys(issuer: TokenIssuer, now: float) -> None:
    other = TokenIssuer.generate("https://other.test", kid=issuer.kid)   # same kid, different key
    verifier = TokenVerifier([issuer_config(issuer), issuer_config(other)])
    assert verifier.verify(token_for(other, now), now).issuer == "https://other.test"
    assert verifier.verify(token_for(issuer, now), now).issuer == ISSUER
    # other's key, ISSUER's name: checked against ISSUER's key, which did not sign it.
    forged = sign(other, claims_for(issuer, now))
    denied(verifier, forged, now, reasons.TOKEN_SIGNATURE_INVALID)


# -- type (RFC 9068 §2.1, §4)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", REMOVE, "", "dpop+jwt", "at+jwt2", "at+JWT ",
                                 123, ["at+jwt"], None])
def test_token_type_invalid_unless_at_jwt(issuer: TokenIssuer, now: float, typ: Any) -> None:
    token = sign(issuer, claims_for(issuer, now), typ=typ)
    denied(verifier_for(issuer), token, now, reasons.TOKEN_TYPE_INVALID)


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_token_type_at_jwt_is_accepted_case_insensitively(issuer: TokenIssuer, now: float, typ: str) -> None:
    assert verifier_for(issuer).verify(sign(issuer, claims_for(issuer, now), typ=typ), now)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", REMOVE, "at+jwt"])
def test_accept_plain_jwt_allows_typ_jwt(issuer: TokenIssuer, now: float, typ: Any) -> None:
    verifier = verifier_for(issuer, accept_plain_jwt=True)
    assert verifier.verify(sign(issuer, claims_for(issuer, now), typ=typ), now).issuer == ISSUER


@pytest.mark.parametrize("typ", ["dpop+jwt", "secevent+jwt", "JOSE", 1])
def test_accept_plain_jwt_still_refuses_other_types(issuer: TokenIssuer, now: float, typ: Any) -> None:
    token = sign(issuer, claims_for(issuer, now), typ=typ)
    denied(verifier_for(issuer, accept_plain_jwt=True), token, now, reasons.TOKEN_TYPE_INVALID)


def test_plain_jwt_profile_requires_only_iss_exp_aud(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, accept_plain_jwt=True, required_claims=PLAIN_REQUIRED_CLAIMS)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(now) + 60}
    assert verifier.verify(sign(issuer, claims, typ="JWT"), now).claims == claims
    denied(verifier, sign(issuer, {"iss": ISSUER, "exp": int(now) + 60}, typ="JWT"), now,
           reasons.TOKEN_CLAIMS_INVALID)


# -- algorithm


def test_token_alg_not_allowed(issuer: TokenIssuer, now: float, rsa_key: rsa.RSAPrivateKey) -> None:
    # The RSA key is in the issuer's set, but the issuer is configured for ES256 only.
    rsa_jwk = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r1"}
    keys = StaticKeySource(parse_jwks({"keys": [issuer.jwk, rsa_jwk]}))
    token = sign(issuer, claims_for(issuer, now), key=rsa_key, alg="RS256", kid="r1")
    denied(verifier_for(issuer, keys), token, now, reasons.TOKEN_ALG_NOT_ALLOWED)
    allowed = verifier_for(issuer, keys, algorithms=frozenset({"ES256", "RS256"}))
    assert allowed.verify(token, now).alg == "RS256"                      # control


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "ES256K", "RSA-OAEP"])
def test_token_alg_not_allowed_for_algorithms_that_do_not_exist_here(issuer: TokenIssuer, now: float,
                                                                     alg: str) -> None:
    header = b64url_encode(json.dumps({"alg": alg, "typ": "at+jwt", "kid": issuer.kid}).encode())
    payload = b64url_encode(json.dumps(claims_for(issuer, now)).encode())
    verifier = verifier_for(issuer, algorithms=frozenset({"ES256", alg}))
    denied(verifier, f"{header}.{payload}.{b64url_encode(b'x' * 32)}", now, reasons.TOKEN_ALG_NOT_ALLOWED)


# -- keys


def test_token_key_unknown_after_one_refresh(issuer: TokenIssuer, now: float) -> None:
    server = Server(jwks_document(issuer))
    keys = remote_keys(server, min_interval=30.0)
    assert keys.refresh(now - 100) is True
    verifier = verifier_for(issuer, keys)
    token = sign(issuer, claims_for(issuer, now), kid="k-unknown")
    denied(verifier, token, now, reasons.TOKEN_KEY_UNKNOWN)
    assert len(server.calls) == 2                                         # exactly one refresh
    # A second unknown kid within min_interval does not fetch again.
    denied(verifier, sign(issuer, claims_for(issuer, now), kid="k-unknown-2"), now + 1, reasons.TOKEN_KEY_UNKNOWN)
    assert len(server.calls) == 2


def test_token_key_unknown_with_a_static_key_set(issuer: TokenIssuer, now: float) -> None:
    denied(verifier_for(issuer), sign(issuer, claims_for(issuer, now), kid="nope"), now, reasons.TOKEN_KEY_UNKNOWN)


def test_key_rotation_new_kid_verifies_after_refresh(issuer: TokenIssuer, now: float) -> None:
    server = Server(jwks_document(issuer))
    keys = remote_keys(server, min_interval=30.0)
    keys.refresh(now - 100)
    verifier = verifier_for(issuer, keys)
    assert verifier.verify(token_for(issuer, now), now).kid == issuer.kid
    rotated = TokenIssuer.generate(ISSUER, kid="k2")
    server.document = jwks_document(issuer, rotated)                      # the issuer publishes its new key
    verified = verifier.verify(token_for(rotated, now), now)
    assert verified.kid == "k2"
    assert len(server.calls) == 2
    assert verifier.verify(token_for(issuer, now), now).kid == issuer.kid  # the old key still works


def test_key_rotation_removed_key_no_longer_verifies_after_refresh(issuer: TokenIssuer, now: float) -> None:
    rotated = TokenIssuer.generate(ISSUER, kid="k2")
    server = Server(jwks_document(issuer))
    keys = remote_keys(server, min_interval=0.0)
    keys.refresh(now - 100)
    verifier = verifier_for(issuer, keys)
    server.document = jwks_document(rotated)
    assert verifier.verify(token_for(rotated, now), now).kid == "k2"
    denied(verifier, token_for(issuer, now), now, reasons.TOKEN_KEY_UNKNOWN)


def test_token_signature_invalid_when_the_payload_is_changed(issuer: TokenIssuer, now: float) -> None:
    h, _, s = token_for(issuer, now).split(".")
    forged = f"{h}.{b64url_encode(json.dumps(claims_for(issuer, now, sub='admin')).encode())}.{s}"
    denied(verifier_for(issuer), forged, now, reasons.TOKEN_SIGNATURE_INVALID)


def test_token_signature_invalid_when_a_signature_bit_is_flipped(issuer: TokenIssuer, now: float) -> None:
    h, p, s = token_for(issuer, now).split(".")
    sig = bytearray(b64url_decode(s))
    sig[10] ^= 0x01
    denied(verifier_for(issuer), f"{h}.{p}.{b64url_encode(bytes(sig))}", now, reasons.TOKEN_SIGNATURE_INVALID)


def test_token_signature_invalid_when_signed_by_another_key_with_the_issuers_kid(issuer: TokenIssuer,
                                                                                 now: float) -> None:
    token = sign(issuer, claims_for(issuer, now), key=ec.generate_private_key(ec.SECP256R1()))
    denied(verifier_for(issuer), token, now, reasons.TOKEN_SIGNATURE_INVALID)


def test_jwks_unavailable(issuer: TokenIssuer, now: float) -> None:
    server = Server(failure=OSError("GET https://issuer.test/jwks.json: connection refused"))
    keys = remote_keys(server, min_interval=30.0)
    verifier = verifier_for(issuer, keys)
    denied(verifier, token_for(issuer, now), now, reasons.JWKS_UNAVAILABLE)
    assert keys.current() is None and keys.last_error
    # Rate-limited: still unavailable, no new fetch.
    denied(verifier, token_for(issuer, now), now + 1, reasons.JWKS_UNAVAILABLE)
    assert len(server.calls) == 1
    # The endpoint recovers; after min_interval the next token loads the keys and verifies.
    server.failure, server.document = None, jwks_document(issuer)
    assert verifier.verify(token_for(issuer, now), now + 30).issuer == ISSUER


def test_jwks_unavailable_is_checked_after_the_issuer(issuer: TokenIssuer, now: float) -> None:
    keys = remote_keys(Server(failure=OSError("down")))
    denied(verifier_for(issuer, keys), token_for(issuer, now, iss="https://other.test"), now,
           reasons.TOKEN_ISSUER_UNKNOWN)


# -- time (RFC 9068 §4, RFC 7519 §4.1.4-6)


def test_token_expired(issuer: TokenIssuer, now: float) -> None:
    token = token_for(issuer, now - 7200, exp=int(now) - 3600)
    denied(verifier_for(issuer), token, now, reasons.TOKEN_EXPIRED)


def test_token_expired_honours_leeway(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, leeway=30.0)
    assert verifier.verify(token_for(issuer, now - 600, exp=int(now) - 29), now)
    denied(verifier, token_for(issuer, now - 600, exp=int(now) - 30), now, reasons.TOKEN_EXPIRED)
    denied(verifier, token_for(issuer, now - 600, exp=int(now) - 31), now, reasons.TOKEN_EXPIRED)


def test_token_expired_at_exp_without_leeway(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, leeway=0.0)
    assert verifier.verify(token_for(issuer, now - 600, exp=int(now) + 1), now)
    denied(verifier, token_for(issuer, now - 600, exp=int(now)), now, reasons.TOKEN_EXPIRED)


def test_token_not_yet_valid_when_nbf_is_in_the_future(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, leeway=30.0)
    denied(verifier, token_for(issuer, now, nbf=int(now) + 31), now, reasons.TOKEN_NOT_YET_VALID)
    assert verifier.verify(token_for(issuer, now, nbf=int(now) + 30), now)      # within leeway


def test_token_not_yet_valid_when_iat_is_in_the_future(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, leeway=30.0)
    denied(verifier, token_for(issuer, now, iat=int(now) + 31, nbf=REMOVE), now, reasons.TOKEN_NOT_YET_VALID)
    assert verifier.verify(token_for(issuer, now, iat=int(now) + 30, nbf=REMOVE), now)


def test_fractional_time_claims_are_accepted(issuer: TokenIssuer, now: float) -> None:
    # RFC 7519 §2 NumericDate may be non-integer.
    token = token_for(issuer, now, iat=now - 0.5, nbf=now - 0.5, exp=now + 60.25)
    assert verifier_for(issuer).verify(token, now).exp == now + 60.25


_OVERFLOWING_TIMES = [
    ("exp", "1e400"),                    # parses to +inf: a token that never expires
    ("exp", "-1e400"),                   # parses to -inf
    ("exp", "1" + "0" * 400),            # an int too large for a float
    ("nbf", "1e400"),
    ("iat", "1e400"),
]


@pytest.mark.parametrize(("claim", "literal"), _OVERFLOWING_TIMES, ids=[f"{c}={v[:6]}" for c, v in _OVERFLOWING_TIMES])
def test_token_claims_invalid_when_a_time_claim_is_out_of_range(issuer: TokenIssuer, now: float, claim: str,
                                                                 literal: str) -> None:
    claims = claims_for(issuer, now, **{claim: 0})
    payload = json.dumps(claims).replace(f'"{claim}": 0', f'"{claim}": {literal}').encode()
    assert literal.encode() in payload
    token = sign(issuer, payload)
    try:
        verifier_for(issuer).verify(token, now)
    except Denied as exc:
        assert exc.reason.code in {reasons.TOKEN_CLAIMS_INVALID.code, reasons.TOKEN_EXPIRED.code}
        return
    pytest.fail("a token with a non-finite or overflowing time claim was accepted")


# -- audience (RFC 9068 §4, RFC 7519 §4.1.3)


def test_token_audience_invalid(issuer: TokenIssuer, now: float) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, aud="https://other-api.test"), now,
           reasons.TOKEN_AUDIENCE_INVALID)


def test_token_audience_list_containing_ours_is_accepted(issuer: TokenIssuer, now: float) -> None:
    token = token_for(issuer, now, aud=["https://other-api.test", AUDIENCE])
    assert verifier_for(issuer).verify(token, now).claims["aud"][1] == AUDIENCE


@pytest.mark.parametrize("aud", [["https://other-api.test"], [], ["https://api.test/"], ["HTTPS://API.TEST"]])
def test_token_audience_invalid_for_a_list_without_ours(issuer: TokenIssuer, now: float, aud: list[str]) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, aud=aud), now, reasons.TOKEN_AUDIENCE_INVALID)


def test_token_audience_any_of_several_configured(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, audiences=frozenset({AUDIENCE, "https://api2.test"}))
    assert verifier.verify(token_for(issuer, now, aud="https://api2.test"), now)


@pytest.mark.parametrize("aud", [1, None, {"aud": AUDIENCE}, [AUDIENCE, 1], [[AUDIENCE]], True])
def test_token_claims_invalid_when_aud_is_not_a_string_or_string_list(issuer: TokenIssuer, now: float,
                                                                      aud: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, aud=aud), now, reasons.TOKEN_CLAIMS_INVALID)


# -- claims (RFC 9068 §2.2)


@pytest.mark.parametrize("claim", PROFILE_REQUIRED_CLAIMS)
def test_token_claims_invalid_when_a_required_claim_is_missing(issuer: TokenIssuer, now: float, claim: str) -> None:
    token = token_for(issuer, now, **{claim: REMOVE})
    denied(verifier_for(issuer), token, now, reasons.TOKEN_CLAIMS_INVALID)


def test_required_claims_are_the_rfc9068_set() -> None:
    assert set(PROFILE_REQUIRED_CLAIMS) == {"iss", "exp", "aud", "sub", "client_id", "iat", "jti"}


@pytest.mark.parametrize(("claim", "value"), [
    ("exp", "4102444800"),         # exp as a string
    ("exp", True),                 # exp as a bool (a Python int subclass)
    ("exp", None),
    ("exp", [1]),
    ("nbf", "0"),
    ("nbf", False),
    ("iat", "now"),
    ("iat", {"t": 1}),
    ("sub", 42),
    ("sub", None),
    ("client_id", ["c"]),
    ("jti", 7),
    ("scope", ["read"]),
    ("scp", "read"),
    ("scp", ["read", 1]),
])
def test_token_claims_invalid_when_a_claim_has_the_wrong_type(issuer: TokenIssuer, now: float, claim: str,
                                                              value: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, **{claim: value}), now, reasons.TOKEN_CLAIMS_INVALID)


def test_token_claims_invalid_for_a_duplicate_claim(issuer: TokenIssuer, now: float) -> None:
    # Two 'sub' members: one parser reads "alice", another "admin". pdp reads neither.
    body = json.dumps(claims_for(issuer, now, sub="alice"))
    payload = body.replace('"sub": "alice"', '"sub": "alice", "sub": "admin"').encode()
    assert payload.count(b'"sub"') == 2
    token = jwt.api_jws.PyJWS().encode(payload, issuer.key, algorithm="ES256",
                                       headers={"typ": "at+jwt", "kid": issuer.kid})
    denied(verifier_for(issuer), token, now, reasons.TOKEN_CLAIMS_INVALID)


def test_token_claims_invalid_for_a_duplicate_claim_spelt_with_an_escape(issuer: TokenIssuer, now: float) -> None:
    body = json.dumps(claims_for(issuer, now, iss=ISSUER))
    payload = body.replace(f'"iss": "{ISSUER}"', f'"iss": "{ISSUER}", "\\u0069ss": "https://evil.test"').encode()
    denied(verifier_for(issuer), sign(issuer, payload), now, reasons.TOKEN_CLAIMS_INVALID)


@pytest.mark.parametrize("cnf", ["x5t", [], ["x5t#S256", X5T], 1, True, False, ""])
def test_token_claims_invalid_when_cnf_is_not_an_object(issuer: TokenIssuer, now: float, cnf: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, cnf=cnf), now, reasons.TOKEN_CLAIMS_INVALID)


@pytest.mark.parametrize("x5t", [1, [X5T], {"v": X5T}, True])
def test_token_claims_invalid_when_cnf_x5t_s256_is_not_a_string(issuer: TokenIssuer, now: float, x5t: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, cnf={"x5t#S256": x5t}), now, reasons.TOKEN_CLAIMS_INVALID)


@pytest.mark.parametrize("jkt", [1, ["abc"], {"v": "abc"}])
def test_token_claims_invalid_when_cnf_jkt_is_not_a_string(issuer: TokenIssuer, now: float, jkt: Any) -> None:
    denied(verifier_for(issuer), token_for(issuer, now, cnf={"jkt": jkt}), now, reasons.TOKEN_CLAIMS_INVALID)


def test_unbound_and_dpop_bound_tokens_expose_their_confirmation(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer)
    unbound = verifier.verify(token_for(issuer, now, cnf=REMOVE), now)
    assert unbound.x5t_s256 is None and unbound.jkt is None
    dpop = verifier.verify(token_for(issuer, now, cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}), now)
    assert dpop.jkt == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I" and dpop.x5t_s256 is None


# -- order of checks: nothing from an unverified token is trusted


def test_signature_is_checked_before_claims(issuer: TokenIssuer, now: float) -> None:
    # Expired and wrongly addressed, but the first failure reported is the forged signature.
    token = sign(issuer, claims_for(issuer, now, exp=int(now) - 3600, aud="x"),
                 key=ec.generate_private_key(ec.SECP256R1()))
    denied(verifier_for(issuer), token, now, reasons.TOKEN_SIGNATURE_INVALID)


def test_type_is_checked_before_signature(issuer: TokenIssuer, now: float) -> None:
    token = sign(issuer, claims_for(issuer, now), key=ec.generate_private_key(ec.SECP256R1()), typ="JWT")
    denied(verifier_for(issuer), token, now, reasons.TOKEN_TYPE_INVALID)


# -- cache


def test_cache_returns_the_same_verified_token_on_second_verify(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer)
    token = token_for(issuer, now)
    first = verifier.verify(token, now)
    assert verifier.verify(token, now + 1) is first
    other = verifier.verify(token_for(issuer, now), now)
    assert other is not first


def test_cache_is_not_used_after_exp(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer, leeway=0.0)
    token = token_for(issuer, now, exp=int(now) + 10)
    first = verifier.verify(token, now)
    assert verifier.verify(token, now + 10 - CACHE_MARGIN_SECONDS - 0.5) is first
    # Inside the cache margin the token is verified again (a new object), then refused at exp.
    assert verifier.verify(token, now + 10 - CACHE_MARGIN_SECONDS + 0.5) is not first
    denied(verifier, token, now + 10, reasons.TOKEN_EXPIRED)
    denied(verifier, token, now + 3600, reasons.TOKEN_EXPIRED)


def test_cache_is_bounded_by_max_cache_seconds(issuer: TokenIssuer, now: float) -> None:
    verifier = TokenVerifier([issuer_config(issuer)], max_cache_seconds=60.0)
    token = token_for(issuer, now)
    first = verifier.verify(token, now)
    assert verifier.verify(token, now + 59) is first
    assert verifier.verify(token, now + 61) is not first


def test_cache_reverifies_when_the_issuers_key_set_object_changes(issuer: TokenIssuer, now: float) -> None:
    keys = static_keys(issuer)
    verifier = verifier_for(issuer, keys)
    token = token_for(issuer, now)
    first = verifier.verify(token, now)
    keys.replace(parse_jwks(issuer.jwks))                # an equal set, but a new one
    second = verifier.verify(token, now)
    assert second is not first and second.claims == first.claims
    assert verifier.verify(token, now) is second


def test_cache_does_not_outlive_a_revoked_key(issuer: TokenIssuer, now: float) -> None:
    keys = static_keys(issuer)
    verifier = verifier_for(issuer, keys)
    token = token_for(issuer, now)
    verifier.verify(token, now)
    keys.replace(KeySet())                                # the issuer's key is withdrawn
    denied(verifier, token, now, reasons.TOKEN_KEY_UNKNOWN)


def test_cache_reverifies_after_a_remote_refresh(issuer: TokenIssuer, now: float) -> None:
    rotated = TokenIssuer.generate(ISSUER, kid="k2")
    server = Server(jwks_document(issuer))
    keys = remote_keys(server, min_interval=0.0)
    keys.refresh(now - 100)
    verifier = verifier_for(issuer, keys)
    token = token_for(issuer, now)
    verifier.verify(token, now)
    server.document = jwks_document(rotated)
    keys.refresh(now)
    denied(verifier, token, now, reasons.TOKEN_KEY_UNKNOWN)


def test_cache_can_be_cleared_and_disabled(issuer: TokenIssuer, now: float) -> None:
    verifier = verifier_for(issuer)
    token = token_for(issuer, now)
    first = verifier.verify(token, now)
    verifier.clear_cache()
    assert verifier.verify(token, now) is not first
    uncached = TokenVerifier([issuer_config(issuer)], cache_size=0)
    assert uncached.verify(token, now) is not uncached.verify(token, now)


def test_a_denied_token_is_not_cached_as_verified(issuer: TokenIssuer, now: float) -> None:
    # The same token denied once is denied again: only successes are cached.
    verifier = verifier_for(issuer)
    bad = token_for(issuer, now, aud="https://other-api.test")
    denied(verifier, bad, now, reasons.TOKEN_AUDIENCE_INVALID)
    denied(verifier, bad, now, reasons.TOKEN_AUDIENCE_INVALID)


# -- decide without network waits (the service's event-loop path) ------------------------------------

def test_verify_without_network_raises_needs_network_instead_of_fetching():



    issuer_key = TokenIssuer.generate("https://remote.test", kid="r1")
    fetches: list[str] = []

    def fetch(url: str) -> bytes:
        fetches.append(url)
        return json.dumps(issuer_key.jwks).encode()

    source = RemoteKeySource(lambda: "https://remote.test/jwks", fetch, min_interval=60, max_age=300,
                             name="remote")
    verifier = TokenVerifier([Issuer("https://remote.test", frozenset({"aud"}), frozenset({"ES256"}), source)])
    token = issuer_key.mint(audience="aud")
    now = time.time()
    with pytest.raises(NeedsNetwork):
        verifier.verify(token, now, network=False)
    assert fetches == []
    assert verifier.verify(token, now).claims["iss"] == "https://remote.test"
    assert len(fetches) == 1
    # Once loaded and within the rate limit, an unknown kid is denied at once, without a fetch.
    stranger = TokenIssuer("https://remote.test", TokenIssuer.generate().key, "unknown").mint(audience="aud")
    with pytest.raises(Denied) as denied:
        verifier.verify(stranger, now + 1, network=False)
    assert denied.value.reason.code == "token_key_unknown"
    assert len(fetches) == 1
