"""read_outcome: a policy's answer (boolean or opa-envoy-plugin result object) → PolicyOutcome, or an error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2
from servers import serve_pdp
from test_envoy_grpc import envoy_request

from pdp.config import load_config
from pdp.policy.engine import UNDEFINED
from pdp.policy.result import MAX_METADATA_DEPTH, PolicyOutcome, PolicyResultError, read_outcome


@pytest.mark.parametrize("value", [True, False])
def test_boolean_answer(value: bool) -> None:
    outcome = read_outcome(value)
    assert outcome == PolicyOutcome(allowed=value)
    assert outcome.reason is None and outcome.http_status is None and not outcome.headers


def test_undefined_is_a_deny_without_reason() -> None:
    outcome = read_outcome(UNDEFINED)
    assert outcome.allowed is False
    assert outcome.reason is None
    assert outcome.http_status is None


def test_object_with_every_deny_member() -> None:
    outcome = read_outcome({
        "allowed": False,
        "reason": "geo_blocked",
        "headers": {"X-Tenant": "acme", "X-List": ["a", "b"]},
        "response_headers_to_add": {"Retry-After": "120"},
        "request_headers_to_remove": "not read on a deny",
        "http_status": 451,
        "body": "not here",
        "dynamic_metadata": {"tenant": "acme", "nested": {"n": [1, 2]}},
    })
    assert outcome.allowed is False
    assert outcome.reason == "geo_blocked"
    # header names are lower-cased, lists joined
    assert dict(outcome.headers) == {"x-tenant": "acme", "x-list": "a, b"}
    assert dict(outcome.response_headers) == {"retry-after": "120"}
    assert outcome.headers_to_remove == ()
    assert outcome.http_status == 451
    assert outcome.body == "not here"
    assert dict(outcome.dynamic_metadata) == {"tenant": "acme", "nested": {"n": [1, 2]}}


def test_object_with_every_allow_member() -> None:
    outcome = read_outcome({
        "allowed": True,
        "headers": [{"X-Tenant": "acme"}, {"x-tenant": "beta", "Set-Cookie": ["a=1", "b=2"]}],
        "response_headers_to_add": [{"Set-Cookie": "c=3"}, {"set-cookie": "d=4"}],
        "request_headers_to_remove": ["Cookie", "x-internal"],
        "query_parameters_to_set": {"tenant": "acme", "tag": ["x", "y"]},
        "query_parameters_to_remove": ["debug"],
        "http_status": "not read on an allow",
        "body": 5,
        "dynamic_metadata": {"k": "v"},
    })
    # every object's headers are taken; repeats joined, except set-cookie, kept line by line
    assert dict(outcome.headers) == {"x-tenant": "acme, beta", "set-cookie": "a=1"}
    assert outcome.more_headers == (("set-cookie", "b=2"),)
    assert dict(outcome.response_headers) == {"set-cookie": "c=3"}
    assert outcome.more_response_headers == (("set-cookie", "d=4"),)
    assert outcome.headers_to_remove == ("cookie", "x-internal")
    assert outcome.query_to_set == (("tenant", "acme"), ("tag", "x"), ("tag", "y"))
    assert outcome.query_to_remove == ("debug",)
    assert outcome.http_status is None and outcome.body == ""


@pytest.mark.parametrize("value", [3, 1.5, True, None, {"a": "b"}], ids=repr)
def test_header_values_are_strings_as_in_the_plugin(value: Any) -> None:
    with pytest.raises(PolicyResultError, match="is not a string"):
        read_outcome({"allowed": True, "headers": {"x-a": value}})


@pytest.mark.parametrize("value", ["a", ["a"], {"a": 1}, {"a": [1]}, {"a": None}, ["a", 1]], ids=repr)
def test_bad_query_members(value: Any) -> None:
    member = "query_parameters_to_set" if isinstance(value, dict) or value == "a" else "query_parameters_to_remove"
    if member == "query_parameters_to_remove" and value == ["a"]:
        return  # a list of strings is the right shape
    with pytest.raises(PolicyResultError, match=member):
        read_outcome({"allowed": True, member: value})


def test_headers_list_holding_a_non_object_is_refused() -> None:
    with pytest.raises(PolicyResultError, match="not an object or a list of objects"):
        read_outcome({"allowed": True, "headers": [{"x-a": "b"}, "x-c: d"]})


def test_minimal_object() -> None:
    assert read_outcome({"allowed": True}) == PolicyOutcome(allowed=True)


def test_null_optional_members_are_accepted_where_documented() -> None:
    outcome = read_outcome({"allowed": True, "headers": None, "response_headers_to_add": None, "reason": None,
                            "http_status": None})
    assert outcome == PolicyOutcome(allowed=True)


@pytest.mark.parametrize("status", [200, 403, 599])
def test_http_status_bounds_accepted(status: int) -> None:
    assert read_outcome({"allowed": False, "http_status": status}).http_status == status


@pytest.mark.parametrize("reason", ["a", "scope_missing", "x9_", "a" + "b" * 63])
def test_good_reason_codes(reason: str) -> None:
    assert read_outcome({"allowed": False, "reason": reason}).reason == reason


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0, [], [True], None], ids=repr)
def test_answer_that_is_neither_boolean_nor_object(value: Any) -> None:
    with pytest.raises(PolicyResultError, match="not a boolean or an object"):
        read_outcome(value)


@pytest.mark.parametrize("doc", [
    {},
    {"reason": "allowed"},
    {"allowed": "true"},
    {"allowed": 1},
    {"allowed": None},
    {"allowed": [True]},
], ids=repr)
def test_allowed_missing_or_not_boolean(doc: dict[str, Any]) -> None:
    with pytest.raises(PolicyResultError, match="'allowed' is missing or not a boolean"):
        read_outcome(doc)


@pytest.mark.parametrize("member", ["allow", "status", "Allowed", "response_headers", "decision"])
@pytest.mark.parametrize("allowed", [True, False])
def test_unknown_members_are_ignored_as_the_plugin_ignores_them(member: str, allowed: bool) -> None:
    # they cannot change the verdict: only 'allowed' decides
    assert read_outcome({"allowed": allowed, member: True}) == PolicyOutcome(allowed=allowed)


@pytest.mark.parametrize("reason", ["", "Scope", "1abc", "_a", "a-b", "a b", "a.b", "\u00e9", "a" * 65,
                                    "a\n", 5, True, ["a"]], ids=repr)
def test_bad_reason_codes(reason: Any) -> None:
    with pytest.raises(PolicyResultError, match="'reason'"):
        read_outcome({"allowed": False, "reason": reason})


@pytest.mark.parametrize("status", [0, 199, 600, 1000, -403, True, False, "403", 403.0, [403]], ids=repr)
def test_bad_http_status(status: Any) -> None:
    with pytest.raises(PolicyResultError, match="'http_status'"):
        read_outcome({"allowed": False, "http_status": status})


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b", ["ok", "b\r\nc"]], ids=repr)
def test_header_values_with_cr_lf_nul(member: str, value: Any) -> None:
    with pytest.raises(PolicyResultError, match="control character"):
        read_outcome({"allowed": True, member: {"x-a": value}})


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("name", ["", "a b", "a:b", "x-\u00e9", "a\r\nb", "(x)", "a/b", "a,b", 'a"'], ids=repr)
def test_invalid_header_names(member: str, name: str) -> None:
    with pytest.raises(PolicyResultError, match="invalid header name"):
        read_outcome({"allowed": True, member: {name: "v"}})


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("value", [{"a": 1}, None, True, False, 3], ids=repr)
def test_header_values_that_are_not_text(member: str, value: Any) -> None:
    with pytest.raises(PolicyResultError, match="is not a string"):
        read_outcome({"allowed": True, member: {"x-a": value}})


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("value", [[{"x": 1}], [None], [True], ["a", ["b"]]], ids=repr)
def test_header_lists_holding_non_text_are_refused(member: str, value: Any) -> None:
    with pytest.raises(PolicyResultError, match="is not a list of strings"):
        read_outcome({"allowed": True, member: {"x-a": value}})


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("value", [["x-a"], "x-a: b", 1, True], ids=repr)
def test_header_maps_that_are_not_objects(member: str, value: Any) -> None:
    with pytest.raises(PolicyResultError, match="is not an object"):
        read_outcome({"allowed": True, member: value})


@pytest.mark.parametrize("value", ["cookie", {"cookie": True}, ["ok", "bad name"], ["ok", 5], [""]],
                         ids=repr)
def test_bad_request_headers_to_remove(value: Any) -> None:
    with pytest.raises(PolicyResultError, match="'request_headers_to_remove'"):
        read_outcome({"allowed": True, "request_headers_to_remove": value})


@pytest.mark.parametrize("body", [5, None, True, ["a"], {"a": "b"}], ids=repr)
def test_non_string_body(body: Any) -> None:
    with pytest.raises(PolicyResultError, match="'body' must be a string"):
        read_outcome({"allowed": False, "body": body})


@pytest.mark.parametrize("meta", [[], ["a"], "x", 1, None, True], ids=repr)
def test_non_object_dynamic_metadata(meta: Any) -> None:
    with pytest.raises(PolicyResultError, match="'dynamic_metadata' must be an object"):
        read_outcome({"allowed": True, "dynamic_metadata": meta})


def test_error_is_a_value_error() -> None:
    # callers that catch ValueError (the adapters) also catch a malformed policy answer
    assert issubclass(PolicyResultError, ValueError)


def _nested(depth: int, leaf: Any = "x") -> dict[str, Any]:
    """An object ``depth`` levels deep (itself level 1)."""
    value: dict[str, Any] = {"leaf": leaf}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("allowed", [True, False])
def test_dynamic_metadata_nested_deeper_than_the_bound_is_refused(allowed: bool) -> None:
    assert read_outcome({"allowed": allowed, "dynamic_metadata": _nested(MAX_METADATA_DEPTH)}).allowed is allowed
    with pytest.raises(PolicyResultError, match=f"nested deeper than {MAX_METADATA_DEPTH} levels"):
        read_outcome({"allowed": allowed, "dynamic_metadata": _nested(MAX_METADATA_DEPTH + 1)})
    lists: Any = ["x"]
    for _ in range(MAX_METADATA_DEPTH - 1):
        lists = [lists]
    with pytest.raises(PolicyResultError, match="nested deeper"):
        read_outcome({"allowed": allowed, "dynamic_metadata": {"l": lists}})


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_dynamic_metadata_holding_a_number_that_is_not_finite_is_refused(number: float) -> None:
    with pytest.raises(PolicyResultError, match="not finite"):
        read_outcome({"allowed": False, "dynamic_metadata": {"a": [1, {"n": number}]}})


def _deny_with_metadata(depth: int) -> str:
    # From a string: regorus parses a deeply nested object literal in exponential time.
    return ("package pdp.authz\n\nimport rego.v1\n\n"
            f"result := {{\"allowed\": false, \"reason\": \"policy_denied\", "
            f"\"dynamic_metadata\": json.unmarshal({json.dumps(json.dumps(_nested(depth)))})}}\n")


@pytest.mark.integration
def test_a_deny_with_deep_metadata_from_an_embedded_policy_is_a_check_response_envoy_can_parse(
        write_setup: Any, tmp_path: Path) -> None:
    """protobuf parsers stop at 100 levels: a CheckResponse carrying metadata deeper than that would fail
    in Envoy, and with ``failure_mode_allow`` that is an allow. The deepest metadata read still parses
    under the ``policy`` member the listener puts it in."""
    answers: dict[int, Any] = {}
    for depth in (MAX_METADATA_DEPTH, MAX_METADATA_DEPTH + 1, 60):
        policy = tmp_path / f"deep{depth}" / "policy.rego"
        policy.parent.mkdir()
        policy.write_text(_deny_with_metadata(depth))
        config = load_config(write_setup(engine="regorus", policy_paths=[str(policy.parent)]))
        with serve_pdp(config) as (_, service), \
                grpc.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
            check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=None)
            answers[depth] = external_auth_pb2.CheckResponse.FromString(check(envoy_request(), timeout=10))
    kept = answers.pop(MAX_METADATA_DEPTH)
    assert kept.status.code == code_pb2.PERMISSION_DENIED and kept.status.message == "policy_denied"
    assert json_format.MessageToDict(kept.dynamic_metadata)["policy"] == _nested(MAX_METADATA_DEPTH)
    for refused in answers.values():
        assert refused.status.code == code_pb2.PERMISSION_DENIED and refused.status.message == "policy_error"
        assert "policy" not in json_format.MessageToDict(refused.dynamic_metadata)


@pytest.mark.parametrize("member", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("allowed", [True, False])
@pytest.mark.parametrize("name", ["content-length", "Content-Length", "transfer-encoding", "connection", "keep-alive",
                                  "upgrade", "te", "trailer", "proxy-connection"])
def test_a_header_that_frames_the_message_is_refused(member: str, allowed: bool, name: str) -> None:
    with pytest.raises(PolicyResultError, match="frames the message"):
        read_outcome({"allowed": allowed, member: {name: "3"}})


@pytest.mark.integration
@pytest.mark.parametrize("allowed", ["true", "false"])
def test_a_policy_s_content_length_never_frames_the_ext_authz_answer(write_setup: Any, tmp_path: Path,
                                                                     allowed: str) -> None:
    """A deny carrying the policy's 'content-length: 3' was sent with no body under that length (h11
    failed with a traceback on the console), and an allow with 'transfer-encoding' became chunked."""
    policy = tmp_path / "frame" / "policy.rego"
    policy.parent.mkdir()
    policy.write_text("package pdp.authz\n\nimport rego.v1\n\n"
                      f'result := {{"allowed": {allowed}, "headers": {{"content-length": "3", '
                      '"transfer-encoding": "chunked"}}\n')
    config = load_config(write_setup(engine="regorus", policy_paths=[str(policy.parent)]))
    with serve_pdp(config) as (base, _):
        answer = httpx.get(f"{base}/ext_authz/orders", headers={"host": "api.example.org"}, timeout=10)
    assert answer.status_code == 403 and answer.headers["x-pdp-reason"] == "policy_error"
    assert "transfer-encoding" not in answer.headers and answer.headers["content-length"] == str(len(answer.content))


SET_OF_OBJECTS = """package pdp.authz
import rego.v1
result := {
  "allowed": true,
  "headers": {{"x-team": "payments"}, {"x-tier": "gold"}},
  "query_parameters_to_remove": {"trace", "debug"},
  "dynamic_metadata": {"routes": {["GET", "/orders"], ["POST", "/orders"]}},
}
"""


def test_a_result_holding_a_set_of_objects_or_arrays_reads_as_opa_writes_it(make_pdp, pki, issuer, tmp_path) -> None:
    """OPA writes a set as a JSON array of its members: a set of header objects is the plugin's 'headers as a
    list of objects'. No Python set holds objects or arrays, so regorus cannot hand one over as Python values;
    pdp reads such a result as JSON instead of refusing it as a policy error."""
    from conftest import bound_token, check_request

    policy = tmp_path / "sets"
    policy.mkdir()
    (policy / "p.rego").write_text(SET_OF_OBJECTS)
    pdp = make_pdp(engine="regorus", policy_paths=[str(policy)])
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client),
                                        path="/orders?trace=1&debug=2"))
    assert decision.allowed, (decision.reason, decision.message)
    assert decision.headers["x-team"] == "payments" and decision.headers["x-tier"] == "gold"
    assert set(decision.query_to_remove) == {"trace", "debug"}
    assert decision.metadata["policy"] == {"routes": [["GET", "/orders"], ["POST", "/orders"]]}
