"""OPA's ``regex.globs_match``: whether two regexp-style globs match at least one common non-empty string.

OPA answers with the Go package ``github.com/yashtewari/glob-intersection``
(``gintersect.NonEmpty``), and so does this port of it, step for step, its
approximations included: a policy must get the answer OPA gives. The globs are
anchored at both ends; their only special symbols are ``.`` (any character),
``[…]`` (a set of characters, with ``a-z`` ranges), ``+`` and ``*`` after a
token (one or more, zero or more), and ``\\`` before a character to take it
literally. Anything else, a flag with nothing before it, an unclosed set, is
an error worded as the Go package words it.

Two things differ from the Go package in how, never in what, it answers.
A set keeps its ranges as ranges (``[\\x00-\\U0010ffff]`` is one pair of
numbers, not a million characters). And the package's backtracking, which
tries every split of a ``*`` or ``+`` and takes time exponential in the number
of flagged tokens, is evaluated once per pair of positions in the two globs:
every step the package takes compares a tail of one glob with a tail of the
other, so its answer for each pair is remembered, and the work is bounded by
the product of the globs' lengths. A glob longer than ``MAX_GLOB_LENGTH``
characters is an evaluation error (a deny), where OPA would answer: the bound
keeps one request from holding a worker, and globs in policies and requests
are short.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from pdp.policy.builtins._types import BuiltinError, string

#: The longest glob, in characters, ``regex.globs_match`` compares; a longer one is an evaluation error. Two
#: globs of this length built to make the search try every pair of positions take ~0.1 s of CPU here.
MAX_GLOB_LENGTH = 256

_NONE, _PLUS, _STAR = 0, 1, 2
_FLAGS = {"+": _PLUS, "*": _STAR}
_CHAR, _DOT, _SET = 0, 1, 2
_INVALID = "the input provided is invalid"

#: Sorted, disjoint, non-adjacent (low, high) code point ranges, both ends included.
Ranges = tuple[tuple[int, int], ...]


class _GlobError(ValueError):
    def __init__(self, text: str, index: int, message: str) -> None:
        super().__init__(f"input:{text}, pos:{index}, {message}: {_INVALID}")


def _normalize(ranges: list[tuple[int, int]]) -> Ranges:
    """The same code points as sorted ranges, overlapping and adjacent ones merged: one form per set, so
    that two sets of the same characters compare equal (Go compares the sets' maps of runes)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _contains(ranges: Ranges, point: int) -> bool:
    i = bisect_right(ranges, (point, 0x10FFFF + 1)) - 1
    return i >= 0 and ranges[i][0] <= point <= ranges[i][1]


def _overlap(a: Ranges, b: Ranges) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False


@dataclass
class _Token:
    """A character, any character (dot) or a set of characters, with its flag. Mutable: ``_simplify``
    merges a repeated flagged token into the one before it, as the Go package does in place."""

    type: int
    flag: int = _NONE
    rune: str = ""
    ranges: Ranges = ()

    def same(self, other: _Token) -> bool:
        """Go's ``Token.Equal``: the same content, whatever the flags."""
        if self.type != other.type:
            return False
        if self.type == _CHAR:
            return self.rune == other.rune
        if self.type == _SET:
            return self.ranges == other.ranges
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
        return _contains(b.ranges, ord(a.rune))
    if a.type == _DOT:
        return True
    return _overlap(a.ranges, b.ranges)


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
    members: list[tuple[int, int]] = []
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
            members.append((ord(prev), ord(r)))
            prev_exists = False
        elif not escaped and r == "]":
            return new_index, _Token(_SET, ranges=_normalize(members))
        else:
            members.append((ord(r), ord(r)))
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


# The Go package's four mutually recursive functions (normal, special, plus, star), each on a tail of one
# glob and a tail of the other. A call is a step (function, which glob comes first, offset in the first,
# offset in the second); each is a generator that yields the steps it needs and returns its answer, and
# ``_Intersection.run`` evaluates each step once, on a stack of its own (no Python recursion, whose depth
# a long glob would exceed). The steps form no cycle: a `star` or `plus` step moves an offset forward
# before it asks for another step, and a `normal` step only hands its own offsets to one of them.
_NORMAL, _PLUS_STEP, _STAR_STEP = 0, 1, 2
Step = tuple[int, int, int, int]
_Search = Generator[Step, bool, bool]


class _Intersection:
    def __init__(self, g1: list[_Token], g2: list[_Token]) -> None:
        self.globs = (g1, g2)
        self.answers: dict[Step, bool] = {}

    def run(self, root: Step) -> bool:
        answers = self.answers
        stack: list[tuple[Step, _Search]] = [(root, self._step(root))]
        reply: bool | None = None
        while stack:
            step, search = stack[-1]
            try:
                wanted = search.send(reply) if reply is not None else next(search)
            except StopIteration as done:
                answers[step] = bool(done.value)
                stack.pop()
                reply = answers[step]
                continue
            known = answers.get(wanted)
            if known is not None:
                reply = known
            else:
                stack.append((wanted, self._step(wanted)))
                reply = None
        return answers[root]

    def _step(self, step: Step) -> _Search:
        kind, first, i, j = step
        if kind == _NORMAL:
            return self._normal(first, i, j)
        if kind == _PLUS_STEP:
            return self._plus(first, i, j)
        return self._star(first, i, j)

    def _special(self, first: int, i: int, j: int) -> Step | None:
        """The step Go's ``special`` takes for flagged tokens at ``i`` and ``j``; None: no intersection."""
        a, b = self.globs[first][i], self.globs[1 - first][j]
        if a.flag != _NONE:
            return (_PLUS_STEP if a.flag == _PLUS else _STAR_STEP, first, i, j)
        if b.flag != _NONE:
            return (_PLUS_STEP if b.flag == _PLUS else _STAR_STEP, 1 - first, j, i)
        return None

    def _normal(self, first: int, i: int, j: int) -> _Search:
        g1, g2 = self.globs[first], self.globs[1 - first]
        while i < len(g1) and j < len(g2):
            if g1[i].flag == _NONE and g2[j].flag == _NONE:
                if not _match(g1[i], g2[j]):
                    return False
            else:
                special = self._special(first, i, j)
                return special is not None and (yield special)
            i, j = i + 1, j + 1
        return i == len(g1) and j == len(g2)

    def _plus(self, first: int, i: int, j: int) -> _Search:
        plussed, other = self.globs[first], self.globs[1 - first]
        if j >= len(other):
            # Go indexes other[0] here and panics; OPA reports the panic as an evaluation error.
            raise IndexError("index out of range [0] with length 0")
        if not _match(plussed[i], other[j]):
            return False
        if (yield (_STAR_STEP, first, i, j + 1)):
            return True
        return other[j].flag != _NONE and (yield (_NORMAL, first, i + 1, j))

    def _star(self, first: int, i: int, j: int) -> _Search:
        starred, other = self.globs[first], self.globs[1 - first]
        star = starred[i]
        after = starred[i + 1] if i + 1 < len(starred) else None
        if j >= len(other):
            return after is None
        token = other[j]
        if after is not None and _match(token, after):
            if (yield (_NORMAL, first, i + 1, j)):
                return True
            if not _match(token, star):
                return False
        elif not _match(token, star):
            return False
        # Go's loop over the rest of ``other``, one token a step, so that each tail is tried once.
        return (yield (_STAR_STEP, first, i, j + 1))


def non_empty(lhs: str, rhs: str) -> bool:
    """``gintersect.NonEmpty``: whether the globs' intersection matches a non-empty set of non-empty strings."""
    g1 = _simplify(_tokenize(lhs))
    g2 = _simplify(_tokenize(rhs))
    trimmed = _trim(g1, g2)
    if trimmed is None:
        return False
    return _Intersection(*trimmed).run((_NORMAL, 0, 0, 0))


def globs_match(glob1: Any, glob2: Any) -> bool:
    name = "regex.globs_match"
    first, second = string(name, 1, glob1), string(name, 2, glob2)
    for pos, glob in ((1, first), (2, second)):
        if len(glob) > MAX_GLOB_LENGTH:
            raise BuiltinError(name, f"operand {pos} is {len(glob)} characters long, more than the "
                                     f"{MAX_GLOB_LENGTH} pdp compares")
    try:
        return non_empty(first, second)
    except (_GlobError, IndexError) as exc:
        raise BuiltinError(name, str(exc)) from exc
