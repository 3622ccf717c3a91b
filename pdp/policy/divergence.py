"""Find, at load time, the Rego constructs that regorus evaluates differently from OPA in a way that can allow.

OPA compiles every rule body before evaluating it, lifting terms out of each
expression into expressions of their own placed before it (opa issue #1877;
``RewriteExprTerms`` and ``RewriteDynamicTerms`` in OPA's ``ast/compile.go``):

- a call nested in an argument (``not startswith(lower(x), "a")`` becomes
  ``lower(x, t); not startswith(t, "a")``);
- a reference passed to a builtin, an operator (``in``, ``!=``, ``<``, ``+``…)
  or a function (``not startswith(input.h.x, "a")`` becomes
  ``t = input.h.x; not startswith(t, "a")``), and a reference inside an array,
  set or object so passed or compared;
- a reference used as an index (``not input.a[input.k]``).

When the lifted term is undefined, the lifted expression fails and so does the
body: under ``not`` OPA's answer is *undefined*. regorus keeps the term inside
the negation, so ``not`` of an expression over an undefined term is *true*:
where a rule allows when the negation holds, regorus allows what OPA denies.
(``==`` is rewritten to unification first, whose reference sides are not
lifted, so ``not input.x == 1`` and a plain ``not input.x`` mean the same on
both.)

A lifted term is reported when it may be undefined: a reference into
``input``, ``data``, a rule, an import or a local variable's members, unless
an earlier expression of the same body already required it (``route.ids;
not f(route.ids)``); a call to a function of the bundle; a builtin call over
such a reference. Names are scoped as in OPA: a function's arguments for its
bodies, a `:=` or `some` from its statement to the end of its query, an
`every` variable inside its own query; elsewhere the name of a rule is the
rule. `print` succeeds on undefined arguments and requires nothing, and an
expression under `with` proves nothing about the real input. Bind the term first (``h := input.h.x`` then
``not startswith(h, "a")``) or give it a default (``object.get``), so the
policy means the same on both engines.

Rego v0 modules are checked the same way: they reach here parsed by regorus in
v0 (``pdp.policy.rego_ast``), where the tree has the same kinds of nodes. A rule
or statement of a kind this check does not know is refused, never skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pdp.errors import LoadError
from pdp.policy.rego_ast import (
    COLLECTION_KINDS,
    COMPREHENSION_KINDS,
    OPERATOR_KINDS,
    REF_KINDS,
    Bundle,
    Module,
    body,
    children,
    dotted,
    kind,
    line_of,
    walk,
)

MODES = ("refuse", "warn")
#: What regorus's syntax tree holds at the top of a module and in a query (v0 and v1 alike); anything else
#: is refused, not skipped.
RULE_KINDS = ("Spec", "Default")
LITERAL_KINDS = ("Expr", "NotExpr", "SomeVars", "SomeIn", "Every")


@dataclass(frozen=True)
class Divergence:
    """One negated expression whose meaning on regorus differs from OPA's when ``term`` is undefined."""

    file: str
    line: int
    expression: str
    term: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.line}: `not {self.expression}`: when `{self.term}` is undefined, regorus "
                f"takes this `not` as true and OPA as undefined (the body fails), so the policy can decide "
                f"otherwise on pdp than on OPA; bind it first (`v := {self.term}`, or `object.get` with a "
                f"default) and use the variable inside `not`")


RefKey = tuple[Any, ...]


class _Scope:
    """What one rule body knows: its module, its local variables, and the references known to be defined."""

    def __init__(self, bundle: Bundle, module: Module, local: set[str]) -> None:
        self.bundle = bundle
        self.module = module
        self.local = set(local)
        self.defined: set[RefKey] = set()

    def copy(self) -> _Scope:
        scope = _Scope(self.bundle, self.module, self.local)  # a set of its own
        scope.defined = set(self.defined)
        return scope

    def resolve(self, name: str) -> str | None:
        """The full path of a non-local variable naming a rule or an import, else None."""
        if name in self.local:
            return None
        if name in self.module.imports:
            return self.module.imports[name]
        path = f"data.{self.module.package}.{name}"
        return path if path in self.bundle.rules else None


def _ref_key(node: Any, scope: _Scope) -> RefKey | None:
    """A comparable key of a reference (root, then each constant or variable index), or None."""
    k = kind(node)
    if k == "Var":
        name = str(body(node)["value"])
        return (scope.resolve(name) or name,)
    if k == "RefDot":
        head = _ref_key(body(node)["refr"], scope)
        return None if head is None else (*head, body(node)["field"][1])
    if k == "RefBrack":
        head = _ref_key(body(node)["refr"], scope)
        index = body(node)["index"]
        ik = kind(index)
        if head is None:
            return None
        if ik in ("String", "Number", "Bool", "Null", "RawString"):
            return (*head, body(index)["value"])
        if ik == "Var":
            return (*head, ("var", body(index)["value"]))
    return None


def _prefixes(key: RefKey) -> Iterable[RefKey]:
    for i in range(1, len(key) + 1):
        yield key[:i]


def _require(node: Any, scope: _Scope) -> None:
    """Record every reference a positive expression needs defined (outside comprehensions, `not` and
    `print`, whose arguments may be undefined)."""
    k = kind(node)
    if not k or k in COMPREHENSION_KINDS or k in ("NotExpr", "Every"):
        return
    if k == "Call" and dotted(body(node)["fcn"]) == "print":
        return
    if k in REF_KINDS or k == "Var":
        key = _ref_key(node, scope)
        if key is not None:
            scope.defined.update(_prefixes(key))
    for child in body(node).values():
        for item in child if isinstance(child, list) else [child]:
            if kind(item):
                _require(item, scope)
            elif isinstance(item, list):  # object fields: [span, key, value]
                for part in item:
                    _require(part, scope)


def _rule_defined(path: str, scope: _Scope) -> bool:
    info = scope.bundle.rules.get(path)
    return info is not None and info.arity is None and (info.has_default or info.multi_value or info.constant)


def _maybe_undefined(node: Any, scope: _Scope) -> bool:
    k = kind(node)
    if k == "Var":
        name = str(body(node)["value"])
        path = scope.resolve(name)
        if path is None or path in ("input", "data"):
            return False
        return (path,) not in scope.defined and not _rule_defined(path, scope)
    if k in REF_KINDS:
        key = _ref_key(node, scope)
        if key is not None and (key in scope.defined or key in (("input",), ("data",))):
            return False
        return True
    if k == "Call":
        if _is_user_function(body(node)["fcn"], scope):
            return True
        return any(_maybe_undefined(p, scope) for p in body(node)["params"])
    if k in OPERATOR_KINDS or k in COLLECTION_KINDS:
        return any(_maybe_undefined(t, scope) for t in _operands(node))
    return False


def _is_user_function(fcn: Any, scope: _Scope) -> bool:
    name = dotted(fcn)
    if name is None:
        return True
    head, _, rest = name.partition(".")
    if head in scope.module.imports:
        name = scope.module.imports[head] + ("." + rest if rest else "")
    elif not name.startswith("data."):
        name = f"data.{scope.module.package}.{name}"
    return name in scope.bundle.rules


def _operands(node: Any) -> list[Any]:
    """The terms an operator, collection or membership applies to."""
    k = kind(node)
    b = body(node)
    if k in ("ArithExpr", "BinExpr", "BoolExpr"):
        return [b["lhs"], b["rhs"]]
    if k == "UnaryExpr":
        return [b["expr"]] if "expr" in b else []
    if k == "Membership":
        return [t for t in (b.get("key"), b["value"], b["collection"]) if t is not None]
    if k in ("Array", "Set"):
        return list(b["items"])
    if k == "Object":
        return [t for field in b["fields"] for t in field[1:]]
    return []


def _lifted_arg(node: Any, scope: _Scope) -> list[Any]:
    """Terms OPA binds before the expression when ``node`` is an argument of a call (``rewriteDynamicsOne``)."""
    k = kind(node)
    if k in REF_KINDS or k == "Call" or k in OPERATOR_KINDS:
        return [node]
    if k == "Var":
        return [node] if scope.resolve(str(body(node)["value"])) is not None else []
    if k in COLLECTION_KINDS:
        return [t for item in _operands(node) for t in _lifted_arg(item, scope)]
    return []


def _lifted_in_term(node: Any, scope: _Scope) -> list[Any]:
    """Terms OPA lifts out of a unification side or a term expression (``rewriteDynamicsInTerm``)."""
    k = kind(node)
    if k in REF_KINDS:
        out: list[Any] = []
        while kind(node) in REF_KINDS:
            if kind(node) == "RefBrack":
                out += _lifted_arg(body(node)["index"], scope)
            node = body(node)["refr"]
        if kind(node) == "Call":  # f(x).y: the call is bound first
            out.append(node)
        return out
    if k in ("Call", *OPERATOR_KINDS):
        return [node]
    if k in COLLECTION_KINDS:
        return [t for item in _operands(node) for t in _lifted_arg(item, scope)]
    return []


def _lifted(expr: Any, scope: _Scope) -> list[Any]:
    """The terms OPA binds before the negated expression ``expr``."""
    k = kind(expr)
    b = body(expr) if k else {}
    if k == "Call":
        return [t for p in b["params"] for t in _lifted_arg(p, scope)]
    if (k == "BoolExpr" and b["op"] == "Eq") or (k == "AssignExpr" and b["op"] == "Eq"):
        return _lifted_in_term(b["lhs"], scope) + _lifted_in_term(b["rhs"], scope)
    if k in OPERATOR_KINDS:
        return [t for operand in _operands(expr) for t in _lifted_arg(operand, scope)]
    return _lifted_in_term(expr, scope)


def _names(module: Module, targets: Iterable[Any]) -> set[str]:
    """The variables named by binding targets: bare spans (`every x in …`, `some x`) or patterns."""
    names: set[str] = set()
    for t in targets:
        if isinstance(t, dict) and "start" in t:
            names.add(module.source[t["start"]:t["end"]].decode())
        elif kind(t):
            names.update(str(body(n)["value"]) for n in walk(t) if kind(n) == "Var")
    return names


def _bound(module: Module, literal: Any) -> set[str]:
    """The names a statement binds for the statements after it: `:=`, `some x`, `some k, v in …`.

    A unification (`=`) binds only names that are not rules or imports, which no check distinguishes
    from local variables, so it adds nothing here.
    """
    k = kind(literal)
    b = body(literal) if k else {}
    if k == "Expr" and kind(b["expr"]) == "AssignExpr" and body(b["expr"])["op"] == "ColEq":
        return _names(module, [body(b["expr"])["lhs"]])
    if k == "SomeIn":
        return _names(module, [b.get("key"), b.get("value")])
    if k == "SomeVars":
        return _names(module, b["vars"])
    return set()


def _nested(node: Any) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    """(query, names it binds first, terms evaluated in its scope) of each outermost comprehension and
    `every` below ``node``."""
    k = kind(node)
    if k in COMPREHENSION_KINDS:
        b = body(node)
        yield b["query"], [], [b[f] for f in ("term", "key", "value") if b.get(f) is not None]
        return
    if k == "Every":
        b = body(node)
        yield from _nested(b["domain"])
        yield b["query"], [b.get("key"), b.get("value")], []
        return
    for child in children(node[k] if k else node):
        yield from _nested(child)


def _cannot_analyse(module: Module, node: Any, what: str) -> LoadError:
    """A construct this check does not know: refused, never passed unread (a policy it cannot read is one
    it cannot vouch for, whatever Rego version it is written in)."""
    return LoadError("policy.paths", f"{module.file}:{line_of(node)}: {what} {kind(node) or '?'!r} is not one "
                                     "the load-time divergence check can analyse; the policy is refused rather "
                                     "than loaded unchecked")


def _check_query(query: Any, scope: _Scope, found: list[Divergence]) -> _Scope:
    """Check each statement in order, with the names bound before it; return the scope at the end."""
    for stmt in query.get("stmts", []):
        literal = stmt["literal"]
        lk = kind(literal)
        if lk not in LITERAL_KINDS:
            raise _cannot_analyse(scope.module, literal, "a statement of kind")
        lb = body(literal)
        if lk == "NotExpr":
            expr = lb["expr"]
            for term in _lifted(expr, scope):
                if _maybe_undefined(term, scope):
                    found.append(Divergence(scope.module.file, line_of(literal), scope.module.text(expr),
                                            scope.module.text(term)))
                    break
        _check_nested(literal, scope, found)
        if lk != "NotExpr" and not stmt.get("with_mods"):
            _require(literal, scope)
        scope.local |= _bound(scope.module, literal)
    return scope


def _check_nested(node: Any, scope: _Scope, found: list[Divergence]) -> None:
    """Check the queries of comprehensions and `every` below ``node``, each in a scope of its own."""
    for query, names, terms in _nested(node):
        inner = scope.copy()
        inner.local |= _names(scope.module, names)
        inner = _check_query(query, inner, found)
        for term in terms:
            _check_nested(term, inner, found)


def find(bundle: Bundle) -> list[Divergence]:
    """Every negated expression of the bundle that can allow on regorus where OPA would not."""
    found: list[Divergence] = []
    for module in bundle.modules:
        for rule in module.rules:
            if kind(rule) not in RULE_KINDS:
                raise _cannot_analyse(module, rule, "a rule of kind")
            if kind(rule) != "Spec":
                continue
            head = body(rule)["head"]
            args = body(head).get("args") if kind(head) == "Func" else None
            base = _Scope(bundle, module, _names(module, args or []))
            bodies = body(rule).get("bodies") or []
            if not bodies:
                _check_nested(head, base.copy(), found)
            for i, rule_body in enumerate(bodies):
                scope = _check_query(rule_body["query"], base.copy(), found)
                if i == 0:  # the head's terms see the first body's variables
                    _check_nested(head, scope, found)
                if rule_body.get("assign"):  # `else := value if …`
                    _check_nested(rule_body["assign"]["value"], scope, found)
    # A place is reached once per body that sees it; report each place once.
    unique: dict[tuple[str, int, str], Divergence] = {}
    for d in found:
        unique.setdefault((d.file, d.line, d.expression), d)
    return list(unique.values())


def check(bundle: Bundle, mode: str, key: str = "policy.paths") -> list[Divergence]:
    """Refuse the bundle (``mode == "refuse"``) or return what was found for the caller to warn about."""
    found = find(bundle)
    if found and mode == "refuse":
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise LoadError(key, f"{found[0]}{more}; policy.divergence = \"warn\" loads such a policy anyway")
    return found
