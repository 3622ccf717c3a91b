"""Regression tests, one per way an attacker once got further than they should, named after the attack."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import AUDIENCE, bound_token, check_request
from servers import serve_pdp

from pdp.config import load_config
from pdp.devpki import DpopKey, TokenIssuer
from pdp.errors import ConfigError
from pdp.store import MemoryStore

ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'


@pytest.fixture
def allow_all(tmp_path):
    folder = tmp_path / "allow-all"
    folder.mkdir()
    (folder / "p.rego").write_text(ALLOW_ALL)
    return str(folder)


def test_client_supplied_pdp_identity_headers_never_reach_the_upstream(make_pdp, pki, issuer, allow_all):
    pdp = make_pdp(policy_paths=[allow_all], require_bound=False)
    # No token: pdp has no subject or client id to set, and the client's own must not pass either.
    for request in (check_request(path="/anything", headers={"x-pdp-subject": "admin-user"}),
                    check_request(chain=pki.chain(), headers={"x-pdp-client-id": "root"})):
        decision = pdp.decide(request)
        assert decision.allowed, decision.explanation()
        for name in ("x-pdp-spiffe-id", "x-pdp-subject", "x-pdp-client-id", "x-pdp-cert-thumbprint"):
            assert name in decision.headers or name in decision.headers_to_remove, name


def test_x_forwarded_for_cannot_make_a_local_caller_a_trusted_proxy(write_setup, pki, issuer):
    extra = '[gateway]\ntrusted_proxies = ["10.0.0.5/32"]\ncert_header = "xfcc"\n'
    xfcc = (f"Hash={hashlib.sha256(pki.admin.der).hexdigest()};"
            f'Cert="{urllib.parse.quote(pki.admin.pem.decode(), safe="")}"')
    with serve_pdp(load_config(write_setup(extra=extra))) as (url, _):
        r = httpx.get(f"{url}/ext_authz/admin/users", headers={
            "x-forwarded-for": "10.0.0.5", "x-forwarded-client-cert": xfcc,
            "authorization": f"Bearer {bound_token(issuer, pki.admin, scope='read admin')}"})
    assert r.status_code == 401 and r.json()["reason"] == "binding_cert_missing"


@pytest.mark.parametrize("path", ["/admin;/users", "/public/..;/admin/users", "/admin%3B/users",
                                  "/public/#/../admin", "/admin;jsessionid=1"])
def test_path_parameters_and_fragments_cannot_escape_prefix_rules(make_pdp, pki, issuer, path):
    decision = make_pdp().decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client),
                                               path=path))
    assert (decision.allowed, decision.reason) == (False, "request_invalid")


@pytest.mark.parametrize("path", ["/admin", "/admin?x=1", "/admin/users"])
def test_the_admin_route_covers_its_path_without_a_trailing_slash(make_pdp, pki, issuer, path):
    decision = make_pdp().decide(check_request(chain=pki.chain(), path=path,
                                               token=bound_token(issuer, pki.client, scope="read admin")))
    assert (decision.allowed, decision.reason) == (False, "spiffe_id_denied")


def test_a_non_ascii_subject_is_carried_percent_encoded_not_a_500(write_setup, pki, issuer):
    token = bound_token(issuer, pki.client, subject="Łukasz")
    xfcc = f'Cert="{urllib.parse.quote(pki.chain_pem(), safe="")}"'
    extra = '[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "xfcc"\n'
    with serve_pdp(load_config(write_setup(extra=extra))) as (url, _):
        r = httpx.get(f"{url}/ext_authz/orders", headers={"authorization": f"Bearer {token}",
                                                          "x-forwarded-client-cert": xfcc})
    assert r.status_code == 200, r.text
    assert r.headers["x-pdp-subject"] == "%C5%81ukasz"


def test_deeply_nested_json_is_a_400_not_a_500(write_setup):
    with serve_pdp(load_config(write_setup())) as (url, _):
        r = httpx.post(f"{url}/v1/check", content=b"[" * 100_000)
    assert r.status_code == 400 and r.json()["reason"] == "request_invalid"


def test_an_overlong_dpop_jti_is_refused_before_it_reaches_the_replay_store(make_pdp, pki, issuer):
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    proof = key.proof("GET", "https://api.test/orders", token, jti="j" * 11_000)
    decision = make_pdp().decide(check_request(chain=pki.chain(),
                                               headers={"authorization": f"DPoP {token}", "dpop": proof}))
    assert (decision.allowed, decision.reason) == (False, "dpop_proof_invalid")


def test_the_memory_replay_store_forgets_expired_entries_as_time_passes():
    store = MemoryStore(max_entries=3)
    for i in range(3):
        assert store.remember(f"k{i}", 0.05)
    time.sleep(0.06)
    assert store.remember("fresh", 60)  # the expired three made room
    assert not store.remember("fresh", 60)


@pytest.mark.parametrize("header", ["Bearer\teyJhbGciOiJub25lIn0.e30.", " Bearer  x y", "bearer\t"])
def test_a_bearer_credential_with_odd_whitespace_is_malformed_not_ignored(make_pdp, pki, header):
    decision = make_pdp().decide(check_request(chain=pki.chain(), headers={"authorization": header}))
    assert (decision.allowed, decision.reason) == (False, "token_malformed")


def test_an_unverified_credential_is_stripped_on_a_public_path(make_pdp):
    decision = make_pdp().decide(check_request(path="/healthz", headers={"authorization": "Basic YWRtaW4="}))
    assert decision.allowed and "authorization" in decision.headers_to_remove


def test_only_one_issuer_may_use_introspection(write_setup):
    opaque = ('\n[[tokens.issuers]]\nissuer = "https://as{n}.test"\naudiences = ["a"]\n'
              'introspection_endpoint = "https://as{n}.test/introspect"\nintrospection_client_id = "pdp"\n'
              'introspection_client_secret = "s"\n')
    with pytest.raises(ConfigError) as err:
        load_config(write_setup(extra=opaque.format(n=1) + opaque.format(n=2)))
    assert err.value.key.endswith(".introspection_endpoint")


def test_a_dpop_iat_beyond_the_float_range_is_invalid_not_an_internal_error(make_pdp, pki, issuer):
    import jwt

    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    body = json.loads(jwt.api_jws.PyJWS()._load(key.proof("GET", "https://api.test/orders", token))[0])
    body["iat"] = 10**400
    proof = jwt.api_jws.PyJWS().encode(json.dumps(body).encode(), key.key, algorithm="ES256",
                                       headers={"typ": "dpop+jwt", "jwk": key.public_jwk})
    decision = make_pdp().decide(check_request(chain=pki.chain(),
                                               headers={"authorization": f"DPoP {token}", "dpop": proof}))
    assert (decision.allowed, decision.reason) == (False, "dpop_proof_invalid")


def test_tokens_of_another_issuer_with_a_colliding_kid_stay_refused(make_pdp, pki):
    rogue = TokenIssuer.generate("https://issuer.test", kid="k1")  # same iss and kid, another key
    decision = make_pdp().decide(check_request(chain=pki.chain(), token=bound_token(rogue, pki.client)))
    assert (decision.allowed, decision.reason) == (False, "token_signature_invalid")


# -- found by a second review

def test_a_host_that_smuggles_a_path_cannot_satisfy_a_dpop_proof_for_another_uri(make_pdp, pki, issuer):
    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    proof = key.proof("GET", "https://api.test/orders", token)
    for host in ("api.test/orders?", "api.test/orders#", "api.test:443/orders", "api test", "a@b"):
        request = check_request(chain=pki.chain(), path="/accounts/7",
                                headers={"authorization": f"DPoP {token}", "dpop": proof})
        request = type(request)(**{**{f: getattr(request, f) for f in request.__slots__}, "host": host})
        decision = make_pdp().decide(request)
        assert (decision.allowed, decision.reason) == (False, "request_invalid"), host


def test_delta_and_partitioned_crls_are_refused_at_load(tmp_path, pki):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from pdp.certificates.trust import load_bundle
    from pdp.errors import LoadError

    now = datetime.now(UTC)
    for ext in (x509.DeltaCRLIndicator(1), x509.IssuingDistributionPoint(
            full_name=None, relative_name=None, only_contains_user_certs=False, only_contains_ca_certs=True,
            only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False)):
        crl = (x509.CertificateRevocationListBuilder().issuer_name(pki.root.cert.subject).last_update(now)
               .next_update(now + timedelta(days=1)).add_extension(ext, critical=True)
               .sign(pki.root.key, hashes.SHA256()))
        (tmp_path / "x.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "root.pem").write_bytes(pki.root.pem)
        with pytest.raises(LoadError, match="delta and partitioned"):
            load_bundle(tmp_path / "root.pem", "b", None, "k", crls=[tmp_path / "x.crl"], crls_key="crls")


def test_a_partner_domain_ca_cannot_log_in_to_introspection_by_dns_name(pki):
    from pdp.adapters.introspection import ClientAuthError, IntrospectionClient, certificate_client

    from pdp.certificates.trust import ChainVerifier, TrustBundle
    from pdp.devpki import make_ca, make_client

    partner = make_ca("partner CA")
    cert = make_client(partner, spiffe_id="spiffe://partner.org/x", dns=("billing.example.org",))
    identity = ChainVerifier([TrustBundle("partner", (partner.cert,), trust_domain="partner.org")]).verify(
        (cert.der,), time.time())
    clients = {"billing": IntrospectionClient("billing", tls_client_auth=("tls_client_auth_san_dns",
                                                                         "billing.example.org"))}
    with pytest.raises(ClientAuthError):
        certificate_client(identity, clients, pinned=True)
    assert certificate_client(identity, clients, pinned=False).client_id == "billing"


def test_crlf_in_a_verified_subject_cannot_split_an_upstream_header(make_pdp, pki, issuer):
    token = bound_token(issuer, pki.client, subject="alice\r\nx-pdp-spiffe-id: spiffe://example.org/admin/ops")
    decision = make_pdp().decide(check_request(chain=pki.chain(), token=token))
    assert decision.allowed
    assert "\r" not in decision.headers["x-pdp-subject"] and "\n" not in decision.headers["x-pdp-subject"]
    assert decision.headers["x-pdp-spiffe-id"] == "spiffe://example.org/demo/client"


def test_one_dpop_key_cannot_fill_the_replay_store_for_everyone(make_pdp, pki, issuer):
    pdp = make_pdp(extra="[dpop]\nmax_proofs_per_key = 2\n")
    flooder, other = DpopKey.generate(), DpopKey.generate()

    def ask(key):
        token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
        return pdp.decide(check_request(chain=pki.chain(), headers={
            "authorization": f"DPoP {token}", "dpop": key.proof("GET", "https://api.test/orders", token)}))

    assert ask(flooder).allowed and ask(flooder).allowed
    assert ask(flooder).reason == "dpop_proof_invalid"
    assert ask(other).allowed


def test_allowlisted_spiffe_ids_compare_exactly(pki):
    from pdp.devpki import make_client
    from pdp.service.listener_tls import caller_allowed

    upper = make_client(pki.intermediate, spiffe_id="spiffe://example.org/GATEWAY")
    assert not caller_allowed(("spiffe://example.org/gateway",), upper.der)
    dns = make_client(pki.intermediate, spiffe_id=None, dns=("Nginx.Example.org",))
    assert caller_allowed(("dns:nginx.example.org",), dns.der)


def test_a_unicode_digit_in_a_nonce_is_just_an_invalid_nonce():
    from pdp.credentials.rfc9449 import NonceIssuer

    assert NonceIssuer(b"k" * 32, 300).valid("\u00b2.x", time.time()) is False


def test_an_introspection_answer_without_aud_is_refused():
    from pdp.credentials.opaque import OpaqueIssuer, OpaqueVerifier
    from pdp.errors import Denied

    answer = {"active": True, "exp": time.time() + 60, "iss": "https://as.test", "scope": "read"}
    verifier = OpaqueVerifier([OpaqueIssuer("https://as.test", frozenset({AUDIENCE}), lambda token: answer)])
    with pytest.raises(Denied) as err:
        verifier.verify("opaque", b"d", time.time(), True)
    assert err.value.reason.code == "token_claims_invalid"


def test_a_flood_of_random_opaque_tokens_cannot_tie_up_every_worker():
    import threading

    from pdp.credentials.opaque import OpaqueIssuer, OpaqueVerifier
    from pdp.errors import Denied

    entered, release = threading.Event(), threading.Event()

    def slow(token):
        entered.set()
        release.wait(10)
        return {"active": False}

    verifier = OpaqueVerifier([OpaqueIssuer("https://as.test", frozenset({AUDIENCE}), slow)],
                              max_concurrent_calls=1)
    def ask_first() -> None:
        with pytest.raises(Denied):
            verifier.verify("t1", b"1", time.time(), True)

    first = threading.Thread(target=ask_first)
    first.start()
    assert entered.wait(10)
    with pytest.raises(Denied) as err:
        verifier.verify("t2", b"2", time.time(), True)
    assert err.value.reason.code == "introspection_unavailable"
    release.set()
    first.join(10)
