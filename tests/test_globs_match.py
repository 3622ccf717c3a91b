"""``regex.globs_match``: the port of the Go package OPA answers it with (glob-intersection), checked against
that package's own test tables (``non_empty_test.go``, ``TestNonEmptyIntersections`` and
``TestEmptyIntersections``) and its error messages; OPA's own cases are in tests/data/opa_builtin_cases.yaml."""

from __future__ import annotations

import time

import pytest

from pdp.policy.builtins.globs import MAX_GLOB_LENGTH, _simplify, _tokenize, non_empty
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError

# Go string literals written as Python raw strings: `".*\\\\"` in Go is the glob `.*\\` (an escaped `\`).
NON_EMPTY = {
    "abcd": ["abcd", "....", "[a-d]*"],
    "pqrs": [".qrs", "p.rs", "pq.s", "pqr."],
    ".*": ["asdklfj", "jasdfh", "asdhfajfh", "asdflkasdfjl"],
    "d*": ["[abcd][abcd]", "d[a-z]+", ".....", "[d]*"],
    "[a-p]+": ["[p-z]+", "apapapaapapapap", ".*", "abcdefgh*"],
    "abcd[a-c]z+": ["abcd[b-d][yz]*", "abcdazzzz", "abcdbzzz", "abcdcz"],
    r".*\\": [".*", r"asdfasdf\\"],
    ".a.a": ["b.b.", "c.c.", "d.d.", "e.e."],
    ".*.*.*.*.*.*.*.*.*.*.*.*.*.*.*": [".*.*.*.*.*.*.*.*.*.*.*"],
}
EMPTY = {
    "abcd": ["lsdfhda", "abcdla", "asdlfk", "ksdfj"],
    "[a-d]+": ["xyz", "p+", "[e-f]+"],
    "[0-9]*": ["[a-z]", r".\*"],
    "mamama.*": ["dadada.*", "nanana.*"],
    ".*mamama": [".*dadada", ".*nanana"],
    ".xyz.": ["paaap", ".*pqr.*"],
    "ab+": ["a", "b", "abc"],
    ".*.*.*.*f": [".*.*.*.*g"],
}


@pytest.mark.parametrize(("lhs", "rhs"), [(lhs, rhs) for lhs, rhss in NON_EMPTY.items() for rhs in rhss])
def test_non_empty_intersections(lhs: str, rhs: str) -> None:
    assert non_empty(lhs, rhs) is True
    assert non_empty(rhs, lhs) is True


@pytest.mark.parametrize(("lhs", "rhs"), [(lhs, rhs) for lhs, rhss in EMPTY.items() for rhs in rhss])
def test_empty_intersections(lhs: str, rhs: str) -> None:
    assert non_empty(lhs, rhs) is False


@pytest.mark.parametrize(("glob", "error"), [
    ("*a", "input:*a, pos:1, flag '*' must be preceded by a non-flag"),
    ("a]", "input:a], pos:2, set-close ']' with no preceding '['"),
    ("[ab", "input:[ab, pos:3, found [ without matching ]"),
    ("a\\", "input:a\\, pos:1, input ends with a \\ (escape) character"),
    ("[-a]", "input:[-a], pos:2, range character '-' must be preceded by a Unicode character"),
    ("[a-]", "input:[a-], pos:3, range character '-' must be followed by a Unicode character"),
    ("[a-]b", "input:[a-]b, pos:4, range character '-' cannot be followed by a special symbol"),
    ("[b-a]", "input:[b-a], pos:4, range is out of order: 'a' comes before 'b' in Unicode"),
])
def test_a_glob_the_package_refuses_is_an_evaluation_error(glob: str, error: str) -> None:
    source = "package t\n\nimport rego.v1\n\nx := regex.globs_match(input.glob, \"a\")\n"
    engine = PolicyEngine(PolicyBundle((("t.rego", source),), {}, "data.t.x", "regorus"))
    with pytest.raises(PolicyEvalError) as info:
        engine.evaluate({"glob": glob})
    assert f"regex.globs_match: {error}: the input provided is invalid" in str(info.value)


def test_operands_must_be_strings() -> None:
    source = "package t\n\nimport rego.v1\n\nx := regex.globs_match(\"a\", input.n)\n"
    engine = PolicyEngine(PolicyBundle((("t.rego", source),), {}, "data.t.x", "regorus"))
    with pytest.raises(PolicyEvalError, match=r"regex\.globs_match: operand 2 must be string but got number"):
        engine.evaluate({"n": 1})
    assert engine.evaluate({"n": "a"}) is True


@pytest.mark.parametrize(("lhs", "rhs", "expected"), [
    ("[\x00-\U0010ffff]", "a", True),
    ("[\x00-\U0010ffff]+", "[\U0010ffff]", True),
    ("[a-cx-z]", "[d-w]", False),
    ("[a-cx-z]", "[c-d]", True),
    ("[a-cx-z]", "[w-x]", True),
    ("[a-bc-d]+", "d", True),
    ("[a-\U0010fffe]", "\U0010ffff", False),
    ("[\U00010000-\U0010ffff]*x", "\U0001f600x", True),
])
def test_sets_compare_as_ranges(lhs: str, rhs: str, expected: bool) -> None:
    assert non_empty(lhs, rhs) is expected
    assert non_empty(rhs, lhs) is expected


def test_sets_of_the_same_characters_are_the_same_token() -> None:
    # Go's Token.Equal compares the sets' characters: `[a-c]*[cba]+` simplifies to `[a-c]+` whatever the spelling.
    assert _simplify(_tokenize("[a-c]*[cba]+[b-ca]*")) == _simplify(_tokenize("[abc]+"))


@pytest.mark.parametrize(("lhs", "rhs"), [
    (".*a" * (MAX_GLOB_LENGTH // 3 - 1) + ".*b", "a.*" * (MAX_GLOB_LENGTH // 3 - 1) + "a*"),
    (".+a" * (MAX_GLOB_LENGTH // 3 - 1) + ".+b", "a.+" * (MAX_GLOB_LENGTH // 3 - 1) + "a+"),
    (".*a." * (MAX_GLOB_LENGTH // 4 - 1) + ".*b", "a.*." * (MAX_GLOB_LENGTH // 4 - 1) + "a*"),
])
def test_the_longest_globs_built_to_backtrack_answer_in_bounded_time(lhs: str, rhs: str) -> None:
    # Tried split by split, as the Go package does, these would not finish; pair by pair, ~0.1 s here.
    started = time.process_time()
    assert non_empty(lhs, rhs) is False
    assert time.process_time() - started < 10


def test_the_longest_globs_need_no_deep_recursion() -> None:
    assert non_empty("a*" * (MAX_GLOB_LENGTH // 2), "a" * MAX_GLOB_LENGTH) is True
    assert non_empty("a+b+" * (MAX_GLOB_LENGTH // 4), "a*b*" * (MAX_GLOB_LENGTH // 4)) is True


def test_a_glob_longer_than_the_cap_is_an_evaluation_error() -> None:
    source = "package t\n\nimport rego.v1\n\nx := regex.globs_match(input.a, input.b)\n"
    engine = PolicyEngine(PolicyBundle((("t.rego", source),), {}, "data.t.x", "regorus"))
    assert engine.evaluate({"a": "a" * MAX_GLOB_LENGTH, "b": ".*"}) is True
    with pytest.raises(PolicyEvalError, match=f"operand 2 is {MAX_GLOB_LENGTH + 1} characters long"):
        engine.evaluate({"a": "a", "b": "." * (MAX_GLOB_LENGTH + 1)})
