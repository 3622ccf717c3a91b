"""``pdp policy test``: discovering test_ rules, running them, reporting like ``opa test``."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pdp.policies import DEFAULT_POLICY_DIR

from pdp.policy import testing as rego_testing
from pdp.policy.engine import PolicyBundle, load_bundle
from pdp.policy.testing import discover, report, run_tests

SUBJECT = """package demo
import rego.v1

h := input.a

r if h == 1

limit := data.limits.max
"""

TESTS = """package demo_test
import rego.v1

test_passes if data.demo.r with input as {"a": 1}

test_fails if data.demo.r with input as {"a": 2}

test_false := false

test_undefined if input.nope

test_errors if to_number("not a number") > 1

test_uses_data if data.demo.limit == 10

helper_not_a_test := true

  test_indented_is_not_a_rule_start := true
"""


def demo_bundle(engine: str = "regorus") -> PolicyBundle:
    return PolicyBundle((("demo.rego", SUBJECT), ("demo_test.rego", TESTS)), {"limits": {"max": 10}}, "data",
                        engine)


def test_discover_finds_test_rules_per_package_in_file_order() -> None:
    found = discover(demo_bundle())
    assert found == [
        ("demo_test.rego", "data.demo_test.test_passes"),
        ("demo_test.rego", "data.demo_test.test_fails"),
        ("demo_test.rego", "data.demo_test.test_false"),
        ("demo_test.rego", "data.demo_test.test_undefined"),
        ("demo_test.rego", "data.demo_test.test_errors"),
        ("demo_test.rego", "data.demo_test.test_uses_data"),
    ]


def test_discover_lists_a_rule_with_several_bodies_once_and_skips_modules_without_package() -> None:
    modules = (
        ("a.rego", "package a.b\nimport rego.v1\ntest_x if true\ntest_x if false\ntest_y := true\n"),
        ("c.rego", "package c\nimport rego.v1\ntest_z if true\n"),
        ("no_package.rego", "test_orphan := true\n"),
    )
    assert discover(PolicyBundle(modules, {}, "data", "regorus")) == [
        ("a.rego", "data.a.b.test_x"), ("a.rego", "data.a.b.test_y"), ("c.rego", "data.c.test_z")]


def test_run_tests_outcomes() -> None:
    results = run_tests(demo_bundle())
    outcomes = {r.name.rsplit(".", 1)[1]: r.outcome for r in results}
    assert outcomes == {
        "test_passes": "PASS",
        "test_fails": "FAIL",
        "test_false": "FAIL",
        "test_undefined": "FAIL",
        "test_errors": "ERROR",
        "test_uses_data": "PASS",
    }
    for r in results:
        assert r.file == "demo_test.rego"
        assert r.duration >= 0
        assert bool(r.detail) == (r.outcome == "ERROR")
    error = next(r for r in results if r.outcome == "ERROR")
    assert "number" in error.detail


def test_run_tests_on_regopy_without_with() -> None:
    modules = (("p.rego", "package p\nimport rego.v1\nx := data.v\n"),
               ("p_test.rego", "package p_test\nimport rego.v1\ntest_ok if data.p.x == 3\ntest_bad if data.p.x == 4\n"))
    results = run_tests(PolicyBundle(modules, {"v": 3}, "data", "regopy"))
    assert [(r.name, r.outcome) for r in results] == [("data.p_test.test_ok", "PASS"), ("data.p_test.test_bad", "FAIL")]


def _result(name: str, outcome: str, detail: str = "") -> rego_testing.TestResult:
    return rego_testing.TestResult(name=f"data.t.{name}", file="t_test.rego", outcome=outcome, duration=0.0015,
                                   detail=detail)


def test_report_all_passing_is_quiet() -> None:
    out = io.StringIO()
    assert report([_result("test_a", "PASS"), _result("test_b", "PASS")], out) is True
    assert out.getvalue() == "PASS: 2/2\n"


def test_report_all_passing_verbose_lists_every_test() -> None:
    out = io.StringIO()
    assert report([_result("test_a", "PASS"), _result("test_b", "PASS")], out, verbose=True) is True
    text = out.getvalue()
    assert "t_test.rego:\ndata.t.test_a: PASS (1.500ms)\n" in text
    assert "data.t.test_b: PASS" in text
    assert text.endswith("-" * 80 + "\nPASS: 2/2\n")


def test_report_failures_and_errors() -> None:
    out = io.StringIO()
    results = [_result("test_a", "PASS"), _result("test_b", "FAIL"), _result("test_c", "ERROR", "boom")]
    assert report(results, out) is False
    text = out.getvalue()
    assert "data.t.test_a" not in text  # passing tests are listed only when verbose
    assert "t_test.rego:\ndata.t.test_b: FAIL (1.500ms)\n" in text
    assert "data.t.test_c: ERROR (1.500ms)\n  boom\n" in text
    assert text.endswith("-" * 80 + "\nPASS: 1/3\nFAIL: 1/3\nERROR: 1/3\n")


@pytest.mark.parametrize("outcome", ["FAIL", "ERROR"])
def test_report_is_false_on_any_single_failure(outcome: str) -> None:
    results = [_result(f"test_{i}", "PASS") for i in range(9)] + [_result("test_last", outcome)]
    out = io.StringIO()
    assert report(results, out) is False
    assert "PASS: 9/10" in out.getvalue()
    assert f"{outcome}: 1/10" in out.getvalue()


def test_report_no_tests_is_a_failure() -> None:
    out = io.StringIO()
    assert report([], out) is False
    assert out.getvalue() == "no tests found\n"


def test_report_of_a_real_run() -> None:
    out = io.StringIO()
    assert report(run_tests(demo_bundle()), out) is False
    text = out.getvalue()
    assert "PASS: 2/6\n" in text and "FAIL: 3/6\n" in text and "ERROR: 1/6\n" in text
    assert "data.demo_test.test_errors: ERROR" in text


def test_shipped_policy_tests_all_pass_with_regorus() -> None:
    bundle = load_bundle([DEFAULT_POLICY_DIR], entrypoint="data", engine="regorus", include_tests=True)
    results = run_tests(bundle)
    source = (Path(DEFAULT_POLICY_DIR) / "zero_trust_test.rego").read_text()
    expected = set(re.findall(r"^(test_\w+)", source, re.MULTILINE))
    assert len(expected) >= 10
    assert {r.name.rsplit(".", 1)[1] for r in results} == expected
    failing = [(r.name, r.outcome, r.detail) for r in results if r.outcome != "PASS"]
    assert failing == []
    out = io.StringIO()
    assert report(results, out) is True
    assert out.getvalue() == f"PASS: {len(expected)}/{len(expected)}\n"
