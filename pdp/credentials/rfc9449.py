"""RFC 9449, OAuth 2.0 Demonstrating Proof of Possession (DPoP): checking a proof at a resource server.

The checks of §4.3, in its order: one ``DPoP`` header; a well-formed JWT; the
required claims; ``typ`` ``dpop+jwt``; an allowed asymmetric ``alg``; a
signature by the public ``jwk`` in the header, which must hold no private
members; ``htm`` and ``htu`` (normalised, query and fragment ignored) naming
this request; the server's ``nonce`` when nonces are in use; ``iat`` within
the window; and, with an access token (§7.1), ``ath`` equal to the token's
hash and the key's RFC 7638 thumbprint equal to the token's ``cnf.jkt``.
A ``jti`` seen before within the window is a replay (§11.1); only fresh
proofs count against a key's ``max_proofs_per_key``.

The replay store holds every fresh proof for two windows (plus a margin for
the clocks of replicas that differ), so its capacity, not any one key, is
what many keys together could use up: once the store is half full, a key
that has presented more than ``busy_proofs_per_key`` (by default 1% of
``max_proofs_per_key``) proofs within that time is refused
(``store_unavailable``) until the store has room again, and the other half
stays for keys that present few proofs. Filling the store then takes some
``capacity / 2 / busy_proofs_per_key`` keys, each with a token of its own.

Server nonces (§8/§9) are stateless: a time bucket and its HMAC under a
secret, valid for the current and the previous bucket, so every replica that
shares the secret accepts every other's nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from pdp import reasons
from pdp.credentials.jose import DecodeError, b64url_encode, json_object
from pdp.credentials.jwks import KeySet, KeySetError, parse_jwk
from pdp.credentials.jws import ASYMMETRIC_ALGORITHMS, JwsError, parse_compact, verify
from pdp.credentials.rfc7638 import ThumbprintError, jwk_thumbprint
from pdp.credentials.rfc9068 import is_numeric_date
from pdp.errors import Denied
from pdp.store import Store, StoreUnavailable

log = logging.getLogger("pdp.dpop")

#: jti, htu and the rest are short in practice; a long one only costs memory in the replay store.
MAX_CLAIM_LENGTH = 512
DEFAULT_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA"})
_DEFAULT_PORTS = {"https": 443, "http": 80}
#: From this share of the replay store's capacity on, only keys within ``busy_proofs_per_key`` record more.
BUSY_LOAD = 0.5
#: What a caller is told when the replay store cannot answer. The store's own error names its address
#: (a Redis host and port, a file path): that goes to the log only, never into a decision.
STORE_UNAVAILABLE_TEXT = "the shared store is unavailable"


@dataclass(frozen=True)
class DpopSettings:
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS
    #: How far (seconds) a proof's ``iat`` may lie in the past or the future.
    iat_window: float = 60.0
    require_nonce: bool = False
    nonce_lifetime: float = 300.0
    #: Proofs one DPoP key may present within two iat windows (the replay store's memory per key).
    max_proofs_per_key: int = 6000
    #: Proofs one key may present within two iat windows while the replay store is half full or more;
    #: None: 1% of ``max_proofs_per_key`` (60 of the default 6000).
    busy_proofs_per_key: int | None = None
    #: Seconds a proof is remembered beyond two iat windows: replicas' clocks differ by a little.
    replay_margin: float = 5.0
    nonce_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False, compare=False)

    @property
    def algs_param(self) -> str:
        return " ".join(sorted(self.algorithms))

    @property
    def busy_quota(self) -> int:
        return self.busy_proofs_per_key or max(1, self.max_proofs_per_key // 100)

    @property
    def replay_ttl(self) -> float:
        """How long a fresh proof's ``jti`` is remembered: any replica may accept it while its ``iat`` lies
        within the window of that replica's clock."""
        return 2 * self.iat_window + self.replay_margin


@dataclass(frozen=True, slots=True)
class DpopProof:
    jkt: str
    jti: str
    htm: str
    htu: str
    iat: float


def access_token_hash(token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token's ASCII bytes (§4.2)."""
    return b64url_encode(hashlib.sha256(token.encode("ascii", "replace")).digest())


def normalise_uri(uri: str) -> str:
    """Scheme and host lower-cased, the default port dropped, query and fragment removed (RFC 3986 §6).

    ``ValueError`` when the URI cannot be read, or its port is not a number from 0 to 65535: dropped, it
    would make ``https://h:99999/`` name ``https://h/``."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # ValueError when it is not a port
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def request_uri(scheme: str, host: str, path: str) -> str:
    """The target URI a proof must name, rebuilt from what a gateway reports (§4.3 item 9); as given when
    it cannot be normalised, which ``check_proof`` then refuses."""
    uri = f"{scheme or 'https'}://{host}{path}"
    try:
        return normalise_uri(uri)
    except ValueError:
        return uri


class NonceIssuer:
    """Stateless server nonces: ``bucket.mac`` under a shared secret."""

    def __init__(self, secret: bytes, lifetime: float) -> None:
        self._secret = secret
        self._lifetime = lifetime

    def _mac(self, bucket: int) -> str:
        return b64url_encode(hmac.new(self._secret, str(bucket).encode(), hashlib.sha256).digest()[:18])

    def issue(self, now: float) -> str:
        bucket = int(now // self._lifetime)
        return f"{bucket}.{self._mac(bucket)}"

    def valid(self, nonce: str, now: float) -> bool:
        bucket_text, _, mac = nonce.partition(".")
        if not (bucket_text.isascii() and bucket_text.isdigit()):
            return False
        bucket = int(bucket_text)
        current = int(now // self._lifetime)
        return bucket in (current, current - 1) and hmac.compare_digest(mac.encode(), self._mac(bucket).encode())


def _invalid(detail: str) -> Denied:
    return Denied(reasons.DPOP_PROOF_INVALID, detail)


def _replayed() -> Denied:
    return _invalid("the DPoP proof was used before (replayed jti)")


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """A proof whose form, type, algorithm and signature were checked (§4.3 items 1 to 7)."""

    claims: dict[str, Any]
    jkt: str
    alg: str


def read_proof(proof_header: str | None, settings: DpopSettings,
               required: tuple[str, ...] = ("jti", "htm", "htu", "iat")) -> VerifiedProof:
    """§4.3 items 1 to 7: one header, a well-formed JWT, the ``required`` claims, ``typ``, ``alg``,
    and a signature by the header's public ``jwk``."""
    # 1. exactly one DPoP header (repeated headers arrive joined with ',', which no JWT contains)
    if not proof_header:
        raise _invalid("the request has no DPoP proof header")
    if "," in proof_header:
        raise _invalid("more than one DPoP header")
    # 2. a well-formed JWT
    try:
        parsed = parse_compact(proof_header.strip())
        claims = json_object(parsed.payload)
    except (JwsError, DecodeError) as exc:
        raise _invalid(f"the DPoP proof is not a well-formed JWT: {exc}") from exc
    # 3. required claims, well typed
    missing = [c for c in required if c not in claims]
    if missing == ["nonce"]:
        raise Denied(reasons.DPOP_NONCE_REQUIRED, "the resource server requires a DPoP nonce")
    if missing:
        raise _invalid(f"the DPoP proof lacks {', '.join(missing)}")
    for name in ("jti", "htm", "htu", "ath", "nonce"):
        if name in claims and (not isinstance(claims[name], str) or not claims[name]):
            raise _invalid(f"'{name}' is not a non-empty string")
        if name in claims and len(claims[name]) > MAX_CLAIM_LENGTH:
            raise _invalid(f"'{name}' is longer than {MAX_CLAIM_LENGTH} characters")
    if not is_numeric_date(claims.get("iat")):
        raise _invalid("'iat' is not a finite number")
    # 4. typ
    typ = parsed.header.get("typ")
    if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
        raise _invalid("'typ' is not dpop+jwt")
    # 5. alg: asymmetric, allowed
    alg = parsed.header.get("alg")
    if not isinstance(alg, str) or alg not in settings.algorithms or alg not in ASYMMETRIC_ALGORITHMS:
        raise _invalid(f"algorithm {alg!r} is not allowed for DPoP proofs")
    # 6./7. a signature by the embedded public key, which holds no private members
    jwk = parsed.header.get("jwk")
    if not isinstance(jwk, dict):
        raise _invalid("the header has no 'jwk' object")
    try:
        key = parse_jwk({k: v for k, v in jwk.items() if k not in ("use", "key_ops", "kid", "alg")})
        if key is None:
            raise KeySetError("the key is not usable for signatures")
        verify(parsed, KeySet((key,)), frozenset({alg}))
        jkt = jwk_thumbprint(jwk)
    except (KeySetError, JwsError, ThumbprintError) as exc:
        raise _invalid(f"the proof's key or signature is not acceptable: {exc}") from exc
    return VerifiedProof(claims=claims, jkt=jkt, alg=alg)


def check_proof(proof_header: str | None, *, method: str, uri: str, access_token: str, token_jkt: str | None,
                now: float, settings: DpopSettings, store: Store, nonces: NonceIssuer) -> DpopProof:
    """Verify a DPoP proof for a request carrying ``access_token``; raise ``Denied`` on any failure."""
    required = ("jti", "htm", "htu", "iat", "ath") + (("nonce",) if settings.require_nonce else ())
    proof = read_proof(proof_header, settings, required)
    claims = proof.claims
    # 8. htm
    if claims["htm"] != method.upper():
        raise _invalid(f"'htm' {claims['htm'][:16]!r} is not the request method {method!r}")
    # 9. htu
    try:
        htu = normalise_uri(claims["htu"])
    except ValueError as exc:
        raise _invalid(f"'htu' is not a valid URI: {exc}") from exc
    try:
        target = normalise_uri(uri)
    except ValueError as exc:
        raise _invalid(f"the request's URI is not valid: {exc}") from exc
    if htu != target:
        raise _invalid("'htu' does not name this request's URI")
    # 10. nonce
    if settings.require_nonce and not nonces.valid(claims["nonce"], now):
        raise Denied(reasons.DPOP_NONCE_REQUIRED, "the DPoP nonce is unknown or stale")
    # 11. iat
    if abs(now - claims["iat"]) > settings.iat_window:
        raise _invalid("'iat' is outside the acceptance window")
    # 12. ath and the key binding (§7.1)
    if not hmac.compare_digest(claims["ath"].encode(), access_token_hash(access_token).encode()):
        raise _invalid("'ath' is not the hash of the access token")
    if token_jkt is None:
        raise Denied(reasons.TOKEN_UNBOUND, "a token presented with DPoP must be DPoP-bound (cnf.jkt)")
    if not hmac.compare_digest(token_jkt.encode("ascii", "replace"), proof.jkt.encode()):
        raise Denied(reasons.DPOP_KEY_MISMATCH, "the access token is bound to another DPoP key")
    # §11.1: a jti seen before within the window is a replay. Each key may record only so many proofs
    # per window, so that one client cannot fill the replay store and lock every other client out.
    # Only fresh proofs count against that quota: a replay is found first and costs its key's owner
    # nothing, so one captured proof cannot lock the owner out. (A fresh proof needs the private key.)
    # A half-full store takes more only from keys that have presented few proofs (see the docstring).
    replay_key = "dpop:jti:" + hashlib.sha256(f"{proof.jkt}\0{claims['jti']}".encode()).hexdigest()
    ttl = settings.replay_ttl
    try:
        if store.ttl(replay_key) > 0:
            raise _replayed()
        used = store.count(f"dpop:n:{proof.jkt}", ttl)
        if used > settings.max_proofs_per_key:
            raise _invalid("too many DPoP proofs for this key within the window")
        if used > settings.busy_quota and (store.load() or 0.0) >= BUSY_LOAD:
            raise Denied(reasons.STORE_UNAVAILABLE, f"the replay store is {BUSY_LOAD:.0%} full or more: a key "
                         f"that presented more than {settings.busy_quota} proofs within the window waits")
        if not store.remember(replay_key, ttl):  # the same proof, checked at the same moment elsewhere
            raise _replayed()
    except StoreUnavailable as exc:
        log.warning("DPoP replay state cannot be read or written: %s", exc)
        raise Denied(reasons.STORE_UNAVAILABLE, STORE_UNAVAILABLE_TEXT) from exc
    return DpopProof(jkt=proof.jkt, jti=claims["jti"], htm=claims["htm"], htu=claims["htu"],
                     iat=float(claims["iat"]))
