"""JSON Web Key Sets (RFC 7517) and the sources they come from.

A key set is accepted only if every key in it is a public, asymmetric
signature key: a set holding a private member, a symmetric (``oct``) key or
two keys with the same ``kid`` is refused whole (Wycheproof's JWK vectors
expect exactly this). Keys whose ``use``/``key_ops`` exclude verification are
left out, and so are RSA keys shorter than 2048 bits.

``KeySource`` is the protocol the token verifier asks for keys. The sources
here do no I/O of their own: a remote source is handed a ``fetch`` callable by
the service, which keeps the core free of sockets and lets tests use real key
sets without a server.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pdp.credentials.jose import DecodeError, b64url_decode, json_object
from pdp.credentials.weak_keys import roca_vulnerable

log = logging.getLogger("pdp.jwks")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048


class KeySetError(ValueError):
    """A key set (or one key in it) is not acceptable."""


@dataclass(frozen=True, slots=True)
class JsonWebKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: PublicKey


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[JsonWebKey, ...] = ()

    def candidates(self, kid: str | None) -> tuple[JsonWebKey, ...]:
        """Keys that may have signed a token with this ``kid`` (all keys when the token names none)."""
        if kid is None:
            return self.keys
        return tuple(k for k in self.keys if k.kid == kid)

    def __len__(self) -> int:
        return len(self.keys)


#: The base64url members of each public key type (RFC 7518 §6.2.1, §6.3.1; RFC 8037 §2).
_KEY_MEMBERS = {"RSA": ("n", "e"), "EC": ("x", "y"), "OKP": ("x",)}


def parse_jwk(jwk: Mapping[str, Any]) -> JsonWebKey | None:
    """One public verification key, or None when the key is not for signature verification."""
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise KeySetError("a key has no 'kty'")
    private = _PRIVATE_MEMBERS & jwk.keys()
    if private:
        raise KeySetError(f"a key holds private members ({', '.join(sorted(private))})")
    if kty == "oct":
        raise KeySetError("symmetric ('oct') keys are not accepted")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeySetError("'kid' is not a string")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise KeySetError("'alg' is not a string")
    crv = jwk.get("crv")
    for member in _KEY_MEMBERS.get(kty, ()):
        # pyjwt skips characters outside base64url, while an RFC 7638 thumbprint hashes the text as
        # written: one key would have many thumbprints. Only the one canonical spelling is a key.
        value = jwk.get(member)
        try:
            if not isinstance(value, str):
                raise DecodeError("not a string")
            b64url_decode(value)
        except DecodeError as exc:
            raise KeySetError(f"'{member}' of the {kty} key is not base64url: {exc}") from exc
    key: Any
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(dict(jwk))
        else:
            raise KeySetError(f"unsupported key type {kty!r}")
    except KeySetError:
        raise
    except Exception as exc:  # pyjwt raises InvalidKeyError, ValueError, KeyError...
        raise KeySetError(f"invalid {kty} key: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            log.warning("ignoring RSA key %r of %d bits (minimum %d)", kid, key.key_size, _MIN_RSA_BITS)
            return None
        if roca_vulnerable(key.public_numbers().n):
            raise KeySetError(f"RSA key {kid!r} has a factorable modulus (ROCA, CVE-2017-15361)")
    if not isinstance(key, PublicKey):
        raise KeySetError("not a public key")
    return JsonWebKey(kid=kid, kty=kty, crv=crv if isinstance(crv, str) else None, alg=alg, key=key)


def parse_jwks(document: bytes | str | Mapping[str, Any]) -> KeySet:
    """Parse and check a whole JWKS document (``{"keys": [...]}``)."""
    try:
        obj = document if isinstance(document, Mapping) else json_object(document)
    except DecodeError as exc:
        raise KeySetError(f"not a JWKS document: {exc}") from exc
    raw_keys = obj.get("keys")
    if not isinstance(raw_keys, list):
        raise KeySetError("a JWKS document needs a 'keys' array")
    keys: list[JsonWebKey] = []
    seen: set[str] = set()
    for raw in raw_keys:
        if not isinstance(raw, Mapping):
            raise KeySetError("a key is not a JSON object")
        kid = raw.get("kid")
        if isinstance(kid, str):
            if kid in seen:
                raise KeySetError(f"duplicate kid {kid!r}")
            seen.add(kid)
        key = parse_jwk(raw)
        if key is not None:
            keys.append(key)
    return KeySet(tuple(keys))


class KeySource(Protocol):
    """Where a token verifier gets an issuer's keys."""

    def current(self) -> KeySet | None:
        """The key set in force, or None when none was ever loaded."""

    def refresh(self, now: float) -> bool:
        """Try to get a newer key set (rate-limited); True when the set changed."""

    def would_fetch(self, now: float) -> bool:
        """Whether ``refresh(now)`` would go to the network (rather than return at once)."""


class StaticKeySource:
    """A key set held in memory (from a file; the service swaps it when the file changes)."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    def current(self) -> KeySet | None:
        return self._keys

    def refresh(self, now: float) -> bool:
        return False

    def would_fetch(self, now: float) -> bool:
        return False

    def replace(self, keys: KeySet) -> None:
        self._keys = keys


Fetch = Callable[[str], bytes]


class RemoteKeySource:
    """A JWKS fetched from a URL, cached, refreshed at most every ``min_interval`` seconds.

    ``resolve_url`` returns the JWKS URL (a fixed URL, or one read from the
    issuer's RFC 8414 / OpenID Connect discovery document). A failed fetch
    keeps the cached key set in force: an unreachable JWKS endpoint does not
    stop tokens signed with known keys from verifying.
    """

    def __init__(self, resolve_url: Callable[[], str], fetch: Fetch, *, min_interval: float,
                 max_age: float, name: str) -> None:
        self._resolve_url = resolve_url
        self._fetch = fetch
        self._min_interval = min_interval
        self._max_age = max_age
        self.name = name
        self._keys: KeySet | None = None
        self._loaded_at = 0.0
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def current(self) -> KeySet | None:
        return self._keys

    def stale(self, now: float) -> bool:
        return self._keys is None or now - self._loaded_at >= self._max_age

    def would_fetch(self, now: float) -> bool:
        return now - self._last_attempt >= self._min_interval

    def refresh(self, now: float) -> bool:
        # One fetch at a time; a caller arriving during a fetch waits for it and uses its result.
        with self._lock:
            if now - self._last_attempt < self._min_interval:
                return False
            self._last_attempt = now
            try:
                keys = parse_jwks(self._fetch(self._resolve_url()))
            except Exception as exc:  # network, HTTP status, bad document: keep the cached set
                self.last_error = str(exc) or type(exc).__name__
                log.warning("JWKS refresh for %s failed: %s", self.name, self.last_error)
                return False
            self.last_error = None
            changed = keys != self._keys
            self._keys = keys
            self._loaded_at = now
            return changed


def discovered_jwks_url(issuer: str, fetch: Fetch) -> Callable[[], str]:
    """A resolver that reads ``jwks_uri`` from the issuer's metadata (RFC 8414, then OpenID Connect).

    The metadata's ``issuer`` must equal the configured issuer (RFC 8414 §3.3),
    so a metadata document cannot redirect pdp to someone else's keys.
    """
    parts = urllib.parse.urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    candidates = tuple(dict.fromkeys((
        # RFC 8414 §3.1: the well-known segment goes between the host and the issuer's path.
        f"{origin}/.well-known/oauth-authorization-server{path}",
        # OpenID Connect Discovery §4: appended to the issuer.
        f"{origin}{path}/.well-known/openid-configuration",
    )))
    cached: list[str] = []

    def resolve() -> str:
        if cached:
            return cached[0]
        errors: list[str] = []
        for url in candidates:
            try:
                meta = json_object(fetch(url))
            except Exception as exc:
                errors.append(f"{url}: {exc}")
                continue
            if meta.get("issuer") != issuer:
                errors.append(f"{url}: metadata issuer {meta.get('issuer')!r} is not {issuer!r}")
                continue
            jwks_uri = meta.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                errors.append(f"{url}: no usable jwks_uri")
                continue
            cached.append(jwks_uri)
            return jwks_uri
        raise KeySetError("discovery failed: " + "; ".join(errors))

    return resolve

