"""What ``pdp check --input`` and ``pdp check --explain`` show of the policy step.

- the input document pdp hands the policy for a request (``recording``: the documents one decision
  hands its engine, and the answers);
- the facts the policy reads: every static path into ``input`` its modules name (the paths the decision
  cache keys on, ``decision_cache.input_paths``) with the value this input has there;
- on regorus, the lines of the modules the engine evaluated for this input, from its coverage report
  (``Engine.set_enable_coverage``): a line is listed when an expression on it was evaluated, whether it
  held or not, so the lines show how far evaluation went, not which rule gave the answer. The answer
  itself (its ``reason``, its ``scope``) says that. regopy keeps no such record;
- under ``policy.dry_run``, that a deny of the policy was let through (``dry_run``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdp.policy.decision_cache import ABSENT, input_paths, values_at
from pdp.policy.engine import PolicyBundle, PolicyEngine, Undefined

if TYPE_CHECKING:
    from pdp.decision import Decision

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the policy: the input document and the answer (None until there is one; an
    ``Undefined`` when the entrypoint gave no value)."""

    input: dict[str, Any]
    answer: Any = None


@contextlib.contextmanager
def recording(engine: PolicyEngine) -> Iterator[list[Evaluation]]:
    """Within the block, every evaluation of ``engine`` is kept, in order, input before answer (an
    evaluation that raises keeps its input with no answer)."""
    evaluate = engine.evaluate
    seen: list[Evaluation] = []

    def record(doc: dict[str, Any]) -> Any:
        seen.append(Evaluation(doc))
        value = evaluate(doc)
        seen[-1] = Evaluation(doc, value)
        return value

    setattr(engine, "evaluate", record)  # noqa: B010 (an instance attribute over the method, for this block)
    try:
        yield seen
    finally:
        delattr(engine, "evaluate")


def _dotted(path: tuple[str, ...]) -> str:
    return "input" + "".join(f".{s}" if _IDENTIFIER.fullmatch(s) else f"[{json.dumps(s)}]" for s in path)


def facts(bundle: PolicyBundle, doc: dict[str, Any]) -> dict[str, Any] | None:
    """``input.x.y`` → the value at that path of ``doc`` (``ABSENT`` where it has none), for every path the
    modules read; None when they read ``input`` whole or call a builtin whose answer is not a function of
    its arguments (then every fact may count), and for a remote engine, whose modules pdp never sees."""
    if bundle.engine == "opa":
        return None
    paths = input_paths(source for _, source in bundle.modules)
    if paths is None:
        return None
    return {_dotted(path): value for path, value in zip(paths, values_at(doc, paths), strict=True)}


@dataclass(frozen=True)
class Line:
    module: str
    number: int
    text: str


def evaluated_lines(bundle: PolicyBundle, doc: dict[str, Any]) -> tuple[Line, ...] | None:
    """The module lines regorus evaluated for ``doc`` (compiled afresh, with coverage on); None on regopy,
    or when the engine cannot say."""
    if bundle.engine != "regorus":
        return None
    from pdp.policy import rego_version
    from pdp.policy.builtins import register

    try:
        engine = rego_version.new_engine(bundle.rego_version)
        register(engine, bundle.rego_version)
        engine.set_enable_coverage(True)
        for name, source in bundle.modules:
            engine.add_policy(name, source)
        engine.add_data(bundle.data)
        engine.set_input(doc)
        with contextlib.suppress(Exception):  # an evaluation error still leaves what was evaluated
            engine.eval_rule(bundle.entrypoint)
        report = json.loads(engine.get_coverage_report_as_json())
    except Exception:  # the explanation is an extra: without it, the decision stands
        return None
    sources = dict(bundle.modules)
    lines: list[Line] = []
    for entry in report.get("files", []) if isinstance(report, dict) else []:
        name = entry.get("path")
        text = sources.get(name, entry.get("code", "")).splitlines()
        for number in sorted(n for n in entry.get("covered", []) if isinstance(n, int)):
            if 1 <= number <= len(text):
                lines.append(Line(str(name), number, text[number - 1].strip()))
    return tuple(lines)


def answer_text(answer: Any) -> str:
    """The policy's answer as JSON (``undefined`` when it gave none)."""
    if answer is None:
        return "none: the evaluation failed (a deny, policy_error)"
    if isinstance(answer, Undefined):
        return "undefined (no value: a deny)"
    return json.dumps(answer, sort_keys=True, default=repr)


def not_evaluated(decision: Decision) -> str:
    failed = [s for s in decision.steps if not s.ok and s.name != "decision"]
    if failed:
        return (f"the policy was not evaluated: pdp denied at the {failed[0].name} step, before the policy "
                f"runs ({decision.reason}); no policy can allow that")
    return "the policy was not evaluated"


def dry_run(decision: Decision) -> str | None:
    """What dry run did to ``decision`` (its ``dry_run`` step), or None when it did nothing."""
    step = next((s for s in decision.steps if s.name == "dry_run"), None)
    if step is None:
        return None
    return f"DRY RUN (policy.dry_run = true): the policy denied this request and pdp let it through: {step.detail}"


def explanation(bundle: PolicyBundle, evaluations: list[Evaluation], decision: Decision) -> dict[str, Any]:
    """The policy step of ``decision`` for ``pdp check --explain --json``: ``evaluated``, ``answer``,
    ``facts`` (null when the policy reads ``input`` whole) and ``lines`` (null when the engine cannot
    tell), or ``why_not`` when pdp decided before the policy."""
    if not evaluations:
        return {"evaluated": False, "why_not": not_evaluated(decision)}
    last = evaluations[-1]
    read = facts(bundle, last.input)
    lines = evaluated_lines(bundle, last.input)
    return {
        "evaluated": True,
        "dry_run": dry_run(decision),
        "answer": None if isinstance(last.answer, Undefined) else last.answer,
        "facts": None if read is None else {k: None if v is ABSENT else v for k, v in read.items()},
        "lines": None if lines is None else [{"module": x.module, "line": x.number, "text": x.text} for x in lines],
    }


def explanation_lines(bundle: PolicyBundle, evaluations: list[Evaluation], decision: Decision) -> list[str]:
    """The policy step of ``decision`` as text, for ``pdp check --explain``."""
    if not evaluations:
        return [not_evaluated(decision)]
    last = evaluations[-1]
    out = [f"policy answer: {answer_text(last.answer)}"]
    if (said := dry_run(decision)) is not None:
        out.append(said)
    read = facts(bundle, last.input)
    if read is None and bundle.engine == "opa":
        out.append("facts the policy read: unknown (the remote policy may read anything in input, and data "
                   "pdp does not see)")
    elif read is None:
        out.append("facts the policy read: all of input (it reads input whole, or calls a builtin such as "
                   "time.now_ns)")
    else:
        out.append("facts the policy read (the input paths its modules name, and their values here):")
        out += [f"  {path} = {'(absent)' if v is ABSENT else json.dumps(v, default=repr)}" for path, v in read.items()]
    lines = evaluated_lines(bundle, last.input)
    if lines is None:
        out.append(f"lines evaluated: the {bundle.engine} engine does not report them")
    else:
        out.append("policy lines evaluated (regorus coverage: an expression on the line was evaluated, whether "
                   "it held or not; the answer above says which rule decided):")
        module = None
        for line in lines:
            if line.module != module:
                module = line.module
                out.append(f"  {module}")
            out.append(f"    {line.number:>4}  {line.text}")
    return out
