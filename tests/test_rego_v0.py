"""Rego v0 policies (``policy.rego_version = "v0"``): loaded, checked and decided as their Rego v1
translation is; a module of the other version refused at load, naming the key."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from pdp.assemble import load_policy
from pdp.config import load_config
from pdp.errors import ConfigError, LoadError
from pdp.policy import callcheck, divergence, rego_ast
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError, load_bundle
from pdp.policy.rego_ast import Bundle, Module
from pdp.policy.rego_version import v1_words
from pdp.policy.testing import run_tests

# The OPA-Envoy tutorial's policy as it was written for OPA 0.x, with a partial set rule, the builtin
# `contains` and the deprecated `re_match`.
ENVOY_V0 = """package envoy.authz

import input.attributes.request.http as http_request

default allow = false

token = {"valid": valid, "payload": payload} {
    [_, encoded] := split(http_request.headers.authorization, " ")
    [valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "the shared secret of the tutorial, 32+ bytes"})
}

allow {
    is_token_valid
    action_allowed
    count(deny) == 0
}

is_token_valid {
    token.valid
    now := time.now_ns() / 1000000000
    token.payload.nbf <= now
    now < token.payload.exp
}

action_allowed {
    http_request.method == "GET"
    token.payload.role == "guest"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed {
    http_request.method == "GET"
    token.payload.role == "admin"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed {
    http_request.method == "POST"
    token.payload.role == "admin"
    glob.match("/people", ["/"], http_request.path)
    lower(input.parsed_body.firstname) == base64url.decode(token.payload.sub)
}

deny["the path holds '..'"] {
    contains(http_request.path, "..")
}

deny[msg] {
    re_match("^/people/[0-9]+$", http_request.path)
    token.payload.role == "guest"
    msg := "numeric ids are for admins"
}
"""

# The same policy as `opa fmt --v0-v1` writes it, with `regex.match` for `re_match`.
ENVOY_V1 = """package envoy.authz

import input.attributes.request.http as http_request

default allow := false

token := {"valid": valid, "payload": payload} if {
    [_, encoded] := split(http_request.headers.authorization, " ")
    [valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "the shared secret of the tutorial, 32+ bytes"})
}

allow if {
    is_token_valid
    action_allowed
    count(deny) == 0
}

is_token_valid if {
    token.valid
    now := time.now_ns() / 1000000000
    token.payload.nbf <= now
    now < token.payload.exp
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "guest"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "admin"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "POST"
    token.payload.role == "admin"
    glob.match("/people", ["/"], http_request.path)
    lower(input.parsed_body.firstname) == base64url.decode(token.payload.sub)
}

deny contains "the path holds '..'" if {
    contains(http_request.path, "..")
}

deny contains msg if {
    regex.match("^/people/[0-9]+$", http_request.path)
    token.payload.role == "guest"
    msg := "numeric ids are for admins"
}
"""


def _setup(tmp_path: Path, name: str, source: str, rego_version: str | None, engine: str = "regorus") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "policy.rego").write_text(source)
    version = f'rego_version = "{rego_version}"\n' if rego_version else ""
    config = folder / "pdp.toml"
    config.write_text(f'[policy]\nengine = "{engine}"\npaths = ["policy.rego"]\ndecision = "envoy/authz/allow"\n'
                      f"{version}")
    return config


SECRET = "the shared secret of the tutorial, 32+ bytes"


def _token(role: str, *, sub: str = "alice", key: str = SECRET, expired: bool = False) -> str:
    now = int(time.time())
    claims = {"role": role, "sub": base64.urlsafe_b64encode(sub.encode()).decode().rstrip("="),
              "nbf": now - 60, "exp": now - 30 if expired else now + 3600}
    return pyjwt.encode(claims, key, algorithm="HS256")


def _request(method: str, path: str, token: str | None = None, body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    doc: dict[str, Any] = {"attributes": {"request": {"http": {"method": method, "path": path, "headers": headers}}}}
    if body is not None:
        doc["parsed_body"] = body
    return doc


REQUESTS = [
    ("guest reads a person", _request("GET", "/people/bob", _token("guest")), True),
    ("admin reads a person", _request("GET", "/people/bob", _token("admin")), True),
    ("admin adds themself", _request("POST", "/people", _token("admin"), {"firstname": "Alice"}), True),
    ("admin adds someone else", _request("POST", "/people", _token("admin"), {"firstname": "Eve"}), False),
    ("guest adds", _request("POST", "/people", _token("guest"), {"firstname": "Alice"}), False),
    ("a path with '..'", _request("GET", "/people/a..b", _token("admin")), False),
    ("guest reads a numeric id", _request("GET", "/people/7", _token("guest")), False),
    ("admin reads a numeric id", _request("GET", "/people/7", _token("admin")), True),
    ("no token", _request("GET", "/people/bob"), False),
    ("expired token", _request("GET", "/people/bob", _token("guest", expired=True)), False),
    ("token signed with another key", _request("GET", "/people/bob", _token("admin", key=SECRET[::-1])), False),
    ("a nested path", _request("GET", "/people/bob/friends", _token("admin")), False),
]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[PolicyEngine, PolicyEngine]:
    tmp = tmp_path_factory.mktemp("envoy")
    v0 = load_policy(load_config(_setup(tmp, "v0", ENVOY_V0, "v0")))
    v1 = load_policy(load_config(_setup(tmp, "v1", ENVOY_V1, None)))
    return v0, v1


@pytest.mark.parametrize(("note", "request_doc", "allowed"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_a_v0_envoy_policy_decides_as_its_v1_translation(engines: tuple[PolicyEngine, PolicyEngine], note: str,
                                                          request_doc: dict[str, Any], allowed: bool) -> None:
    v0, v1 = engines
    assert v0.bundle.rego_version == "v0" and v1.bundle.rego_version == "v1"
    assert v0.evaluate(request_doc) is allowed
    assert v1.evaluate(request_doc) is allowed
    assert v0.query("data.envoy.authz.deny", request_doc) == v1.query("data.envoy.authz.deny", request_doc)


def test_a_v0_policy_is_refused_under_v1_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        load_policy(load_config(_setup(tmp_path, "p", ENVOY_V0, None)))
    assert info.value.key == "policy.rego_version"
    assert 'policy.rego_version = "v1"' in str(info.value) and 'set policy.rego_version = "v0"' in str(info.value)


def test_a_v1_policy_is_refused_under_v0_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as info:
        load_policy(load_config(_setup(tmp_path, "p", ENVOY_V1, "v0")))
    assert info.value.key == "policy.rego_version"
    assert "policy.rego_version" in info.value.message and "`if` is a keyword of Rego v1" in info.value.message
    assert "policy.rego:7:" in info.value.message  # the first `if`, after `token := {…}`


@pytest.mark.parametrize("source", [
    # regorus reads each of these as v0 without an error, with another meaning than its author's.
    "package p\n\ndefault allow := false\n\nallow if { input.x == 1 }\n",
    "package p\n\nallow if input.x == 1\n",
    "package p\n\ndeny contains msg if {\n    msg := input.m\n}\n",
    "package p\n\nallow {\n    input.role in {\"admin\", \"ops\"}\n}\n",
    "package p\n\nallow {\n    every r in input.roles { r == \"admin\" }\n}\n",
])
def test_v1_keywords_in_a_v0_module_are_refused_before_the_engine_reads_them(source: str) -> None:
    bundle = PolicyBundle((("p.rego", source),), {}, "data.p.allow", "regorus", "v0")
    with pytest.raises(LoadError, match=r'policy\.rego_version = \\?"v0\\?"') as info:
        PolicyEngine(bundle)
    assert info.value.key == "policy.rego_version"
    with pytest.raises(LoadError):
        rego_ast.parse(bundle.modules, rego_version="v0")


def test_a_v0_module_that_imports_its_keywords_loads() -> None:
    source = ("package p\n\nimport future.keywords.if\nimport future.keywords.in\n\ndefault allow = false\n\n"
              "allow if input.role in {\"admin\"}\n")
    engine = PolicyEngine(PolicyBundle((("p.rego", source),), {}, "data.p.allow", "regorus", "v0"))
    assert engine.evaluate({"role": "admin"}) is True
    assert engine.evaluate({"role": "guest"}) is False
    everything = "package p\n\nimport future.keywords\n\nallow if { every r in input.r { r > 0 } }\n"
    assert PolicyEngine(PolicyBundle((("p.rego", everything),), {}, "data.p.allow", "regorus", "v0")).evaluate(
        {"r": [1, 2]}) is True


def test_a_v1_policy_importing_rego_v1_loads_under_v0_as_on_opa() -> None:
    source = "package p\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.x == 1\n"
    for version in ("v0", "v1"):
        engine = PolicyEngine(PolicyBundle((("p.rego", source),), {}, "data.p.allow", "regorus", version))
        assert engine.evaluate({"x": 1}) is True
        assert engine.evaluate({"x": 2}) is False


def test_the_builtin_contains_and_keywords_in_strings_and_comments_are_not_v1_words() -> None:
    source = ('package p\n\n# allow if the role is in the list\nallow {\n    contains(input.path, "if in every")\n'
              '    contains (input.path, `contains x if`)\n    input.x.in == input.if\n}\n')
    assert v1_words(source) == []
    assert v1_words("package p\n\nx := y if { y := 1 }\n") == [(3, "if")]


def test_the_rego_version_config_key(tmp_path: Path) -> None:
    config = load_config(_setup(tmp_path, "a", ENVOY_V0, "v0"))
    assert config.policy.rego_version == "v0"
    assert load_config(_setup(tmp_path, "b", ENVOY_V1, None)).policy.rego_version == "v1"
    with pytest.raises(ConfigError) as info:
        load_config(_setup(tmp_path, "c", ENVOY_V0, "v2"))
    assert info.value.key == "policy.rego_version"
    with pytest.raises(ConfigError) as info:
        load_config(_setup(tmp_path, "d", ENVOY_V0, "v0", engine="regopy"))
    assert info.value.key == "policy.rego_version" and "regorus" in info.value.message


def test_regopy_refuses_a_v0_bundle() -> None:
    bundle = PolicyBundle((("p.rego", "package p\n\nallow { true }\n"),), {}, "data.p.allow", "regopy", "v0")
    with pytest.raises(LoadError) as info:
        PolicyEngine(bundle)
    assert info.value.key == "policy.rego_version"


def test_the_bundle_version_differs_between_rego_versions() -> None:
    modules = (("p.rego", "package p\n\nimport rego.v1\n\nallow if input.x == 1\n"),)
    v0 = PolicyBundle(modules, {}, "data.p.allow", "regorus", "v0")
    v1 = PolicyBundle(modules, {}, "data.p.allow", "regorus", "v1")
    assert v0.version != v1.version  # one thread's compiled copies are kept by version
    assert v1.version == PolicyBundle(modules, {}, "data.p.allow", "regorus").version
    with pytest.raises(LoadError) as info:
        load_bundle([Path(__file__)], entrypoint="data", engine="regorus", rego_version="v2")
    assert info.value.key in ("policy.paths", "policy.rego_version")


def test_the_decision_cache_keys_a_v0_policy_on_the_imported_path() -> None:
    source = ("package envoy.authz\n\nimport input.attributes.request.http as http_request\n\n"
              "default allow = false\n\nallow {\n    http_request.method == \"GET\"\n    "
              "startswith(http_request.path, \"/public/\")\n}\n")
    engine = PolicyEngine(PolicyBundle((("p.rego", source),), {}, "data.envoy.authz.allow", "regorus", "v0"),
                          decision_cache_size=10)
    assert engine.decisions is not None
    assert engine.decisions.paths == (("attributes", "request", "http"),)
    get = _request("GET", "/public/a")
    post = _request("POST", "/public/a")
    assert engine.decisions.key(get) != engine.decisions.key(post)
    assert engine.evaluate(get) is True and engine.evaluate(post) is False
    # A policy reading the clock (the tutorial's) is not cached, in v0 as in v1.
    timed = PolicyEngine(PolicyBundle((("p.rego", ENVOY_V0),), {}, "data.envoy.authz.allow", "regorus", "v0"),
                         decision_cache_size=10)
    assert timed.decisions is None


def test_deprecated_builtins_are_v0_only() -> None:
    v1 = "package p\n\nimport rego.v1\n\nallow if re_match(\"^a\", input.x)\n"
    with pytest.raises(LoadError, match=r"re_match: is a deprecated builtin .* Rego v0 policies only"):
        callcheck.check(rego_ast.parse((("p.rego", v1),)))
    with pytest.raises(PolicyEvalError, match="could not find function re_match"):
        PolicyEngine(PolicyBundle((("p.rego", v1),), {}, "data.p.allow", "regorus")).evaluate({"x": "a"})
    tree = rego_ast.parse((("p.rego", v1),), rego_version="v0")
    assert callcheck.find(tree) == []
    engine = PolicyEngine(PolicyBundle((("p.rego", v1),), {}, "data.p.allow", "regorus", "v0"))
    assert engine.evaluate({"x": "abc"}) is True


def _v0(expr: str, input_doc: dict[str, Any] | None = None) -> Any:
    source = f"package p\n\nx = {expr}\n"
    return PolicyEngine(PolicyBundle((("p.rego", source),), {}, "data.p.x", "regorus", "v0")).evaluate(
        input_doc or {})


@pytest.mark.parametrize(("expr", "want"), [
    ("any([false, true])", True),
    ("any({false})", False),
    ("any([])", False),
    ("all([true, true])", True),
    ("all({true, false})", False),
    ("all([])", True),
    ("set_diff({1, 2, 3}, {2})", {1, 3}),
    ("cast_array({3, \"a\", 1, null, false})", [None, False, 1, 3, "a"]),
    ("cast_array([2, 1])", [2, 1]),
    ("cast_set([1, 1, 2])", {1, 2}),
    ("cast_string(\"s\")", "s"),
    ("cast_boolean(true)", True),
    ("cast_object({\"a\": 1})", {"a": 1}),
    ("net.cidr_overlap(\"10.0.0.0/8\", \"::ffff:10.1.2.3\")", True),
    ("net.cidr_overlap(\"10.0.0.0/8\", \"11.0.0.1\")", False),
    ("re_match(\"^[a-z]+$\", \"abc\")", True),
    ("re_match(\"^[a-z]+$\", \"ab1\")", False),
])
def test_deprecated_builtins(expr: str, want: Any) -> None:
    assert _v0(expr) == want


@pytest.mark.parametrize(("expr", "error"), [
    ("any(1)", "any: operand 1 must be any of array, set but got number"),
    ("set_diff([1], {1})", "set_diff: operand 1 must be set but got array"),
    ("cast_string(1)", "cast_string: operand 1 must be string but got number"),
    ("cast_null(1)", "cast_null: operand 1 must be null but got number"),
    ("net.cidr_overlap(\"10.0.0.1\", \"10.0.0.1\")", "net.cidr_overlap: invalid CIDR address: 10.0.0.1"),
    ("re_match(\"(\", \"a\")", "re_match:"),
])
def test_deprecated_builtin_errors(expr: str, error: str) -> None:
    with pytest.raises(PolicyEvalError) as info:
        _v0(expr)
    assert error in str(info.value)


def test_divergence_is_found_in_v0_as_in_v1() -> None:
    v0 = "package p\n\ndefault allow = false\n\nallow {\n    not startswith(input.h.x, \"a\")\n}\n"
    v1 = "package p\n\ndefault allow := false\n\nallow if {\n    not startswith(input.h.x, \"a\")\n}\n"
    found_v0 = divergence.find(rego_ast.parse((("p.rego", v0),), rego_version="v0"))
    found_v1 = divergence.find(rego_ast.parse((("p.rego", v1),)))
    assert [(d.line, d.term) for d in found_v0] == [(d.line, d.term) for d in found_v1] == [(6, "input.h.x")]


def test_divergence_refuses_what_it_cannot_analyse() -> None:
    module = Module("p.rego", b"package p\n", "p", {}, [{"Unknown": {"span": {"line": 3, "col": 1, "start": 0,
                                                                              "end": 1}}}])
    with pytest.raises(LoadError, match=r"p\.rego:3: a rule of kind 'Unknown' is not one"):
        divergence.find(Bundle(modules=[module]))
    query = {"stmts": [{"literal": {"Strange": {"span": {"line": 4, "col": 1, "start": 0, "end": 1}}}}]}
    spec = {"Spec": {"span": {"line": 2, "col": 1, "start": 0, "end": 1},
                     "head": {"Compr": {"refr": {"Var": {"value": "allow"}}, "assign": None}},
                     "bodies": [{"query": query}]}}
    with pytest.raises(LoadError, match=r"p\.rego:4: a statement of kind 'Strange'"):
        divergence.find(Bundle(modules=[Module("p.rego", b"package p\n", "p", {}, [spec])]))


def test_policy_tests_run_in_v0(tmp_path: Path) -> None:
    (tmp_path / "policy.rego").write_text(ENVOY_V0)
    (tmp_path / "policy_test.rego").write_text("""package envoy.authz_test

import data.envoy.authz

test_traversal_denied {
    authz.deny["the path holds '..'"] with input as {"attributes": {"request": {"http": {
        "method": "GET", "path": "/a..b", "headers": {}}}}}
}

test_no_token_not_allowed {
    not authz.allow with input as {"attributes": {"request": {"http": {
        "method": "GET", "path": "/people/a", "headers": {}}}}}
}
""")
    bundle = load_bundle([tmp_path], entrypoint="data", engine="regorus", include_tests=True, rego_version="v0")
    results = run_tests(bundle)
    assert [(r.name, r.outcome) for r in results] == [
        ("data.envoy.authz_test.test_traversal_denied", "PASS"),
        ("data.envoy.authz_test.test_no_token_not_allowed", "PASS"),
    ]
    with pytest.raises(LoadError) as info:
        run_tests(load_bundle([tmp_path], entrypoint="data", engine="regorus", include_tests=True))
    assert info.value.key == "policy.rego_version"
