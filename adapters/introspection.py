"""The RFC 7662 introspection endpoint (``POST /oauth2/introspect``) and its metadata document.

Callers must authenticate as a configured introspection client, either with
HTTP Basic (``client_secret_basic``; pdp keeps only the SHA-256 of each
secret) or with a client certificate in the RFC 8705 ``tls_client_auth``
style: the certificate arrives over pdp's mutual-TLS listener or from a
trusted proxy's header, chains to pdp's trust bundles, and names the client
in a registered SAN or subject DN. An unauthenticated caller gets 401; a
source or client locked out after too many failed secrets gets 429
(``pdp.service.brute_force``), whatever the secret it sends.

The answer for anything but a valid token is ``{"active": false}``, and so is
the answer for a valid token the caller has no business seeing: one for none
of the client's ``audiences``, or an unbound one where bound tokens are
required. Validity is judged without leeway, at the moment of answering: the
resource server compares ``exp`` with its own clock. A token on pdp's own
revocation list (by ``jti``, by a revoked ``sub``, or bound by ``cnf.x5t#S256``
to a revoked certificate: the resource server checks the binding against a
certificate its own TLS trusts, and only pdp knows of the revocation) is not
active either, and neither is any token while this replica has yet to read
that list. A client certificate on that list authenticates no client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdp.certificates.identity import CertIdentity
from pdp.credentials.rfc7662 import introspection_response
from pdp.credentials.tokens import VerifiedToken
from pdp.errors import Denied
from pdp.pipeline import Pdp
from pdp.service.brute_force import FailureLimiter, Locked

#: RFC 8705 §2.1.2 client metadata names → the identity attribute they are compared with.
TLS_CLIENT_AUTH_NAMES = ("tls_client_auth_subject_dn", "tls_client_auth_san_dns", "tls_client_auth_san_uri",
                         "tls_client_auth_san_ip", "tls_client_auth_san_email")


@dataclass(frozen=True)
class IntrospectionClient:
    client_id: str
    secret_sha256: str | None = None
    #: (RFC 8705 metadata name, expected value), e.g. ("tls_client_auth_san_uri", "spiffe://...").
    tls_client_auth: tuple[str, str] | None = None
    #: The audiences (resource servers) this client answers for; None: every audience pdp accepts.
    audiences: frozenset[str] | None = None


class ClientAuthError(Exception):
    """The caller did not authenticate as an introspection client."""


class LockedOut(ClientAuthError):
    """Too many failed attempts from this source or for this client: refused whatever the secret."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"locked out for another {retry_after:.0f} s after too many failed attempts")
        self.retry_after = retry_after


def basic_client(authorization: str | None, clients: Mapping[str, IntrospectionClient], *,
                 limiter: FailureLimiter | None = None, source: str = "") -> IntrospectionClient | None:
    """The client named and proven by an HTTP Basic ``Authorization`` header, if any (RFC 6749 §2.3.1).

    With a ``limiter``, every attempt is recorded before it is answered, right or wrong (a failure may start
    a lock-out): one refused as locked out raises ``LockedOut`` whatever its secret, and one the store
    cannot record raises ``StoreUnavailable`` whatever its secret, so neither answer tells a right secret
    from a wrong one."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    credentials = _basic_credentials(authorization)
    client = clients.get(credentials[0]) if credentials is not None else None
    registered = client.client_id if client is not None and client.secret_sha256 is not None else None
    proven: IntrospectionClient | None = None
    failure: ClientAuthError | None = None
    try:  # in constant time; the answer waits for the limiter
        if credentials is None:
            raise ClientAuthError("malformed Basic credentials")
        proven = _check_secret(*credentials, clients)
    except ClientAuthError as exc:
        failure = exc
    if limiter is not None:
        try:
            limiter.attempt(source, registered, ok=proven is not None)
        except Locked as exc:
            raise LockedOut(exc.retry_after) from None
    if failure is not None:
        raise failure
    return proven


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        return None
    return urllib.parse.unquote_plus(raw_id), urllib.parse.unquote_plus(raw_secret)


def _check_secret(client_id: str, secret: str, clients: Mapping[str, IntrospectionClient]) -> IntrospectionClient:
    client = clients.get(client_id)
    digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
    # Compare even for unknown clients, so timing does not tell which client ids exist.
    expected = client.secret_sha256 if client and client.secret_sha256 else "0" * 64
    if client is None or not hmac.compare_digest(digest, expected) or client.secret_sha256 is None:
        raise ClientAuthError("unknown client or wrong secret")
    return client


def certificate_client(identity: CertIdentity, clients: Mapping[str, IntrospectionClient], *,
                       pinned: bool = False) -> IntrospectionClient:
    """The client whose registered ``tls_client_auth`` name the (verified) certificate carries.

    ``pinned``: the certificate was vouched for by a bundle pinned to one SPIFFE trust domain. Such a
    CA is trusted for SPIFFE IDs in its domain only, so only a ``tls_client_auth_san_uri`` equal to
    the certificate's SPIFFE ID can name a client (its DNS names or subject could be anyone's)."""
    values = {
        "tls_client_auth_subject_dn": {identity.subject},
        "tls_client_auth_san_dns": set(identity.dns),
        "tls_client_auth_san_uri": set(identity.uris),
        "tls_client_auth_san_ip": set(identity.ips),
        "tls_client_auth_san_email": set(identity.emails),
    }
    if pinned:
        values = {name: set() for name in values}
        if identity.spiffe_id:
            values["tls_client_auth_san_uri"] = {identity.spiffe_id}
    for client in clients.values():
        if client.tls_client_auth and client.tls_client_auth[1] in values[client.tls_client_auth[0]]:
            return client
    raise ClientAuthError("the certificate names no registered introspection client")


def read_form(body: bytes) -> dict[str, str]:
    """The parameters of an ``application/x-www-form-urlencoded`` body; ``ValueError`` when it is not UTF-8
    or names a parameter twice (RFC 6749 §3.1: which of two ``token`` values would be the one asked about?)."""
    pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    form = dict(pairs)
    if len(form) != len(pairs):
        raise ValueError("a parameter is repeated")
    return form


def introspect(pdp: Pdp, token: str, client: IntrospectionClient, *, leeway: float = 0.0,
               now: float | None = None) -> dict[str, Any]:
    """The RFC 7662 answer to ``client`` for ``token``, judged at ``now`` (by default: this moment)."""
    at = time.time() if now is None else now
    try:
        verified = pdp.tokens.verify(token, at, leeway=leeway)
    except Denied:
        verified = None
    if verified is not None and not _answerable(verified, client, pdp.settings.require_bound_tokens):
        verified = None
    if verified is not None and pdp.revocations.token_revocation(verified, at) is not None:
        verified = None  # on pdp's revocation list, or bound to a certificate on it (or not loaded yet): not active
    return introspection_response(verified)


def _answerable(token: VerifiedToken, client: IntrospectionClient, require_bound: bool) -> bool:
    """RFC 7662 §4: a token is shown only to a resource server it can be used at, and only if it is a token
    pdp would accept there (an unbound one is not, where bound tokens are required)."""
    if require_bound and token.x5t_s256 is None and token.jkt is None:
        return False
    if client.audiences is None:
        return True
    aud = token.claims.get("aud")
    return not client.audiences.isdisjoint([aud] if isinstance(aud, str) else aud or [])


def metadata(issuer: str, dpop_algs: list[str]) -> dict[str, Any]:
    """The RFC 8414 metadata document listing the introspection endpoint."""
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "introspection_endpoint": f"{base}/oauth2/introspect",
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": True,
        "dpop_signing_alg_values_supported": dpop_algs,
    }
