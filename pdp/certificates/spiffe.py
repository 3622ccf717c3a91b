"""SPIFFE IDs (SPIFFE ID standard, §2): ``spiffe://<trust domain>/<path>``.

The trust domain is lower-case letters, digits, ``.``, ``-`` and ``_``; path
segments are non-empty, not ``.`` or ``..``, and use letters, digits, ``.``,
``-`` and ``_``; no port, user info, query or fragment; at most 2048 bytes.
An X.509-SVID carries exactly one SPIFFE ID as a URI SAN (X.509-SVID §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_LENGTH = 2048


class SpiffeIdError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId:
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        raise SpiffeIdError("longer than 2048 bytes")
    if not uri.startswith("spiffe://"):
        raise SpiffeIdError("scheme is not 'spiffe'")
    rest = uri[len("spiffe://"):]
    domain, slash, path = rest.partition("/")
    if not domain or _TRUST_DOMAIN.fullmatch(domain) is None:
        raise SpiffeIdError(f"invalid trust domain {domain!r}")
    if slash:
        for segment in path.split("/"):
            if segment in ("", ".", "..") or _SEGMENT.fullmatch(segment) is None:
                raise SpiffeIdError(f"invalid path segment {segment!r}")
        path = "/" + path
    return SpiffeId(domain, path)


def is_spiffe_uri(uri: str) -> bool:
    return uri[:9].lower() == "spiffe://"
