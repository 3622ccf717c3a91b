"""Rego v0 rule heads that regorus reads otherwise than OPA: refused at load, naming the file and the line.

OPA's v0 parser (``parseRules``, and ``ParseRuleFromExpr`` for a statement
that is no rule of itself, in ``ast/parser.go`` and ``parser_ext.go``) and
regorus's part ways on these heads, which ``check`` finds in the syntax tree
regorus builds (``Engine.get_ast_as_json``), after ``rego_version.check`` has
refused the Rego v1 keywords a module did not import:

- a two-part name with no value, ``admins.alice { … }`` or ``admins.alice``
  alone: OPA reads ``admins contains "alice"`` (``p.x`` is ``p["x"]``, an entry
  of the multi-value rule ``p``), undefined when the body fails; regorus makes
  ``admins.alice`` a set of its own, empty but defined, so ``admins.alice`` in
  a body holds whatever the rule's body says. Write ``admins["alice"] { … }``.
- a name alone, with neither a value nor a body (``allow``, ``allow # { … }``,
  ``allow iff { … }``): OPA refuses it ("var cannot be used for rule name");
  regorus reads ``allow = true``. A dotted name alone (``a.b.c``) is
  ``a.b.c = true`` on both and stays.
- ``contains`` in a rule head of a module that imported neither it nor
  ``rego.v1``: OPA refuses it; regorus takes the keyword anyway. (The keyword
  guard lets ``contains(`` through, as in a body it is the builtin.)
- a rule that begins on the line where a rule without a body ends
  (``allow = true if_admin { … }``): both engines read two rules, an
  ``allow = true`` that always holds and a rule ``if_admin``. OPA loads that;
  pdp refuses it, since the word between a value and its body is a slip, not
  a way anyone writes an unconditional rule.
"""

from __future__ import annotations

import re
from typing import Any

from pdp.errors import LoadError
from pdp.policy.rego_ast import body, dotted, kind, line_of
from pdp.policy.rego_version import KEY, code_only

_CONTAINS = re.compile(r"\s*contains\b")


class _Source:
    """A module's text, addressed by the byte offsets of regorus's spans."""

    def __init__(self, file: str, contents: str) -> None:
        self.file = file
        self.raw = contents.encode()

    def between(self, start: int, end: int) -> str:
        return self.raw[start:end].decode("utf-8", "replace")

    def text(self, node: Any) -> str:
        span = body(node).get("span") if kind(node) else None
        return self.between(span["start"], span["end"]) if isinstance(span, dict) else "?"

    def line_at(self, offset: int) -> int:
        return self.raw.count(b"\n", 0, offset) + 1


def _imports(ast: dict[str, Any]) -> set[str]:
    return {path for imp in ast.get("imports", []) if (path := dotted(imp.get("refr"))) is not None}


def _keyless_set(src: _Source, head: Any) -> str:
    """The message for ``admins.alice { … }``: what OPA means, and how to write it for both."""
    refr = body(head)["refr"]
    name = src.text(refr)
    if kind(refr) == "RefDot":
        parent, leaf = src.text(body(refr)["refr"]), body(refr)["field"][1]
        meaning = f"`{parent} contains \"{leaf}\"` (an entry of the set `{parent}`)"
        fix = f"`{parent}[\"{leaf}\"] {{ … }}`"
    else:
        meaning, fix = "an entry of a set", f"`{name}` with its last part in brackets"
    return (f"`{name}` with no value: Rego v0 reads it as {meaning}, where regorus would make `{name}` a set of "
            f"its own, always defined, whatever its body says; write {fix}")


def _problem(module: dict[str, Any]) -> tuple[str, str] | None:
    """(config key, message) for the first head of ``module`` that regorus reads otherwise than OPA."""
    src = _Source(str(module["source"]["file"]), str(module["source"]["contents"]))
    ast = module["ast"]
    imports = _imports(ast)
    contains_known = bool(imports & {"future.keywords", "future.keywords.contains", "rego.v1"})
    previous: tuple[int, str] | None = None  # (end, text) of the rule before, when it has no body
    for rule in ast.get("rules", []):
        spec = body(rule)
        span = spec.get("span")
        if not isinstance(span, dict):
            continue
        where = f"{src.file}:{line_of(rule)}"
        if previous is not None:
            gap = src.between(previous[0], span["start"])
            if "\n" not in gap:
                name = src.text(spec["head"]) if kind(rule) == "Spec" else src.text(rule)
                return "policy.paths", (
                    f"{where}: `{previous[1]}` and `{name}` are two rules on one line (a word between a rule's "
                    f"value and its body starts a rule of its own, and the first holds without a condition); put "
                    f"the body right after the value, or each rule on a line of its own")
        previous = None
        if kind(rule) == "Spec":
            head = spec["head"]
            hb = body(head)
            if kind(head) == "Set" and hb.get("key") is None:
                return "policy.paths", f"{where}: {_keyless_set(src, head)}"
            if kind(head) == "Set" and not contains_known:
                # What follows the name: `[key]`, or the keyword (`contains key`, `contains(key)`).
                refr_span, head_span = body(hb["refr"]).get("span"), hb.get("span")
                if isinstance(refr_span, dict) and isinstance(head_span, dict) and _CONTAINS.match(
                        code_only(src.between(refr_span["end"], head_span["end"]))):
                    return KEY, (f"{where}: `contains` in a rule head is a keyword of Rego v1, but "
                                 f"policy.rego_version = \"v0\" and the module does not import it (`import "
                                 f"future.keywords.contains` or `import rego.v1`): OPA refuses it; write "
                                 f"`{src.text(hb['refr'])}[…] {{ … }}`, or add the import")
            if kind(head) == "Compr" and hb.get("assign") is None and not spec.get("bodies") \
                    and kind(hb["refr"]) == "Var":
                name = src.text(hb["refr"])
                return "policy.paths", (
                    f"{where}: `{name}` is a rule name with neither a value nor a body: OPA refuses it (\"var "
                    f"cannot be used for rule name\"), where regorus would read `{name} = true`; give it its body "
                    f"(`{name} {{ … }}`, nothing between the name and the brace) or a value")
        if kind(rule) == "Default" or not spec.get("bodies"):
            previous = int(span["end"]), src.between(span["start"], span["end"])
    return None


def check(tree: list[dict[str, Any]], rego_version: str, key: str = "policy.paths") -> None:
    """Refuse a Rego v0 bundle holding a rule head that regorus reads otherwise than OPA. ``tree`` is the
    engine's syntax tree (``json.loads(engine.get_ast_as_json())``): one entry per module, with its source."""
    if rego_version != "v0":
        return
    for module in tree:
        found = _problem(module)
        if found is not None:
            problem_key, message = found
            raise LoadError(key if problem_key == "policy.paths" else problem_key, message)
