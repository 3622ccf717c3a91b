"""A cache of policy outcomes, keyed on exactly the facts the policy reads.

A policy is a function of its input and data. The shipped policy reads eight
members of a 3 KB input document (the path, the method, whether a certificate
and a token are present, the trust domain, the SPIFFE ID, the scopes, the
binding), so a gateway's traffic asks it the same question again and again.
The answer to a question already asked is taken from here instead of
evaluating the policy again.

The key is built from what the modules read: every reference that starts at
``input`` is followed as far as it is static (``input.cert.spiffe_id``,
``input.attributes.request.http.headers["x-a"]``), and the value found there
in the input document (or its absence) is part of the key. The modules are
read as text, strings and all, so a reference cannot hide in a string
template; comments are left out. The cache is off for a bundle that:

- reads ``input`` as a whole anywhere (``x := input``, ``input[k]``, ``f(input)``):
  every fact would be part of the key;
- calls a builtin whose answer is not a function of its arguments: the clock,
  randomness, the network, the runtime.

One cache belongs to one compiled bundle (its version covers modules, data,
entrypoint and Rego version), so a reload starts empty. It is bounded
(``policy.decision_cache_size``). Rego v0 modules are read the same way: an
import of a path into ``input`` (``import input.attributes.request.http as
http_request``) is itself a reference, so the whole value at that path is
part of the key, whatever the alias is used for.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

#: Builtins whose answer is not a function of their arguments (OPA's non-deterministic builtins, and those
#: that read the clock when not given a time).
NONDETERMINISTIC = ("time.now_ns", "rand.intn", "uuid.rfc4122", "http.send", "net.lookup_ip_addr", "opa.runtime",
                    "io.jwt.decode_verify", "crypto.x509.parse_and_verify_certificates",
                    "crypto.x509.parse_and_verify_certificates_with_options", "time.now",
                    # ECDSA and RSA-PSS signatures are randomized.
                    "io.jwt.encode_sign", "io.jwt.encode_sign_raw")

_INPUT = re.compile(r"(?<![\w.])input(?!\w)")
# A step of a reference follows the one before with nothing between: in Rego, a '[' after a space or a
# line break starts another term ('x := input' then '["b"]' on the next line reads input whole), so a
# path stops there, and its prefix is what the key holds.
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*(\"(?:[^\"\\\n]|\\.)*\")\s*\]")

Path = tuple[str, ...]


class _Absent:
    """The value at a path the input document does not have."""

    def __repr__(self) -> str:
        return "<absent>"


#: What ``values_at`` gives for a path the document does not have.
ABSENT = _Absent()


def _without_comments(source: str) -> str:
    """The module without its comments; strings (which may hold '#') are kept as they are."""
    out: list[str] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            out.append(source[i:j + 1])
            i = j + 1
        elif c == "`":
            j = source.find("`", i + 1)
            j = n if j < 0 else j
            out.append(source[i:j + 1])
            i = j + 1
        elif c == "#":
            j = source.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def input_paths(sources: Iterable[str]) -> tuple[Path, ...] | None:
    """Every static path into ``input`` the modules read, or None when the outcome may depend on more
    than the values at those paths (``input`` read whole, or a non-deterministic builtin)."""
    paths: set[Path] = set()
    for source in sources:
        text = _without_comments(source)
        if any(name in text for name in NONDETERMINISTIC):
            return None
        for match in _INPUT.finditer(text):
            steps: list[str] = []
            pos = match.end()
            while (step := _STEP.match(text, pos)) is not None:
                if step.group(1) is not None:
                    steps.append(step.group(1))
                else:
                    key = _string(step.group(2))
                    if key is None:
                        break  # a key pdp cannot read the way Rego does: the path stops before it
                    steps.append(key)
                pos = step.end()
            if not steps:
                return None
            paths.add(tuple(steps))
    # A path under another one adds nothing: the shorter one's value holds it.
    kept = sorted(paths)
    return tuple(p for p in kept if not any(p[:len(q)] == q and p != q for q in kept))


def _string(literal: str) -> str | None:
    """A Rego string literal's value: Rego strings are JSON strings ("\\u0061" is "a", "\\t" a tab)."""
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def values_at(doc: dict[str, Any], paths: tuple[Path, ...]) -> list[Any]:
    """The value at each path of ``doc``, ``ABSENT`` where it has none (one loop, no call per path: the
    decision cache's key is built from these on every decision)."""
    values = []
    for path in paths:
        value: Any = doc
        for step in path:
            if not isinstance(value, dict) or step not in value:
                value = ABSENT
                break
            value = value[step]
        values.append(value)
    return values


class DecisionCache:
    """Bounded LRU of outcomes by the values at the paths a bundle reads. Thread-safe."""

    def __init__(self, paths: tuple[Path, ...], max_entries: int) -> None:
        self.paths = paths
        self._max = max_entries
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_modules(cls, sources: Iterable[str], max_entries: int) -> DecisionCache | None:
        """A cache for these modules, or None when their outcome cannot be keyed on a few facts."""
        if max_entries <= 0:
            return None
        paths = input_paths(sources)
        return None if paths is None else cls(paths, max_entries)

    def key(self, doc: dict[str, Any]) -> str:
        # repr keeps types apart (1, 1.0, True and "1" are four keys) and quotes every string.
        return repr(values_at(doc, self.paths))

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
