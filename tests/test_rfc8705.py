"""RFC 8705 certificate-bound access tokens: the thumbprint, the binding check and the pipeline."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from conftest import AUDIENCE, bound_token, check_request

from pdp import reasons
from pdp.credentials.rfc8705 import BINDING_METHOD, check_binding, thumbprint
from pdp.errors import Denied

ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'


def sha256_b64url(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode("ascii").rstrip("=")


# -- thumbprint

def test_thumbprint_of_the_empty_string_known_answer():
    # SHA-256("") = e3b0c442 98fc1c14 9afbf4c8 996fb924 27ae41e4 649b934c a495991b 7852b855
    assert thumbprint(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_thumbprint_matches_an_independent_computation(pki):
    for issued in (pki.client, pki.other, pki.admin, pki.intermediate, pki.root):
        assert thumbprint(issued.der) == sha256_b64url(issued.der)


def test_thumbprint_follows_the_rfc8705_definition(pki):
    # §3.1: base64url-encoded [RFC4648] SHA-256 hash of the DER encoding of the certificate,
    # without padding (RFC 7515 §2 base64url): 32 bytes -> 43 characters from the URL-safe alphabet.
    tp = thumbprint(pki.client.der)
    assert len(tp) == 43
    assert set(tp) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert base64.urlsafe_b64decode(tp + "=") == hashlib.sha256(pki.client.der).digest()
    assert BINDING_METHOD == "x5t#S256"


def test_thumbprint_is_over_der_not_pem(pki):
    assert thumbprint(pki.client.der) != thumbprint(pki.client.pem)


def test_thumbprints_of_distinct_certificates_differ(pki):
    assert len({thumbprint(i.der) for i in (pki.client, pki.other, pki.admin)}) == 3


@pytest.mark.parametrize("data", [b"\x00", b"a" * 1000, bytes(range(256))])
def test_thumbprint_of_arbitrary_bytes(data):
    assert thumbprint(data) == sha256_b64url(data)


# -- check_binding

def test_check_binding_matching_thumbprint_passes(pki):
    assert check_binding(pki.client.thumbprint, thumbprint(pki.client.der)) is None


def test_check_binding_other_thumbprint_is_a_mismatch(pki):
    with pytest.raises(Denied) as err:
        check_binding(pki.client.thumbprint, pki.other.thumbprint)
    assert err.value.reason is reasons.BINDING_MISMATCH


@pytest.mark.parametrize("token_x5t", [
    "",
    "x",
    "PADDED=",
    "thumbprint-with-non-ascii-é",
])
def test_check_binding_odd_token_values_are_a_mismatch(pki, token_x5t):
    with pytest.raises(Denied) as err:
        check_binding(token_x5t, pki.client.thumbprint)
    assert err.value.reason is reasons.BINDING_MISMATCH


def test_check_binding_is_exact(pki):
    tp = pki.client.thumbprint
    for variant in (tp + "=", tp[:-1], tp.upper() if tp != tp.upper() else tp.lower(), " " + tp,
                    base64.b64encode(hashlib.sha256(pki.client.der).digest()).decode()):
        with pytest.raises(Denied) as err:
            check_binding(variant, tp)
        assert err.value.reason is reasons.BINDING_MISMATCH, variant


def test_check_binding_without_certificate(pki):
    with pytest.raises(Denied) as err:
        check_binding(pki.client.thumbprint, None)
    assert err.value.reason is reasons.BINDING_CERT_MISSING


# -- through the full pipeline

def _challenge(decision) -> str:
    return decision.response_headers["www-authenticate"]


def test_pipeline_bound_token_on_its_certificate_is_allowed(make_pdp, pki, issuer):
    decision = make_pdp().decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert decision.allowed, decision.explanation()
    assert decision.headers["x-pdp-cert-thumbprint"] == sha256_b64url(pki.client.der)


def test_pipeline_token_bound_to_another_certificate(make_pdp, pki, issuer):
    pdp = make_pdp()
    decision = pdp.decide(check_request(chain=pki.chain(pki.other), token=bound_token(issuer, pki.client)))
    assert not decision.allowed
    assert decision.reason == "binding_mismatch"
    assert decision.status == 401
    assert decision.reason_info is reasons.BINDING_MISMATCH
    assert 'error="invalid_token"' in _challenge(decision)
    assert _challenge(decision).startswith("Bearer ")
    assert next(s.name for s in decision.steps if not s.ok) == "binding"


def test_pipeline_bound_token_without_certificate(make_pdp, pki, issuer):
    decision = make_pdp().decide(check_request(token=bound_token(issuer, pki.client)))
    assert not decision.allowed
    assert decision.reason == "binding_cert_missing"
    assert decision.status == 401
    assert 'error="invalid_token"' in _challenge(decision)


def test_pipeline_unbound_token_when_bound_tokens_are_required(make_pdp, pki, issuer):
    token = issuer.mint(audience=AUDIENCE, scope="read write")
    decision = make_pdp(require_bound=True).decide(check_request(chain=pki.chain(), token=token))
    assert not decision.allowed
    assert decision.reason == "token_unbound"
    assert decision.status == 401
    assert decision.reason_info is reasons.TOKEN_UNBOUND  # the core refused it, not the policy
    assert 'error="invalid_token"' in _challenge(decision)


@pytest.fixture
def allow_all_policy(tmp_path: Path) -> str:
    folder = tmp_path / "allow_all_policy"
    folder.mkdir()
    (folder / "allow.rego").write_text(ALLOW_ALL)
    return str(folder)


def test_core_switch_require_bound_false_accepts_unbound_tokens(make_pdp, pki, issuer, allow_all_policy):
    token = issuer.mint(audience=AUDIENCE, scope="read write")
    decision = make_pdp(require_bound=False, policy_paths=[allow_all_policy]).decide(
        check_request(chain=pki.chain(), token=token))
    assert decision.allowed, decision.explanation()
    assert decision.reason != "token_unbound"
    binding = [s for s in decision.steps if s.name == "binding"]
    assert binding and binding[0].ok


def test_core_switch_require_bound_true_with_the_same_policy(make_pdp, pki, issuer, allow_all_policy):
    # Control for the test above: the same allow-everything policy, only the core switch differs.
    token = issuer.mint(audience=AUDIENCE, scope="read write")
    decision = make_pdp(require_bound=True, policy_paths=[allow_all_policy]).decide(
        check_request(chain=pki.chain(), token=token))
    assert not decision.allowed
    assert decision.reason == "token_unbound"
    assert decision.status == 401


def test_require_bound_false_still_enforces_a_present_binding(make_pdp, pki, issuer, allow_all_policy):
    # Not requiring bound tokens never lets a token bound to someone else through.
    pdp = make_pdp(require_bound=False, policy_paths=[allow_all_policy])
    token = bound_token(issuer, pki.client)
    mismatch = pdp.decide(check_request(chain=pki.chain(pki.other), token=token))
    assert (mismatch.allowed, mismatch.reason, mismatch.status) == (False, "binding_mismatch", 401)
    missing = pdp.decide(check_request(token=token))
    assert (missing.allowed, missing.reason, missing.status) == (False, "binding_cert_missing", 401)
    ok = pdp.decide(check_request(chain=pki.chain(), token=token))
    assert ok.allowed, ok.explanation()
