"""``pdp policy diff OLD NEW --requests FILE``: replay recorded inputs through two policies.

FILE holds JSON lines, each either a bare input document (an object with pdp's ``attributes``
member, as ``pdp check --input`` prints it) or a decision line with an ``input`` member (pdp's with
``log.include_input = true``, or OPA's decision log, which has the same member). The file is read
one line at a time, and only the counts are kept, so a file of any length runs in bounded memory.
A line that is neither is reported with its number and left out; it never stops the replay.
Bytes that are not UTF-8 and lone surrogates (``"\\ud800"``) become U+FFFD, as Go's JSON decoder (and
so OPA) reads them, before either policy sees the document; ``NaN`` and ``Infinity`` are not JSON.
What a line prints of its document (method, path, reasons) is quoted when it holds a control
character, so a crafted file cannot make the report say more than it does.

Two outcomes differ as ``pdp.policy.shadow.differences`` says: by what a caller and an upstream get
(allowed or not, the reason, the status, headers, body, query changes). A policy that fails on an
input is an ``error`` outcome there, which differs from any answer but the same error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from pdp.policy.engine import PolicyEngine
from pdp.policy.input import _clean as clean_text
from pdp.policy.result import PolicyOutcome, decided_outcome
from pdp.policy.shadow import deny_of, differences

#: The longest line read (a decision line with a large body is well under it); a longer one is skipped.
MAX_LINE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Recorded:
    """One line of FILE: its input document, or why it has none."""

    number: int
    input: dict[str, Any] | None
    problem: str = ""


def recorded_inputs(stream: IO[str]) -> Iterator[Recorded]:
    """The lines of ``stream`` as inputs, one at a time (blank lines are left out). A text stream over
    bytes (a file, standard input) is read as bytes, decoded here: whatever its encoding errors say."""
    binary: IO[bytes] | None = getattr(stream, "buffer", None)

    def read(limit: int) -> tuple[str, int, bool]:
        """A line (at most ``limit`` bytes or characters): its text, its length, whether it ends."""
        if binary is not None:
            raw = binary.readline(limit)
            return raw.decode("utf-8", "replace"), len(raw), raw.endswith(b"\n")
        text = stream.readline(limit)
        return text, len(text), text.endswith("\n")

    number = 0
    while True:
        line, size, ends = read(MAX_LINE + 1)
        if not size:
            return
        number += 1
        if size > MAX_LINE and not ends:
            while (rest := read(MAX_LINE))[1] and not rest[2]:
                pass  # the rest of a line too long to read, dropped in pieces
            yield Recorded(number, None, f"longer than {MAX_LINE} bytes")
            continue
        if line.strip():
            yield _recorded(number, line)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _recorded(number: int, line: str) -> Recorded:
    try:
        # Lone surrogates (escaped, or from a stream decoded with surrogateescape) become U+FFFD: the
        # regorus engine dies on one.
        value = clean_text(json.loads(line, parse_constant=_no_constant))
    except (ValueError, RecursionError) as exc:
        return Recorded(number, None, f"not JSON ({str(exc)[:80]})")
    if not isinstance(value, dict):
        return Recorded(number, None, "not a JSON object")
    if "input" in value:
        doc = value["input"]
        if isinstance(doc, dict):
            return Recorded(number, doc)
        return Recorded(number, None, "its 'input' member is not an object")
    if isinstance(value.get("attributes"), dict):
        return Recorded(number, value)
    if "decision_id" in value:
        return Recorded(number, None, "a decision line without an input (log.include_input was off, or pdp "
                                      "denied before the policy ran)")
    return Recorded(number, None, "neither an input document (no 'attributes' member) nor a decision line "
                                  "with an 'input' member")


def outcome_of(engine: PolicyEngine, doc: dict[str, Any]) -> PolicyOutcome | str:
    """The policy's outcome for ``doc`` (through its decision cache), or the text of its error."""
    try:
        return decided_outcome(engine, doc)[0]
    except Exception as exc:  # a policy that fails on an input is that input's outcome, not the end
        return f"error ({type(exc).__name__}: {str(exc)[:160]})"


def shown(text: str) -> str:
    """``text`` as printed: as it is when every character of it is printable, else JSON-quoted (with
    every control, format and non-ASCII character escaped), so that it cannot end or forge a line."""
    return text if text.isprintable() else json.dumps(text)


def describe(outcome: PolicyOutcome | str) -> str:
    if isinstance(outcome, str):
        return shown(outcome)
    if outcome.allowed:
        return f"allowed ({shown(outcome.reason or 'allowed')})"
    code, status = deny_of(outcome)
    return f"denied ({shown(code)}, {status})"


def request_of(doc: dict[str, Any]) -> str:
    """``METHOD /path`` of an input document (without the query: it may carry what it should not)."""
    attributes = doc.get("attributes")
    request = attributes.get("request") if isinstance(attributes, dict) else None
    http = request.get("http") if isinstance(request, dict) else None
    http = http if isinstance(http, dict) else {}
    method = http.get("method")
    path = doc.get("path") or http.get("path")
    return f"{shown(method) if isinstance(method, str) else '?'} " \
           f"{shown(path.split('?', 1)[0]) if isinstance(path, str) else '?'}"


@dataclass
class Counts:
    replayed: int = 0
    different: int = 0
    skipped: int = 0


def replay(old: PolicyEngine, new: PolicyEngine, stream: IO[str], out: Callable[[str], None]) -> Counts:
    """Replay every input of ``stream`` through both policies; write each difference and each skipped
    line to ``out`` as it is found, and return the counts."""
    counts = Counts()
    for line in recorded_inputs(stream):
        if line.input is None:
            counts.skipped += 1
            out(f"line {line.number}: skipped: {line.problem}")
            continue
        counts.replayed += 1
        a, b = outcome_of(old, line.input), outcome_of(new, line.input)
        if isinstance(a, str) or isinstance(b, str):
            differs = [] if a == b else ["outcome"]
        else:
            differs = differences(a, b)
        if differs:
            counts.different += 1
            out(f"line {line.number}: {request_of(line.input)}: old {describe(a)}, new {describe(b)}"
                f"{'' if differs in (['allowed'], ['outcome']) else ' (differs in ' + ', '.join(differs) + ')'}")
    return counts
