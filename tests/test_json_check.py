"""pdp's JSON check protocol: request documents → CheckRequest, decisions → JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import bound_token, check_request
from hypothesis import given, settings
from hypothesis import strategies as st
from pdp.adapters.json_check import RequestDocumentError, parse_request, render

from pdp.decision import Decision, Step
from pdp.errors import Denied
from pdp.request import CheckRequest
from pdp.request_reader import RequestReader

NOW = 1_700_000_000.0


def read(doc: Any, **kw: Any) -> CheckRequest:
    """The document as the one reader turns it into a ``CheckRequest``."""
    return RequestReader().read(parse_request(doc, **kw))


def test_good_document(pki: Any) -> None:
    doc = {
        "method": "post", "path": "/orders?id=1", "host": "api.example.org", "scheme": "http",
        "headers": {"Authorization": "Bearer abc", "X-Trace": "t1"},
        "client_cert": pki.chain_pem(), "source_address": "10.0.0.7", "protocol": "HTTP/2",
    }
    req = read(doc, now=NOW, peer_address="192.0.2.1")
    assert isinstance(req, CheckRequest)
    assert req.method == "POST"
    assert req.path == "/orders?id=1"
    assert req.host == "api.example.org"
    assert req.scheme == "http"
    assert req.protocol == "HTTP/2"
    assert dict(req.headers) == {"authorization": "Bearer abc", "x-trace": "t1"}
    assert req.client_cert_chain == pki.chain()
    assert req.client_cert_error is None
    assert req.source_address == "10.0.0.7"
    assert req.time == NOW


def test_defaults() -> None:
    req = read({"method": "GET", "path": "/"}, now=NOW, peer_address="192.0.2.1")
    assert req.scheme == "https"
    assert req.protocol == "HTTP/1.1"
    assert req.host == ""
    assert dict(req.headers) == {}
    assert req.client_cert_chain == ()
    assert req.client_cert_error is None
    assert req.source_address == "192.0.2.1"


def test_headers_are_read_only() -> None:
    req = read({"method": "GET", "path": "/", "headers": {"a": "1"}}, now=NOW)
    with pytest.raises(TypeError):
        req.headers["a"] = "2"  # type: ignore[index]


def test_header_lists_are_joined_with_commas() -> None:
    req = read({"method": "GET", "path": "/", "headers": {"accept": ["a/b", "c/d"], "x-e": []}}, now=NOW)
    assert dict(req.headers) == {"accept": "a/b,c/d", "x-e": ""}


def test_header_names_are_lower_cased_and_repeats_joined() -> None:
    req = read({"method": "GET", "path": "/", "headers": {"X-A": "1", "x-a": "2", "X-a": ["3", "4"]}},
                        now=NOW)
    assert dict(req.headers) == {"x-a": "1,2,3,4"}


def test_host_from_authority_then_host_header() -> None:
    both = read({"method": "GET", "path": "/", "headers": {":authority": "a.test", "Host": "a.test"}}, now=NOW)
    assert both.host == "a.test"
    with pytest.raises(Denied, match="different hosts"):
        read({"method": "GET", "path": "/", "headers": {":authority": "a.test", "Host": "h.test"}}, now=NOW)
    only_host = read({"method": "GET", "path": "/", "headers": {"Host": "h.test"}}, now=NOW)
    assert only_host.host == "h.test"
    explicit = read({"method": "GET", "path": "/", "host": "x.test", "headers": {"host": "h.test"}},
                             now=NOW)
    assert explicit.host == "x.test"


@pytest.mark.parametrize("pem", [
    "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    "not a certificate at all",
    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    "-----BEGIN CERTIFICATE-----\nAAAA\n",
    "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
], ids=["bad-base64", "no-pem", "private-key", "truncated", "empty"])
def test_bad_pem_sets_client_cert_error(pem: str) -> None:
    req = read({"method": "GET", "path": "/", "client_cert": pem}, now=NOW)
    assert req.client_cert_chain == ()
    assert isinstance(req.client_cert_error, str) and req.client_cert_error


def test_blank_client_cert_is_no_certificate() -> None:
    req = read({"method": "GET", "path": "/", "client_cert": "  \n"}, now=NOW)
    assert req.client_cert_chain == () and req.client_cert_error is None


def test_bad_pem_is_denied_as_cert_malformed_not_as_no_cert(make_pdp: Any) -> None:
    pdp = make_pdp()
    req = read({"method": "GET", "path": "/healthz", "client_cert": "garbage"}, now=NOW)
    decision = pdp.decide(req)
    # /healthz is public: with "no certificate" this would be allowed
    assert not decision.allowed
    assert decision.reason == "cert_malformed"


@pytest.mark.parametrize("doc", [[], "x", None, 1, 1.5, True, [{"method": "GET", "path": "/"}]], ids=repr)
def test_non_object_document(doc: Any) -> None:
    with pytest.raises(RequestDocumentError, match="must be a JSON object"):
        parse_request(doc, now=NOW)


@pytest.mark.parametrize("extra", ["Body", "Method", "cert", "time", "headerz"])
def test_unknown_fields(extra: str) -> None:
    with pytest.raises(RequestDocumentError, match=f"unknown fields: .*{extra}"):
        parse_request({"method": "GET", "path": "/", extra: "x"}, now=NOW)


@pytest.mark.parametrize("doc,field", [
    ({"path": "/"}, "method"),
    ({"method": "GET"}, "path"),
    ({"method": 1, "path": "/"}, "method"),
    ({"method": "GET", "path": None}, "path"),
    ({"method": "GET", "path": ["/"]}, "path"),
    ({"method": "GET", "path": "/", "host": 5}, "host"),
    ({"method": "GET", "path": "/", "scheme": False}, "scheme"),
    ({"method": "GET", "path": "/", "protocol": 1.1}, "protocol"),
    ({"method": "GET", "path": "/", "source_address": ["10.0.0.1"]}, "source_address"),
    ({"method": "GET", "path": "/", "headers": ["a: b"]}, "headers"),
    ({"method": "GET", "path": "/", "headers": "a: b"}, "headers"),
    ({"method": "GET", "path": "/", "headers": {"a": 1}}, "header 'a'"),
    ({"method": "GET", "path": "/", "headers": {"a": None}}, "header 'a'"),
    ({"method": "GET", "path": "/", "headers": {"a": ["x", 2]}}, "header 'a'"),
    ({"method": "GET", "path": "/", "headers": {"a": {"b": "c"}}}, "header 'a'"),
    ({"method": "GET", "path": "/", "client_cert": 5}, "client_cert"),
    ({"method": "GET", "path": "/", "client_cert": ["-----BEGIN CERTIFICATE-----"]}, "client_cert"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_types(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestDocumentError, match=field):
        parse_request(doc, now=NOW)


def test_render_allowed_decision(make_pdp: Any, pki: Any, issuer: Any) -> None:
    decision = make_pdp().decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    out = render(decision)
    assert json.loads(json.dumps(out)) == out
    assert set(out) == {"allowed", "status", "reason", "message", "decision_id", "headers", "headers_to_remove",
                        "response_headers", "metadata", "explanation"}
    assert out["allowed"] is True and out["status"] == 200 and out["reason"] == "allowed"
    assert out["decision_id"] == decision.decision_id
    assert out["headers"]["x-pdp-decision-id"] == decision.decision_id
    assert out["headers_to_remove"] == ["authorization", "dpop"]
    assert out["explanation"] == decision.explanation()
    assert [s["step"] for s in out["explanation"]["steps"]] == ["identity", "credential", "binding", "policy",
                                                                "decision"]
    assert "body" not in out
    assert "explanation" not in render(decision, explain=False)


def test_render_denied_decision(make_pdp: Any, pki: Any) -> None:
    decision = make_pdp().decide(check_request(chain=pki.chain()))
    out = render(decision)
    assert out["allowed"] is False and out["status"] == 401 and out["reason"] == "token_required"
    assert out["response_headers"] == {"www-authenticate": 'Bearer realm="pdp"'}
    assert out["headers"] == {} and out["headers_to_remove"] == []


def test_render_body_only_when_present() -> None:
    decision = Decision(decision_id="d", allowed=False, status=451, reason="geo", message="m", body="nope",
                        steps=(Step("policy", False, "x"),))
    out = render(decision)
    assert out["body"] == "nope"
    assert out["status"] == 451
    assert out["explanation"]["steps"] == [{"step": "policy", "ok": False, "detail": "x"}]


# -- anything JSON-like either parses or is refused with RequestDocumentError, nothing else

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)), max_leaves=12)
_fields = ["method", "path", "host", "scheme", "headers", "client_cert", "source_address", "protocol"]
_header_maps = st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=12),
                                                               st.lists(st.text(max_size=8), max_size=3), _json),
                               max_size=5)
_pem_like = st.sampled_from(["", " ", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
                             "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" * 11,
                             "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"])
_near_valid = st.fixed_dictionaries(
    {"method": st.one_of(st.sampled_from(["GET", "post"]), _json), "path": st.one_of(st.text(max_size=20), _json)},
    optional={"host": st.one_of(st.text(max_size=10), _json), "scheme": _json, "headers": st.one_of(_header_maps,
              _json), "client_cert": st.one_of(_pem_like, st.text(max_size=30), _json), "source_address": _json,
              "protocol": _json, "extra": _json})
_documents = st.one_of(_json, st.dictionaries(st.sampled_from(_fields), _json, max_size=8), _near_valid)


@settings(max_examples=400, database=None, deadline=None)
@given(doc=_documents)
def test_arbitrary_documents_parse_or_are_refused(doc: Any) -> None:
    try:
        req = read(doc, now=NOW, peer_address="192.0.2.9")
    except (RequestDocumentError, Denied):
        return
    assert isinstance(req, CheckRequest)
    assert isinstance(doc, dict) and set(doc) <= set(_fields)
    assert isinstance(req.method, str) and req.method == req.method.upper()
    assert isinstance(req.path, str) and req.path == doc["path"]
    assert all(isinstance(k, str) and k == k.lower() and isinstance(v, str) for k, v in req.headers.items())
    assert all(isinstance(d, bytes) and d for d in req.client_cert_chain)
    assert req.client_cert_error is None or (isinstance(req.client_cert_error, str) and not req.client_cert_chain)


def test_a_repeated_allow_is_answered_with_the_same_bytes_as_a_whole_rendering(make_pdp: Any, pki: Any,
                                                                               issuer: Any) -> None:
    """Repeated allows reuse a kept answer with their own id put in: byte for byte the whole rendering,
    however the steps change (a first decision's policy step differs from a repeated one's) and whatever
    was changed in a decision since it was made."""
    import dataclasses

    from pdp.adapters.json_check import answer, document

    pdp = make_pdp()
    token = bound_token(issuer, pki.client)
    decisions = [pdp.decide(check_request(chain=pki.chain(), token=token)) for _ in range(4)]
    assert decisions[0].steps != decisions[1].steps and decisions[1].parts is decisions[0].parts
    changed = [dataclasses.replace(decisions[1], headers={**decisions[1].headers, "x-pdp-subject": "other"}),
               dataclasses.replace(decisions[1], decision_id='"quoted"-id-of-thirty-six-characters'),
               dataclasses.replace(decisions[1], status=415)]
    for decision in [*decisions, *changed, decisions[0]]:
        assert answer(decision) == document(render(decision))
    assert len({json.loads(answer(d))["decision_id"] for d in decisions}) == 4
