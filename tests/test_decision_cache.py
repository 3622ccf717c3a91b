"""pdp.policy.decision_cache: outcomes kept by the facts a policy reads, and never for one that reads more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pdp.policies import DEFAULT_POLICY_DIR

from pdp.policy.decision_cache import DecisionCache, input_paths
from pdp.policy.engine import PolicyEngine, load_bundle
from pdp.policy.result import read_outcome


def paths(source: str) -> Any:
    return input_paths([f"package t\nimport rego.v1\n{source}\n"])


def test_the_shipped_policy_reads_eight_facts() -> None:
    source = (DEFAULT_POLICY_DIR / "zero_trust.rego").read_text()
    assert input_paths([source]) == (
        ("attributes", "request", "http", "method"), ("binding", "bound"), ("cert", "present"),
        ("cert", "spiffe_id"), ("cert", "trust_domain"), ("path",), ("token", "present"), ("token", "scopes"))


@pytest.mark.parametrize(("source", "expected"), [
    ('r if input.a.b == 1', (("a", "b"),)),
    ('r if input["a"].b == 1', (("a", "b"),)),
    ('r if input.a["x-y"] == 1', (("a", "x-y"),)),
    ('r if input.a[0] == 1', (("a",),)),
    ('r if { some k; input.a[k] == 1 }', (("a",),)),
    ('r if input.a.b == 1\nq if input.a == 2', (("a",),)),
    ('import input.attributes.request.http as http\nr if http.method == "GET"', (("attributes", "request", "http"),)),
    ('r if input["\\u0061"] == 1', (("a",),)),
    ('r if input["a\\tb"] == 1', (("a\tb",),)),
    ('r if input[ "a" ].b == 1', (("a", "b"),)),
    ('# input[k] in a comment only\nr if input.a == 1', (("a",),)),
    ('r := "input.b" if input.a == 1', (("a",), ("b",))),  # a string naming input counts too
    ('r if data.input.x == 1', ()),
])
def test_paths_read(source: str, expected: Any) -> None:
    assert paths(source) == expected


@pytest.mark.parametrize("source", [
    "r := input",
    "r if { x := input; x.a == 1 }",
    "r if { some k; input[k] == 1 }",
    "r := object.get(input, \"a\", 1)",
    "r := count(input)",
    'r := "the input"',                      # conservative: a bare word in a string turns the cache off
    "r if input.a == 1 with input as {}",
    "r if input . a . b == 1",                # not a path this scanner follows: off, not guessed
    'r if {\n  x := input  # a comment\n  ["b"]\n  x.a == 1\n}',  # '["b"]' is a term of its own
])
def test_a_policy_that_reads_input_whole_is_not_cached(source: str) -> None:
    assert paths(source) is None


@pytest.mark.parametrize("call", ["time.now_ns()", "rand.intn(\"x\", 10)", "uuid.rfc4122(\"x\")",
                                  "http.send({})", "opa.runtime()", "net.lookup_ip_addr(\"x\")",
                                  "io.jwt.decode_verify(input.t, {})"])
def test_a_policy_that_reads_the_clock_randomness_or_the_network_is_not_cached(call: str) -> None:
    assert paths(f"r := {call} if input.a == 1") is None


def test_a_zero_size_turns_the_cache_off() -> None:
    assert DecisionCache.for_modules(["package t\nr if input.a == 1"], 0) is None


def test_the_cache_is_bounded() -> None:
    cache = DecisionCache((("a",),), 3)
    for i in range(10):
        cache.put(cache.key({"a": i}), i)
    assert len(cache) == 3 and cache.get(cache.key({"a": 0})) is None and cache.get(cache.key({"a": 9})) == 9


def test_keys_keep_types_and_absence_apart() -> None:
    cache = DecisionCache((("a",),), 10)
    keys = {cache.key({"a": v}) for v in (1, 1.0, True, "1", None, [1], {"1": 1})} | {cache.key({})}
    assert len(keys) == 8


# -- the cache never changes an answer

_scopes = st.lists(st.sampled_from(["read", "write", "admin", "x"]), max_size=3)
_cert = st.one_of(st.just({"present": False}), st.fixed_dictionaries({
    "present": st.just(True), "trust_domain": st.sampled_from(["example.org", "evil.example"]),
    "spiffe_id": st.sampled_from(["spiffe://example.org/demo/client", "spiffe://example.org/admin/ops",
                                  "spiffe://evil.example/x"]), "thumbprint": st.text(max_size=3)}))
_token = st.one_of(st.just({"present": False}), st.fixed_dictionaries({
    "present": st.just(True), "scopes": _scopes, "sub": st.text(max_size=3)}))
_docs = st.builds(
    lambda method, path, cert, token, bound, noise: {
        "attributes": {"request": {"http": {"method": method, "path": path, "host": "api", "headers": noise}}},
        "path": path, "cert": cert, "token": token, "binding": {"bound": bound, "method": None}},
    st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "HEAD"]),
    st.sampled_from(["/orders", "/admin", "/Admin/x", "/admin/users", "/public/x", "/healthz", "/", "/public"]),
    _cert, _token, st.booleans(), st.dictionaries(st.sampled_from(["a", "b"]), st.text(max_size=3), max_size=2))


@pytest.fixture(scope="module")
def shipped() -> PolicyEngine:
    bundle = load_bundle([DEFAULT_POLICY_DIR], entrypoint="pdp/authz/result", engine="regorus")
    return PolicyEngine(bundle, decision_cache_size=64)


@settings(max_examples=300, database=None, deadline=None)
@given(docs=st.lists(_docs, min_size=1, max_size=6))
def test_a_cached_outcome_is_the_outcome_the_policy_gives(shipped: PolicyEngine, docs: list[dict[str, Any]]) -> None:
    cache = shipped.decisions
    assert cache is not None
    for doc in docs:
        fresh = read_outcome(shipped.evaluate(json.loads(json.dumps(doc))))
        key = cache.key(doc)
        kept = cache.get(key)
        if kept is None:
            cache.put(key, fresh)
        else:
            assert kept == fresh


def test_a_reloaded_policy_starts_with_an_empty_cache(tmp_path: Path, make_pdp: Any) -> None:
    pdp = make_pdp()
    assert pdp.policy.decisions is not None
    assert pdp.policy.decisions is not PolicyEngine(pdp.policy.bundle, decision_cache_size=10).decisions


@pytest.mark.parametrize(("source", "first", "second"), [
    ('allow if input["\\u0061"] == 1', {"a": 1}, {"a": 2}),
    ('allow if input["a\\tb"] == 1', {"a\tb": 1}, {"a\tb": 2}),
    ('allow if {\n  x := input # note\n  ["b"]\n  x.a == 1\n}', {"a": 1}, {"a": 2}),
    ('allow if {\n  x := input.a\n  ["b"]\n  x.c == 1\n}', {"a": {"c": 1}}, {"a": {"c": 2}}),
])
def test_escaped_keys_and_split_references_never_give_a_false_hit(
        tmp_path: Path, source: str, first: dict[str, Any], second: dict[str, Any]) -> None:
    """False hits once found: '\\u0061' was keyed as 'u0061', and a '[' on the next line read as a step."""
    (tmp_path / "p.rego").write_text(f"package t\nimport rego.v1\ndefault allow := false\n{source}\n")
    engine = PolicyEngine(load_bundle([tmp_path], entrypoint="t/allow", engine="regorus"), decision_cache_size=16)
    answers = []
    for doc in (first, second):
        cache = engine.decisions
        key = cache.key(doc) if cache is not None else ""
        kept = cache.get(key) if cache is not None else None
        fresh = engine.evaluate(doc)
        if cache is not None and kept is None:
            cache.put(key, fresh)
        answers.append(fresh if kept is None else kept)
        assert kept is None or kept == fresh
    assert answers == [True, False]
