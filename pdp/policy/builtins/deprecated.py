"""OPA's deprecated builtins, which Rego v0 policies may still call: ``any``, ``all``, ``set_diff``,
``re_match``, ``cast_*`` (``net.cidr_overlap`` lives with the other ``net.*``).

OPA keeps them for v0 only (a Rego v1 module calling one does not compile), so
pdp registers them with engines reading Rego v0 only (``Extension.v0_only``).
``re_match`` is ``regex.match`` under its old name: it asks the engine's own
``regex.match`` (one small engine per thread, as regorus engines must not
cross threads), so both names answer alike.
"""

from __future__ import annotations

from typing import Any

from pdp.policy.builtins._types import BuiltinError, operand, rego_order, type_name
from pdp.policy.thread_bound import ThreadBound, thread_cache


def _collection(name: str, value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise BuiltinError(name, f"operand 1 must be any of array, set but got {type_name(value)}")


def any_(collection: Any) -> bool:
    """Whether some member is ``true``."""
    return any(v is True for v in _collection("any", collection))


def all_(collection: Any) -> bool:
    """Whether every member is ``true`` (an empty collection: true)."""
    return all(v is True for v in _collection("all", collection))


def set_diff(a: Any, b: Any) -> set[Any]:
    """The members of ``a`` that are not in ``b``."""
    first = operand("set_diff", 1, a, (set, frozenset), "set")
    second = operand("set_diff", 2, b, (set, frozenset), "set")
    return set(first) - set(second)


def cast_array(x: Any) -> list[Any]:
    """An array as it is; a set's members as an array."""
    if isinstance(x, list | tuple):
        return list(x)
    if isinstance(x, set | frozenset):
        return sorted(x, key=rego_order)
    raise BuiltinError("cast_array", f"operand 1 must be any of array, set but got {type_name(x)}")


def cast_set(x: Any) -> set[Any]:
    """An array's members, or a set, as a set."""
    if isinstance(x, list | tuple | set | frozenset):
        return set(x)
    raise BuiltinError("cast_set", f"operand 1 must be any of array, set but got {type_name(x)}")


def cast_string(x: Any) -> str:
    result: str = operand("cast_string", 1, x, str, "string")
    return result


def cast_boolean(x: Any) -> bool:
    result: bool = operand("cast_boolean", 1, x, bool, "boolean")
    return result


def cast_null(x: Any) -> None:
    if x is not None:
        raise BuiltinError("cast_null", f"operand 1 must be null but got {type_name(x)}")


def cast_object(x: Any) -> dict[Any, Any]:
    result: dict[Any, Any] = operand("cast_object", 1, x, dict, "object")
    return result


def _regex_engine() -> Any:
    cache: dict[str, ThreadBound[Any]] = thread_cache("re_match")  # freed on this thread (``thread_bound``)
    held = cache.get("engine")
    if held is None:
        import regorus

        engine = regorus.Engine()
        engine.add_policy("re_match.rego", "package pdp_re_match\n\nmatch := regex.match(input[0], input[1])\n")
        held = cache["engine"] = ThreadBound(engine)
    return held.value


def re_match(pattern: Any, value: Any) -> bool:
    """``regex.match(pattern, value)``, answered by the engine's own ``regex.match``."""
    engine = _regex_engine()
    engine.set_input([pattern, value])
    try:
        result = engine.eval_rule("data.pdp_re_match.match")
    except BaseException as exc:  # pyo3 panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        message = str(exc).split("Stack backtrace:")[0].strip().rsplit("error:", 1)[-1].strip()
        raise BuiltinError("re_match", message.replace("regex.match", "re_match")) from exc
    if not isinstance(result, bool):
        raise BuiltinError("re_match", "operands must be strings")
    return result
