"""RFC 6750 §3: the ``WWW-Authenticate: Bearer`` challenge for a denied request.

``error`` is ``invalid_request``, ``invalid_token`` or ``insufficient_scope``;
with no credentials at all the challenge names no error (§3.1). Quoted values
may hold only %x20-21 / %x23-5B / %x5D-7E, so descriptions are reduced to that.
The ``scope`` attribute names the scope the resource needs, as RFC 6749 §3.3
scope-tokens separated by spaces (``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``);
``scope_tokens`` keeps only words that are scope-tokens (a policy's ``scope`` is read
through it), and the challenge quotes what it is given like any other value.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_SCOPE_TOKEN = re.compile(r'[\x21\x23-\x5b\x5d-\x7e]+')


def _quoted(value: str) -> str:
    return '"' + _UNSAFE.sub("", value) + '"'


def scope_tokens(words: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The RFC 6749 §3.3 scope-tokens of a space-separated scope string (or of a list of them), each
    once, in order; any other word is dropped."""
    parts = words.split(" ") if isinstance(words, str) else [w for word in words for w in word.split(" ")]
    return tuple(dict.fromkeys(p for p in parts if _SCOPE_TOKEN.fullmatch(p)))


def challenge(*, realm: str, error: str | None = None, description: str | None = None,
              scope: str | None = None, scheme: str = "Bearer", algs: str | None = None) -> str:
    """A ``Bearer`` challenge, or with ``scheme="DPoP"`` the RFC 9449 §7.1 one (which adds ``algs``)."""
    params = [f"realm={_quoted(realm)}"]
    if error:
        params.append(f"error={_quoted(error)}")
        if description:
            params.append(f"error_description={_quoted(description)}")
    if scope:
        params.append(f"scope={_quoted(scope)}")
    if algs:
        params.append(f"algs={_quoted(algs)}")
    return f"{scheme} " + ", ".join(params)
