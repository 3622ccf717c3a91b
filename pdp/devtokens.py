"""``pdp dev token`` and ``pdp dev proof``: access tokens of the dev issuer, and DPoP proofs to go with them.

Tokens are RFC 9068 JWT access tokens signed with the issuer key ``pdp dev init DIR`` wrote
(``DIR/issuer.key``, under the ``kid`` its ``DIR/jwks.json`` publishes), for its issuer and audience. A
token is bound to a client certificate by RFC 8705 (``cnf.x5t#S256``, the SHA-256 thumbprint of its
DER) or to a DPoP key by RFC 9449 (``cnf.jkt``, the key's RFC 7638 thumbprint). A DPoP key is kept in
a file as an RFC 7517 private JWK (EC P-256), readable by its owner only; a proof (RFC 9449 §4.2)
names the method and the target URI without query or fragment, and with a token its hash (``ath``).

Every error is a ``DevToolError`` whose message is one line naming the option or the file at fault.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

from pdp.devinit import AUDIENCE, ISSUER
from pdp.devpki import DpopKey, TokenIssuer, load_private_key

#: An HTTP method is a token (RFC 9110 §9.1).
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A token68 (RFC 9110 §11.2): what an ``Authorization`` credential may hold.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: How long before now an ``--expired`` token expired: far past any clock-skew leeway.
EXPIRED_AGO = 3600


class DevToolError(ValueError):
    """What ``pdp dev token`` / ``pdp dev proof`` cannot do, in one line naming the option or file."""


def parse_lifetime(text: str) -> int:
    """``--lifetime`` in whole seconds (``90s``, ``15m``, ``1h``, ``7d``, ``2w``)."""
    from pdp.durations import parse_duration

    try:
        return max(1, round(parse_duration(text)))
    except ValueError as exc:
        raise DevToolError(f"--lifetime: {exc}") from None


def parse_scope(text: str) -> str:
    """``--scope``: RFC 6749 §3.3 scope-tokens separated by spaces (none at all is a token without scopes)."""
    from pdp.credentials.rfc6750 import scope_tokens

    words = text.split()
    if list(scope_tokens(words)) != list(dict.fromkeys(words)):
        raise DevToolError(f"--scope: {text!r} is not a list of scope tokens separated by spaces (RFC 6749 §3.3: "
                           "no quotes, backslashes or control characters)")
    return " ".join(dict.fromkeys(words))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DevToolError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None


def load_issuer(folder: Path) -> TokenIssuer:
    """The dev issuer of ``folder``: its ``issuer.key``, with the ``kid`` its ``jwks.json`` gives that key."""
    if not folder.is_dir():
        raise DevToolError(f"--dir: {str(folder)!r} is not a folder; `pdp dev init {folder}` writes one")
    key_file, jwks_file = folder / "issuer.key", folder / "jwks.json"
    if not key_file.exists():
        raise DevToolError(f"--dir: {str(folder)!r} holds no issuer.key: it is not a folder `pdp dev init` wrote")
    try:
        key = load_private_key(_read(key_file, "--dir"))
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise DevToolError(f"--dir: {str(key_file)!r} is not an unencrypted EC private key in PEM: {exc}") from None
    try:
        jwks = json.loads(_read(jwks_file, "--dir"))
    except ValueError as exc:
        raise DevToolError(f"--dir: {str(jwks_file)!r} is not JSON: {exc}") from None
    public = TokenIssuer(ISSUER, key, "").jwk
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    for jwk in keys if isinstance(keys, list) else []:
        if isinstance(jwk, dict) and (jwk.get("x"), jwk.get("y")) == (public["x"], public["y"]):
            kid = jwk.get("kid")
            return TokenIssuer(ISSUER, key, kid if isinstance(kid, str) else "")
    raise DevToolError(f"--dir: {str(jwks_file)!r} does not publish the key of {str(key_file)!r}: pdp would not "
                       "accept its tokens")


def cert_thumbprint(path: Path) -> str:
    """RFC 8705 ``x5t#S256`` of the one certificate in a PEM file that is not a CA (a chain file may be
    written CA first; a CA's thumbprint is never a client's)."""
    from cryptography import x509

    from pdp.certificates.pem import PemError, pem_to_der_chain
    from pdp.credentials.rfc8705 import thumbprint

    pem = _read(path, "--cert")
    try:
        chain = pem_to_der_chain(pem)
        certs = [(der, x509.load_der_x509_certificate(der)) for der in chain]
    except (PemError, ValueError) as exc:
        raise DevToolError(f"--cert: {str(path)!r} is not a PEM certificate: {exc}") from None

    def is_ca(cert: x509.Certificate) -> bool:
        try:
            return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        except x509.ExtensionNotFound:
            return False

    leaves = [der for der, cert in certs if not is_ca(cert)]
    if len(leaves) != 1:
        raise DevToolError(f"--cert: {str(path)!r} holds {len(leaves)} certificates that are not CAs; give the file "
                           "of the one client certificate to bind the token to")
    return thumbprint(leaves[0])


def dpop_key(path: Path, *, create: bool) -> DpopKey:
    """The DPoP key in ``path`` (a private EC P-256 JWK); with ``create``, a new one written there first
    when the file does not exist, readable by its owner only (mode 0600)."""
    if create and not path.exists():
        key = DpopKey.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another command: use that one
            pass
        except OSError as exc:
            raise DevToolError(f"--dpop-key: cannot create {str(path)!r}: {exc.strerror or exc}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(key.private_jwk, indent=2) + "\n")
            return key
    if not path.exists():
        raise DevToolError(f"--dpop-key: {str(path)!r} does not exist (`pdp dev token --dpop-key {path}` "
                           "creates it, with a token bound to it)")
    try:
        return DpopKey.from_jwk(json.loads(_read(path, "--dpop-key")))
    except ValueError as exc:
        raise DevToolError(f"--dpop-key: {str(path)!r} is not a private EC P-256 JWK: {exc}") from None


def mint(folder: Path, *, scope: str = "read write", lifetime: int = 3600, audience: str = AUDIENCE,
         subject: str = "demo-user", client_id: str = "demo-client", cert: Path | None = None,
         dpop_key_file: Path | None = None, expired: bool = False, now: float | None = None) -> str:
    """An access token of ``folder``'s dev issuer; bound to the certificate in ``cert`` and/or to the DPoP
    key in ``dpop_key_file`` (created when missing); ``expired`` makes one that expired ``EXPIRED_AGO``
    seconds ago."""
    issuer = load_issuer(folder)
    cnf: dict[str, Any] = {}
    if cert is not None:
        cnf["x5t#S256"] = cert_thumbprint(cert)
    if dpop_key_file is not None:
        cnf["jkt"] = dpop_key(dpop_key_file, create=True).jkt
    issued = now if now is not None else time.time()
    if expired:
        issued -= lifetime + EXPIRED_AGO
    return issuer.mint(audience=audience, subject=subject, client_id=client_id, scope=scope, lifetime=lifetime,
                       now=issued, extra={"cnf": cnf} if cnf else None)


def target_uri(url: str) -> str:
    """``htu``: the URL without query and fragment (RFC 9449 §4.2); an absolute http(s) URL only."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it: a port that is not a number up to 65535 raises)
    except ValueError as exc:
        raise DevToolError(f"URL: {url!r} cannot be read: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DevToolError(f"URL: {url!r} is not an absolute http or https URL (such as "
                           "https://api.example.org/orders)")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


def read_token(text: str) -> str:
    """The access token in ``--token``'s file, an ``Authorization`` scheme before it allowed."""
    token = text.strip()
    scheme, _, rest = token.partition(" ")
    if rest and scheme.lower() in ("bearer", "dpop"):
        token = rest.strip()
    if _TOKEN68.fullmatch(token) is None:
        raise DevToolError("--token: the file does not hold an access token (a token68 value, such as a JWT)")
    return token


def proof(key: DpopKey, method: str, url: str, *, token: str | None = None, nonce: str | None = None,
          now: float | None = None) -> str:
    """A DPoP proof of ``key`` for ``method`` ``url``, with ``ath`` for ``token`` and the server's ``nonce``."""
    if _METHOD.fullmatch(method) is None:
        raise DevToolError(f"METHOD: {method!r} is not an HTTP method")
    if nonce is not None and (not nonce or not nonce.isascii() or not nonce.isprintable()):
        raise DevToolError("--nonce: a nonce is printable ASCII (the DPoP-Nonce header's value)")
    return key.proof(method.upper(), target_uri(url), token, nonce=nonce, iat=now)
