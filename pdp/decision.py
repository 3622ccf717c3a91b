"""``Decision``: the one answer the core gives, and its step trace."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pdp.frozen import fast_init
from pdp.reasons import Reason

if TYPE_CHECKING:
    from pdp.allowed import AllowedParts
    from pdp.certificates.identity import CertIdentity
    from pdp.credentials.tokens import VerifiedToken

_EMPTY: Mapping[str, str] = MappingProxyType({})


@fast_init
@dataclass(frozen=True, slots=True)
class Step:
    """One step of the pipeline: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.name, "ok": self.ok, "detail": self.detail}


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    """Allow or deny, with everything an adapter needs to render it.

    ``headers`` are added to the request sent upstream, ``headers_to_remove``
    are stripped from it, ``response_headers`` go to the client (on a deny:
    ``WWW-Authenticate``). ``message`` and ``steps`` explain the decision to
    operators; ``reason`` is the stable code callers and metrics see.
    ``more_headers`` / ``more_response_headers`` are further lines of a header that cannot be joined
    into one (``set-cookie``), added after the first. ``query_to_set`` (pairs, overwriting parameters of
    the same name) and ``query_to_remove`` (names) change the query string sent upstream (an allow only).
    """

    decision_id: str
    allowed: bool
    status: int
    reason: str
    message: str
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    headers_to_remove: tuple[str, ...] = ()
    response_headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    body: str = ""
    more_headers: tuple[tuple[str, str], ...] = ()
    more_response_headers: tuple[tuple[str, str], ...] = ()
    query_to_set: tuple[tuple[str, str], ...] = ()
    query_to_remove: tuple[str, ...] = ()
    steps: tuple[Step, ...] = ()
    #: Facts for access logs (Envoy dynamic metadata): verified identity, never credentials.
    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: Set when the decision came from a credential check, not the policy.
    reason_info: Reason | None = None
    #: What was verified (for in-process callers such as the ASGI middleware); never rendered.
    identity: CertIdentity | None = field(default=None, repr=False, compare=False)
    token: VerifiedToken | None = field(default=None, repr=False, compare=False)
    #: An allow's parts (``pdp.allowed``): the same object for every allow made from the same facts, so an
    #: adapter may keep what it rendered of them (all but the decision id) and render it once.
    parts: AllowedParts | None = field(default=None, repr=False, compare=False)

    def denial(self) -> tuple[str, dict[str, str]]:
        """The body and response headers a denied client gets: the policy's body, or a small JSON
        document naming the reason code and the decision id (never credential material)."""
        headers = dict(self.response_headers)
        if self.body:
            return self.body, headers
        headers.setdefault("content-type", "application/json")
        return json.dumps({"reason": self.reason, "decision_id": self.decision_id}), headers

    def explanation(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "allowed": self.allowed,
            "reason": self.reason,
            "message": self.message,
            "steps": [s.as_dict() for s in self.steps],
        }


#: Random bits for decision ids, read from the OS this many ids at a time (one system call, not one per
#: decision), each thread from its own buffer.
_IDS_PER_READ = 256
_RANDOM = threading.local()
# A forked worker must not hand out the ids its parent's buffer still holds: it reads its own.
os.register_at_fork(after_in_child=lambda: _RANDOM.__dict__.clear())


def _random_hex() -> str:
    """80 bits from the OS's random source, as 20 hex digits."""
    buffered: list[str] | None = getattr(_RANDOM, "hex", None)
    if not buffered:
        data = os.urandom(10 * _IDS_PER_READ).hex()
        buffered = _RANDOM.hex = [data[i:i + 20] for i in range(0, len(data), 20)]
    return buffered.pop()


#: The RFC 9562 variant digit (binary 10xx) for a random hex digit, keeping its two low bits.
_VARIANT = {f"{n:x}": f"{8 + (n & 3):x}" for n in range(16)}


def new_decision_id() -> str:
    """A time-ordered 128-bit id in UUID text form (48-bit milliseconds, then random bits, as UUIDv7):
    the version digit 7, 12 random bits, the variant digit with 2 random bits, 60 random bits."""
    ms = (time.time_ns() // 1_000_000).to_bytes(6, "big").hex()
    r = _random_hex()
    return f"{ms[:8]}-{ms[8:]}-7{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:19]}"
