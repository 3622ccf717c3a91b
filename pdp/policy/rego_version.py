"""Rego v0 and Rego v1: reading each module in the language version it is written in (``policy.rego_version``).

OPA 1.0 made Rego v1 the default: ``if`` before every rule body, ``contains``
for multi-value rules, and ``if``, ``contains``, ``in`` and ``every`` always
keywords. A policy not yet migrated is Rego v0, read with the engine switched
to v0 (regorus ``Engine.set_rego_v0``), where those four words are keywords
only after ``import future.keywords`` (all of them), ``import
future.keywords.<word>`` or ``import rego.v1``.

Text of the wrong version is not always refused by the engine. regorus, reading
v1 text as v0, takes a keyword it was not told about for a name and goes on:
``allow if { input.x == 1 }`` becomes an ``allow`` that is always true, where
OPA refuses the module. So a v0 module that uses one of those words where v0
does not know it as a keyword is refused here (``check``), before any engine
reads it, naming the file, the line and ``policy.rego_version``. A v0 module
whose own variable is named ``if`` or ``in`` is refused too (rename it); the
builtin ``contains(…)`` is a call, not the keyword (in a rule head, where regorus
reads the keyword, ``pdp.policy.v0_heads`` refuses it). A v0 module read as v1
fails to parse in the engine; ``compile_error`` then says in which version it
does parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pdp.errors import LoadError

KEY = "policy.rego_version"
#: regorus refuses a module line longer than 1,024 columns unless told otherwise; OPA has no such limit,
#: and OPA policies (and OPA's own test cases) hold long literals, certificates and keys, on one line.
#: regorus's limits on a module's size (1 MiB) and line count (20,000) are kept.
MAX_COLUMNS = 1 << 20
MAX_FILE_BYTES = 1 << 20
MAX_LINES = 20_000
#: The words Rego v1 always reads as keywords, and Rego v0 only after importing them.
FUTURE_KEYWORDS = ("if", "contains", "in", "every")

# `\r` before the line's end: a module saved with CRLF line endings imports as well as one with LF.
_IMPORT = re.compile(r"^[ \t]*import[ \t]+(future\.keywords(?:\.([A-Za-z_]+))?|rego\.v1)[ \t]*(?:#.*)?\r?$",
                     re.MULTILINE)
_WORD = re.compile(r"(?<![\w.])(if|contains|in|every)(?![\w])")
_CALL = re.compile(r"[ \t]*\(")


def code_only(source: str) -> str:
    """``source`` with its comments and the contents of its strings blanked (line breaks kept, so that
    offsets and line numbers still hold): what is left is Rego's own words."""
    out = list(source)
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == '"':
            j = i + 1
            while j < n and source[j] not in '"\n':
                j += 2 if source[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
        elif c == "`":
            j = source.find("`", i + 1)
            j = n if j < 0 else j
            for k in range(i + 1, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j + 1
        elif c == "#":
            j = source.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        else:
            i += 1
    return "".join(out)


def _imported(code: str) -> set[str]:
    """The future keywords a v0 module has imported."""
    known: set[str] = set()
    for match in _IMPORT.finditer(code):
        if match.group(1) == "rego.v1" or match.group(2) is None:
            known.update(FUTURE_KEYWORDS)
        else:
            known.add(match.group(2))
    return known


def v1_words(source: str) -> list[tuple[int, str]]:
    """(line, word) of each Rego v1 keyword a v0 module uses without having imported it."""
    code = code_only(source)
    known = _imported(code)
    found: list[tuple[int, str]] = []
    for match in _WORD.finditer(code):
        word = match.group(1)
        if word in known:
            continue
        if word == "contains" and _CALL.match(code, match.end()):
            continue  # the builtin contains(haystack, needle); a rule head's `contains(` is v0_heads's
        found.append((code.count("\n", 0, match.start()) + 1, word))
    return found


def check(modules: Iterable[tuple[str, str]], rego_version: str) -> None:
    """Refuse a v0 bundle holding a module that only Rego v1 reads as its author meant it."""
    if rego_version != "v0":
        return
    for name, source in modules:
        found = v1_words(source)
        if found:
            line, word = found[0]
            raise LoadError(KEY, f"{name}:{line}: `{word}` is a keyword of Rego v1, but policy.rego_version = "
                                 f"\"v0\" and the module does not import it (`import future.keywords.{word}` or "
                                 f"`import rego.v1`): read as v0 it would mean something else than its author "
                                 f"meant; load it with policy.rego_version = \"v1\", or add the import")


def new_engine(rego_version: str = "v1") -> Any:
    """A ``regorus.Engine`` reading modules in ``rego_version``, with OPA's freedom of line length."""
    import regorus

    engine = regorus.Engine()
    engine.set_rego_v0(rego_version == "v0")
    engine.set_policy_length_config(max_col=MAX_COLUMNS, max_file_bytes=MAX_FILE_BYTES, max_lines=MAX_LINES)
    return engine


def _parses(name: str, source: str, rego_version: str) -> bool:
    if rego_version == "v0" and v1_words(source):
        return False  # checked first: regorus would read it, warning on stderr, with another meaning
    engine = new_engine(rego_version)
    try:
        engine.add_policy(name, source)
    except BaseException as exc:  # pyo3 panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return False
    return True


def compile_error(name: str, source: str, rego_version: str, message: str,
                  key: str = "policy.paths") -> LoadError:
    """The error for a module the engine refused: keyed on ``policy.rego_version`` when the module is
    written in the other Rego version (it parses there), else on ``key``."""
    other = "v0" if rego_version == "v1" else "v1"
    if _parses(name, source, other):
        migrate = ", or migrate it to Rego v1 (`opa fmt --v0-v1`)" if other == "v0" else ""
        return LoadError(KEY, f"{name} is Rego {other} but policy.rego_version = \"{rego_version}\": set "
                              f"policy.rego_version = \"{other}\"{migrate} ({message})")
    return LoadError(key, f"policy does not compile: {message}")
