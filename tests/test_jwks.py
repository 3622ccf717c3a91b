"""pdp.credentials.jwks: JWKS parsing (RFC 7517), the remote key source and RFC 8414 / OIDC discovery.

The remote source is given a plain ``fetch(url) -> bytes`` function (its documented injection point) that
serves real JWKS documents built from real keys, or raises like an unreachable server would.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pdp.credentials.jose import b64url_encode
from pdp.credentials.jwks import (
    DISCOVERY_FAILED,
    FETCH_FAILED,
    KEY_SET_REFUSED,
    JsonWebKey,
    KeySetError,
    RemoteKeySource,
    StaticKeySource,
    discovered_jwks_url,
    parse_jwk,
    parse_jwks,
)


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    rsa_1024: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p256b: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey
    ed448: ed448.Ed448PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(65537, 2048),
        rsa_1024=rsa.generate_private_key(65537, 1024),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p256b=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        ed448=ed448.Ed448PrivateKey.generate(),
    )


def _algorithm_for(key: Any) -> Any:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return RSAAlgorithm
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return ECAlgorithm
    return OKPAlgorithm


def public_jwk(private_key: Any, **members: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = _algorithm_for(private_key).to_jwk(private_key.public_key(), as_dict=True)
    jwk.update(members)
    return jwk


def private_jwk(private_key: Any, **members: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = _algorithm_for(private_key).to_jwk(private_key, as_dict=True)
    jwk.update(members)
    return jwk


def jwks_bytes(*jwks: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


# -- parse_jwks: what is accepted


def test_parse_jwks_reads_rsa_ec_and_okp_public_keys(keys: Keys) -> None:
    ks = parse_jwks(jwks_bytes(
        public_jwk(keys.rsa, kid="r", alg="RS256", use="sig"),
        public_jwk(keys.p256, kid="e"),
        public_jwk(keys.p384, kid="e384", alg="ES384"),
        public_jwk(keys.ed25519, kid="ed", key_ops=["verify"]),
        public_jwk(keys.ed448, kid="ed448"),
    ))
    assert [k.kid for k in ks.keys] == ["r", "e", "e384", "ed", "ed448"]
    assert [k.kty for k in ks.keys] == ["RSA", "EC", "EC", "OKP", "OKP"]
    assert [k.crv for k in ks.keys] == [None, "P-256", "P-384", "Ed25519", "Ed448"]
    assert [k.alg for k in ks.keys] == ["RS256", None, "ES384", None, None]
    assert isinstance(ks.keys[0].key, rsa.RSAPublicKey)
    assert ks.keys[0].key.public_numbers() == keys.rsa.public_key().public_numbers()
    assert isinstance(ks.keys[1].key, ec.EllipticCurvePublicKey)
    assert ks.keys[1].key.public_numbers() == keys.p256.public_key().public_numbers()
    assert isinstance(ks.keys[3].key, ed25519.Ed25519PublicKey)
    assert isinstance(ks.keys[4].key, ed448.Ed448PublicKey)
    assert len(ks) == 5


def test_parse_jwks_accepts_str_bytes_and_mappings(keys: Keys) -> None:
    doc = jwks_bytes(public_jwk(keys.p256, kid="e"))
    for document in (doc, doc.decode(), json.loads(doc)):
        assert [k.kid for k in parse_jwks(document).keys] == ["e"]


def test_parse_jwks_accepts_an_empty_key_set() -> None:
    assert len(parse_jwks(b'{"keys": []}')) == 0


def test_parse_jwks_allows_several_keys_without_kid(keys: Keys) -> None:
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256), public_jwk(keys.p256b)))
    assert [k.kid for k in ks.keys] == [None, None]


def test_parse_jwks_ignores_unknown_members(keys: Keys) -> None:
    # RFC 7517 §4: members that are not understood must be ignored.
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="e", x5t="whatever", ext=True, extra={"a": 1})))
    assert ks.keys[0].kid == "e"


def test_keyset_candidates_by_kid(keys: Keys) -> None:
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="a"), public_jwk(keys.p256b, kid="b"), public_jwk(keys.rsa)))
    assert [k.kid for k in ks.candidates("b")] == ["b"]
    assert ks.candidates("zzz") == ()
    assert ks.candidates(None) == ks.keys


# -- parse_jwks: refused whole


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi"])
def test_parse_jwks_refuses_a_private_rsa_member(keys: Keys, member: str) -> None:
    full = private_jwk(keys.rsa, kid="r")
    jwk = {**public_jwk(keys.rsa, kid="r"), member: full[member]}
    with pytest.raises(KeySetError, match="private"):
        parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="ok"), jwk))


def test_parse_jwks_refuses_the_oth_member(keys: Keys) -> None:
    with pytest.raises(KeySetError, match="private"):
        parse_jwks(jwks_bytes({**public_jwk(keys.rsa, kid="r"), "oth": [{"r": "AQ", "d": "AQ", "t": "AQ"}]}))


@pytest.mark.parametrize("key_name", ["p256", "ed25519", "rsa"])
def test_parse_jwks_refuses_a_whole_private_key(keys: Keys, key_name: str) -> None:
    with pytest.raises(KeySetError, match="private"):
        parse_jwks(jwks_bytes(private_jwk(getattr(keys, key_name), kid="x")))


def test_parse_jwks_refuses_a_set_mixing_public_and_private_keys(keys: Keys) -> None:
    with pytest.raises(KeySetError):
        parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="pub"), private_jwk(keys.p256b, kid="priv")))


@pytest.mark.parametrize("jwk", [
    {"kty": "oct", "k": b64url_encode(b"\x01" * 32), "alg": "HS256", "kid": "h"},
    {"kty": "oct", "alg": "HS256", "kid": "h"},                # no secret, still symmetric
    {"kty": "oct", "k": "", "kid": "h"},
    {"kty": "oct", "k": b64url_encode(b"\x01" * 32), "use": "enc", "alg": "A256KW"},
])
def test_parse_jwks_refuses_symmetric_keys(keys: Keys, jwk: dict[str, Any]) -> None:
    with pytest.raises(KeySetError):
        parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="ok"), jwk))


def test_parse_jwks_refuses_duplicate_kid(keys: Keys) -> None:
    # Two different keys with one kid: which one a token means would depend on the order.
    with pytest.raises(KeySetError, match="duplicate kid"):
        parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="k"), public_jwk(keys.p256b, kid="k")))


def test_parse_jwks_refuses_duplicate_kid_across_key_types(keys: Keys) -> None:
    with pytest.raises(KeySetError, match="duplicate kid"):
        parse_jwks(jwks_bytes(public_jwk(keys.rsa, kid="k"), public_jwk(keys.p256, kid="k")))


@pytest.mark.parametrize("document", [
    b"[]", b"null", b"1", b'"keys"', b"not json", b"", b'{"keys": [], "keys": []}',
    b'{"keys": NaN}', b"\xff\xfe",
])
def test_parse_jwks_refuses_a_document_that_is_not_a_json_object(document: bytes) -> None:
    with pytest.raises(KeySetError):
        parse_jwks(document)


@pytest.mark.parametrize("document", [{}, {"key": []}, {"keys": None}, {"keys": {}}, {"keys": "[]"},
                                      {"keys": {"kty": "EC"}}])
def test_parse_jwks_refuses_a_missing_or_non_array_keys_member(document: dict[str, Any]) -> None:
    with pytest.raises(KeySetError, match="keys"):
        parse_jwks(json.dumps(document))


@pytest.mark.parametrize("entry", [1, "key", None, ["kty", "EC"]])
def test_parse_jwks_refuses_a_key_that_is_not_an_object(keys: Keys, entry: Any) -> None:
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [public_jwk(keys.p256, kid="ok"), entry]})


@pytest.mark.parametrize("change", [
    {"kty": None}, {"kty": 1}, {"kty": "XYZ"}, {"kty": "RSA"},   # wrong or unknown type
    {"kid": 1}, {"kid": ["a"]}, {"alg": 1},                      # non-string kid / alg
    {"crv": "P-384"},                                            # coordinates of another curve
    {"x": "AAAA"},                                               # a point that is not on the curve
    {"y": None},
])
def test_parse_jwks_refuses_an_invalid_ec_key(keys: Keys, change: dict[str, Any]) -> None:
    jwk = public_jwk(keys.p256, kid="e")
    for name, value in change.items():
        if value is None:
            del jwk[name]
        else:
            jwk[name] = value
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [jwk]})


def test_parse_jwks_refuses_rsa_public_exponent_one(keys: Keys) -> None:
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [{**public_jwk(keys.rsa, kid="r"), "e": "AQ"}]})


def test_parse_jwks_refuses_x25519_keys(keys: Keys) -> None:
    # An OKP key for key agreement is not a signature key.
    from cryptography.hazmat.primitives.asymmetric import x25519
    raw = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [{"kty": "OKP", "crv": "X25519", "x": b64url_encode(raw), "kid": "x"}]})


# -- parse_jwks: keys left out of the set


@pytest.mark.parametrize("use", ["enc", "ENC", "", "signature"])
def test_parse_jwks_skips_keys_not_for_signatures_by_use(keys: Keys, use: str) -> None:
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="enc", use=use), public_jwk(keys.p256b, kid="sig", use="sig")))
    assert [k.kid for k in ks.keys] == ["sig"]


@pytest.mark.parametrize("ops", [["encrypt"], ["sign"], ["wrapKey", "encrypt"], [], "verify", {"verify": True}])
def test_parse_jwks_skips_keys_whose_key_ops_exclude_verify(keys: Keys, ops: Any) -> None:
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="no", key_ops=ops), public_jwk(keys.p256b, kid="yes")))
    assert [k.kid for k in ks.keys] == ["yes"]


@pytest.mark.parametrize("ops", [["verify"], ["sign", "verify"]])
def test_parse_jwks_keeps_keys_whose_key_ops_include_verify(keys: Keys, ops: list[str]) -> None:
    ks = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="k", key_ops=ops)))
    assert [k.kid for k in ks.keys] == ["k"]


def test_parse_jwks_skips_rsa_keys_under_2048_bits(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdp.jwks"):
        ks = parse_jwks(jwks_bytes(public_jwk(keys.rsa_1024, kid="weak"), public_jwk(keys.rsa, kid="strong")))
    assert [k.kid for k in ks.keys] == ["strong"]
    assert ks.keys[0].key.key_size == 2048
    assert any("weak" in r.getMessage() and "1024" in r.getMessage() for r in caplog.records)


def test_parse_jwk_returns_none_for_a_skipped_key_and_a_key_otherwise(keys: Keys) -> None:
    assert parse_jwk(public_jwk(keys.p256, use="enc")) is None
    key = parse_jwk(public_jwk(keys.p256, kid="k"))
    assert isinstance(key, JsonWebKey) and key.kid == "k"


# -- StaticKeySource


def test_static_key_source_serves_and_replaces_its_set(keys: Keys) -> None:
    first = parse_jwks(jwks_bytes(public_jwk(keys.p256, kid="a")))
    second = parse_jwks(jwks_bytes(public_jwk(keys.p256b, kid="b")))
    source = StaticKeySource(first)
    assert source.current() is first
    assert source.refresh(time.time()) is False
    source.replace(second)
    assert source.current() is second


# -- RemoteKeySource with an injected fetch


JWKS_URL = "https://issuer.test/jwks.json"


@dataclass
class Server:
    """What the fetch callable serves: a body per URL, or an exception; and the URLs it was asked for."""

    bodies: dict[str, bytes] = field(default_factory=dict)
    failure: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def fetch(self, url: str) -> bytes:
        self.calls.append(url)
        if self.failure is not None:
            raise self.failure
        if url not in self.bodies:
            raise OSError(f"GET {url}: HTTP 404")
        return self.bodies[url]


def remote(server: Server, *, min_interval: float = 30.0, max_age: float = 300.0) -> RemoteKeySource:
    return RemoteKeySource(lambda: JWKS_URL, server.fetch, min_interval=min_interval, max_age=max_age,
                           name="https://issuer.test")


def test_remote_source_has_no_keys_before_the_first_refresh(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server)
    assert source.current() is None
    assert source.stale(time.time())
    assert server.calls == []


def test_remote_source_first_refresh_loads_the_key_set(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"), public_jwk(keys.rsa, kid="r"))})
    source = remote(server)
    assert source.refresh(1000.0) is True
    ks = source.current()
    assert ks is not None and [k.kid for k in ks.keys] == ["a", "r"]
    assert server.calls == [JWKS_URL]
    assert source.last_error is None


def test_remote_source_reports_unchanged_and_changed_key_sets(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=10.0)
    assert source.refresh(1000.0) is True
    assert source.refresh(1010.0) is False                     # same keys served again
    assert [k.kid for k in source.current().keys] == ["a"]
    server.bodies[JWKS_URL] = jwks_bytes(public_jwk(keys.p256, kid="a"), public_jwk(keys.p256b, kid="b"))
    assert source.refresh(1020.0) is True                      # rotation: a new key appeared
    assert [k.kid for k in source.current().keys] == ["a", "b"]
    assert len(server.calls) == 3


def test_remote_source_min_interval_rate_limits_refreshes(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=30.0)
    assert source.refresh(1000.0) is True
    server.bodies[JWKS_URL] = jwks_bytes(public_jwk(keys.p256b, kid="b"))
    for now in (1000.0, 1001.0, 1029.9):
        assert source.refresh(now) is False
    assert server.calls == [JWKS_URL]                          # no fetch at all inside the interval
    assert [k.kid for k in source.current().keys] == ["a"]
    assert source.refresh(1030.0) is True                      # the interval has passed
    assert [k.kid for k in source.current().keys] == ["b"]
    assert len(server.calls) == 2


def test_remote_source_rate_limits_failed_attempts_too(keys: Keys) -> None:
    server = Server(failure=OSError("connection refused"))
    source = remote(server, min_interval=30.0)
    assert source.refresh(1000.0) is False
    assert source.refresh(1010.0) is False
    assert len(server.calls) == 1                              # a dead endpoint is not hammered
    server.failure = None
    server.bodies[JWKS_URL] = jwks_bytes(public_jwk(keys.p256, kid="a"))
    assert source.refresh(1030.0) is True


def test_remote_source_failing_fetch_keeps_the_cached_key_set(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=0.0)
    assert source.refresh(1000.0) is True
    cached = source.current()
    server.failure = OSError("GET https://issuer.test/jwks.json: HTTP 503")
    assert source.refresh(1100.0) is False
    assert source.current() is cached
    assert source.last_error is not None and "503" in source.last_error
    server.failure = None
    assert source.refresh(1200.0) is False                     # recovered, same keys
    assert source.last_error is None
    assert source.current() is not None


@pytest.mark.parametrize("body", [
    b"<html>502 Bad Gateway</html>",
    b'{"keys": "nope"}',
    b'{"keys": [{"kty": "oct", "k": "AAAA"}]}',
])
def test_remote_source_refused_document_keeps_the_cached_key_set(keys: Keys, body: bytes) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=0.0)
    source.refresh(1000.0)
    cached = source.current()
    server.bodies[JWKS_URL] = body
    assert source.refresh(1100.0) is False
    assert source.current() is cached
    assert source.last_error


def test_remote_source_failing_url_resolution_is_a_failed_refresh(keys: Keys) -> None:
    def resolve() -> str:
        raise KeySetError("discovery failed")

    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = RemoteKeySource(resolve, server.fetch, min_interval=0.0, max_age=300.0, name="x")
    assert source.refresh(1000.0) is False
    assert source.current() is None
    assert source.last_error == "discovery failed"
    assert server.calls == []


def test_remote_source_failure_without_message_names_the_exception() -> None:
    server = Server(failure=TimeoutError())
    source = remote(server)
    assert source.refresh(1000.0) is False
    assert source.last_error == "TimeoutError"


def test_remote_source_stale_after_max_age(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=0.0, max_age=300.0)
    now = time.time()
    assert source.stale(now)                                   # nothing loaded yet
    assert source.refresh(now) is True
    assert not source.stale(time.time())
    assert not source.stale(time.time() + 290.0)
    assert source.stale(time.time() + 300.0)


def test_remote_source_failed_refresh_does_not_make_the_set_fresh(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=0.0, max_age=300.0)
    source.refresh(time.time())
    server.failure = OSError("down")
    source.refresh(time.time())
    assert source.stale(time.time() + 300.0)


def test_remote_source_stale_uses_the_clock_it_is_given(keys: Keys) -> None:
    server = Server({JWKS_URL: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = remote(server, min_interval=0.0, max_age=300.0)
    assert source.refresh(1000.0) is True
    assert not source.stale(1000.0)
    assert source.stale(1300.0)


# -- discovered_jwks_url

ISSUER = "https://as.test"
RFC8414 = f"{ISSUER}/.well-known/oauth-authorization-server"
OIDC = f"{ISSUER}/.well-known/openid-configuration"


def meta(issuer: str = ISSUER, jwks_uri: Any = f"{ISSUER}/keys", **extra: Any) -> bytes:
    doc = {"issuer": issuer, "jwks_uri": jwks_uri, **extra}
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_discovery_uses_rfc8414_metadata() -> None:
    server = Server({RFC8414: meta(jwks_uri=f"{ISSUER}/oauth-keys"), OIDC: meta(jwks_uri=f"{ISSUER}/oidc-keys")})
    resolve = discovered_jwks_url(ISSUER, server.fetch)
    assert resolve() == f"{ISSUER}/oauth-keys"
    assert server.calls == [RFC8414]


def test_discovery_falls_back_to_openid_configuration() -> None:
    server = Server({OIDC: meta(jwks_uri=f"{ISSUER}/oidc-keys")})
    resolve = discovered_jwks_url(ISSUER, server.fetch)
    assert resolve() == f"{ISSUER}/oidc-keys"
    assert server.calls == [RFC8414, OIDC]


def test_discovery_caches_the_resolved_url() -> None:
    server = Server({RFC8414: meta()})
    resolve = discovered_jwks_url(ISSUER, server.fetch)
    assert resolve() == resolve() == f"{ISSUER}/keys"
    assert server.calls == [RFC8414]


def test_discovery_refuses_metadata_whose_issuer_differs() -> None:
    # RFC 8414 §3.3: a metadata document naming another issuer must not redirect pdp to its keys.
    server = Server({RFC8414: meta(issuer="https://evil.test", jwks_uri="https://evil.test/keys"),
                     OIDC: meta(issuer="https://evil.test", jwks_uri="https://evil.test/keys")})
    resolve = discovered_jwks_url(ISSUER, server.fetch)
    with pytest.raises(KeySetError, match=r"evil\.test"):
        resolve()


def test_discovery_skips_mismatched_rfc8414_metadata_for_valid_openid_configuration() -> None:
    server = Server({RFC8414: meta(issuer="https://evil.test", jwks_uri="https://evil.test/keys"),
                     OIDC: meta(jwks_uri=f"{ISSUER}/oidc-keys")})
    assert discovered_jwks_url(ISSUER, server.fetch)() == f"{ISSUER}/oidc-keys"


@pytest.mark.parametrize("issuer_value", [None, "https://as.test/", "HTTPS://AS.TEST", "https://as.test.evil"])
def test_discovery_requires_the_issuer_to_match_exactly(issuer_value: str | None) -> None:
    server = Server({RFC8414: meta(issuer=issuer_value), OIDC: meta(issuer=issuer_value)})
    with pytest.raises(KeySetError):
        discovered_jwks_url(ISSUER, server.fetch)()


@pytest.mark.parametrize("jwks_uri", [None, 42, "", "file:///etc/passwd", "/relative/keys", "ftp://as.test/keys",
                                      "https://[::1/keys", "https:///keys"])
def test_discovery_refuses_metadata_without_a_usable_jwks_uri(jwks_uri: Any) -> None:
    server = Server({RFC8414: meta(jwks_uri=jwks_uri), OIDC: meta(jwks_uri=jwks_uri)})
    with pytest.raises(KeySetError, match="jwks_uri"):
        discovered_jwks_url(ISSUER, server.fetch)()


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"issuer": "https://as.test", "issuer": "x"}'])
def test_discovery_refuses_documents_that_are_not_strict_json_objects(body: bytes) -> None:
    server = Server({RFC8414: body, OIDC: body})
    with pytest.raises(KeySetError):
        discovered_jwks_url(ISSUER, server.fetch)()


def test_discovery_failure_is_retried_on_the_next_resolve() -> None:
    server = Server(failure=OSError("down"))
    resolve = discovered_jwks_url(ISSUER, server.fetch)
    with pytest.raises(KeySetError, match="down"):
        resolve()
    server.failure = None
    server.bodies[RFC8414] = meta()
    assert resolve() == f"{ISSUER}/keys"


def test_discovery_with_a_trailing_slash_issuer() -> None:
    issuer = "https://as.test/"
    server = Server({RFC8414: meta(issuer=issuer)})
    assert discovered_jwks_url(issuer, server.fetch)() == f"{ISSUER}/keys"


def test_discovery_inserts_the_rfc8414_well_known_path_before_the_issuer_path() -> None:
    issuer = "https://as.test/tenant1"
    server = Server({"https://as.test/.well-known/oauth-authorization-server/tenant1":
                     meta(issuer=issuer, jwks_uri="https://as.test/tenant1/keys")})
    assert discovered_jwks_url(issuer, server.fetch)() == "https://as.test/tenant1/keys"


def test_discovery_appends_openid_configuration_after_the_issuer_path() -> None:
    # OpenID Connect Discovery §4 appends /.well-known/openid-configuration to the issuer (path included).
    issuer = "https://as.test/tenant1"
    server = Server({"https://as.test/tenant1/.well-known/openid-configuration":
                     meta(issuer=issuer, jwks_uri="https://as.test/tenant1/keys")})
    assert discovered_jwks_url(issuer, server.fetch)() == "https://as.test/tenant1/keys"


def test_remote_source_with_discovery_loads_keys_from_the_discovered_url(keys: Keys) -> None:
    server = Server({RFC8414: meta(jwks_uri=f"{ISSUER}/keys"),
                     f"{ISSUER}/keys": jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = RemoteKeySource(discovered_jwks_url(ISSUER, server.fetch), server.fetch, min_interval=0.0,
                             max_age=300.0, name=ISSUER)
    assert source.refresh(1000.0) is True
    assert [k.kid for k in source.current().keys] == ["a"]
    assert server.calls == [RFC8414, f"{ISSUER}/keys"]
    assert source.refresh(1001.0) is False                     # discovery is not repeated
    assert server.calls == [RFC8414, f"{ISSUER}/keys", f"{ISSUER}/keys"]


def test_remote_source_with_discovery_refuses_a_foreign_issuer(keys: Keys) -> None:
    server = Server({RFC8414: meta(issuer="https://evil.test", jwks_uri="https://evil.test/keys"),
                     "https://evil.test/keys": jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = RemoteKeySource(discovered_jwks_url(ISSUER, server.fetch), server.fetch, min_interval=0.0,
                             max_age=300.0, name=ISSUER)
    assert source.refresh(1000.0) is False
    assert source.current() is None
    assert "https://evil.test/keys" not in server.calls
    assert source.last_error and "discovery failed" in source.last_error


# -- RFC 8414 §2: an https issuer's keys come over https

@pytest.mark.parametrize("jwks_uri", ["http://as.test/keys", "http://127.0.0.1:8080/keys", "HTTP://as.test/keys"])
def test_discovery_of_an_https_issuer_refuses_an_http_jwks_uri_and_fetches_nothing_from_it(keys: Keys,
                                                                                          jwks_uri: str) -> None:
    server = Server({RFC8414: meta(jwks_uri=jwks_uri), OIDC: meta(jwks_uri=jwks_uri),
                     jwks_uri: jwks_bytes(public_jwk(keys.p256, kid="a"))})
    source = RemoteKeySource(discovered_jwks_url(ISSUER, server.fetch), server.fetch, min_interval=0.0,
                             max_age=300.0, name=ISSUER)
    assert source.refresh(1000.0) is False and source.current() is None
    assert jwks_uri not in server.calls
    assert source.last_error is not None and "RFC 8414" in source.last_error
    assert source.public_error == DISCOVERY_FAILED


def test_discovery_of_an_http_issuer_may_name_an_http_jwks_uri() -> None:
    # Only an https issuer's keys are held to https: an http issuer (a loopback test server) has no TLS to lose.
    issuer = "http://127.0.0.1:8080"
    server = Server({f"{issuer}/.well-known/oauth-authorization-server": meta(issuer=issuer,
                                                                               jwks_uri=f"{issuer}/keys")})
    assert discovered_jwks_url(issuer, server.fetch)() == f"{issuer}/keys"


# -- what a failed refresh is called where anyone may read it

def test_a_failed_refresh_is_shown_as_a_fixed_text_and_detailed_in_the_log(keys: Keys, caplog) -> None:
    internal = "https://10.1.2.3:8443/internal/realm-7/keys"
    server = Server({RFC8414: meta(jwks_uri=internal)}, failure=None)
    source = RemoteKeySource(discovered_jwks_url(ISSUER, server.fetch), server.fetch, min_interval=0.0,
                             max_age=300.0, name=ISSUER)
    with caplog.at_level(logging.WARNING, logger="pdp.jwks"):
        assert source.refresh(1000.0) is False  # the discovered URL answers 404
    assert source.public_error == FETCH_FAILED and internal not in source.public_error
    assert source.last_error is not None and internal in source.last_error
    assert internal in caplog.text and FETCH_FAILED in caplog.text
    server.bodies[internal] = b'{"keys": [{"kty": "oct", "k": "AAAA"}]}'
    assert source.refresh(1001.0) is False
    assert source.public_error == KEY_SET_REFUSED and "private" in (source.last_error or "")
    server.bodies[internal] = jwks_bytes(public_jwk(keys.p256, kid="a"))
    assert source.refresh(1002.0) is True
    assert source.public_error is None and source.last_error is None
