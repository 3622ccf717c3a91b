"""OPA's ``regex.globs_match``: whether two regexp-style globs match at least one common non-empty string.

OPA answers with the Go package ``github.com/yashtewari/glob-intersection``
(``gintersect.NonEmpty``), and so does this port of it, step for step, its
approximations included: a policy must get the answer OPA gives. The globs are
anchored at both ends; their only special symbols are ``.`` (any character),
``[…]`` (a set of characters, with ``a-z`` ranges), ``+`` and ``*`` after a
token (one or more, zero or more), and ``\\`` before a character to take it
literally. Anything else, a flag with nothing before it, an unclosed set, is
an error worded as the Go package words it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdp.policy.builtins._types import BuiltinError, string

_NONE, _PLUS, _STAR = 0, 1, 2
_FLAGS = {"+": _PLUS, "*": _STAR}
_CHAR, _DOT, _SET = 0, 1, 2
_INVALID = "the input provided is invalid"


class _GlobError(ValueError):
    def __init__(self, text: str, index: int, message: str) -> None:
        super().__init__(f"input:{text}, pos:{index}, {message}: {_INVALID}")


@dataclass
class _Token:
    """A character, any character (dot) or a set of characters, with its flag. Mutable: ``_simplify``
    merges a repeated flagged token into the one before it, as the Go package does in place."""

    type: int
    flag: int = _NONE
    rune: str = ""
    runes: frozenset[str] = frozenset()

    def same(self, other: _Token) -> bool:
        """Go's ``Token.Equal``: the same content, whatever the flags."""
        if self.type != other.type:
            return False
        if self.type == _CHAR:
            return self.rune == other.rune
        if self.type == _SET:
            return self.runes == other.runes
        return True


def _match(a: _Token, b: _Token) -> bool:
    """Whether two tokens can match a common character (a set and a dot always can, even an empty set)."""
    if a.type > b.type:
        a, b = b, a
    if a.type == _CHAR:
        if b.type == _CHAR:
            return a.rune == b.rune
        if b.type == _DOT:
            return True
        return a.rune in b.runes
    if a.type == _DOT:
        return True
    return bool(a.runes & b.runes)


def _next_rune(index: int, runes: str) -> tuple[int, str, bool] | None:
    """(next index, rune, escaped) or None at the end of the input."""
    if index >= len(runes):
        return None
    if runes[index] == "\\":
        if index < len(runes) - 1:
            return index + 2, runes[index + 1], True
        raise _GlobError(runes, index, "input ends with a \\ (escape) character")
    return index + 1, runes[index], False


def _next_set(index: int, runes: str) -> tuple[int, _Token]:
    """The set that starts after the '[' before ``index``, and the index after its ']'."""
    members: list[str] = []
    prev, prev_exists = "", False
    new_index = index
    while (step := _next_rune(new_index, runes)) is not None:
        new_index, r, escaped = step
        if not escaped and r == "-":
            if not prev_exists:
                raise _GlobError(runes, new_index, "range character '-' must be preceded by a Unicode character")
            if new_index >= len(runes) - 1:
                raise _GlobError(runes, new_index, "range character '-' must be followed by a Unicode character")
            step = _next_rune(new_index, runes)
            assert step is not None  # a rune is left: checked just above
            new_index, r, escaped = step
            if not escaped and r in "]-":
                raise _GlobError(runes, new_index, "range character '-' cannot be followed by a special symbol")
            if r < prev:
                raise _GlobError(runes, new_index, f"range is out of order: '{r}' comes before '{prev}' in Unicode")
            members.extend(chr(c) for c in range(ord(prev), ord(r) + 1))
            prev_exists = False
        elif not escaped and r == "]":
            return new_index, _Token(_SET, runes=frozenset(members))
        else:
            members.append(r)
            prev, prev_exists = r, True
    raise _GlobError(runes, len(runes), "found [ without matching ]")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    index = 0
    while (step := _next_rune(index, text)) is not None:
        index, r, escaped = step
        if escaped:
            token = _Token(_CHAR, rune=r)
        elif r == ".":
            token = _Token(_DOT)
        elif r == "]":
            raise _GlobError(text, index, "set-close ']' with no preceding '['")
        elif r == "[":
            index, token = _next_set(index, text)
        elif r in _FLAGS:
            raise _GlobError(text, index, f"flag '{r}' must be preceded by a non-flag")
        else:
            token = _Token(_CHAR, rune=r)
        flag_step = _next_rune(index, text)
        if flag_step is not None and not flag_step[2] and flag_step[1] in _FLAGS:
            index, token.flag = flag_step[0], _FLAGS[flag_step[1]]
        tokens.append(token)
    return tokens


def _simplify(tokens: list[_Token]) -> list[_Token]:
    """``t+t*`` and ``t*t+`` are ``t+``, ``t*t*`` is ``t*``."""
    if not tokens:
        return tokens
    simple = [tokens[0]]
    for token in tokens[1:]:
        latest = simple[-1]
        if token.flag != _NONE and latest.flag != _NONE and token.same(latest):
            latest.flag = _PLUS if _PLUS in (token.flag, latest.flag) else _STAR
        else:
            simple.append(token)
    return simple


def _trim(g1: list[_Token], g2: list[_Token]) -> tuple[list[_Token], list[_Token]] | None:
    """Drop the unflagged prefixes and suffixes the two globs share (keeping one token of each), or None
    when those do not match."""
    n1, n2 = len(g1), len(g2)
    left = 0
    while left < n1 and left < n2 and g1[left].flag == _NONE and g2[left].flag == _NONE:
        if not _match(g1[left], g2[left]):
            return None
        left += 1
    if left > 0:
        left -= 1
    r1, r2 = n1 - 1, n2 - 1
    while r1 >= 0 and r1 >= left and r2 >= 0 and r2 >= left and g1[r1].flag == _NONE and g2[r2].flag == _NONE:
        if not _match(g1[r1], g2[r2]):
            return None
        r1, r2 = r1 - 1, r2 - 1
    if r1 < n1 - 1:
        r1, r2 = r1 + 1, r2 + 1
    return g1[left:r1 + 1], g2[left:r2 + 1]


def _normal(g1: list[_Token], g2: list[_Token]) -> bool:
    i = 0
    while i < len(g1) and i < len(g2):
        if g1[i].flag == _NONE and g2[i].flag == _NONE:
            if not _match(g1[i], g2[i]):
                return False
        else:
            return _special(g1[i:], g2[i:])
        i += 1
    return i == len(g1) and i == len(g2)


def _special(g1: list[_Token], g2: list[_Token]) -> bool:
    if g1[0].flag != _NONE:
        return _plus(g1, g2) if g1[0].flag == _PLUS else _star(g1, g2)
    if g2[0].flag != _NONE:
        return _plus(g2, g1) if g2[0].flag == _PLUS else _star(g2, g1)
    return False


def _plus(plussed: list[_Token], other: list[_Token]) -> bool:
    if not other:
        # Go indexes other[0] here and panics; OPA reports the panic as an evaluation error.
        raise IndexError("index out of range [0] with length 0")
    if not _match(plussed[0], other[0]):
        return False
    if _star(plussed, other[1:]):
        return True
    return other[0].flag != _NONE and _normal(plussed[1:], other)


def _star(starred: list[_Token], other: list[_Token]) -> bool:
    star = starred[0]
    after = starred[1] if len(starred) > 1 else None
    for i, token in enumerate(other):
        if after is not None and _match(token, after):
            if _normal(starred[1:], other[i:]):
                return True
            if not _match(token, star):
                return False
        elif not _match(token, star):
            return False
    return after is None


def non_empty(lhs: str, rhs: str) -> bool:
    """``gintersect.NonEmpty``: whether the globs' intersection matches a non-empty set of non-empty strings."""
    g1 = _simplify(_tokenize(lhs))
    g2 = _simplify(_tokenize(rhs))
    trimmed = _trim(g1, g2)
    if trimmed is None:
        return False
    return _normal(*trimmed)


def globs_match(glob1: Any, glob2: Any) -> bool:
    name = "regex.globs_match"
    first, second = string(name, 1, glob1), string(name, 2, glob2)
    try:
        return non_empty(first, second)
    except (_GlobError, IndexError) as exc:
        raise BuiltinError(name, str(exc)) from exc
