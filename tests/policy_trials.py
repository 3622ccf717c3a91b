"""Policies and config edits for the shadow policy, dry run and policy diff tests.

ENFORCED allows ``GET /orders`` with a token (adding ``x-tier``), and denies ``/closed`` with its own
reason and a header for the client; NEXT, the policy meant to replace it, also wants the ``write``
scope on ``/orders``; CONFLICTING fails on ``/orders`` (two complete rules disagree); SLOW takes as
long as a request asks it to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

ENFORCED = """package pdp.authz

default result := {"allowed": false}

result := {"allowed": true, "headers": {"x-tier": "gold"}} if {
\tinput.token.present
\tinput.path == "/orders"
}

result := {"allowed": false, "reason": "orders_closed", "headers": {"x-why": "closed"}} if {
\tinput.path == "/closed"
}

result := {"allowed": false, "reason": "token_revoked"} if {
\tinput.path == "/revoked-by-policy"
}
"""

NEXT = """package pdp.authz

default result := {"allowed": false, "reason": "not_yet"}

result := {"allowed": true, "headers": {"x-tier": "gold"}} if {
\tinput.token.present
\tinput.path == "/orders"
\t"write" in input.token.scopes
}
"""

#: Answers as ENFORCED does on ``/orders``, unless the request has an ``x-n`` header: then it counts to
#: that number first (about a second per million here) and denies.
SLOW = """package pdp.authz

default result := {"allowed": true, "headers": {"x-tier": "gold"}}

result := {"allowed": false, "reason": "slow"} if {
\tn := to_number(input.attributes.request.http.headers["x-n"])
\tcount([x | some x in numbers.range(1, n); x % 7 == 0]) >= 0
}
"""

CONFLICTING = """package pdp.authz

result := {"allowed": true} if input.path == "/orders"

result := {"allowed": false} if input.token.present
"""


def write_policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "authz.rego").write_text(text)
    return folder


def with_policy_keys(config: Path, keys: str) -> Path:
    """Add ``keys`` (TOML lines) to the ``[policy]`` table of a config ``write_setup`` wrote."""
    text = config.read_text()
    assert "\n[policy]\n" in text
    config.write_text(text.replace("\n[policy]\n", f"\n[policy]\n{keys}\n", 1))
    return config


@contextlib.contextmanager
def lines_of(name: str) -> Iterator[list[str]]:
    """The messages logged on logger ``name`` (and its children) within the block."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level, disabled = Keep(logging.DEBUG), logger.level, logger.disabled
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False  # `pdp check`, run in this process, turns the decision lines off
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (Linux /proc), with their command lines."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    frontier.append(child)
    return found


def shadow_processes(pid: int) -> list[int]:
    """The shadow evaluators running below ``pid``."""
    return [p for p, cmdline in descendants(pid).items() if "pdp.policy.shadow_process" in cmdline]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
