"""Refuse, at load time, a policy that calls a function that does not exist or with the wrong arguments.

regorus looks functions up only when evaluation reaches a call, so a policy
calling a builtin it lacks (``io.jwt.decode``) would load, report ready, and
fail each request that reaches the call. OPA's compiler refuses such a policy
(``CheckUndefinedFuncs``, ``CheckTypes``); pdp does the same here, naming the
function, the file and the line:

- a call to a name that is neither a function of the bundle, nor a builtin of
  the engine (asked of regorus itself, once per name), nor one of pdp's own
  extensions (``pdp.policy.builtins.EXTENSIONS``, registered with each engine);
- a call to a function of the bundle with too few or too many arguments (one
  more is allowed: OPA binds the last to the result);
- a builtin call whose arguments are all constants and which fails on them
  (``count(1)``, ``startswith(1, "a")``): it would fail on every request;
- in a Rego v1 policy, a call to one of OPA's deprecated builtins (``any``,
  ``re_match``, ``net.cidr_overlap``…), which OPA keeps for v0 policies only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from pdp.errors import LoadError
from pdp.policy.rego_ast import Bundle, Module, Node, body, dotted, kind, line_of, walk

#: Builtins whose result depends on more than their arguments (time, randomness, the network): never run at load.
_NOT_AT_LOAD = ("http.", "net.lookup", "rand.", "uuid.", "time.now_ns", "opa.runtime", "print", "trace", "io.")
_LITERALS = ("String", "RawString", "Number", "Bool", "Null")


@dataclass(frozen=True)
class CallProblem:
    file: str
    line: int
    function: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.function}: {self.problem}"


def extensions(rego_version: str = "v1") -> frozenset[str]:
    """The names of pdp's own builtins registered with an engine reading ``rego_version``, if that module is
    installed (OPA's deprecated builtins exist for Rego v0 policies only)."""
    try:
        module = importlib.import_module("pdp.policy.builtins")
    except ImportError:
        return frozenset()
    return frozenset(str(getattr(ext, "name", ext)) for ext in getattr(module, "EXTENSIONS", ())
                     if rego_version == "v0" or not getattr(ext, "v0_only", False))


def _probe(call_text: str) -> str | None:
    """Evaluate ``call_text`` in an empty policy; the engine's error message, or None."""
    from pdp.policy.rego_version import new_engine

    engine = new_engine()  # a constant call may be as long as a line of the module it is in
    try:
        engine.add_policy("probe.rego", f"package pdp_probe\nimport rego.v1\nx := {call_text}\n")
        engine.eval_rule("data.pdp_probe.x")
    except BaseException as exc:  # pyo3 panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        message = str(exc).split("Stack backtrace:")[0].strip()
        return message.rsplit("error:", 1)[-1].strip()
    return None


@cache
def engine_has(name: str) -> bool:
    """Whether regorus knows the builtin ``name`` (its lookup error is the only answer that says no)."""
    error = _probe(f"{name}(null)")
    return error is None or "could not find function" not in error


def _constant(node: Node) -> bool:
    k = kind(node)
    if k in _LITERALS:
        return True
    if k in ("Array", "Set"):
        return all(_constant(i) for i in body(node)["items"])
    if k == "Object":
        return all(_constant(t) for f in body(node)["fields"] for t in f[1:])
    return False


def _resolve(name: str, module: Module, bundle: Bundle) -> str | None:
    """The full path of a function of the bundle that ``name`` calls, else None."""
    head, _, rest = name.partition(".")
    candidates = [f"data.{module.package}.{name}"]
    if head in module.imports:
        candidates.insert(0, module.imports[head] + ("." + rest if rest else ""))
    if name.startswith("data."):
        candidates = [name]
    return next((c for c in candidates if c in bundle.rules), None)


def find(bundle: Bundle) -> list[CallProblem]:
    known = extensions(bundle.rego_version)
    v0_only = extensions("v0") - extensions("v1")
    found: list[CallProblem] = []
    for module in bundle.modules:
        for node in (n for rule in module.rules for n in walk(rule)):
            if kind(node) != "Call":
                continue
            name = dotted(body(node)["fcn"])
            if name is None:
                continue
            params = body(node)["params"]
            line = line_of(node)
            path = _resolve(name, module, bundle)
            if path is not None:
                arity = bundle.rules[path].arity
                if arity is None:
                    found.append(CallProblem(module.file, line, name, "is a rule, not a function"))
                elif not arity <= len(params) <= arity + 1:
                    found.append(CallProblem(module.file, line, name,
                                             f"takes {arity} argument(s), called with {len(params)}"))
                continue
            if name in known:
                continue
            if name in v0_only:
                found.append(CallProblem(module.file, line, name,
                                         "is a deprecated builtin that OPA keeps for Rego v0 policies only "
                                         "(policy.rego_version = \"v0\")"))
                continue
            if not engine_has(name):
                found.append(CallProblem(module.file, line, name,
                                         "unknown function: neither a builtin of the engine nor defined in the "
                                         "policy"))
                continue
            if params and all(_constant(p) for p in params) and not name.startswith(_NOT_AT_LOAD):
                error = _probe(module.text(node))
                if error is not None:
                    found.append(CallProblem(module.file, line, name, f"fails on every request: {error}"))
    return found


def check(bundle: Bundle, key: str = "policy.paths") -> None:
    """Refuse a bundle holding a call that cannot run, naming the first (and how many more)."""
    found = find(bundle)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise LoadError(key, f"policy cannot run: {found[0]}{more}")

