"""``pdp policy test``: run a policy's ``test_`` rules and report like ``opa test``.

A test passes when its rule evaluates to true, fails when it is false or
undefined, and errors when evaluation fails. Tests are found by name in the
module sources (``test_*`` rules at the start of a line, in the module's
package), the same rule ``opa test`` uses. Rego v0 test modules (``test_x {
… }``) run when the bundle is loaded as v0 (``load_bundle(…,
rego_version="v0")``; ``pdp policy test --v0-compatible``, as ``opa test --v0-compatible``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TextIO

from pdp.errors import LoadError
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)


@dataclass(frozen=True)
class TestResult:
    name: str
    file: str
    outcome: str  # "PASS", "FAIL" or "ERROR"
    duration: float
    detail: str = ""


def discover(bundle: PolicyBundle) -> list[tuple[str, str]]:
    """(file, data reference) of every test rule, in file order, each once."""
    found: list[tuple[str, str]] = []
    for name, source in bundle.modules:
        package = _PACKAGE.search(source)
        if package is None:
            continue
        for rule in dict.fromkeys(_TEST_RULE.findall(source)):
            found.append((name, f"data.{package.group(1)}.{rule}"))
    return found


def run_tests(bundle: PolicyBundle) -> list[TestResult]:
    engine = PolicyEngine(bundle)
    results: list[TestResult] = []
    for file, ref in discover(bundle):
        started = time.perf_counter()
        try:
            value = engine.query(ref, {})
            outcome, detail = ("PASS", "") if value is True else ("FAIL", "")
        except (PolicyEvalError, LoadError) as exc:
            outcome, detail = "ERROR", str(exc)
        results.append(TestResult(ref, file, outcome, time.perf_counter() - started, detail))
    return results


def report(results: list[TestResult], out: TextIO, verbose: bool = False) -> bool:
    """Print like ``opa test``; True when every test passed."""
    for r in results:
        if verbose or r.outcome != "PASS":
            line = f"{r.file}:\n{r.name}: {r.outcome} ({r.duration * 1000:.3f}ms)"
            if r.detail:
                line += f"\n  {r.detail}"
            print(line, file=out)
    total = len(results)
    passed = sum(r.outcome == "PASS" for r in results)
    failed = sum(r.outcome == "FAIL" for r in results)
    errors = total - passed - failed
    if total == 0:
        print("no tests found", file=out)
        return False
    if verbose or passed != total:
        print("-" * 80, file=out)
    print(f"PASS: {passed}/{total}", file=out)
    if failed:
        print(f"FAIL: {failed}/{total}", file=out)
    if errors:
        print(f"ERROR: {errors}/{total}", file=out)
    return passed == total
