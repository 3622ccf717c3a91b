"""pdp's own revocation list: certificates, tokens and subjects cut off at once, on every replica.

CRLs and OCSP (``pdp.certificates.revocation``) say what a CA revoked, as late
as the CA publishes it. This list is what an operator revokes *now*
(``pdp revoke``, ``POST /admin/revocations``), by:

- ``cert``: the certificate's SHA-256 thumbprint in the RFC 8705 ``x5t#S256``
  form (base64url, no padding) — denied ``cert_revoked``;
- ``token``: the access token's ``jti`` claim (RFC 7519 §4.1.7; JWTs, and
  opaque tokens whose introspection answer carries one) — denied
  ``token_revoked``, and ``active: false`` at the RFC 7662 endpoint;
- ``subject``: a SPIFFE ID (or any other subject name) — the certificate's
  SPIFFE ID and the token's ``sub`` are both compared with it — denied
  ``subject_revoked``.

An entry may expire (``--ttl``); expired entries are no longer enforced on any
replica, whenever the store drops them. The entries live in the store's map
``revocations`` (field ``KIND:VALUE``, a small JSON value); every replica keeps
a copy here, as one dictionary per kind, so the check on the request path is
a dictionary lookup and never waits on the store. ``pdp.service.revocation_sync``
keeps the copy current.

A token bound (RFC 8705 ``cnf.x5t#S256``) to a revoked certificate is revoked
with it, and pdp's own callers (gateways, trusted proxies, admins,
introspection clients) are checked against the list too (``caller_revocation``).
Re-revoking never shortens an entry: the later expiry is kept. Entries in the
store that pdp did not write are skipped, never a failed read
(``pdp.stored_values``), and the expiry sweep deletes an entry only while it
is still the one it read.

A copy that has never been loaded (the store was down when pdp started)
cannot say that a credential is *not* revoked: a request that presents one is
denied ``store_unavailable`` until the first load. After that, the last list
read is enforced while the store is unreachable.

No I/O here: the store is reached through the ``Store`` protocol.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cryptography import x509

from pdp import reasons
from pdp.certificates.identity import CertIdentity
from pdp.certificates.spiffe import SpiffeIdError, is_spiffe_uri, parse_spiffe_id
from pdp.credentials.rfc8705 import thumbprint
from pdp.credentials.tokens import VerifiedToken
from pdp.errors import Denied
from pdp.reasons import Reason
from pdp.store import Store
from pdp.stored_values import shown, unix_time

log = logging.getLogger("pdp")

KINDS = ("cert", "token", "subject")
#: The store map the entries live in.
MAP = "revocations"
#: The most entries the list takes: a revocation list is short (long-lived mistakes belong in a CRL).
MAX_ENTRIES = 100_000
MAX_VALUE_LENGTH = 2048
MAX_REASON_LENGTH = 512

_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
_HEX_SHA256 = re.compile(r"(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}")


class RevocationError(ValueError):
    """A revocation that cannot be recorded: an unknown kind, a malformed value, a full list."""


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: str
    value: str
    reason: str = ""
    #: When it was revoked (Unix time).
    created: float = 0.0
    #: When it stops being enforced (Unix time); None: never.
    expires: float | None = None
    #: Who revoked it: the admin caller's identity, or the user and host of ``pdp revoke``.
    by: str = ""
    #: The value as read from the store (``decode``): what the expiry sweep deletes only if it is still there.
    stored: bytes = dataclasses.field(default=b"", compare=False, repr=False)

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.value}"

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def encode(self) -> bytes:
        return json.dumps({"reason": self.reason, "created": self.created, "expires": self.expires, "by": self.by},
                          separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def decode(cls, field: str, value: bytes) -> Revocation:
        """The entry stored under ``field``; ``ValueError`` when it is not one pdp wrote (numbers must be
        finite times, the value printable: see ``pdp.stored_values``)."""
        kind, sep, subject = field.partition(":")
        if not sep or kind not in KINDS or not subject:
            raise ValueError(f"field {field[:80]!r} is not KIND:VALUE")
        if len(subject) > MAX_VALUE_LENGTH or not subject.isprintable():
            raise ValueError("the value is not 1 to 2048 printable characters")
        try:
            doc = json.loads(value)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        expires, created = doc.get("expires"), doc.get("created", 0.0)
        return cls(kind, subject, shown(str(doc.get("reason", "")), MAX_REASON_LENGTH), unix_time(created),
                   unix_time(expires) if expires is not None else None, shown(str(doc.get("by", "")), MAX_VALUE_LENGTH),
                   bytes(value))

    def view(self) -> dict[str, object]:
        """The entry as ``pdp revoke list --json`` and ``GET /admin/revocations`` show it."""
        return {"kind": self.kind, "value": self.value, "reason": self.reason, "created": self.created,
                "expires": self.expires, "by": self.by}


def normalize(kind: str, value: str) -> str:
    """The form ``value`` is kept and compared in, for ``kind``; ``RevocationError`` when it cannot be one.

    A certificate thumbprint may be given as ``x5t#S256`` (43 base64url characters) or as the hex SHA-256
    fingerprint of the DER certificate (``openssl x509 -fingerprint -sha256``, with or without colons, any
    case); either way it is kept as the x5t#S256 a certificate's thumbprint is compared with. The last of
    the 43 characters carries 2 bits that name nothing: one with them set is the same digest in another
    spelling, and is kept in the one spelling that matches. A token is named by its ``jti``: a whole JWT
    given instead is refused (naming its jti), since nothing would ever match it."""
    if kind not in KINDS:
        raise RevocationError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    value = value.strip()
    if not value or len(value) > MAX_VALUE_LENGTH or not value.isprintable():
        raise RevocationError(f"a {kind} value is 1 to {MAX_VALUE_LENGTH} printable characters")
    if kind == "cert":
        if _HEX_SHA256.fullmatch(value):
            digest = binascii.unhexlify(value.replace(":", ""))
            return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        if not _THUMBPRINT.fullmatch(value):
            raise RevocationError("a certificate is named by its x5t#S256 thumbprint (43 base64url characters), "
                                  "its hex SHA-256 fingerprint, or its PEM file")
        return base64.urlsafe_b64encode(base64.urlsafe_b64decode(value + "=")).rstrip(b"=").decode("ascii")
    if kind == "token":
        _refuse_whole_jwt(value)
    if kind == "subject" and is_spiffe_uri(value):
        try:
            return str(parse_spiffe_id(value))
        except SpiffeIdError as exc:
            raise RevocationError(f"not a valid SPIFFE ID: {exc}") from exc
    return value


def check_reason(reason: str) -> None:
    """``RevocationError`` unless ``reason`` is at most ``MAX_REASON_LENGTH`` printable characters of Unicode
    text: it is shown in logs, terminals and JSON answers, where a control character forges a line and a
    lone surrogate cannot be written at all."""
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError:
        raise RevocationError("the reason is not Unicode text (it holds a lone surrogate)") from None
    if len(reason) > MAX_REASON_LENGTH:
        raise RevocationError(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    if not reason.isprintable():
        raise RevocationError("the reason holds control characters (line breaks, escapes): one line of text only")


def _refuse_whole_jwt(value: str) -> None:
    """A JWT (or JWE) pasted where its ``jti`` belongs: refused, with what to revoke instead. The token is not
    verified here, so its jti is only named, never revoked on its word."""
    parts = value.split(".")
    if len(parts) not in (3, 5):
        return
    header = _json_segment(parts[0])
    if not isinstance(header, dict) or "alg" not in header:
        return
    if len(parts) == 5:
        raise RevocationError("this is a whole encrypted token (JWE), not a jti: revoke its jti claim, or its "
                              "subject (revoke subject)")
    claims = _json_segment(parts[1])
    jti = claims.get("jti") if isinstance(claims, dict) else None
    if isinstance(jti, str) and jti:
        raise RevocationError(f"this is a whole token, not a jti: its jti claim is {jti[:200]!r}; revoke that "
                              "(a token is revoked by its jti)")
    raise RevocationError("this is a whole token and it has no jti claim, so it cannot be revoked by itself: "
                          "revoke its subject (revoke subject SUB) or the certificate it is bound to")


def _json_segment(segment: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        return None


class RevocationList:
    """This replica's copy of the list, checked on every request. ``replace`` swaps in a whole new list
    (one assignment, so a concurrent check sees the old list or the new one, never half of each)."""

    def __init__(self, entries: Iterable[Revocation] = (), *, loaded: bool = True, version: int = 0,
                 now: float = 0.0) -> None:
        self._tables: tuple[dict[str, float], dict[str, float], dict[str, float]] = ({}, {}, {})
        self._entries: tuple[Revocation, ...] = ()
        self.loaded = False
        self.version = version
        self.loaded_at = 0.0
        #: When the first entry with a ``ttl`` expires (``math.inf``: none will).
        self.next_expiry = math.inf
        if loaded:
            self.replace(entries, version, now)

    @classmethod
    def not_loaded(cls) -> RevocationList:
        """A copy that has yet to read the store: requests with credentials are denied until it has."""
        return cls(loaded=False, version=-1)

    def replace(self, entries: Iterable[Revocation], version: int, now: float) -> None:
        tables: tuple[dict[str, float], dict[str, float], dict[str, float]] = ({}, {}, {})
        kept = []
        for entry in entries:
            if entry.active(now):
                tables[KINDS.index(entry.kind)][entry.value] = math.inf if entry.expires is None else entry.expires
                kept.append(entry)
        self._tables = tables
        self._entries = tuple(kept)
        self.next_expiry = min((e.expires for e in kept if e.expires is not None), default=math.inf)
        self.version = version
        self.loaded_at = now
        self.loaded = True

    def entries(self, now: float) -> list[Revocation]:
        """The entries in force at ``now``, newest first."""
        return sorted((e for e in self._entries if e.active(now)), key=lambda e: -e.created)

    def expired(self, now: float) -> list[Revocation]:
        """The entries of this copy that have expired by ``now`` (no longer enforced: see ``check_*``)."""
        return [e for e in self._entries if not e.active(now)]

    def __len__(self) -> int:
        return len(self._entries)

    def check_identity(self, identity: CertIdentity, now: float) -> None:
        """Raise ``Denied`` for a revoked certificate (``cert_revoked``) or SPIFFE ID (``subject_revoked``)."""
        if not self.loaded:
            raise _not_loaded()
        certs, _, subjects = self._tables
        if certs and certs.get(identity.thumbprint, 0.0) > now:
            raise Denied(reasons.CERT_REVOKED, f"certificate {identity.thumbprint} is on pdp's revocation list")
        if subjects and identity.spiffe_id and subjects.get(identity.spiffe_id, 0.0) > now:
            raise Denied(reasons.SUBJECT_REVOKED, f"{identity.spiffe_id} is on pdp's revocation list")

    def token_revocation(self, token: VerifiedToken, now: float) -> Reason | None:
        """``token_revoked`` (by ``jti``), ``subject_revoked`` (by ``sub``), ``cert_revoked`` (bound by
        ``cnf.x5t#S256`` to a revoked certificate: RFC 8705 §3, the token is only good with it), or None;
        a list never loaded answers ``store_unavailable``."""
        if not self.loaded:
            return reasons.STORE_UNAVAILABLE
        certs, tokens, subjects = self._tables
        if tokens:
            jti = token.jti
            if jti is not None and tokens.get(jti, 0.0) > now:
                return reasons.TOKEN_REVOKED
        if subjects:
            sub = token.claims.get("sub")
            if isinstance(sub, str) and subjects.get(sub, 0.0) > now:
                return reasons.SUBJECT_REVOKED
        if certs and token.x5t_s256 is not None and certs.get(token.x5t_s256, 0.0) > now:
            return reasons.CERT_REVOKED
        return None

    def check_token(self, token: VerifiedToken, now: float) -> None:
        reason = self.token_revocation(token, now)
        if reason is reasons.STORE_UNAVAILABLE:
            raise _not_loaded()
        if reason is reasons.TOKEN_REVOKED:
            raise Denied(reason, f"token {token.jti} is on pdp's revocation list")
        if reason is reasons.CERT_REVOKED:
            raise Denied(reason, f"the token is bound to certificate {token.x5t_s256}, which is on pdp's "
                                 "revocation list")
        if reason is not None:
            raise Denied(reason, f"the token's subject {token.claims.get('sub')} is on pdp's revocation list")

    def caller_revocation(self, cert_der: bytes | None, now: float) -> Reason | None:
        """``cert_revoked`` or ``subject_revoked`` when the certificate a caller of pdp itself presented on
        its mutual-TLS listener (a gateway, a trusted proxy, an admin, an introspection client) is on the
        list, by thumbprint or by a SPIFFE ID among its URI SANs; else None. A list never loaded refuses no
        caller: it has nothing to enforce yet, and the decisions deny every credential meanwhile."""
        certs, _, subjects = self._tables
        if not cert_der or not (certs or subjects):
            return None
        cert_thumbprint, spiffe_ids = _caller_keys(cert_der)
        if certs and certs.get(cert_thumbprint, 0.0) > now:
            return reasons.CERT_REVOKED
        if subjects:
            for spiffe_id in spiffe_ids:
                if subjects.get(spiffe_id, 0.0) > now:
                    return reasons.SUBJECT_REVOKED
        return None


@functools.lru_cache(maxsize=1024)
def _caller_keys(cert_der: bytes) -> tuple[str, tuple[str, ...]]:
    """A caller certificate's thumbprint and the SPIFFE IDs among its URI SANs, in the form the list keeps
    them. Cached: the same few gateway certificates arrive with every request."""
    try:
        san = x509.load_der_x509_certificate(cert_der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return thumbprint(cert_der), ()
    ids = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if is_spiffe_uri(uri):
            try:
                ids.append(str(parse_spiffe_id(uri)))
            except SpiffeIdError:
                continue
    return thumbprint(cert_der), tuple(ids)


def _not_loaded() -> Denied:
    return Denied(reasons.STORE_UNAVAILABLE, "pdp's revocation list has not been read from the store yet")


# -- the list in the store
def store_revocation(store: Store, revocation: Revocation) -> Revocation:
    """Record ``revocation`` and tell every replica; the entry as stored is returned. Its value is put in
    normal form and its reason checked (``check_reason``) here, for every way in (admin endpoint, CLI).

    An entry already on the list for the same value is replaced, except that the later expiry is kept
    (a permanent revocation stays permanent): a temporary revocation of a certificate revoked for good
    (an incident script run over a leaked key) must not end the permanent one."""
    if revocation.kind not in KINDS:
        raise RevocationError(f"unknown kind {revocation.kind!r}")
    check_reason(revocation.reason)
    revocation = replace(revocation, value=normalize(revocation.kind, revocation.value),
                         by=shown(revocation.by, MAX_VALUE_LENGTH))
    try:
        unix_time(revocation.created)
        if revocation.expires is not None:
            unix_time(revocation.expires)
    except ValueError as exc:  # not a time a store can give back
        raise RevocationError(str(exc)) from None
    existing = store.map_get(MAP, [revocation.field])[0]
    if existing is None:
        if store.map_size(MAP) >= MAX_ENTRIES:
            raise RevocationError(f"the revocation list is full ({MAX_ENTRIES} entries): remove some first")
    else:
        try:
            older: Revocation | None = Revocation.decode(revocation.field, existing)
        except ValueError:
            older = None  # not one pdp wrote: replaced
        if older is not None and older.active(revocation.created) and revocation.expires is not None \
                and (older.expires is None or older.expires > revocation.expires):
            revocation = replace(revocation, expires=older.expires)
    store.map_set(MAP, {revocation.field: revocation.encode()}, notify=True)
    return revocation


def remove_revocation(store: Store, kind: str, value: str) -> bool:
    """Take ``kind:value`` off the list on every replica; False when it was not on it."""
    return store.map_delete(MAP, [f"{kind}:{normalize(kind, value)}"], notify=True) > 0


#: Entries already reported as skipped (field and value), so that a bad entry is logged once, not at each read.
_reported: set[tuple[str, bytes]] = set()


def read_revocations(store: Store) -> tuple[int, list[Revocation]]:
    """The version and the entries of the list in the store (the version first: a change made between
    the two reads is read again on the next look, never missed). Entries pdp did not write (anything
    ``Revocation.decode`` refuses) are skipped, each logged once: one bad entry never fails the read."""
    version = store.map_version(MAP)
    entries = []
    for field, value in store.map_items(MAP).items():
        try:
            entries.append(Revocation.decode(field, value))
        except ValueError as exc:
            if (field, value) not in _reported:
                if len(_reported) >= 1000:
                    _reported.clear()
                _reported.add((field, value))
                log.warning("revocation list: entry %r skipped: %s", shown(field, 80), exc)
    return version, entries


def drop_expired(store: Store, entries: Iterable[Revocation], now: float) -> int:
    """Delete the entries that have expired from the store (no replica enforces them any more), each only
    if it is still the one read: a revocation of the same value stored since (renewed as the old one ran
    out) is a different value under the same field, and stays."""
    expired = {e.field: e.stored or e.encode() for e in entries if not e.active(now)}
    return store.map_delete_unchanged(MAP, expired) if expired else 0


def restore_revocations(store: Store, entries: Iterable[Revocation], now: float) -> int:
    """Write back the entries in force at ``now`` that the store no longer has (it lost its contents) and
    tell every replica; how many were written."""
    missing = [e for e in entries if e.active(now)]
    if not missing:
        return 0
    present = store.map_get(MAP, [e.field for e in missing])
    items = {e.field: e.encode() for e, value in zip(missing, present, strict=True) if value is None}
    if items:
        store.map_set(MAP, items, notify=True)
    return len(items)
