"""Rego v0 policies and the newest builtins under attack: each test names the attack class it covers.

A v0 policy must decide on pdp as it decides on OPA run with ``--v0-compatible``, or be refused at
load; a builtin must answer as OPA's does, and bad operands end in a deny, never a crash or a hang.
Policies are loaded through pdp's own loader (``load_config`` + ``load_policy``), as the service does.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from pdp.assemble import load_policy
from pdp.config import load_config
from pdp.errors import LoadError
from pdp.policy.engine import PolicyEngine, PolicyEvalError
from pdp.policy.result import decided_outcome


def _engine(tmp_path: Path, source: str, *, decision: str = "p/allow", rego_version: str = "v0",
            cache: int = 0) -> PolicyEngine:
    """The policy as the service loads it: config file, bundle, load-time checks, compiled engine."""
    (tmp_path / "policy.rego").write_text(source)
    config = tmp_path / "pdp.toml"
    config.write_text(f'[policy]\nengine = "regorus"\npaths = ["policy.rego"]\ndecision = "{decision}"\n'
                      f'rego_version = "{rego_version}"\ndecision_cache_size = {cache}\n')
    return load_policy(load_config(config))


def _decide(engine: PolicyEngine, doc: dict[str, Any]) -> bool:
    """The policy step as ``Pdp._policy`` runs it: the decision cache first, then the engine."""
    return decided_outcome(engine, doc)[0].allowed


# -- v0 rule heads that regorus reads otherwise than OPA ---------------------------------------------

def test_v0_two_term_ref_head_is_a_partial_set_rule_as_on_opa(tmp_path: Path) -> None:
    # OPA v0 reads `admins.alice { … }` as `admins contains "alice" if { … }` (ast/parser.go parseRules:
    # "p[x] becomes a multi-value rule p", a two-term ref with no value); `admins.alice` is then undefined
    # when the body fails. regorus v0 makes `admins.alice` a multi-value rule of its own with no key,
    # whose value is the empty set, defined and truthy, whatever the body says.
    source = ('package p\n\ndefault allow = false\n\nadmins.alice {\n    input.user == "alice"\n}\n\n'
              'allow {\n    admins.alice\n}\n')
    try:
        engine = _engine(tmp_path, source)
    except LoadError:
        return  # refusing what it cannot read as OPA does is fine
    assert _decide(engine, {"user": "alice"}) is True
    assert _decide(engine, {"user": "mallory"}) is False  # pdp allows mallory here; OPA denies


def test_v0_two_term_ref_head_counts_as_on_opa(tmp_path: Path) -> None:
    source = ('package p\n\ndefault allow = false\n\nblocked.mallory {\n    input.user == "mallory"\n}\n\n'
              'allow {\n    count(blocked) == 0\n}\n\nadmins.alice {\n    input.user == "alice"\n}\n\n'
              'admin_count = count(admins)\n')
    try:
        engine = _engine(tmp_path, source)
    except LoadError:
        return
    # OPA: blocked = set() for bob, so count(blocked) == 0 and bob is allowed; admins = set() for bob.
    assert engine.query("data.p.admin_count", {"user": "bob"}) == 0


@pytest.mark.parametrize("source", [
    # A rule head alone: OPA v0 refuses it ("var cannot be used for rule name", ParseRuleFromExpr);
    # regorus v0 reads it as `allow = true`.
    "package p\n\ndefault allow = false\n\nallow\n",
    # The body commented out: the same bare head.
    "package p\n\ndefault allow = false\n\nallow # {\n#     input.user == \"admin\"\n# }\n",
    # A word after the head that is no keyword of either version: regorus reads `allow` (true), then a
    # rule named `iff`; OPA refuses the module.
    "package p\n\ndefault allow = false\n\nallow iff {\n    input.user == \"admin\"\n}\n",
    "package p\n\ndefault allow = false\n\nallow when {\n    input.user == \"admin\"\n}\n",
    # A constant head followed by a stray name before the body: OPA (parseRules, then ParseRuleFromExpr) and
    # regorus both read two rules, an unconditional `allow = true` and a rule `if_admin`; OPA loads that,
    # pdp refuses it (pdp.policy.v0_heads), since no author writes an unconditional rule this way.
    "package p\n\ndefault allow = false\n\nallow = true if_admin {\n    input.user == \"admin\"\n}\n",
    # Importing `if` changes nothing: the head is still bare (with `import rego.v1` regorus refuses it).
    "package p\n\nimport future.keywords.if\n\ndefault allow = false\n\nallow\n",
], ids=["bare-head", "body-commented-out", "iff", "when", "value-then-name", "future-if-imported"])
def test_v0_bare_rule_head_is_refused_as_on_opa(tmp_path: Path, source: str) -> None:
    with pytest.raises(LoadError):
        engine = _engine(tmp_path, source)
        # Not refused: say what pdp decides for a user the author meant to deny.
        pytest.fail(f"loaded; decides {engine.evaluate({'user': 'mallory'})!r} for mallory")


def test_v0_contains_head_without_import_is_refused_as_on_opa(tmp_path: Path) -> None:
    # The guard lets `contains` through when `(` follows (the builtin `contains(s, t)`), but in a rule
    # head regorus v0 takes it for the keyword it was not told about; OPA v0 refuses the module.
    source = ('package p\n\ndefault allow = false\n\nroles contains("admin") {\n    input.user == "alice"\n}\n\n'
              'allow {\n    roles[input.role]\n}\n')
    with pytest.raises(LoadError):
        engine = _engine(tmp_path, source)
        pytest.fail(f"loaded; allows role admin for alice: {engine.evaluate({'user': 'alice', 'role': 'admin'})!r}")


@pytest.mark.parametrize("source", [
    "package p\n\nimport rego.v1\n\ndefault allow := false\n\nallow\n",
    "package p\n\nimport rego.v1\nimport future.keywords\n\ndefault allow := false\n\nallow if input.x == 1\n",
    "package p\n\nimport rego.v1\n\ndefault allow := false\n\nallow {\n    input.x == 1\n}\n",
], ids=["rego-v1-bare-head", "rego-v1-and-future-keywords", "rego-v1-without-if"])
def test_a_v0_module_importing_rego_v1_is_held_to_v1_as_on_opa(tmp_path: Path, source: str) -> None:
    # OPA parses a module importing rego.v1 as Rego v1 (and refuses rego.v1 next to future.keywords).
    with pytest.raises(LoadError):
        _engine(tmp_path, source)


# -- the v1 keyword guard: hiding a keyword from it ---------------------------------------------------

@pytest.mark.parametrize("source", [
    'package p\n\nx := "a\\"b # `"\n\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\nx := `a"b`\n\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\n# a " and a ` in a comment\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\nx := `\nimport future.keywords.if\n`\n\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\nimport future.keywords.in\n\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\n# import future.keywords.if\ndefault allow = false\n\nallow if { input.x == 1 }\n',
    'package p\n\ndefault allow = false\n\nallow if{ input.x == 1 }\n',
    'package p\n\ndefault allow = false\n\nallow\tif\t{ input.x == 1 }\n',
], ids=["escaped-quote", "raw-string-quote", "comment-quotes", "import-in-raw-string", "other-keyword-imported",
        "import-in-comment", "no-space", "tabs"])
def test_v1_keyword_hidden_from_the_guard_is_still_refused(tmp_path: Path, source: str) -> None:
    with pytest.raises(LoadError) as info:
        _engine(tmp_path, source)
    assert info.value.key == "policy.rego_version"


# -- the decision cache and `import input.… as alias` --------------------------------------------------

ALIAS_POLICY = """package envoy.authz

import input.attributes.request.http as http_request

default allow = false

allow {
    http_request.method == "GET"
    http_request.headers["x-role"] == "admin"
}
"""


def _http(role: str, *, method: str = "GET", path: str = "/a") -> dict[str, Any]:
    return {"attributes": {"request": {"http": {"method": method, "path": path,
                                                "headers": {"x-role": role, "host": "h"}}}}}


@pytest.mark.parametrize("source", [
    ALIAS_POLICY,
    ALIAS_POLICY.replace("import input.attributes.request.http as http_request",
                         "import input.attributes.request.http").replace("http_request.", "http."),
    ALIAS_POLICY.replace("import input.attributes.request.http as http_request",
                         "import input.attributes as a").replace("http_request.", "a.request.http."),
    ALIAS_POLICY.replace("import input.attributes.request.http as http_request",
                         'import input["attributes"]["request"] as r').replace("http_request.", "r.http."),
], ids=["alias", "no-alias", "shorter-alias", "bracket-import"])
def test_the_cache_keys_on_what_an_import_alias_reads(tmp_path: Path, source: str) -> None:
    engine = _engine(tmp_path, source, decision="envoy/authz/allow", cache=100)
    assert engine.decisions is not None
    admin, guest = _http("admin"), _http("guest")
    assert engine.decisions.key(admin) != engine.decisions.key(guest)
    assert _decide(engine, admin) is True
    assert _decide(engine, guest) is False  # not the cached allow of the request before
    assert _decide(engine, admin) is True and engine.decisions.hits == 1
    assert _decide(engine, _http("admin", method="POST")) is False


def test_the_cache_is_off_when_input_is_imported_whole(tmp_path: Path) -> None:
    source = ("package p\n\nimport input as req\n\ndefault allow = false\n\n"
              "allow {\n    req.attributes.request.http.headers[\"x-role\"] == \"admin\"\n}\n")
    engine = _engine(tmp_path, source, cache=100)
    assert engine.decisions is None
    assert _decide(engine, _http("admin")) is True and _decide(engine, _http("guest")) is False


# -- regex.globs_match: bounded, and errors end in a deny ------------------------------------------------

GLOBS = "package p\n\nimport future.keywords.if\n\nallow if regex.globs_match(input.g, \"a.*\")\n"


def test_globs_match_set_ranges_are_not_expanded_rune_by_rune(tmp_path: Path) -> None:
    # A glob from the request (a header, a token claim) holding `[\x00-\U0010ffff]` makes pdp build a set
    # of 1,114,112 one-character strings per bracket (~100 MB and ~0.35 s each): a few kilobytes of
    # them take minutes and gigabytes. Ranges compare as ranges; memory must not grow with their width.
    engine = _engine(tmp_path, GLOBS)
    glob = "[\x00-\U0010ffff]" * 2
    tracemalloc.start()
    try:
        allowed = engine.evaluate({"g": glob})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allowed is True
    assert peak < 16 * 1024 * 1024, f"{peak / 1e6:.0f} MB for two bracket expressions"


_BACKTRACK_CHILD = """
import sys
from pdp.policy.engine import PolicyBundle, PolicyEngine
source = "package p\\n\\nallow = regex.globs_match(input.a, input.b)\\n"
engine = PolicyEngine(PolicyBundle((("p.rego", source),), {}, "data.p.allow", "regorus", "v0"))
try:
    print(engine.evaluate({"a": ".*a" * 8 + ".*b", "b": "a" * 64 + "a*"}))
except Exception as exc:
    print("error", type(exc).__name__)
"""


def test_globs_match_backtracking_is_bounded() -> None:
    # gintersect's `star`/`normal` try every split: `.*a` k times against n `a`s is ~n^k/k! steps
    # (k=5, n=60 took 14 s here). 90 bytes of request text must not hold a worker for hours: the answer
    # (false) or an evaluation error (a deny) must come at once. Run in a child so that a hang is killed.
    try:
        done = subprocess.run([sys.executable, "-c", _BACKTRACK_CHILD], capture_output=True, timeout=8,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("regex.globs_match(\".*a\" * 8 + \".*b\", \"a\" * 64 + \"a*\") still running after 8 s")
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert done.stdout.decode().strip().splitlines()[-1] in ("False", "error PolicyEvalError")


def test_globs_match_deep_nesting_is_a_deny_not_a_crash(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "package p\n\nallow = regex.globs_match(input.a, input.b)\n")
    with pytest.raises(PolicyEvalError):
        engine.evaluate({"a": "a+b+" * 3000, "b": "a*b*" * 3000})
    with pytest.raises(PolicyEvalError, match="found \\[ without matching \\]"):
        engine.evaluate({"a": "[a", "b": "a"})


# -- v0 deprecated builtins and OPA's errors --------------------------------------------------------------

def test_deprecated_builtins_on_sets_of_collections_are_a_deny_not_a_crash(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "package p\n\nallow = count(cast_set(input.a)) == 1\n")
    with pytest.raises(PolicyEvalError):
        engine.evaluate({"a": [[1], [1]]})


def test_deprecated_builtins_are_refused_in_v1(tmp_path: Path) -> None:
    source = "package p\n\ndefault allow := false\n\nallow if re_match(\"^a\", input.x)\n"
    with pytest.raises(LoadError, match="re_match"):
        _engine(tmp_path, source, rego_version="v1")
