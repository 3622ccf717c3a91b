"""The two in-process Rego engines: regopy (Microsoft rego-cpp) and regorus (Rust).

Both are compiled once per policy version and evaluated many times. Both are
run in strict mode: a builtin error (``to_number("x")``, a division by zero)
is an evaluation error, which pdp turns into a deny, never an undefined value
that a ``default allow := true`` could turn into an allow.

rego-cpp aborts the whole process on some inputs it cannot compile (seen with
``with input as … with data.x as …`` in one expression), so a regopy bundle is
first compiled in a child process: a crash there refuses the bundle instead
of taking the service down.

Rego v0 policies (``policy.rego_version = "v0"``) run on regorus only, with its
v0 switch on and OPA's deprecated builtins that v0 still has
(``pdp.policy.rego_version`` says how each module is checked first, ``pdp.policy.v0_heads``
which rule heads are refused after the engine has read them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from typing import Any

from pdp.credentials.jose import DecodeError, json_object
from pdp.errors import LoadError
from pdp.policy.engine import UNDEFINED, Evaluator, PolicyBundle, PolicyEvalError
from pdp.policy.thread_bound import ThreadBound

_PROBE_TIMEOUT = 60.0


def _short(message: str) -> str:
    """Engine errors without the Rust stack backtrace regorus appends."""
    return message.split("Stack backtrace:")[0].strip()


class RegopyEvaluator:
    def __init__(self, bundle: PolicyBundle) -> None:
        import regopy

        self._regopy = regopy
        self._entrypoint = bundle.entrypoint
        it = regopy.Interpreter()
        it.strict_built_in_errors = True
        try:
            for name, source in bundle.modules:
                it.add_module(name, source)
            # JSON text, not Python objects: regopy's object conversion does not escape strings.
            it.add_data_json(json.dumps(bundle.data))
            self._plan = it.build(f"x = {bundle.entrypoint}")
        except regopy.RegoError as exc:
            raise LoadError("policy.paths", f"policy does not compile: {exc}") from exc
        self._it = it

    def _run(self, input_doc: dict[str, Any] | None, plan: Any) -> Any:
        try:
            if input_doc is not None:
                # As a JSON term: regopy's set_input(dict) passes strings through unescaped, so a
                # header value holding '"' could inject members into the policy's answer.
                self._it.set_input_term(json.dumps(input_doc))
            out = self._it.query_bundle(plan)
        except self._regopy.RegoError as exc:
            raise PolicyEvalError(str(exc)) from exc
        except ValueError as exc:  # regopy reads its engine's answer as JSON: an unknown function's is not
            raise PolicyEvalError(f"the engine's answer is unreadable (a function rego-cpp lacks?): {exc}") from exc
        # Read the result as text: asking an undefined result for a binding aborts rego-cpp.
        text = str(out)
        if text == "undefined":
            return UNDEFINED
        if not out.ok() or text.startswith("<error"):
            raise PolicyEvalError(f"policy evaluation failed: {text}")
        try:
            bindings = json_object(text).get("bindings", {})
        except DecodeError as exc:  # duplicate members, bad escapes: never guess at an answer
            raise PolicyEvalError(f"unreadable policy answer: {exc}") from exc
        if not isinstance(bindings, dict):
            raise PolicyEvalError("unreadable policy answer: no bindings")
        return bindings.get("x", UNDEFINED)

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        return self._run(input_doc, self._plan)

    def query(self, ref: str, input_doc: dict[str, Any] | None) -> Any:
        try:
            plan = self._it.build(f"x = {ref}")
        except self._regopy.RegoError as exc:
            raise PolicyEvalError(str(exc)) from exc
        return self._run(input_doc, plan)


class RegorusEvaluator:
    def __init__(self, bundle: PolicyBundle) -> None:
        from pdp.policy import rego_version

        self._entrypoint = bundle.entrypoint
        # Before the engine reads them: v1 text read as v0 is not always refused by regorus.
        rego_version.check(bundle.modules, bundle.rego_version)
        engine = rego_version.new_engine(bundle.rego_version)
        try:
            _load(engine, bundle)
        except BaseException as exc:
            # A regorus engine may only be dropped on the thread that made it (pyo3 "unsendable"): drop it
            # now, not when a traceback holding it is collected, perhaps on another thread.
            traceback.clear_frames(exc.__traceback__)
            del engine
            raise
        self._engine = ThreadBound(engine)

    def query(self, ref: str, input_doc: dict[str, Any] | None) -> Any:
        # No local for the engine: a frame kept by a traceback would hold it outside its ThreadBound.
        if input_doc is not None:
            self._engine.value.set_input(input_doc)
        try:
            value = self._engine.value.eval_rule(ref)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise PolicyEvalError(_short(str(exc))) from exc
            # A set of arrays or objects, which no Python set can hold: read the value as JSON, where a set
            # is an array of its members in order, as OPA writes it.
            return self._as_json(ref)
        except BaseException as exc:  # pyo3 panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            message = _short(str(exc))
            if "not a valid rule path" in message:
                return UNDEFINED
            raise PolicyEvalError(message) from exc
        return UNDEFINED if value is None else value

    def _as_json(self, ref: str) -> Any:
        try:
            return json.loads(self._engine.value.eval_rule_as_json(ref))
        except Exception as exc:
            raise PolicyEvalError(_short(str(exc))) from exc

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        return self.query(self._entrypoint, input_doc)


def _load(engine: Any, bundle: PolicyBundle) -> None:
    from pdp.policy import rego_version, v0_heads
    from pdp.policy.builtins import register

    register(engine, bundle.rego_version)  # OPA's builtins that regorus lacks (io.jwt.*, crypto.x509.*, …)
    for name, source in bundle.modules:
        try:
            engine.add_policy(name, source)
        except Exception as exc:
            raise rego_version.compile_error(name, source, bundle.rego_version, _short(str(exc))) from exc
    if bundle.rego_version == "v0":  # rule heads that regorus reads otherwise than OPA
        try:
            tree = json.loads(engine.get_ast_as_json())
        except Exception as exc:
            raise LoadError("policy.paths", f"policy does not compile: {_short(str(exc))}") from exc
        v0_heads.check(tree, bundle.rego_version)
    try:
        engine.add_data(bundle.data)
    except Exception as exc:
        raise LoadError("policy.paths", f"policy does not compile: {_short(str(exc))}") from exc


def compile_evaluator(bundle: PolicyBundle) -> Evaluator:
    if bundle.engine == "regorus":
        try:
            import regorus  # noqa: F401
        except ImportError as exc:
            raise LoadError("policy.engine", "engine 'regorus' needs the gordon-to-regorus package") from exc
        return RegorusEvaluator(bundle)
    if bundle.engine == "regopy":
        if bundle.rego_version != "v1":
            raise LoadError("policy.rego_version", "Rego v0 needs engine 'regorus' (rego-cpp reads Rego v1 only)")
        return RegopyEvaluator(bundle)
    raise LoadError("policy.engine", f"unknown engine {bundle.engine!r} (regopy or regorus)")


def probe_compile(bundle: PolicyBundle) -> None:
    """Compile ``bundle`` in a child process first when the engine may abort the process."""
    if bundle.engine != "regopy":
        return
    if bundle.rego_version != "v1":
        raise LoadError("policy.rego_version", "Rego v0 needs engine 'regorus' (rego-cpp reads Rego v1 only)")
    payload = json.dumps({"modules": bundle.modules, "data": bundle.data, "entrypoint": bundle.entrypoint})
    # -I: the child imports the installed pdp, never a pdp/ folder in the working directory.
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-m", "pdp.policy.probe"], input=payload.encode(), capture_output=True,
            timeout=_PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError("policy.paths", "compiling the policy took too long") from exc
    if proc.returncode == 0:
        return
    detail = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
    if proc.returncode < 0:
        raise LoadError("policy.paths", f"the Rego engine crashed compiling the policy: {detail[-500:]}")
    raise LoadError("policy.paths", detail[-2000:] or "policy does not compile")
