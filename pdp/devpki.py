"""A small PKI and token issuer for development and tests: real keys, real certificates, real tokens.

``pdp dev init`` uses it to write a working setup; anyone can use it to mint
more client certificates and bound tokens for their own tests.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdp.credentials.jose import b64url_encode
from pdp.credentials.rfc8705 import thumbprint

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    @functools.cached_property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.der)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, *, ca: bool, path_length: int | None,
             not_before: datetime | None, days: int) -> x509.CertificateBuilder:
    """What every certificate here has: names, key, serial, validity, basic constraints, key usage."""
    start = not_before or _now() - timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=ca), critical=True)
    )


def make_ca(name: str = "pdp dev CA", *, key: PrivateKey | None = None, issuer: Issued | None = None,
            days: int = 3650, path_length: int | None = None,
            not_before: datetime | None = None) -> Issued:
    """A root CA (``issuer`` None) or an intermediate CA signed by ``issuer``."""
    key = key or new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdp dev"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key = issuer.key if issuer else key
    builder = _builder(subject, issuer.cert.subject if issuer else subject, key, ca=True, path_length=path_length,
                       not_before=not_before, days=days).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def make_client(ca: Issued, *, spiffe_id: str | None = "spiffe://example.org/demo/client",
                common_name: str = "demo client", organizational_unit: str | None = None,
                dns: tuple[str, ...] = (), uris: tuple[str, ...] = (), emails: tuple[str, ...] = (),
                ips: tuple[str, ...] = (), days: int = 365, not_before: datetime | None = None,
                client_auth: bool = True, key: PrivateKey | None = None) -> Issued:
    """An end-entity certificate signed by ``ca``, with a SPIFFE ID URI SAN by default; a client
    certificate, or a server certificate with ``client_auth=False``."""
    key = key or new_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdp dev")]
    if organizational_unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    all_uris = ((spiffe_id,) if spiffe_id else ()) + uris
    names += [x509.UniformResourceIdentifier(u) for u in all_uris]
    names += [x509.RFC822Name(e) for e in emails]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if client_auth else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(x509.Name(attrs), ca.cert.subject, key, ca=False, path_length=None, not_before=not_before,
                 days=days)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(ca: Issued, revoked: tuple[Issued, ...] = (), *, days: int = 7,
             last_update: datetime | None = None) -> bytes:
    """A PEM CRL signed by ``ca`` listing ``revoked``, valid for ``days`` from ``last_update``."""
    start = last_update or _now() - timedelta(minutes=5)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(start)
               .next_update(start + timedelta(days=days)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.cert.serial_number).revocation_date(start).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TokenIssuer:
    """An OAuth authorization server's signing key, its JWKS and a minting function."""

    issuer: str
    key: PrivateKey
    kid: str

    @classmethod
    def generate(cls, issuer: str = "https://issuer.example.org", kid: str | None = None) -> TokenIssuer:
        return cls(issuer, new_key(), kid or uuid.uuid4().hex[:16])

    @property
    def jwk(self) -> dict[str, Any]:
        nums = self.key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
                "x": b64url_encode(nums.x.to_bytes(32, "big")), "y": b64url_encode(nums.y.to_bytes(32, "big"))}

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def mint(self, *, audience: str | list[str] = "https://api.example.org", subject: str = "demo-user",
             client_id: str = "demo-client", scope: str = "read", bound_to: Issued | None = None,
             lifetime: int = 3600, now: float | None = None, typ: str = "at+jwt",
             extra: dict[str, Any] | None = None, headers: dict[str, Any] | None = None,
             dpop_key: DpopKey | None = None) -> str:
        """An RFC 9068 access token; ``bound_to`` adds ``cnf.x5t#S256`` for that certificate,
        ``dpop_key`` adds ``cnf.jkt`` for that DPoP key (RFC 9449)."""
        iat = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": subject, "aud": audience, "client_id": client_id, "scope": scope,
            "iat": iat, "nbf": iat, "exp": iat + lifetime, "jti": uuid.uuid4().hex,
        }
        if bound_to is not None:
            claims["cnf"] = {"x5t#S256": bound_to.thumbprint}
        if dpop_key is not None:
            claims.setdefault("cnf", {})["jkt"] = dpop_key.jkt
        claims.update(extra or {})
        header = {"typ": typ, "kid": self.kid, **(headers or {})}
        return jwt.encode(claims, self.key, algorithm="ES256", headers=header)


@dataclass(frozen=True)
class DpopKey:
    """A client's DPoP key pair (P-256) and a maker of RFC 9449 proofs."""

    key: PrivateKey

    @classmethod
    def generate(cls) -> DpopKey:
        return cls(new_key())

    @property
    def public_jwk(self) -> dict[str, Any]:
        nums = self.key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": b64url_encode(nums.x.to_bytes(32, "big")),
                "y": b64url_encode(nums.y.to_bytes(32, "big"))}

    @property
    def private_jwk(self) -> dict[str, Any]:
        """The key pair as an RFC 7517 private JWK (``d`` included): keep it secret."""
        d = self.key.private_numbers().private_value
        return {**self.public_jwk, "d": b64url_encode(d.to_bytes(32, "big"))}

    @classmethod
    def from_jwk(cls, jwk: Any) -> DpopKey:
        """The key of a private P-256 JWK (as ``private_jwk`` writes it); ``ValueError`` for anything else,
        a ``d`` that is not the private key of ``x`` and ``y`` included."""
        from pdp.credentials.jose import DecodeError, b64url_decode

        if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("not an EC P-256 JWK")
        if not all(isinstance(jwk.get(m), str) for m in ("x", "y", "d")):
            raise ValueError("a private EC JWK needs string members x, y and d")
        try:
            d = b64url_decode(jwk["d"])
        except DecodeError as exc:
            raise ValueError(f"its d is not base64url: {exc}") from None
        if len(d) != 32:
            raise ValueError("its d is not a P-256 private key (32 bytes)")
        key = cls(ec.derive_private_key(int.from_bytes(d, "big"), ec.SECP256R1()))
        if (key.public_jwk["x"], key.public_jwk["y"]) != (jwk["x"], jwk["y"]):
            raise ValueError("its x and y are not the public key of its d")
        return key

    @property
    def jkt(self) -> str:
        from pdp.credentials.rfc7638 import jwk_thumbprint

        return jwk_thumbprint(self.public_jwk)

    def proof(self, method: str, url: str, access_token: str | None = None, *, nonce: str | None = None,
              iat: float | None = None, jti: str | None = None, claims: dict[str, Any] | None = None,
              headers: dict[str, Any] | None = None) -> str:
        """A DPoP proof JWT for ``method`` ``url`` (and ``access_token``'s hash as ``ath``)."""
        from pdp.credentials.rfc9449 import access_token_hash

        body: dict[str, Any] = {"jti": jti or uuid.uuid4().hex, "htm": method, "htu": url,
                                "iat": int(iat if iat is not None else time.time())}
        if access_token is not None:
            body["ath"] = access_token_hash(access_token)
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims or {})
        header = {"typ": "dpop+jwt", "jwk": self.public_jwk, **(headers or {})}
        return jwt.encode(body, self.key, algorithm="ES256", headers=header)


def load_private_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an EC private key")
    return key


def dumps_jwks(jwks: dict[str, Any]) -> str:
    return json.dumps(jwks, indent=2) + "\n"
