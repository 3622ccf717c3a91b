"""RFC 6750 §3: the ``WWW-Authenticate: Bearer`` challenge for a denied request.

``error`` is ``invalid_request``, ``invalid_token`` or ``insufficient_scope``;
with no credentials at all the challenge names no error (§3.1). Quoted values
may hold only %x20-21 / %x23-5B / %x5D-7E, so descriptions are reduced to that.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _quoted(value: str) -> str:
    return '"' + _UNSAFE.sub("", value) + '"'


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
