"""RFC 6750 §3: a policy's ``scope`` reaches the challenge of its deny (``error="insufficient_scope",
scope="write"``), as RFC 6749 §3.3 scope-tokens and nothing else, on every engine and scheme."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import bound_token, check_request
from pdp.policies import DEFAULT_POLICY_DIR

from pdp.credentials.rfc6750 import scope_tokens
from pdp.devpki import DpopKey
from pdp.policy.engine import load_bundle
from pdp.policy.result import PolicyResultError, read_outcome
from pdp.policy.testing import run_tests


def test_scope_tokens_keeps_rfc6749_words_once_in_order() -> None:
    assert scope_tokens("write read  write") == ("write", "read")
    assert scope_tokens(["a b", "c"]) == ("a", "b", "c")
    # %x21 / %x23-5B / %x5D-7E only: no quote, backslash, control character, non-ASCII or empty word.
    assert scope_tokens('ok "quoted" back\\slash tab\there caf\u00e9 !#[]~') == ("ok", "!#[]~")


@pytest.mark.parametrize(("member", "scope"), [
    ("write", "write"),
    ("write read", "write read"),
    (["admin", "read"], "admin read"),
    (["read", 'x"y', "a\\b", "r\u00e9ad", 'write", error="invalid_token'], "read"),
    ('"', None),
    ([], None),
    ("", None),
])
def test_a_deny_reads_the_scope_member_as_scope_tokens(member: Any, scope: str | None) -> None:
    outcome = read_outcome({"allowed": False, "reason": "insufficient_scope", "scope": member})
    assert outcome.scope == scope


@pytest.mark.parametrize("member", [3, {"a": "b"}, ["read", 1], True])
def test_a_scope_of_another_type_is_a_policy_error(member: Any) -> None:
    with pytest.raises(PolicyResultError, match="'scope' must be a string or a list of strings"):
        read_outcome({"allowed": False, "scope": member})


def test_an_allow_does_not_read_scope() -> None:
    assert read_outcome({"allowed": True, "scope": 3}).scope is None


def test_the_shipped_policy_names_the_scope_a_write_needs(make_pdp: Any, pki: Any, issuer: Any,
                                                         engine: str) -> None:
    token = bound_token(issuer, pki.client, scope="read")
    decision = make_pdp(engine=engine).decide(check_request(chain=pki.chain(), token=token, method="POST"))
    assert decision.reason == "insufficient_scope" and decision.status == 403
    assert decision.response_headers["www-authenticate"] == (
        'Bearer realm="pdp", error="insufficient_scope", error_description="the access token lacks the required '
        'scope", scope="write"')


def test_the_shipped_policy_names_every_scope_of_the_admin_route(make_pdp: Any, pki: Any, issuer: Any) -> None:
    token = bound_token(issuer, pki.admin, scope="read")
    decision = make_pdp(engine="regorus").decide(check_request(chain=pki.chain(pki.admin), token=token,
                                                               path="/admin/users"))
    assert decision.reason == "insufficient_scope"
    assert decision.response_headers["www-authenticate"].endswith(', scope="admin read"')


def test_other_denies_of_the_shipped_policy_name_no_scope(make_pdp: Any, pki: Any, issuer: Any) -> None:
    pdp = make_pdp(engine="regorus")
    token_required = pdp.decide(check_request(chain=pki.chain()))
    assert token_required.response_headers["www-authenticate"] == 'Bearer realm="pdp"'
    allowed = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client, scope="read")))
    assert allowed.allowed and "www-authenticate" not in allowed.response_headers


def test_a_dpop_request_gets_the_scope_in_a_dpop_challenge(make_pdp: Any, pki: Any, issuer: Any) -> None:
    key = DpopKey.generate()
    token = issuer.mint(audience="https://api.test", scope="read", dpop_key=key)
    proof = key.proof("POST", "https://api.test/orders", token)
    request = check_request(chain=pki.chain(), method="POST", headers={"authorization": f"DPoP {token}",
                                                                       "dpop": proof})
    decision = make_pdp(engine="regorus").decide(request)
    assert decision.reason == "insufficient_scope"
    header = decision.response_headers["www-authenticate"]
    assert header.startswith('DPoP realm="pdp", error="insufficient_scope"')
    assert 'scope="write"' in header and "algs=" in header


def test_a_policy_cannot_inject_a_challenge_parameter_through_scope(make_pdp: Any, pki: Any, issuer: Any,
                                                                   tmp_path: Path, engine: str) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "p.rego").write_text(
        'package pdp.authz\n\nimport rego.v1\n\n'
        'result := {"allowed": false, "reason": "insufficient_scope",\n'
        '\t"scope": ["orders:write", "x\\", error=\\"invalid_token", "ok\\u00e9"]}\n')
    pdp = make_pdp(engine=engine, policy_paths=["policy"])
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert decision.response_headers["www-authenticate"] == (
        'Bearer realm="pdp", error="insufficient_scope", error_description="the access token lacks the required '
        'scope", scope="orders:write"')


def test_the_shipped_rego_tests_cover_the_scope_and_pass() -> None:
    bundle = load_bundle([DEFAULT_POLICY_DIR], entrypoint="data", engine="regorus", include_tests=True)
    results = {r.name: r.outcome for r in run_tests(bundle)}
    for test in ("test_insufficient_scope_names_the_scope_the_route_needs",
                 "test_insufficient_scope_names_every_scope_of_every_route_that_applies",
                 "test_insufficient_scope_of_a_token_without_scopes_names_the_scope",
                 "test_only_insufficient_scope_names_a_scope"):
        assert results.get(f"data.pdp.authz_test.{test}") == "PASS", (test, sorted(results))
    assert all(outcome == "PASS" for outcome in results.values()), results
