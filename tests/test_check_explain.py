"""``pdp check --input`` (the policy's input document for a request) and ``pdp check --explain`` (what the
policy answered, the facts it read, the lines regorus evaluated), in process and as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from pdp.assemble import build_pdp
from pdp.certificates.pem import pem_to_der_chain
from pdp.config import load_config
from pdp.devinit import dev_init
from pdp.devtokens import mint
from pdp.policy import explain
from pdp.policy.engine import UNDEFINED, PolicyEngine, load_bundle
from pdp.request import CheckRequest

PDP = str(Path(sys.executable).parent / "pdp")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("explain") / "dev"
    dev_init(target)
    (target / "read.jwt").write_text(mint(target, scope="read", cert=target / "client.pem") + "\n")
    return target


def check(dev: Path, *args: str, config: str = "pdp.toml") -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, "check", "--config", str(dev / config), "--cert", str(dev / "client.pem"),
                           "--token", str(dev / "read.jwt"), "--path", "/orders", *args],
                          capture_output=True, text=True, timeout=60, check=False)


# -- --input


def test_input_prints_the_document_the_policy_denies_on_and_exits_0(dev):
    result = check(dev, "--method", "POST", "--input")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["attributes"]["request"]["http"]["method"] == "POST"
    assert doc["path"] == "/orders"
    assert doc["cert"]["spiffe_id"] == "spiffe://example.org/demo/client"
    assert doc["token"]["scopes"] == ["read"] and doc["binding"]["bound"] is True


def test_input_is_the_document_handed_to_the_engine(dev):
    pdp = build_pdp(load_config(dev / "pdp.toml"))
    try:
        request = CheckRequest(method="GET", path="/orders?x=1", time=time.time(), host="api.example.org",
                               headers=MappingProxyType({"authorization": "Bearer " + (dev / "read.jwt").read_text()
                                                         .strip()}),
                               client_cert_chain=pem_to_der_chain((dev / "client.pem").read_bytes()))
        with explain.recording(pdp.policy) as seen:
            decision = pdp.decide(request)
        assert decision.allowed
        (evaluation,) = seen
        assert evaluation.answer == {"allowed": True, "reason": "allowed"}
        assert pdp.policy.evaluate(evaluation.input) == evaluation.answer  # the method is back in place
        assert evaluation.input["parsed_query"] == {"x": ["1"]}
    finally:
        pdp.close()


def test_input_when_pdp_denies_before_the_policy_says_where_and_exits_1(dev):
    result = subprocess.run([PDP, "check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "other.pem"),
                             "--token", str(dev / "read.jwt"), "--path", "/orders", "--input"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "no input document" in line and "binding step" in line and "binding_mismatch" in line


def test_input_with_json_or_explain_is_a_usage_error(dev):
    for extra in ("--json", "--explain"):
        result = check(dev, "--input", extra)
        assert result.returncode == 2 and "--input prints the policy's input document alone" in result.stderr


# -- --explain


def test_explain_shows_the_answer_the_facts_read_and_the_lines_evaluated(dev):
    result = check(dev, "--method", "POST", "--explain")
    assert result.returncode == 1
    out = result.stdout
    assert 'response header www-authenticate: Bearer realm="pdp", error="insufficient_scope"' in out
    assert 'policy answer: {"allowed": false, "reason": "insufficient_scope", "scope": "write"}' in out
    assert '  input.token.scopes = ["read"]' in out
    assert '  input.attributes.request.http.method = "POST"' in out
    lines = out.split("policy lines evaluated", 1)[1]
    assert str(dev / "policy" / "zero_trust.rego") in lines
    assert "scope_missing" in lines and "not scope in token_scopes" in lines


def test_explain_json_has_an_explain_member(dev):
    result = check(dev, "--method", "POST", "--explain", "--json")
    doc = json.loads(result.stdout)
    assert doc["reason"] == "insufficient_scope"
    e = doc["explain"]
    assert e["evaluated"] is True and e["answer"]["scope"] == "write"
    assert e["facts"]["input.cert.trust_domain"] == "example.org"
    assert any("scope_missing" in line["text"] for line in e["lines"])


def test_explain_of_a_deny_before_the_policy_says_the_policy_did_not_run(dev):
    result = subprocess.run([PDP, "check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "other.pem"),
                             "--token", str(dev / "read.jwt"), "--path", "/orders", "--explain"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert ("the policy was not evaluated: pdp denied at the binding step, before the policy runs "
            "(binding_mismatch)") in result.stdout


def test_explain_on_regopy_says_it_reports_no_lines(dev):
    (dev / "regopy.toml").write_text((dev / "pdp.toml").read_text().replace('engine = "regorus"', 'engine = "regopy"'))
    result = check(dev, "--explain", config="regopy.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lines evaluated: the regopy engine does not report them" in result.stdout
    assert 'policy answer: {"allowed": true, "reason": "allowed"}' in result.stdout


def test_facts_of_a_policy_that_reads_input_whole_are_all_of_input(tmp_path):
    (tmp_path / "p.rego").write_text('package pdp.authz\n\nimport rego.v1\n\nresult := {"allowed": count(input) > 1}\n')
    bundle = load_bundle([tmp_path], entrypoint="pdp/authz/result", engine="regorus")
    assert explain.facts(bundle, {"a": 1}) is None


def test_facts_name_absent_paths_and_quote_keys_that_are_not_identifiers(tmp_path):
    (tmp_path / "p.rego").write_text(
        'package pdp.authz\n\nimport rego.v1\n\n'
        'default result := false\n\n'
        'result if input.attributes.request.http.headers["x-tenant"] == "a"\n\n'
        'result if input.cert.present\n')
    bundle = load_bundle([tmp_path], entrypoint="pdp/authz/result", engine="regorus")
    facts = explain.facts(bundle, {"cert": {"present": False}})
    assert facts == {'input.attributes.request.http.headers["x-tenant"]': explain.ABSENT,
                     "input.cert.present": False}
    lines = explain.evaluated_lines(bundle, {"cert": {"present": True}})
    assert lines is not None and [line.number for line in lines if line.text == "result if input.cert.present"] == [9]


def test_an_evaluation_error_keeps_its_input_and_no_answer(tmp_path):
    (tmp_path / "p.rego").write_text('package pdp.authz\n\nimport rego.v1\n\nresult := to_number(input.n)\n')
    engine = PolicyEngine(load_bundle([tmp_path], entrypoint="pdp/authz/result", engine="regorus"))
    with explain.recording(engine) as seen, pytest.raises(Exception, match="to_number"):
        engine.evaluate({"n": "x"})
    assert seen == [explain.Evaluation({"n": "x"})]
    assert explain.answer_text(UNDEFINED).startswith("undefined")


def test_explain_of_a_policy_that_fails_shows_its_input_facts_and_no_answer(dev, tmp_path):
    broken = tmp_path / "broken"
    (broken / "policy").mkdir(parents=True)
    for name in ("pdp.toml", "ca.pem", "jwks.json"):
        (broken / name).write_bytes((dev / name).read_bytes())
    (broken / "policy" / "p.rego").write_text(
        'package pdp.authz\n\nimport rego.v1\n\nresult := {"allowed": to_number(input.path) > 0}\n')
    for name in ("client.pem", "read.jwt"):
        (broken / name).write_bytes((dev / name).read_bytes())
    result = check(broken, "--explain")
    assert result.returncode == 1 and "DENY 403 policy_error" in result.stdout
    assert "policy answer: none: the evaluation failed" in result.stdout
    assert '  input.path = "/orders"' in result.stdout
    assert "to_number(input.path)" in result.stdout.split("policy lines evaluated", 1)[1]
    document = check(broken, "--input")
    assert document.returncode == 0 and json.loads(document.stdout)["path"] == "/orders"
