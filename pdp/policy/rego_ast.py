"""Reading Rego modules through regorus's parser: rules, calls and references, with their source lines.

The load-time checks (``pdp.policy.divergence``, ``pdp.policy.callcheck``)
walk the syntax tree regorus itself builds (``Engine.get_ast_as_json``), so
they see each module exactly as the engine that will evaluate it does (in the
Rego version it is configured for: a v0 module is parsed with the engine's v0
switch on, after ``pdp.policy.rego_version.check``, and the v0 rule heads
regorus reads otherwise than OPA are refused by ``pdp.policy.v0_heads``). Nodes
are JSON objects of one member, the node kind (``Call``, ``RefDot``,
``NotExpr``, …), whose value holds a ``span`` (line, column and byte offsets
into the module).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdp.errors import LoadError

Node = dict[str, Any]

#: Node kinds that hold a reference (``a.b``, ``a[b]``).
REF_KINDS = ("RefDot", "RefBrack")
#: Node kinds that are values built from other terms.
COLLECTION_KINDS = ("Array", "Set", "Object")
#: Comprehensions: always defined (an empty collection at worst); their bodies are queries of their own.
COMPREHENSION_KINDS = ("ArrayCompr", "SetCompr", "ObjectCompr")
#: Operators that are builtin calls in OPA (``plus``, ``or``, ``lt``…); ``==`` is not among them (see divergence).
OPERATOR_KINDS = ("ArithExpr", "BinExpr", "BoolExpr", "UnaryExpr", "Membership")


def kind(node: Any) -> str:
    return next(iter(node)) if isinstance(node, dict) and len(node) == 1 else ""


def body(node: Node) -> dict[str, Any]:
    value: dict[str, Any] = node[kind(node)]
    return value


def line_of(node: Any) -> int:
    span = body(node).get("span") if kind(node) else None
    return int(span["line"]) if isinstance(span, dict) else 0


@dataclass
class Module:
    """One parsed module: its file, package path, imports (alias → dotted path) and source bytes."""

    file: str
    source: bytes
    package: str
    imports: dict[str, str]
    rules: list[Node]

    def text(self, node: Any) -> str:
        """The source text of ``node`` (spans are byte offsets into the module)."""
        span = body(node).get("span") if kind(node) else None
        if not isinstance(span, dict):
            return "?"
        return self.source[span["start"]:span["end"]].decode("utf-8", "replace")


@dataclass
class RuleInfo:
    """What the checks need to know of a rule or function, over all modules that define it."""

    has_default: bool = False
    #: ``p contains x`` and ``p[k] := v`` rules: an empty set or object when no body holds, never undefined.
    multi_value: bool = False
    #: A definition without a body whose value holds no reference: always defined.
    constant: bool = False
    #: The number of arguments, for functions; None for rules.
    arity: int | None = None


@dataclass
class Bundle:
    modules: list[Module] = field(default_factory=list)
    #: Rules and functions by full dotted path (``data.pdp.authz.result``).
    rules: dict[str, RuleInfo] = field(default_factory=dict)
    #: The Rego version the modules were parsed in (``policy.rego_version``).
    rego_version: str = "v1"


def dotted(node: Any) -> str | None:
    """``a.b.c`` for a reference made only of a variable and field names, else None."""
    k = kind(node)
    if k == "Var":
        return str(body(node)["value"])
    if k == "RefDot":
        head = dotted(body(node)["refr"])
        return None if head is None else f"{head}.{body(node)['field'][1]}"
    if k == "RefBrack":
        index = body(node)["index"]
        if kind(index) == "String":
            head = dotted(body(node)["refr"])
            return None if head is None else f"{head}.{body(index)['value']}"
    return None


def children(node: Any) -> Iterator[Any]:
    """Every JSON value directly below ``node`` that may hold further nodes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "span":
                yield value
    elif isinstance(node, list):
        yield from node


def walk(node: Any) -> Iterator[Node]:
    """Every node at or below ``node``, depth first, in source order."""
    if kind(node):
        yield node
    for child in children(node[kind(node)] if kind(node) else node):
        yield from walk(child)


def _head_name(refr: Any) -> str | None:
    """The rule name of a head reference (``p``, ``p[k]``, ``a.b.p``): its first component."""
    name = dotted(refr)
    if name is not None:
        return name
    if kind(refr) in REF_KINDS:
        return _head_name(body(refr)["refr"])
    return None


def _references(node: Any) -> bool:
    return any(kind(n) in (*REF_KINDS, "Var", "Call") for n in walk(node))


def _index_rule(bundle: Bundle, module: Module, rule: Node) -> None:
    k = kind(rule)
    spec = body(rule)
    if k == "Default":
        name = _head_name(spec["refr"])
        if name is not None:
            info = bundle.rules.setdefault(f"data.{module.package}.{name}", RuleInfo())
            info.has_default = True
            if spec.get("args"):
                info.arity = len(spec["args"])
        return
    if k != "Spec":
        return
    head = spec["head"]
    hk = kind(head)
    hb = body(head)
    name = _head_name(hb["refr"])
    if name is None:
        return
    # A ref head ``a.b.p if …`` names the rule by its whole path; the checks look rules up by it.
    info = bundle.rules.setdefault(f"data.{module.package}.{name}", RuleInfo())
    if hk == "Set" or (hk == "Compr" and kind(hb["refr"]) == "RefBrack"):
        info.multi_value = True
    if hk == "Func":
        info.arity = len(hb.get("args") or [])
    assign = hb.get("assign")
    if not spec.get("bodies") and hk == "Compr" and (assign is None or not _references(assign["value"])):
        info.constant = True



def _tree(engine: Any, name: str, source: str, rego_version: str, key: str) -> Any:
    """The syntax tree regorus builds of one module (a ``LoadError`` naming it when it does not parse)."""
    from pdp.policy import rego_version as versions

    try:
        engine.add_policy(name, source)
    except Exception as exc:
        raise versions.compile_error(name, source, rego_version,
                                     str(exc).split("Stack backtrace:")[0].strip(), key) from exc
    try:
        return json.loads(engine.get_ast_as_json())
    except Exception as exc:
        raise LoadError(key, f"policy does not compile: {str(exc).split('Stack backtrace:')[0].strip()}") \
            from exc


def parse(modules: tuple[tuple[str, str], ...], key: str = "policy.paths", *, rego_version: str = "v1") -> Bundle:
    """Parse every module with regorus, in ``rego_version``; a module that does not parse is a
    ``LoadError`` naming it (and ``policy.rego_version`` when it is written in the other version)."""
    from pdp.policy import rego_version as versions
    from pdp.policy import v0_heads

    versions.check(modules, rego_version)  # v1 text that regorus would read otherwise as v0
    bundle = Bundle(rego_version=rego_version)
    for name, source in modules:
        engine = versions.new_engine(rego_version)
        try:
            tree = _tree(engine, name, source, rego_version, key)
        except BaseException as exc:
            # A regorus engine may only be dropped on the thread that made it (pyo3 "unsendable"): drop it
            # now, not when a traceback holding it is collected, perhaps on another thread.
            traceback.clear_frames(exc.__traceback__)
            del engine
            raise
        del engine
        v0_heads.check(tree, rego_version, key)  # before any check reads a misread head
        ast = tree[0]["ast"]
        package = dotted(ast["package"]["refr"]) or ""
        imports: dict[str, str] = {}
        for imp in ast.get("imports", []):
            path = dotted(imp["refr"])
            if path is None or path in ("rego.v1",) or path.startswith("future."):
                continue
            alias_span = imp.get("as")
            alias = (source.encode()[alias_span["start"]:alias_span["end"]].decode() if alias_span
                     else path.rsplit(".", 1)[-1])
            imports[alias] = path
        module = Module(name, source.encode(), package, imports, list(ast.get("rules", [])))
        bundle.modules.append(module)
        for rule in module.rules:
            _index_rule(bundle, module, rule)
    return bundle
