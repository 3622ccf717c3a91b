"""OPA's own conformance cases for the builtins pdp adds (tests/data/opa_builtin_cases.yaml), run through
pdp's policy engine and compared with OPA's expected results and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdp.policy.engine import UNDEFINED, PolicyBundle, PolicyEngine, PolicyEvalError

CASES_FILE = Path(__file__).parent / "data" / "opa_builtin_cases.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(CASES_FILE.read_text("utf-8"))["cases"]


def _ref(query: str) -> str:
    """OPA's runner asks ``data.generated.p = x``; the value of ``x`` is the value of the reference."""
    ref, _, var = query.partition(" = ")
    assert var == "x", query
    return ref


def _canonical(value: Any, sort: bool) -> Any:
    """A set comes back from the engine as a Python set; OPA's runner writes it as an array (sorted with
    ``sort_bindings``)."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=json.dumps)
    if sort and isinstance(value, list):
        return sorted(value, key=json.dumps)
    return value


def _run(case: dict[str, Any]) -> Any:
    modules = tuple((f"case{i}.rego", m) for i, m in enumerate(case["modules"]))
    bundle = PolicyBundle(modules, case.get("data") or {}, "data", "regorus")
    return PolicyEngine(bundle).query(_ref(case["query"]), {})


def test_the_cases_cover_each_builtin_and_name_their_source() -> None:
    dirs = {c["source"].split("/")[-2] for c in CASES}
    assert {"globsmatch", "jwtencodesign", "jwtencodesignraw", "jwtencodesignheadererrors",
            "jwtencodesignpayloaderrors", "netcidrintersects", "uribuiltins"} <= dirs
    for case in CASES:
        assert case["source"].startswith("v1/test/cases/testdata/v1/"), case["note"]
        assert ("want_result" in case) != ("want_error" in case), case["note"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['source'].split('/')[-1]}" for c in CASES])
def test_opa_conformance_case(case: dict[str, Any]) -> None:
    if "want_error" in case:
        with pytest.raises(PolicyEvalError) as info:
            _run(case)
        assert case["want_error"] in str(info.value)
        return
    got = _run(case)
    want = case["want_result"]
    if want == []:
        assert got is UNDEFINED
        return
    assert len(want) == 1, "every case binds x once"
    sort = bool(case.get("sort_bindings"))
    assert _canonical(got, sort) == _canonical(want[0]["x"], sort)


def test_a_module_line_longer_than_1024_columns_loads(tmp_path: Path) -> None:
    """OPA has no limit on a line's length, and its policies inline keys and certificates; regorus refuses
    a line past 1,024 columns unless told otherwise, which pdp does."""
    from pdp.assemble import load_policy
    from pdp.config import load_config

    long_value = "k" * 5000
    (tmp_path / "p.rego").write_text(f'package envoy.authz\n\nimport rego.v1\n\nallow if input.key == "{long_value}"\n')
    (tmp_path / "pdp.toml").write_text('[policy]\npaths = ["p.rego"]\ndecision = "envoy/authz/allow"\n')
    engine = load_policy(load_config(tmp_path / "pdp.toml"))
    assert engine.evaluate({"key": long_value}) is True
    assert engine.evaluate({"key": "k"}) is UNDEFINED
