"""Load-time refusal of policies that mean something else on regorus than on OPA, or that cannot run.

Each flagged construct is shown to differ for real: regorus evaluates it to
true where the member is missing, and the form OPA's compiler rewrites it to
(opa issue #1877: the term bound first, in an expression of its own) is
undefined on the same input. Each construct left alone is shown to mean the
same in both forms.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import regorus
from pdp.policies import DEFAULT_POLICY_DIR
from servers import serve_pdp

from pdp.assemble import load_policy
from pdp.config import Config, load_config
from pdp.errors import ConfigError, LoadError
from pdp.policy import callcheck, divergence, rego_ast

PRELUDE = """package t
import rego.v1
g(_) if true
default d := "a"
s contains 1 if false
r := input.missing
"""


def _policy(stmts: str) -> str:
    body = "\n".join(f"  {line.strip()}" for line in stmts.strip().splitlines())
    return f"{PRELUDE}allow if {{\n{body}\n}}\n"


def _regorus(stmts: str, input_doc: dict[str, Any]) -> Any:
    engine = regorus.Engine()
    engine.add_policy("t.rego", _policy(stmts))
    engine.set_input(input_doc)
    return engine.eval_rule("data.t.allow")


def _found(stmts: str) -> list[divergence.Divergence]:
    return divergence.find(rego_ast.parse((("t.rego", _policy(stmts)),)))


INPUT = {"a": {}, "routes": [{"ids": ["x"]}], "list": [2], "cert": {"present": False}}

# (construct, the form OPA evaluates it as: the lifted term bound before the negation)
DIFFERING = [
    ('not startswith(input.h["x-forwarded-for"], "203.0.113.")',
     't := input.h["x-forwarded-for"]\nnot startswith(t, "203.0.113.")'),
    ("not 1 in input.missing_list", "t := input.missing_list\nnot 1 in t"),
    ("not input.missing in input.list", "t := input.missing\nnot t in input.list"),
    ("not input.missing != 1", "t := input.missing\nnot t != 1"),
    ("not input.missing < 1", "t := input.missing\nnot t < 1"),
    ("not g(input.missing)", "t := input.missing\nnot g(t)"),
    ('not startswith(lower(input.missing), "x")', 't := lower(input.missing)\nnot startswith(t, "x")'),
    ("not count(input.missing) == 0", "t := count(input.missing)\nnot t == 0"),
    ("not input.missing + 1 == 2", "t := input.missing + 1\nnot t == 2"),
    ("not input.a[input.k]", "t := input.k\nnot input.a[t]"),
    ("not [input.missing] == [1]", "t := input.missing\nnot [t] == [1]"),
    ('not startswith(r, "x")', 't := r\nnot startswith(t, "x")'),
    ('not startswith(input.a.b.c.d, "x")', 't := input.a.b.c.d\nnot startswith(t, "x")'),
    ("some route in input.routes\nnot g(route.other)", "some route in input.routes\nt := route.other\nnot g(t)"),
]

# (construct, the form OPA evaluates it as): nothing that may be undefined is lifted, so both agree.
AGREEING = [
    ("not input.missing", "not input.missing"),
    ("not input.cert.present", "not input.cert.present"),
    # OPA rewrites == to unification, whose reference sides are not lifted.
    ("not input.missing == 1", "not input.missing = 1"),
    ('h := input.missing\nnot startswith(h, "x")', 'h := input.missing\nnot startswith(h, "x")'),
    ('not startswith(d, "x")', 't := d\nnot startswith(t, "x")'),
    ("not count(s) == 1", "t := count(s)\nnot t == 1"),
    ('x := object.get(input, ["token", "scopes"], [])\nnot "a" in x',
     'x := object.get(input, ["token", "scopes"], [])\nnot "a" in x'),
    ("input.list\nnot 1 in input.list", "input.list\nt := input.list\nnot 1 in t"),
    ("some route in input.routes\nroute.ids\nnot g(route.ids)",
     "some route in input.routes\nroute.ids\nt := route.ids\nnot g(t)"),
    ("not count([y | y := input.missing[_]]) == 1", "t := count([y | y := input.missing[_]])\nnot t == 1"),
]


@pytest.mark.parametrize(("construct", "as_opa"), DIFFERING, ids=[c for c, _ in DIFFERING])
def test_a_construct_that_differs_is_found_and_really_differs(construct: str, as_opa: str) -> None:
    assert _regorus(construct, INPUT) is True
    assert _regorus(as_opa, INPUT) is None
    found = _found(construct)
    assert len(found) == 1
    assert found[0].line == PRELUDE.count("\n") + construct.count("\n") + 2


@pytest.mark.parametrize(("construct", "as_opa"), AGREEING, ids=[c for c, _ in AGREEING])
def test_a_construct_that_agrees_is_left_alone(construct: str, as_opa: str) -> None:
    for input_doc in (INPUT, {**INPUT, "missing": "x", "list": [1], "cert": {"present": True}}):
        assert _regorus(construct, input_doc) == _regorus(as_opa, input_doc)
    assert _found(construct) == []


# A rule's name bound as a variable elsewhere in the same rule is still the rule at the `not`:
# (construct, the form OPA evaluates it as, line of the `not` in the construct).
RULE_NAME_REUSED = [
    ('not startswith(r, "x")\nevery r in ["a"] { r == "a" }',
     't := r\nnot startswith(t, "x")\nevery r in ["a"] { r == "a" }', 1),
    ('not startswith(r, "x")\nn := count([1 | r := 1])',
     't := r\nnot startswith(t, "x")\nn := count([1 | r := 1])', 1),
    ('every x in [1] { r := x }\nnot startswith(r, "x")',
     'every x in [1] { r := x }\nt := r\nnot startswith(t, "x")', 2),
]


@pytest.mark.parametrize(("construct", "as_opa", "line"), RULE_NAME_REUSED, ids=[c for c, _, _ in RULE_NAME_REUSED])
def test_a_rule_name_bound_elsewhere_in_the_rule_is_still_the_rule_at_the_not(construct: str, as_opa: str,
                                                                               line: int) -> None:
    assert _regorus(construct, INPUT) is True
    assert _regorus(as_opa, INPUT) is None
    found = _found(construct)
    assert [(d.line, d.term) for d in found] == [(PRELUDE.count("\n") + 1 + line, "r")]


def test_a_rule_name_bound_in_an_else_body_is_still_the_rule_in_the_first_body() -> None:
    source = (f'{PRELUDE}allow if {{\n  not startswith(r, "x")\n}} else := false if {{\n  r := "y"\n'
              f'  r == "z"\n}}\n')
    engine = regorus.Engine()
    engine.add_policy("t.rego", source)
    engine.set_input(INPUT)
    assert engine.eval_rule("data.t.allow") is True  # OPA: `t := r` is undefined, so is the first body
    found = divergence.find(rego_ast.parse((("t.rego", source),)))
    assert [(d.line, d.term) for d in found] == [(PRELUDE.count("\n") + 2, "r")]


def test_a_rule_name_bound_before_the_not_in_the_same_query_is_the_variable() -> None:
    for construct in ('r := "a"\nnot startswith(r, "x")', 'every r in ["a"] { not startswith(r, "x") }',
                      'n := count([1 | r := "a"; not startswith(r, "x")])'):
        assert _regorus(construct, INPUT) is True
        assert _found(construct) == [], construct


# An earlier expression that succeeds whatever its terms (`print`), or is evaluated against another input
# (`with`), does not make a reference defined for a later `not`.
NOT_REQUIRING = [
    ('print(input.missing)\nnot startswith(input.missing, "x")',
     'print(input.missing)\nt := input.missing\nnot startswith(t, "x")'),
    ('input.missing with input as {"missing": "y"}\nnot startswith(input.missing, "x")',
     'input.missing with input as {"missing": "y"}\nt := input.missing\nnot startswith(t, "x")'),
]


@pytest.mark.parametrize(("construct", "as_opa"), NOT_REQUIRING, ids=["print", "with"])
def test_print_or_with_does_not_make_a_reference_defined(construct: str, as_opa: str) -> None:
    assert _regorus(construct, INPUT) is True
    assert _regorus(as_opa, INPUT) is None
    assert [(d.line, d.term) for d in _found(construct)] == [(PRELUDE.count("\n") + 3, "input.missing")]


def test_the_forwarded_for_policy_that_allowed_what_opa_denies_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "authz.rego"
    policy.write_text("""package envoy.authz
import rego.v1
default allow := false
allow if {
\tinput.attributes.request.http.method == "GET"
\tnot startswith(input.attributes.request.http.headers["x-forwarded-for"], "203.0.113.")
}
""")
    config = _config(tmp_path, policy_paths=[str(policy)])
    with pytest.raises(LoadError) as err:
        load_policy(config)
    assert err.value.key == "policy.paths"
    assert f"{policy}:6:" in err.value.message
    assert 'not startswith(input.attributes.request.http.headers["x-forwarded-for"], "203.0.113.")' \
        in err.value.message
    assert 'v := input.attributes.request.http.headers["x-forwarded-for"]' in err.value.message


def test_warn_loads_the_policy_and_logs_each_construct(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "p.rego"
    policy.write_text('package pdp.authz\nimport rego.v1\nresult if not startswith(input.h.x, "a")\n')
    config = _config(tmp_path, policy_paths=[str(policy)], divergence="warn")
    with caplog.at_level(logging.WARNING, logger="pdp"):
        engine = load_policy(config)
    assert engine.evaluate({"h": {}}) is True
    assert any(f"{policy}:3:" in r.getMessage() for r in caplog.records)


def test_the_shipped_policy_has_no_divergence_and_no_bad_call() -> None:
    modules = tuple((str(f), f.read_text()) for f in sorted(DEFAULT_POLICY_DIR.glob("*.rego")))
    tree = rego_ast.parse(modules)
    assert divergence.find(tree) == []
    assert callcheck.find(tree) == []


def test_the_key_defaults_to_refuse_and_other_values_name_it(tmp_path: Path) -> None:
    assert Config.defaults().policy.divergence == "refuse"
    (tmp_path / "pdp.toml").write_text('[policy]\ndivergence = "ignore"\n')
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "pdp.toml")
    assert err.value.key == "policy.divergence"
    (tmp_path / "pdp.toml").write_text('[policy]\ndivergence = "warn"\n')
    assert load_config(tmp_path / "pdp.toml").policy.divergence == "warn"


CALLS = [
    ("a if crypto.x509.parse_and_verify_certificates(input.c)", "crypto.x509.parse_and_verify_certificates",
     "unknown function"),
    ("a if no.such_builtin(1)", "no.such_builtin", "unknown function"),
    ("f(x) := x\na if f(1, 2, 3)", "f", "takes 1 argument(s), called with 3"),
    ("r := 1\na if r(1)", "r", "is a rule, not a function"),
    ("a if count(1) > 0", "count", "fails on every request"),
    ('a if startswith(1, "x")', "startswith", "fails on every request"),
]


@pytest.mark.parametrize(("rules", "name", "problem"), CALLS, ids=[n for _, n, _ in CALLS])
def test_a_call_that_cannot_run_is_refused_naming_it_and_its_line(tmp_path: Path, rules: str, name: str,
                                                                   problem: str) -> None:
    policy = tmp_path / "p.rego"
    policy.write_text(f"package pdp.authz\nimport rego.v1\n{rules}\nresult := true\n")
    with pytest.raises(LoadError) as err:
        load_policy(_config(tmp_path, policy_paths=[str(policy)]))
    line = 3 + rules.count("\n")
    assert f"{policy}:{line}: {name}: {problem}" in err.value.message


def test_calls_that_can_run_are_accepted() -> None:
    source = ('package t\nimport rego.v1\nf(x) := x\nf2(x, y) := x\n'
              'a if { f(1); f(1, y); y == 1; startswith("ab", "a"); object.get(input, "k", 1); f2(1, 2) }\n'
              'b if io.jwt.decode(input.t)\n')  # one of pdp's extensions (pdp.policy.builtins)
    assert callcheck.find(rego_ast.parse((("t.rego", source),))) == []
    assert callcheck.engine_has("startswith") and not callcheck.engine_has("io.jwt.decode")


def test_a_refused_new_version_keeps_the_policy_in_force(write_setup, tmp_path: Path, pki, issuer) -> None:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    good = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": false, "reason": "v1"}\n'
    (policy_dir / "p.rego").write_text(good)
    config = load_config(write_setup(engine="regorus", policy_paths=["policy"], reload_interval=0.1))
    with serve_pdp(config) as (url, service):
        first = service.pdp.policy.version
        (policy_dir / "p.rego").write_text(
            good + 'result := {"allowed": true, "reason": "v2"} if not startswith(input.h.x, "a")\n')
        assert _wait_for(lambda: 'pdp_reloads_total{part="policy",result="failed"} 1.0'
                         in httpx.get(f"{url}/metrics").text)
        (policy_dir / "p.rego").write_text(
            good.replace("v1", "v2") + "x if crypto.x509.parse_and_verify_certificates(input.c)\n")
        assert _wait_for(lambda: 'pdp_reloads_total{part="policy",result="failed"} 2.0'
                         in httpx.get(f"{url}/metrics").text)
        assert service.pdp.policy.version == first


def _wait_for(predicate: Any, attempts: int = 200) -> bool:
    import time

    for _ in range(attempts):
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _config(tmp_path: Path, *, policy_paths: list[str], divergence: str = "refuse") -> Config:
    config = Config.defaults()
    return dataclasses.replace(config, policy=dataclasses.replace(
        config.policy, engine="regorus", paths=tuple(Path(p) for p in policy_paths), divergence=divergence))
