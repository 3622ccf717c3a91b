"""OPA's ``strings.split_n`` and ``array.flatten``, newer than the embedded engine."""

from __future__ import annotations

from typing import Any

from pdp.policy.builtins._types import BuiltinError, operand, string


def split_n(x: Any, delimiter: Any, n: Any) -> list[str]:
    """The first ``n`` pieces of ``x`` split at ``delimiter`` (the last ``-n`` when ``n`` is negative)."""
    name = "strings.split_n"
    text, sep = string(name, 1, x), string(name, 2, delimiter)
    count = operand(name, 3, n, (int, float), "integer number")
    if isinstance(count, float):
        if not count.is_integer():
            raise BuiltinError(name, "operand 3 must be integer number but got floating-point number")
        count = int(count)
    parts = text.split(sep) if sep else list(text)
    if count == 0:
        return []
    return parts[:count] if count > 0 else parts[count:]


def flatten(arr: Any) -> list[Any]:
    """``arr`` with each array member replaced by its members (one level)."""
    items = operand("array.flatten", 1, arr, list, "array")
    out: list[Any] = []
    for item in items:
        if isinstance(item, list):
            out.extend(item)
        else:
            out.append(item)
    return out
