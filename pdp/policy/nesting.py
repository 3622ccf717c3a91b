"""Refuse, at load, Rego whose ``[`` and ``{`` brackets nest deeper than the parser can bear.

regorus's parser takes time exponential in how deeply array, set and object literals nest: 0.1 s at 12
levels, 3 to 4 s at 16 and 40 s at 20, on every thread that compiles the policy and at every reload, while
the service waits. No policy needs such depth (a route table nests four or five levels), so a module
nesting them deeper than ``MAX_DEPTH`` is refused with the file and line, before any engine reads it.
Brackets inside strings, raw strings and comments are not counted.
"""

from __future__ import annotations

#: The deepest nesting of ``[`` and ``{`` a module may hold.
MAX_DEPTH = 12


def too_deep(source: str, max_depth: int = MAX_DEPTH) -> int | None:
    """The line where ``[``/``{`` brackets first nest deeper than ``max_depth``, else None."""
    depth = 0
    line = 1
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "\n":
            line += 1
        elif c == "#":  # a comment, to the end of its line
            end = source.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c == '"':
            i += 1
            while i < n and source[i] != '"' and source[i] != "\n":
                i += 2 if source[i] == "\\" else 1
        elif c == "`":  # a raw string may span lines
            end = source.find("`", i + 1)
            end = n if end < 0 else end
            line += source.count("\n", i, end)
            i = end
        elif c in "[{":
            depth += 1
            if depth > max_depth:
                return line
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return None
