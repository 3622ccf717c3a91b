"""Known JWT attack classes, one test each, through the full ``Pdp.decide()``.

Every attack token is built for real: signed (where it is signed) with real keys, presented over a real,
trusted client-certificate chain, and bound to that certificate when the attack is not about binding, so
the only thing wrong with the request is the attack itself. Each test asserts a deny and its reason code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import AUDIENCE, ISSUER, Pki, bound_token, check_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, get_default_algorithms

from pdp.credentials.jose import b64url_decode, b64url_encode
from pdp.decision import Decision
from pdp.devpki import TokenIssuer, make_ca
from pdp.pipeline import Pdp

PYJWT = get_default_algorithms()
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# -- helpers


@pytest.fixture
def pdp(make_pdp: Callable[..., Pdp]) -> Pdp:
    return make_pdp()


@pytest.fixture(scope="module")
def attacker_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def decide(pdp: Pdp, pki: Pki, token: str) -> Decision:
    return pdp.decide(check_request(chain=pki.chain(), token=token))


def assert_denied(decision: Decision, code: str) -> None:
    assert decision.allowed is False, decision.explanation()
    assert decision.reason == code, decision.explanation()


def bound_claims(pki: Pki, *, iss: str = ISSUER, now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """The claims of a good RFC 9068 token bound to pki.client (what TokenIssuer.mint would write)."""
    iat = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": iss, "sub": "demo-user", "aud": AUDIENCE, "client_id": "demo-client", "scope": "read write",
        "iat": iat, "nbf": iat, "exp": iat + 3600, "jti": uuid.uuid4().hex,
        "cnf": {"x5t#S256": pki.client.thumbprint},
    }
    claims.update(overrides)
    return claims


def header_for(kid: str | None = "k1", alg: str = "ES256", **extra: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": alg, "typ": "at+jwt"}
    if kid is not None:
        header["kid"] = kid
    header.update(extra)
    return header


def encode_part(value: dict[str, Any] | bytes) -> str:
    return b64url_encode(value if isinstance(value, bytes) else json.dumps(value).encode())


def sign_compact(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, key: Any,
                 alg: str = "ES256") -> str:
    signing_input = f"{encode_part(header)}.{encode_part(payload)}".encode()
    return f"{signing_input.decode()}.{b64url_encode(PYJWT[alg].sign(signing_input, key))}"


def hmac_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[header["alg"]]
    signing_input = f"{encode_part(header)}.{encode_part(payload)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


# -- controls: the honest tokens these attacks are built from are allowed


def test_control_minted_bound_token_is_allowed(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    decision = decide(pdp, pki, bound_token(issuer, pki.client))
    assert decision.allowed, decision.explanation()


def test_control_hand_signed_bound_token_is_allowed(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    decision = decide(pdp, pki, sign_compact(header_for(), bound_claims(pki), issuer.key))
    assert decision.allowed, decision.explanation()


# -- the attacks


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_unsigned_token(pdp: Pdp, pki: Pki, alg: str) -> None:
    token = f"{encode_part(header_for(alg=alg))}.{encode_part(bound_claims(pki))}."
    assert_denied(decide(pdp, pki, token), "token_alg_not_allowed")


def _public_key_forms(issuer: TokenIssuer) -> dict[str, bytes]:
    public = issuer.key.public_key()
    return {
        "pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "der": public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "point": public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
        "jwk": json.dumps(issuer.jwk).encode(),
        "jwks": json.dumps(issuer.jwks).encode(),
    }


@pytest.mark.parametrize("form", ["pem", "der", "point", "jwk", "jwks"])
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_signed_with_the_issuers_public_key_as_secret(pdp: Pdp, pki: Pki, issuer: TokenIssuer, alg: str,
                                                           form: str) -> None:
    # Algorithm confusion (CVE-2015-9235 and kin): a verifier that lets the header pick HMAC would use the
    # public key it holds as the HMAC secret, and the attacker knows that key.
    secret = _public_key_forms(issuer)[form]
    token = hmac_token(header_for(alg=alg), bound_claims(pki, sub="admin"), secret)
    assert_denied(decide(pdp, pki, token), "token_alg_not_allowed")


@pytest.mark.parametrize("kid", [
    "../../../../../../dev/null",
    "/dev/null",
    "../../../../etc/passwd",
    "..\\..\\..\\windows\\win.ini",
    "%2e%2e%2f%2e%2e%2fdev%2fnull",
    "k1/../k1",
    "' OR '1'='1",
    "k1' UNION SELECT 'secret' --",
    "k1\"; DROP TABLE keys; --",
    "k1; ls",
    "$(id)",
    "*",
    "k1\u0000",
    "k1 ",
    "K1",
    "",
])
def test_kid_path_traversal_and_injection(pdp: Pdp, pki: Pki, attacker_key: ec.EllipticCurvePrivateKey,
                                          kid: str) -> None:
    # The kid only selects among configured keys: no file, query or normalisation ever sees it.
    token = sign_compact(header_for(kid=kid), bound_claims(pki, sub="admin"), attacker_key)
    assert_denied(decide(pdp, pki, token), "token_key_unknown")


@pytest.mark.parametrize("kid", ["/dev/null", "../../../../../../dev/null"])
def test_kid_path_traversal_with_hmac_over_an_empty_file(pdp: Pdp, pki: Pki, kid: str) -> None:
    # The classic form: kid points at an empty file, the token is HMACed with an empty secret.
    token = hmac_token(header_for(kid=kid, alg="HS256"), bound_claims(pki, sub="admin"), b"")
    assert_denied(decide(pdp, pki, token), "token_alg_not_allowed")


def test_kid_names_the_issuers_key_exactly(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    # Even the issuer's genuine signature fails when the kid is a traversal "equivalent" of k1.
    token = sign_compact(header_for(kid="./k1"), bound_claims(pki), issuer.key)
    assert_denied(decide(pdp, pki, token), "token_key_unknown")


@pytest.mark.parametrize(("kid", "code"), [
    ("k1", "token_signature_invalid"),          # names the issuer's key: verified with it, and fails
    (None, "token_signature_invalid"),          # no kid: every configured key is tried, none verifies
    ("attacker", "token_key_unknown"),          # names the embedded key: no such configured key
])
def test_embedded_jwk_header_attacker_key_is_ignored(pdp: Pdp, pki: Pki, attacker_key: ec.EllipticCurvePrivateKey,
                                                     kid: str | None, code: str) -> None:
    # CVE-2018-0114 style: the token carries its own verification key in 'jwk'.
    jwk = {**ECAlgorithm.to_jwk(attacker_key.public_key(), as_dict=True), "kid": kid or "attacker"}
    token = sign_compact(header_for(kid=kid, jwk=jwk), bound_claims(pki, sub="admin"), attacker_key)
    assert_denied(decide(pdp, pki, token), code)


@pytest.mark.parametrize("param", ["jku", "x5u"])
@pytest.mark.parametrize(("kid", "code"), [("attacker", "token_key_unknown"), ("k1", "token_signature_invalid"),
                                           (None, "token_signature_invalid")])
def test_jku_and_x5u_pointing_elsewhere_are_ignored(pdp: Pdp, pki: Pki, attacker_key: ec.EllipticCurvePrivateKey,
                                                    param: str, kid: str | None, code: str) -> None:
    extra = {param: f"https://attacker.test/{'jwks.json' if param == 'jku' else 'cert.pem'}"}
    token = sign_compact(header_for(kid=kid, **extra), bound_claims(pki, sub="admin"), attacker_key)
    assert_denied(decide(pdp, pki, token), code)


def test_x5c_embedded_attacker_certificate_is_ignored(pdp: Pdp, pki: Pki,
                                                      attacker_key: ec.EllipticCurvePrivateKey) -> None:
    cert = make_ca("attacker", key=attacker_key).der
    token = sign_compact(header_for(kid="k1", x5c=[base64.b64encode(cert).decode()]),
                         bound_claims(pki, sub="admin"), attacker_key)
    assert_denied(decide(pdp, pki, token), "token_signature_invalid")


@pytest.mark.parametrize("crit", [["urn:attacker:ignore-exp"], ["exp"], ["b64"]])
def test_crit_unknown_header(pdp: Pdp, pki: Pki, issuer: TokenIssuer, crit: list[str]) -> None:
    # Signed by the issuer itself: a token whose meaning depends on an extension pdp does not implement
    # must be refused (RFC 7515 §4.1.11), even when its signature is genuine.
    header = header_for(crit=crit, **{name: True for name in crit if name != "b64"})
    token = sign_compact(header, bound_claims(pki), issuer.key)
    assert_denied(decide(pdp, pki, token), "token_malformed")


@pytest.mark.parametrize("signature", [bytes(64), P256_ORDER.to_bytes(32, "big") * 2], ids=["zero", "order"])
def test_ecdsa_psychic_signature(pdp: Pdp, pki: Pki, signature: bytes) -> None:
    # CVE-2022-21449: r = s = 0 (and r = s = n, its modular twin) "verify" any message on a broken ECDSA.
    token = f"{encode_part(header_for())}.{encode_part(bound_claims(pki, sub='admin'))}.{b64url_encode(signature)}"
    assert_denied(decide(pdp, pki, token), "token_signature_invalid")


@pytest.mark.parametrize(("strip", "code"), ids=["empty", "removed", "r-only"], argvalues=[
    (lambda h, p, s: f"{h}.{p}.", "token_signature_invalid"),   # empty signature part
    (lambda h, p, s: f"{h}.{p}", "token_malformed"),           # signature part and its dot removed
    (lambda h, p, s: f"{h}.{p}.{b64url_encode(b64url_decode(s)[:32])}", "token_signature_invalid"),  # r only
])
def test_signature_stripping(pdp: Pdp, pki: Pki, issuer: TokenIssuer, strip: Callable[[str, str, str], str],
                             code: str) -> None:
    h, p, s = bound_token(issuer, pki.client).split(".")
    assert len(b64url_decode(s)) == 64
    assert_denied(decide(pdp, pki, strip(h, p, s)), code)


def test_token_substitution_between_issuers(pdp: Pdp, pki: Pki) -> None:
    # A token from an issuer pdp does not trust, using the same kid as the trusted issuer's key.
    stranger = TokenIssuer.generate("https://stranger.test", kid="k1")
    assert_denied(decide(pdp, pki, bound_token(stranger, pki.client)), "token_issuer_unknown")


def test_token_substitution_claiming_the_trusted_issuer(pdp: Pdp, pki: Pki) -> None:
    # The stranger writes the trusted issuer's name into 'iss' and signs with its own key under kid k1.
    stranger = TokenIssuer.generate(ISSUER, kid="k1")
    assert_denied(decide(pdp, pki, bound_token(stranger, pki.client)), "token_signature_invalid")


def test_expired_token_with_a_valid_signature(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    token = bound_token(issuer, pki.client, now=time.time() - 7200, lifetime=3600)
    assert_denied(decide(pdp, pki, token), "token_expired")


def test_duplicate_sub_claims(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    # Parser differential: the first 'sub' for one JSON parser, the last for another.
    body = json.dumps(bound_claims(pki, sub="demo-user"))
    payload = body.replace('"sub": "demo-user"', '"sub": "demo-user", "sub": "admin"').encode()
    assert payload.count(b'"sub"') == 2
    assert_denied(decide(pdp, pki, sign_compact(header_for(), payload, issuer.key)), "token_claims_invalid")


def test_duplicate_alg_header_members(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    header = b'{"alg":"ES256","typ":"at+jwt","kid":"k1","alg":"none"}'
    assert_denied(decide(pdp, pki, sign_compact(header, bound_claims(pki), issuer.key)), "token_malformed")


def test_unencoded_payload_b64_false(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    # RFC 7797: with b64=false the signature covers the raw payload; a verifier unaware of it would check
    # a different signing input than the issuer signed.
    token = sign_compact(header_for(b64=False), bound_claims(pki), issuer.key)
    assert_denied(decide(pdp, pki, token), "token_malformed")


def test_plain_jwt_or_id_token_substitution(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    # RFC 9068 §4 / RFC 8725 §3.11: a JWT of another type (an ID token, typ JWT) is not an access token.
    assert_denied(decide(pdp, pki, bound_token(issuer, pki.client, typ="JWT")), "token_type_invalid")


def test_token_for_another_audience(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    token = bound_token(issuer, pki.client, audience="https://another-api.test")
    assert_denied(decide(pdp, pki, token), "token_audience_invalid")


def test_jwe_instead_of_jws(pdp: Pdp, pki: Pki) -> None:
    jwe = ".".join([encode_part({"alg": "RSA-OAEP", "enc": "A256GCM", "typ": "at+jwt"}), "AAAA", "AAAA",
                    "AAAA", "AAAA"])
    assert_denied(decide(pdp, pki, jwe), "token_malformed")


def test_oversized_token(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    token = bound_token(issuer, pki.client, extra={"pad": "x" * 20_000})
    assert_denied(decide(pdp, pki, token), "token_malformed")


def test_bound_token_replayed_with_another_certificate(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    # A stolen certificate-bound token presented by a different (also trusted) client.
    decision = pdp.decide(check_request(chain=pki.chain(pki.other), token=bound_token(issuer, pki.client)))
    assert_denied(decision, "binding_mismatch")


def test_stolen_unbound_bearer_token(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    token = issuer.mint(audience=AUDIENCE, scope="read write")
    assert_denied(decide(pdp, pki, token), "token_unbound")


# -- the introspection endpoint and DPoP under attack


def test_introspection_client_secret_brute_force() -> None:
    from pdp.adapters.introspection import ClientAuthError, IntrospectionClient, LockedOut, basic_client

    from pdp.service.brute_force import FailureLimiter, LockoutSettings
    from pdp.store import MemoryStore

    clients = {"rs": IntrospectionClient("rs", hashlib.sha256(b"right").hexdigest())}
    limiter = FailureLimiter(LockoutSettings(source_failures=5), MemoryStore())

    def attempt(secret: str) -> None:
        basic_client("Basic " + base64.b64encode(f"rs:{secret}".encode()).decode(), clients, limiter=limiter,
                     source="192.0.2.66")

    for i in range(5):
        with pytest.raises(ClientAuthError):
            attempt(f"guess-{i}")
    with pytest.raises(LockedOut):
        attempt("right")  # a right guess during the lock-out cannot be told from a wrong one


def test_introspection_of_a_token_expired_within_the_gateways_leeway(pdp: Pdp, pki: Pki,
                                                                     issuer: TokenIssuer) -> None:
    from pdp.adapters.introspection import IntrospectionClient, introspect

    expired = bound_token(issuer, pki.client, now=time.time() - 70, lifetime=60)
    assert decide(pdp, pki, expired).allowed  # tokens.leeway is for the gateway's clock skew
    assert introspect(pdp, expired, IntrospectionClient("rs", "0" * 64)) == {"active": False}


def test_introspection_of_a_token_for_another_resource_server(pdp: Pdp, pki: Pki, issuer: TokenIssuer) -> None:
    from pdp.adapters.introspection import IntrospectionClient, introspect

    client = IntrospectionClient("billing", "0" * 64, audiences=frozenset({"https://billing.test"}))
    assert introspect(pdp, bound_token(issuer, pki.client), client) == {"active": False}


def test_captured_dpop_proof_replayed_to_exhaust_the_owners_quota(make_pdp: Callable[..., Pdp], pki: Pki,
                                                                   issuer: TokenIssuer) -> None:
    from pdp.devpki import DpopKey

    pdp = make_pdp(extra="[dpop]\nmax_proofs_per_key = 3\n")
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)

    def present(proof: str) -> Decision:
        return pdp.decide(check_request(chain=pki.chain(), headers={"authorization": f"DPoP {token}", "dpop": proof}))

    captured = key.proof("GET", "https://api.test/orders", token)
    assert present(captured).allowed
    for _ in range(5):
        assert_denied(present(captured), "dpop_proof_invalid")
    assert present(key.proof("GET", "https://api.test/orders", token)).allowed  # the owner is not locked out


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def test_introspection_secret_oracle_through_a_full_lockout_store() -> None:
    """A store that cannot record a failure must not tell a right secret from a wrong one: both get 503
    (StoreUnavailable), where a wrong one used to get 503 and the right one 200."""
    from pdp.adapters.introspection import ClientAuthError, IntrospectionClient, basic_client

    from pdp.service.brute_force import FailureLimiter, LockoutSettings
    from pdp.store import MemoryStore, StoreUnavailable

    clients = {"rs": IntrospectionClient("rs", hashlib.sha256(b"right").hexdigest())}
    limiter = FailureLimiter(LockoutSettings(), MemoryStore(max_entries=100))
    for i in range(99):  # one failure from each of 99 sources fills the store (with the unknown-id counter)
        with pytest.raises(ClientAuthError):
            basic_client(_basic("nobody", "x"), clients, limiter=limiter, source=f"198.51.100.{i}")
    for secret in ("guess-1", "right"):
        with pytest.raises(StoreUnavailable):
            basic_client(_basic("rs", secret), clients, limiter=limiter, source="203.0.113.7")


def test_introspection_client_kept_locked_out_by_a_stranger() -> None:
    """A stranger spread over many addresses locks a client out; it must not then keep it locked with one
    failure per lock-out, nor lock it out where it authenticates from."""
    from pdp.adapters.introspection import ClientAuthError, IntrospectionClient, LockedOut, basic_client

    from pdp.service.brute_force import FailureLimiter, LockoutSettings
    from pdp.store import MemoryStore

    clients = {"rs": IntrospectionClient("rs", hashlib.sha256(b"right").hexdigest())}
    limiter = FailureLimiter(LockoutSettings(source_failures=10, client_failures=100, duration=0.3,
                                             max_duration=0.3), MemoryStore())
    home = "192.0.2.10"
    assert basic_client(_basic("rs", "right"), clients, limiter=limiter, source=home) is not None

    def stranger(times: int, first_source: int) -> None:
        for i in range(times):
            with pytest.raises(ClientAuthError):
                basic_client(_basic("rs", "wrong"), clients, limiter=limiter,
                             source=f"198.51.100.{first_source + i // 9}")  # 9 per address: under its limit

    stranger(100, 0)
    with pytest.raises(LockedOut):
        basic_client(_basic("rs", "right"), clients, limiter=limiter, source="203.0.113.1")  # a new address
    assert basic_client(_basic("rs", "right"), clients, limiter=limiter, source=home) is not None
    while limiter.locked_for("203.0.113.1", "rs") > 0:
        time.sleep(0.05)
    stranger(1, 100)  # one more failure after the lock-out used to start the next one
    assert basic_client(_basic("rs", "right"), clients, limiter=limiter, source="203.0.113.1") is not None


def test_dpop_replay_store_filled_by_many_keys_within_their_quotas(issuer: TokenIssuer) -> None:
    """Keys that each stay within max_proofs_per_key used to fill the replay store together, after which
    every fresh proof from everyone was store_unavailable."""
    from pdp.credentials.rfc9449 import DpopSettings, NonceIssuer, check_proof
    from pdp.devpki import DpopKey
    from pdp.errors import Denied
    from pdp.store import MemoryStore

    store, settings = MemoryStore(max_entries=60), DpopSettings(max_proofs_per_key=12, busy_proofs_per_key=3)
    nonces = NonceIssuer(settings.nonce_secret, settings.nonce_lifetime)

    def present(key: DpopKey, token: str) -> str:
        try:
            check_proof(key.proof("GET", "https://api.test/orders", token), method="GET",
                        uri="https://api.test/orders", access_token=token, token_jkt=key.jkt, now=time.time(),
                        settings=settings, store=store, nonces=nonces)
            return "allowed"
        except Denied as exc:
            return exc.reason.code

    for _ in range(5):  # the attacker: five keys, five tokens, twelve proofs each
        key = DpopKey.generate()
        token = issuer.mint(audience=AUDIENCE, dpop_key=key)
        for _ in range(12):
            present(key, token)
    for _ in range(3):
        victim = DpopKey.generate()
        assert present(victim, issuer.mint(audience=AUDIENCE, dpop_key=victim)) == "allowed"


@pytest.mark.parametrize("cnf", [{"x5t#S256": ""}, {"jkt": ""}, {"jkt": None}, {"x5t#S256": 7}, ""])
def test_empty_cnf_member_bound_for_decisions_but_unbound_for_introspection(pdp: Pdp, pki: Pki, issuer: TokenIssuer,
                                                                            cnf: Any) -> None:
    """An empty cnf member was 'bound' to a decision (binding_mismatch) and absent from an active
    introspection answer; the token is invalid for both."""
    from pdp.adapters.introspection import IntrospectionClient, introspect

    token = issuer.mint(audience=AUDIENCE, scope="read write", extra={"cnf": cnf})
    assert_denied(decide(pdp, pki, token), "token_claims_invalid")
    assert introspect(pdp, token, IntrospectionClient("rs", "0" * 64)) == {"active": False}
