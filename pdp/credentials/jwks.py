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
from dataclasses import dataclass, field
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
    #: What ``pdp.credentials.jws`` prepared to verify with these keys, by (kid, alg) of the tokens seen.
    prepared: dict[tuple[str | None, str], Any] = field(default_factory=dict, compare=False, repr=False)

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


#: Seconds between two attempts of the refresher to fetch a key set that failed to load, at least.
RETRY_FLOOR = 1.0

#: What a failed refresh is called where anyone may read it (``/readyz``): fixed texts, since the detail
#: names internal hosts, ports and paths and the transport's own words; the detail goes to the log.
DISCOVERY_FAILED = "discovery failed: the issuer's metadata named no key set pdp could use"
FETCH_FAILED = "the key set could not be fetched"
KEY_SET_REFUSED = "the key set was refused"


class RemoteKeySource:
    """A JWKS fetched from a URL, cached, refreshed at most every ``min_interval`` seconds.

    ``resolve_url`` returns the JWKS URL (a fixed URL, or one read from the
    issuer's RFC 8414 / OpenID Connect discovery document). A failed fetch
    keeps the cached key set in force: an unreachable JWKS endpoint does not
    stop tokens signed with known keys from verifying.

    The set is fetched again ``max_age`` seconds after it was last fetched
    (``due``: the service's refresher wakes at that moment), so a key the issuer
    removed stops verifying ``max_age`` seconds after the last fetch at the
    latest, plus the time the fetch takes, provided the fetch succeeds. A token
    whose ``kid`` is not in the set makes one fetch, at most one per
    ``min_interval`` for the issuer, whoever asks: a stream of made-up ``kid``
    values costs the issuer one fetch per ``min_interval`` and keeps a newly
    published key out for at most ``min_interval`` (every fetch, whoever caused
    it, brings the newest set, whose keys verify at once).

    After a failed refresh ``last_error`` holds its detail (for the log) and ``public_error`` one of the
    fixed texts above (for whoever asks ``/readyz``); both are None after a successful one.
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
        self.public_error: str | None = None

    def current(self) -> KeySet | None:
        return self._keys

    def stale(self, now: float) -> bool:
        return self._keys is None or now - self._loaded_at >= self._max_age

    def would_fetch(self, now: float) -> bool:
        return now - self._last_attempt >= self._min_interval

    def due(self) -> float:
        """When the refresher should fetch next (a ``time.time()`` value): when the set in force turns
        stale and the rate limit allows; with no set in force or after a failed fetch, as soon as the rate
        limit allows (a failed fetch is tried again ``RETRY_FLOOR`` seconds after it at the soonest)."""
        if self._keys is None:
            return self._last_attempt + max(self._min_interval, RETRY_FLOOR)
        spacing = max(self._min_interval, RETRY_FLOOR) if self.last_error is not None else self._min_interval
        return max(self._loaded_at + self._max_age, self._last_attempt + spacing)

    def refresh(self, now: float) -> bool:
        """Fetch the set unless one was fetched less than ``min_interval`` ago; True when the set in force
        changed, by this fetch or by one another caller finished while this one waited for it."""
        seen = self._keys
        # One fetch at a time; a caller arriving during a fetch waits for it and uses its result.
        with self._lock:
            if self._keys is not seen:
                return True
            if now - self._last_attempt < self._min_interval:
                return False
            self._last_attempt = now
            # Network, HTTP status, bad metadata or document: keep the cached set.
            stage = DISCOVERY_FAILED
            try:
                url = self._resolve_url()
                stage = FETCH_FAILED
                document = self._fetch(url)
                stage = KEY_SET_REFUSED
                keys = parse_jwks(document)
            except Exception as exc:
                self.last_error, self.public_error = str(exc) or type(exc).__name__, stage
                log.warning("JWKS refresh for %s failed (%s): %s", self.name, stage, self.last_error)
                return False
            self.last_error = self.public_error = None
            self._loaded_at = now
            changed = keys != self._keys
            if changed:  # the same keys keep the same set: tokens it verified stay cached
                self._keys = keys
            return changed


def refresh_wait(sources: list[RemoteKeySource], now: float) -> float:
    """Seconds the refresher may sleep before a source is due (at least 10 ms: no spinning)."""
    if not sources:
        return 3600.0
    return max(0.01, min(s.due() for s in sources) - now)


def discovered_jwks_url(issuer: str, fetch: Fetch) -> Callable[[], str]:
    """A resolver that reads ``jwks_uri`` from the issuer's metadata (RFC 8414, then OpenID Connect).

    The metadata's ``issuer`` must equal the configured issuer (RFC 8414 §3.3),
    so a metadata document cannot redirect pdp to someone else's keys; and an
    https issuer's ``jwks_uri`` must be https too (RFC 8414 §2), or the keys
    that verify every token would travel in clear text, for anyone on the path
    to swap. (A configured ``jwks_url`` is used as configured.)
    """
    parts = urllib.parse.urlsplit(issuer)
    schemes = ("https",) if parts.scheme == "https" else ("https", "http")
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
            try:
                target = urllib.parse.urlsplit(jwks_uri) if isinstance(jwks_uri, str) else None
            except ValueError:  # an unclosed IPv6 bracket, say
                target = None
            if not isinstance(jwks_uri, str) or target is None or target.scheme not in ("https", "http") \
                    or not target.hostname:
                errors.append(f"{url}: no usable jwks_uri")
                continue
            if target.scheme not in schemes:
                errors.append(f"{url}: jwks_uri {jwks_uri!r} is not https, as an https issuer's must be "
                              "(RFC 8414 §2)")
                continue
            cached.append(jwks_uri)
            return jwks_uri
        raise KeySetError("discovery failed: " + "; ".join(errors))

    return resolve

