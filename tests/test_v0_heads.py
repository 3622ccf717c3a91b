"""``pdp.policy.v0_heads``: the Rego v0 rule heads regorus reads otherwise than OPA, refused wherever a v0
bundle is compiled (the service's load, ``PolicyEngine``, ``pdp policy test --v0-compatible``); the heads both
read alike still load and decide as on OPA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pdp.errors import LoadError
from pdp.policy import rego_ast
from pdp.policy.engine import PolicyBundle, PolicyEngine

PDP = str(Path(sys.executable).parent / "pdp")


def _bundle(source: str, entrypoint: str = "data.p.allow") -> PolicyBundle:
    return PolicyBundle((("m.rego", source),), {}, entrypoint, "regorus", "v0")


def _refusal(source: str) -> LoadError:
    """The error of both places that compile a v0 bundle: the engine, and the load-time syntax tree."""
    with pytest.raises(LoadError) as from_engine:
        PolicyEngine(_bundle(source))
    with pytest.raises(LoadError) as from_tree:
        rego_ast.parse((("m.rego", source),), rego_version="v0")
    assert str(from_engine.value) == str(from_tree.value)
    return from_engine.value


def test_a_two_part_name_without_value_is_refused_with_the_bracket_form_to_write() -> None:
    error = _refusal('package p\n\nadmins.alice {\n    input.user == "alice"\n}\n\nallow {\n    admins.alice\n}\n')
    assert error.key == "policy.paths"
    assert "m.rego:3:" in error.message and 'admins["alice"] { … }' in error.message
    assert 'admins contains "alice"' in error.message


def test_a_two_part_name_alone_is_refused_too() -> None:
    # OPA: `a contains "b"`, a set; regorus: an object {"b": set()}. `a == {"b"}` would differ.
    assert 'a["b"]' in _refusal("package p\n\na.b\n\nallow = a\n").message


def test_the_bracket_form_decides_as_on_opa() -> None:
    source = ('package p\n\ndefault allow = false\n\nadmins["alice"] {\n    input.user == "alice"\n}\n\n'
              'allow {\n    admins.alice\n}\n\nn = count(admins)\n')
    engine = PolicyEngine(_bundle(source))
    assert engine.evaluate({"user": "alice"}) is True
    assert engine.evaluate({"user": "mallory"}) is False
    assert engine.query("data.p.n", {"user": "mallory"}) == 0


@pytest.mark.parametrize(("source", "name"), [
    ("package p\n\nallow\n", "allow"),
    ("package p\n\nallow when {\n    input.x == 1\n}\n", "allow"),
    ("package p\n\nimport future.keywords\n\nallow\n", "allow"),
])
def test_a_name_alone_is_refused_naming_the_line(source: str, name: str) -> None:
    error = _refusal(source)
    assert error.key == "policy.paths"
    assert f"`{name}` is a rule name with neither a value nor a body" in error.message
    assert "var cannot be used for rule name" in error.message


def test_a_dotted_name_alone_is_a_true_rule_on_both_and_loads() -> None:
    source = "package p\n\na.b.c\n\nallow = a.b.c\n"
    rego_ast.parse((("m.rego", source),), rego_version="v0")
    assert PolicyEngine(_bundle(source)).evaluate({}) is True


def test_a_word_between_value_and_body_is_refused_naming_both_rules() -> None:
    error = _refusal('package p\n\ndefault allow = false\n\nallow = true if_admin {\n    input.user == "admin"\n}\n')
    assert "`allow = true` and `if_admin` are two rules on one line" in error.message
    assert "m.rego:5:" in error.message


def test_rules_on_lines_of_their_own_load() -> None:
    source = "package p\n\ndefault allow = false\nx = 1\ny = 2 # z = 3\n\nallow {\n    x == 1\n}\n"
    assert PolicyEngine(_bundle(source)).evaluate({}) is True


@pytest.mark.parametrize("head", ['roles contains("admin")', 'roles contains "admin"', "roles  contains  (x)"])
def test_contains_in_a_head_without_its_import_is_refused(head: str) -> None:
    body = "x := input.role" if "(x)" in head else "input.user == \"alice\""
    error = _refusal(f"package p\n\n{head} {{\n    {body}\n}}\n")
    assert error.key == "policy.rego_version"
    assert "m.rego:3:" in error.message and "`contains`" in error.message


@pytest.mark.parametrize("imports", ["import future.keywords.contains", "import future.keywords"])
def test_contains_in_a_head_with_its_import_is_a_partial_set(imports: str) -> None:
    source = (f'package p\n\n{imports}\n\nroles contains("admin") {{\n    input.user == "alice"\n}}\n\n'
              'allow {\n    roles[input.role]\n}\n')
    engine = PolicyEngine(_bundle(source))
    assert engine.evaluate({"user": "alice", "role": "admin"}) is True
    assert engine.evaluate({"user": "bob", "role": "admin"}) is not True


def test_the_builtin_contains_in_a_body_and_a_member_named_contains_load() -> None:
    source = ('package p\n\nd := {"contains": 1}\n\nr[x] {\n    x := contains(input.s, "a")\n}\n\n'
              "allow {\n    r[true]\n    d.contains == 1\n}\n")
    engine = PolicyEngine(_bundle(source))
    assert engine.evaluate({"s": "cat"}) is True
    assert engine.evaluate({"s": "dog"}) is not True


def test_crlf_line_endings_keep_a_future_keyword_import() -> None:
    source = ("package p\r\n\r\nimport future.keywords.if\r\nimport future.keywords.in # all of them\r\n\r\n"
              "default allow = false\r\n\r\nallow if {\r\n    input.role in [\"admin\"]\r\n}\r\n")
    engine = PolicyEngine(_bundle(source))
    assert engine.evaluate({"role": "admin"}) is True
    assert engine.evaluate({"role": "guest"}) is False
    rego_ast.parse((("m.rego", source),), rego_version="v0")


def test_v1_bundles_are_not_held_to_v0_heads() -> None:
    source = "package p\n\nimport rego.v1\n\nadmins.alice if input.user == \"alice\"\n\nallow if admins.alice\n"
    engine = PolicyEngine(PolicyBundle((("m.rego", source),), {}, "data.p.allow", "regorus", "v1"))
    assert engine.evaluate({"user": "alice"}) is True
    assert engine.evaluate({"user": "mallory"}) is not True


V0_POLICY = 'package p\n\ndefault allow = false\n\nallow {\n    input.user == "alice"\n}\n'
V0_TESTS = ('package p\n\ntest_alice {\n    allow with input as {"user": "alice"}\n}\n\n'
            'test_mallory {\n    not allow with input as {"user": "mallory"}\n}\n')


def _policy_test(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, "policy", "test", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_pdp_policy_test_runs_v0_tests_with_v0_compatible(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(V0_POLICY)
    (tmp_path / "p_test.rego").write_text(V0_TESTS)
    result = _policy_test(str(tmp_path), "--v0-compatible", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data.p.test_alice: PASS" in result.stdout and "data.p.test_mallory: PASS" in result.stdout
    assert result.stdout.strip().endswith("PASS: 2/2")
    # Without the flag the modules are read as Rego v1, where they do not parse: the error names the key.
    v1 = _policy_test(str(tmp_path))
    assert v1.returncode != 0 and "policy.rego_version" in v1.stdout + v1.stderr


def test_pdp_policy_test_v0_compatible_refuses_a_misread_head(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text('package p\n\nadmins.alice {\n    input.user == "alice"\n}\n')
    (tmp_path / "p_test.rego").write_text('package p\n\ntest_mallory {\n    not admins.alice with input as '
                                          '{"user": "mallory"}\n}\n')
    result = _policy_test(str(tmp_path), "--v0-compatible")
    assert result.returncode != 0
    assert 'admins["alice"]' in result.stdout + result.stderr
    assert "PASS" not in result.stdout
