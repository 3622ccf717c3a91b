"""RFC 9449 DPoP at the resource server: each rejection rule has its own test, named after it.

Also the RFCs' own examples: the RFC 7638 §3.1 RSA key's thumbprint, and RFC 9449's first proof
(Figure 2, the token request of 2019), which verifies with its embedded P-256 key.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt
import pytest
from conftest import AUDIENCE, check_request
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pdp import reasons
from pdp.credentials.jose import b64url_encode
from pdp.credentials.rfc7638 import jwk_thumbprint
from pdp.credentials.rfc9449 import (
    DpopSettings,
    NonceIssuer,
    access_token_hash,
    check_proof,
    normalise_uri,
    read_proof,
    request_uri,
)
from pdp.devpki import DpopKey
from pdp.errors import Denied
from pdp.store import MemoryStore

URL = "https://api.test/orders"

# -- the RFCs' own examples

RFC7638_N = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCi"
             "FV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0z"
             "gdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kE"
             "gU8awapJzKnqDKgw")

RFC9449_FIGURE_2 = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQy"
    "VVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiI"
    "tQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ"
    ".2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg")


def test_rfc7638_example_rsa_key_thumbprint():
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc9449_first_example_proof_verifies_with_its_embedded_key():
    proof = read_proof(RFC9449_FIGURE_2, DpopSettings())
    assert proof.jkt == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert proof.claims == {"jti": "-BwC3ESc6acc2lTc", "htm": "POST", "htu": "https://server.example.com/token",
                            "iat": 1562262616}


def test_rfc9449_example_proof_with_a_flipped_signature_bit_is_refused():
    head, body, sig = RFC9449_FIGURE_2.split(".")
    forged = f"{head}.{body}.{'3' if sig[0] != '3' else '4'}{sig[1:]}"
    with pytest.raises(Denied) as err:
        read_proof(forged, DpopSettings())
    assert err.value.reason is reasons.DPOP_PROOF_INVALID


# -- one test per rule of §4.3 (and §7.1, §11.1)

TOKEN = "an-access-token"


@pytest.fixture
def key() -> DpopKey:
    return DpopKey.generate()


def check(proof: str | None, key: DpopKey, *, method: str = "GET", uri: str = URL, token: str = TOKEN,
          jkt: str | None = "same", settings: DpopSettings | None = None, store: MemoryStore | None = None,
          now: float | None = None) -> Any:
    settings = settings or DpopSettings()
    return check_proof(proof, method=method, uri=uri, access_token=token,
                       token_jkt=key.jkt if jkt == "same" else jkt, now=now or time.time(), settings=settings,
                       store=store or MemoryStore(), nonces=NonceIssuer(settings.nonce_secret, settings.nonce_lifetime))


def refused(reason: reasons.Reason, proof: str | None, key: DpopKey, **kw: Any) -> None:
    with pytest.raises(Denied) as err:
        check(proof, key, **kw)
    assert err.value.reason is reason, err.value


def test_a_valid_proof_passes(key):
    assert check(key.proof("GET", URL, TOKEN), key).jkt == key.jkt


def test_rule_1_a_missing_dpop_header_is_refused(key):
    refused(reasons.DPOP_PROOF_INVALID, None, key)


def test_rule_1_two_dpop_headers_are_refused(key):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", URL, TOKEN) + "," + key.proof("GET", URL, TOKEN), key)


@pytest.mark.parametrize("value", ["not-a-jwt", "a.b", "a.b.c.d.e", "eyJ.eyJ.sig"])
def test_rule_2_a_malformed_jwt_is_refused(key, value):
    refused(reasons.DPOP_PROOF_INVALID, value, key)


@pytest.mark.parametrize("claim", ["jti", "htm", "htu", "iat", "ath"])
def test_rule_3_each_required_claim_must_be_present(key, claim):
    proof = key.proof("GET", URL, TOKEN)
    body = jwt.decode(proof, options={"verify_signature": False})
    del body[claim]
    refused(reasons.DPOP_PROOF_INVALID, _sign(key, body), key)


def _sign(key: DpopKey, body: dict[str, Any], header: dict[str, Any] | None = None, signer: Any = None,
          alg: str = "ES256") -> str:
    return jwt.encode(body, signer or key.key, algorithm=alg,
                      headers={"typ": "dpop+jwt", "jwk": key.public_jwk, **(header or {})})


def test_rule_4_typ_must_be_dpop_jwt(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    refused(reasons.DPOP_PROOF_INVALID, _sign(key, body, {"typ": "JWT"}), key)


def test_rule_5_alg_none_is_refused(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    header = b64url_encode(b'{"typ":"dpop+jwt","alg":"none","jwk":' +
                           __import__("json").dumps(key.public_jwk).encode() + b"}")
    payload = b64url_encode(__import__("json").dumps(body).encode())
    refused(reasons.DPOP_PROOF_INVALID, f"{header}.{payload}.", key)


def test_rule_5_a_symmetric_alg_is_refused(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    refused(reasons.DPOP_PROOF_INVALID, _sign(key, body, signer="a-shared-secret-of-enough-length-123",
                                              alg="HS256"), key)


def test_rule_5_an_alg_outside_the_allowlist_is_refused(key):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", URL, TOKEN), key,
            settings=DpopSettings(algorithms=frozenset({"PS256"})))


def test_rule_6_a_signature_by_another_key_is_refused(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    refused(reasons.DPOP_PROOF_INVALID, _sign(key, body, signer=ec.generate_private_key(ec.SECP256R1())), key)


def test_rule_7_a_jwk_with_private_members_is_refused(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    private = dict(key.public_jwk, d=b64url_encode(key.key.private_numbers().private_value.to_bytes(32, "big")))
    refused(reasons.DPOP_PROOF_INVALID, _sign(key, body, {"jwk": private}), key)


def test_rule_7_a_header_without_jwk_is_refused(key):
    body = jwt.decode(key.proof("GET", URL, TOKEN), options={"verify_signature": False})
    proof = jwt.encode(body, key.key, algorithm="ES256", headers={"typ": "dpop+jwt"})
    refused(reasons.DPOP_PROOF_INVALID, proof, key)


def test_rule_8_htm_must_be_the_request_method(key):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("POST", URL, TOKEN), key, method="GET")


@pytest.mark.parametrize("htu", ["https://api.test/other", "https://evil.test/orders", "http://api.test/orders"])
def test_rule_9_htu_must_be_the_request_uri(key, htu):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", htu, TOKEN), key)


@pytest.mark.parametrize("htu", ["https://API.test/orders", "https://api.test:443/orders", "HTTPS://api.test/orders",
                                 "https://api.test/orders?x=1", "https://api.test/orders#frag"])
def test_rule_9_htu_is_compared_normalised_without_query_or_fragment(key, htu):
    assert check(key.proof("GET", htu, TOKEN), key, uri="https://api.test/orders?page=2")


@pytest.mark.parametrize("htu", ["https://api.test:99999/orders", "https://api.test:abc/orders",
                                 "https://api.test:+443/orders", "https://[::1/orders"])
def test_rule_9_an_htu_with_an_invalid_port_or_host_is_refused_not_read_as_another(key, htu):
    """Dropping a port that is not one would make ``https://api.test:99999/`` name ``https://api.test/``."""
    with pytest.raises(ValueError):
        normalise_uri(htu)
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", htu, TOKEN), key)


def test_rule_9_a_request_uri_with_an_invalid_port_refuses_the_proof(key):
    uri = request_uri("https", "api.test:99999", "/orders")
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", URL, TOKEN), key, uri=uri)
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", uri, TOKEN), key, uri=uri)


def test_rule_10_a_required_nonce_must_be_present_and_current(key):
    settings = DpopSettings(require_nonce=True)
    nonces = NonceIssuer(settings.nonce_secret, settings.nonce_lifetime)
    refused(reasons.DPOP_NONCE_REQUIRED, key.proof("GET", URL, TOKEN), key, settings=settings)
    refused(reasons.DPOP_NONCE_REQUIRED, key.proof("GET", URL, TOKEN, nonce="12.forged"), key, settings=settings)
    stale = nonces.issue(time.time() - 3 * settings.nonce_lifetime)
    refused(reasons.DPOP_NONCE_REQUIRED, key.proof("GET", URL, TOKEN, nonce=stale), key, settings=settings)
    assert check(key.proof("GET", URL, TOKEN, nonce=nonces.issue(time.time())), key, settings=settings)


@pytest.mark.parametrize("offset", [-3600, -61, 61, 3600])
def test_rule_11_iat_must_be_within_the_window(key, offset):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", URL, TOKEN, iat=time.time() + offset), key)


def test_rule_12_ath_must_be_the_hash_of_the_presented_token(key):
    refused(reasons.DPOP_PROOF_INVALID, key.proof("GET", URL, "another-token"), key)


def test_rule_12_the_key_must_be_the_one_the_token_is_bound_to(key):
    refused(reasons.DPOP_KEY_MISMATCH, key.proof("GET", URL, TOKEN), key, jkt=DpopKey.generate().jkt)
    assert reasons.DPOP_KEY_MISMATCH.code == reasons.BINDING_MISMATCH.code == "binding_mismatch"


def test_rule_12_a_token_presented_with_dpop_must_be_dpop_bound(key):
    refused(reasons.TOKEN_UNBOUND, key.proof("GET", URL, TOKEN), key, jkt=None)


def test_replayed_jti_is_refused(key):
    store = MemoryStore()
    proof = key.proof("GET", URL, TOKEN)
    check(proof, key, store=store)
    refused(reasons.DPOP_PROOF_INVALID, proof, key, store=store)


def test_ath_is_the_base64url_sha256_of_the_token():
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"  # RFC 9449 Figure 12 / 13


def test_request_uri_is_rebuilt_from_what_a_gateway_reports():
    assert request_uri("https", "API.test:443", "/orders?x=1") == "https://api.test/orders"
    assert normalise_uri("http://h:8080/a") == "http://h:8080/a"
    assert request_uri("", "h", "/") == "https://h/"


def test_rsa_and_p384_proof_keys_are_accepted():
    for private in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        from jwt.algorithms import ECAlgorithm, RSAAlgorithm

        algo = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
        jwk = algo.to_jwk(private.public_key(), as_dict=True)
        alg = "PS256" if isinstance(private, rsa.RSAPrivateKey) else "ES384"
        body = {"jti": "j", "htm": "GET", "htu": URL, "iat": int(time.time()), "ath": access_token_hash(TOKEN)}
        proof = jwt.encode(body, private, algorithm=alg, headers={"typ": "dpop+jwt", "jwk": jwk})
        assert read_proof(proof, DpopSettings()).jkt == jwk_thumbprint(jwk)


# -- through the pipeline: Authorization: DPoP, the downgrade, the challenge

def _dpop_request(token: str, proof: str | None, pki, *, scheme: str = "DPoP", path: str = "/orders"):
    headers = {"authorization": f"{scheme} {token}"}
    if proof is not None:
        headers["dpop"] = proof
    return check_request(chain=pki.chain(), headers=headers, path=path)


def test_pipeline_allows_a_dpop_bound_token_with_its_proof(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    decision = pdp.decide(_dpop_request(token, key.proof("GET", URL, token), pki))
    assert decision.allowed, decision.explanation()
    assert any("RFC 9449" in s.detail for s in decision.steps)


def test_pipeline_refuses_a_dpop_bound_token_presented_as_bearer(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    decision = pdp.decide(_dpop_request(token, None, pki, scheme="Bearer"))
    assert (decision.allowed, decision.reason, decision.status) == (False, "binding_dpop_required", 401)
    assert decision.response_headers["www-authenticate"].startswith("DPoP ")


def test_pipeline_challenge_names_the_error_and_the_algs(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    decision = pdp.decide(_dpop_request(token, key.proof("POST", URL, token), pki))
    challenge = decision.response_headers["www-authenticate"]
    assert decision.reason == "dpop_proof_invalid"
    assert challenge.startswith("DPoP ") and 'error="invalid_dpop_proof"' in challenge and 'algs="' in challenge


def test_pipeline_invalid_token_on_a_dpop_request_uses_the_dpop_scheme(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience="someone-else", scope="read", dpop_key=key)
    decision = pdp.decide(_dpop_request(token, key.proof("GET", URL, token), pki))
    assert decision.reason == "token_audience_invalid"
    assert decision.response_headers["www-authenticate"].startswith('DPoP realm="pdp", error="invalid_token"')


def test_pipeline_asks_for_a_nonce_and_accepts_it(make_pdp, pki, issuer, key):
    pdp = make_pdp(extra='[dpop]\nrequire_nonce = true\nnonce_secret = "0123456789abcdef0123456789abcdef"\n')
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    first = pdp.decide(_dpop_request(token, key.proof("GET", URL, token), pki))
    assert (first.reason, first.status) == ("dpop_nonce_required", 401)
    assert 'error="use_dpop_nonce"' in first.response_headers["www-authenticate"]
    nonce = first.response_headers["dpop-nonce"]
    second = pdp.decide(_dpop_request(token, key.proof("GET", URL, token, nonce=nonce), pki))
    assert second.allowed, second.explanation()


def test_pipeline_refuses_a_replayed_proof(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    proof = key.proof("GET", URL, token)
    assert pdp.decide(_dpop_request(token, proof, pki)).allowed
    again = pdp.decide(_dpop_request(token, proof, pki))
    assert (again.allowed, again.reason) == (False, "dpop_proof_invalid")


def test_replayed_proofs_do_not_count_against_the_owners_quota(key):
    """One captured proof, replayed, must not exhaust its key's max_proofs_per_key and lock the owner out."""
    store, settings = MemoryStore(), DpopSettings(max_proofs_per_key=3)
    captured = key.proof("GET", URL, TOKEN)
    assert check(captured, key, store=store, settings=settings)
    for _ in range(50):
        refused(reasons.DPOP_PROOF_INVALID, captured, key, store=store, settings=settings)
    assert check(key.proof("GET", URL, TOKEN), key, store=store, settings=settings)
    assert check(key.proof("GET", URL, TOKEN), key, store=store, settings=settings)


def test_a_proof_is_remembered_two_windows_and_a_margin_for_the_replicas_clocks(key):
    """A replica whose clock is behind accepts a proof until its iat leaves that replica's window: the
    record of the proof must outlast 2 x iat_window by the clocks' difference."""
    store, settings = MemoryStore(), DpopSettings(iat_window=60, replay_margin=5)
    assert settings.replay_ttl == 125
    proof = key.proof("GET", URL, TOKEN)
    check(proof, key, store=store, settings=settings)
    jti = jwt.decode(proof, options={"verify_signature": False})["jti"]
    replay_key = "dpop:jti:" + hashlib.sha256(f"{key.jkt}\0{jti}".encode()).hexdigest()
    assert 120 < store.ttl(replay_key) <= 125


def test_fresh_proofs_beyond_the_quota_are_refused(key):
    store, settings = MemoryStore(), DpopSettings(max_proofs_per_key=3)
    for _ in range(3):
        assert check(key.proof("GET", URL, TOKEN), key, store=store, settings=settings)
    with pytest.raises(Denied) as err:
        check(key.proof("GET", URL, TOKEN), key, store=store, settings=settings)
    assert err.value.reason is reasons.DPOP_PROOF_INVALID and "too many" in err.value.detail


def test_pipeline_dpop_key_mismatch_does_not_speak_of_a_certificate(make_pdp, pki, issuer, key):
    pdp = make_pdp()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=DpopKey.generate())
    decision = pdp.decide(_dpop_request(token, key.proof("GET", URL, token), pki))
    challenge = decision.response_headers["www-authenticate"]
    assert (decision.reason, decision.status) == ("binding_mismatch", 401)
    assert challenge.startswith("DPoP ") and "DPoP key" in challenge and "certificate" not in challenge
    assert "certificate" in reasons.by_code("binding_mismatch").description  # RFC 8705's keeps its words


def test_a_half_full_replay_store_takes_more_only_from_keys_with_few_proofs():
    """Many keys, each within its quota, together fill the replay store; from half full on, a key that has
    presented more than busy_proofs_per_key proofs waits, and the other half stays for the others."""
    store = MemoryStore(max_entries=40)
    settings = DpopSettings(max_proofs_per_key=12, busy_proofs_per_key=2)
    heavy = [DpopKey.generate() for _ in range(4)]
    answers = []
    for k in heavy:
        for _ in range(12):
            try:
                check(k.proof("GET", URL, TOKEN), k, store=store, settings=settings)
                answers.append("allowed")
            except Denied as exc:
                answers.append(exc.reason.code)
    assert "store_unavailable" in answers and store.load() < 1  # the heavy keys were stopped short of full
    for _ in range(4):  # keys that present few proofs still get in
        light = DpopKey.generate()
        assert check(light.proof("GET", URL, TOKEN), light, store=store, settings=settings)
        assert check(light.proof("GET", URL, TOKEN), light, store=store, settings=settings)
        with pytest.raises(Denied) as err:
            check(light.proof("GET", URL, TOKEN), light, store=store, settings=settings)
        assert err.value.reason is reasons.STORE_UNAVAILABLE


def test_busy_proofs_per_key_and_replay_margin_are_configured_in_dpop(write_setup):
    from pdp.config import load_config
    from pdp.errors import ConfigError

    config = load_config(write_setup(extra="[dpop]\nbusy_proofs_per_key = 30\nreplay_margin = 2\n"))
    assert (config.dpop.busy_proofs_per_key, config.dpop.replay_margin) == (30, 2.0)
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra="[dpop]\nbusy_proofs_per_key = 0\n"))
    assert err.value.key == "dpop.busy_proofs_per_key"


# -- found by fuzz/fuzz_dpop.py


@pytest.mark.parametrize("member", ["x", "y"])
def test_one_dpop_key_has_one_thumbprint_whatever_its_jwk_spelling(key, member):
    # pyjwt decodes a JWK's members leniently (characters outside base64url are skipped), while the
    # RFC 7638 thumbprint hashes the member as written: '!!!!' inside 'x' would give the same key a
    # second cnf.jkt. Either the spelling is refused or the thumbprint is the key's own.
    jwk = dict(key.public_jwk)
    jwk[member] = jwk[member][:8] + "!!!!" + jwk[member][8:]
    proof = key.proof("GET", URL, TOKEN, headers={"jwk": jwk})
    try:
        verified = read_proof(proof, DpopSettings())
    except Denied:
        return
    assert verified.jkt == key.jkt
