"""The RFC 7662 introspection endpoint (``POST /oauth2/introspect``) and its metadata document.

Callers must authenticate as a configured introspection client, either with
HTTP Basic (``client_secret_basic``; pdp keeps only the SHA-256 of each
secret) or with a client certificate in the RFC 8705 ``tls_client_auth``
style: the certificate arrives over pdp's mutual-TLS listener or from a
trusted proxy's header, chains to pdp's trust bundles, and names the client
in a registered SAN or subject DN. An unauthenticated caller gets 401.

The answer for anything but a valid token is ``{"active": false}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdp.certificates.identity import CertIdentity
from pdp.credentials.rfc7662 import introspection_response
from pdp.errors import Denied
from pdp.pipeline import Pdp

#: RFC 8705 §2.1.2 client metadata names → the identity attribute they are compared with.
TLS_CLIENT_AUTH_NAMES = ("tls_client_auth_subject_dn", "tls_client_auth_san_dns", "tls_client_auth_san_uri",
                         "tls_client_auth_san_ip", "tls_client_auth_san_email")


@dataclass(frozen=True)
class IntrospectionClient:
    client_id: str
    secret_sha256: str | None = None
    #: (RFC 8705 metadata name, expected value), e.g. ("tls_client_auth_san_uri", "spiffe://...").
    tls_client_auth: tuple[str, str] | None = None


class ClientAuthError(Exception):
    """The caller did not authenticate as an introspection client."""


def basic_client(authorization: str | None, clients: Mapping[str, IntrospectionClient]) -> IntrospectionClient | None:
    """The client named and proven by an HTTP Basic ``Authorization`` header, if any (RFC 6749 §2.3.1)."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise ClientAuthError("malformed Basic credentials") from exc
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise ClientAuthError("malformed Basic credentials")
    client_id, secret = urllib.parse.unquote_plus(raw_id), urllib.parse.unquote_plus(raw_secret)
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


def introspect(pdp: Pdp, form: Mapping[str, str], now: float) -> dict[str, Any]:
    """The RFC 7662 answer for the ``token`` of a request form."""
    token = form.get("token", "")
    try:
        verified = pdp.tokens.verify(token, now)
    except Denied:
        verified = None
    return introspection_response(verified)


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
