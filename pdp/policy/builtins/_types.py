"""Operand checks and the error every builtin raises, worded as OPA words them."""

from __future__ import annotations

import json
from typing import Any


class BuiltinError(ValueError):
    """A builtin refused its operands; the engine reports it as an evaluation error (strict mode)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")


def type_name(value: Any) -> str:
    """OPA's name for the type of a value as it arrives from the engine."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, set | frozenset):
        return "set"
    return type(value).__name__


def operand(name: str, pos: int, value: Any, kind: type | tuple[type, ...], want: str) -> Any:
    """``value`` when it is of ``kind``, else OPA's type error for operand ``pos``."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BuiltinError(name, f"operand {pos} must be {want} but got boolean")
    if not isinstance(value, kind):
        raise BuiltinError(name, f"operand {pos} must be {want} but got {type_name(value)}")
    return value


def string(name: str, pos: int, value: Any) -> str:
    result: str = operand(name, pos, value, str, "string")
    return result


_RANK = {"null": 0, "boolean": 1, "number": 2, "string": 3, "array": 4, "object": 5, "set": 6}


def rego_order(value: Any) -> tuple[int, str, Any]:
    """A sort key putting values in Rego's order of types (null, booleans, numbers, strings, arrays, objects,
    sets), scalars by value within their type; collections by their JSON text, which is Rego's order only
    approximately (what a set of collections turns into when written as an array)."""
    kind = type_name(value)
    if kind in ("boolean", "number", "string"):
        return _RANK[kind], "", value
    if kind == "null":
        return 0, "", 0
    try:
        text = json.dumps(value, sort_keys=True, default=lambda v: sorted(v, key=rego_order))
    except (TypeError, ValueError):
        text = repr(value)
    return _RANK.get(kind, 7), text, 0
