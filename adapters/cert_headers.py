"""Client certificates handed over in headers by the proxy that terminated TLS.

Each format has its own parser; every parser returns the chain as DER, leaf
first, or raises ``CertHeaderError``:

- Envoy ``x-forwarded-client-cert`` (XFCC): comma-separated elements of
  ``;``-separated ``Key=value`` pairs (keys ``By``, ``Hash``, ``Cert``,
  ``Chain``, ``Subject``, ``URI``, ``DNS``, case-insensitive), values quoted
  when they hold ``,;=`` with ``\\"`` escapes. ``Cert``/``Chain`` are
  URL-encoded PEM; ``Hash`` is the hex SHA-256 of the leaf's DER and, when
  present beside ``Cert``, must match it.
- RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain``: structured-field byte
  sequences (``:base64:``) of DER, the chain a comma-separated list.
- nginx ``$ssl_client_escaped_cert``: URL-encoded PEM.
- Traefik ``X-Forwarded-Tls-Client-Cert``: PEM bodies without their
  delimiters, comma-separated, URL-encoded.
- AWS ALB ``X-Amzn-Mtls-Clientcert``: URL-encoded PEM chain with ``+``, ``=``
  and ``/`` left as they are.

``CertificateHeaders`` reads the configured format, but only from a peer in
the trusted proxy list: anyone else's certificate header is ignored (and
counted), so a client cannot present a certificate it does not hold.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pdp.certificates.pem import PemError, pem_to_der_chain
from pdp.service.listener_tls import identity_key

MAX_HEADER_BYTES = 64 * 1024


class CertHeaderError(ValueError):
    """A certificate header that is present but cannot be read."""


# -- Envoy x-forwarded-client-cert

@dataclass(frozen=True)
class XfccElement:
    by: tuple[str, ...] = ()
    hash: str | None = None
    cert: str | None = None
    chain: str | None = None
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


_XFCC_KEYS = {"by": "by", "hash": "hash", "cert": "cert", "chain": "chain", "subject": "subject", "uri": "uris",
              "dns": "dns"}
_REPEATABLE = frozenset({"by", "uris", "dns"})


def _xfcc_tokens(value: str) -> Iterable[tuple[str, str, str]]:
    """Yield (key, value, separator-after) for each pair; the separator is ';', ',' or '' at the end."""
    i, n = 0, len(value)
    while i < n:
        eq = value.find("=", i)
        if eq < 0:
            raise CertHeaderError("x-forwarded-client-cert: a pair without '='")
        key = value[i:eq].strip()
        if not key or any(c in key for c in ',;"'):
            raise CertHeaderError(f"x-forwarded-client-cert: bad key {key[:32]!r}")
        i = eq + 1
        if i < n and value[i] == '"':
            out: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise CertHeaderError("x-forwarded-client-cert: unterminated quoted value")
                c = value[i]
                if c == "\\" and i + 1 < n:
                    out.append(value[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                out.append(c)
                i += 1
            text = "".join(out)
            while i < n and value[i] == " ":
                i += 1
            if i < n and value[i] not in ",;":
                raise CertHeaderError("x-forwarded-client-cert: text after a quoted value")
        else:
            end = i
            while end < n and value[end] not in ",;":
                end += 1
            text = value[i:end].strip()
            if '"' in text:
                raise CertHeaderError("x-forwarded-client-cert: a quote inside an unquoted value")
            i = end
        sep = value[i] if i < n else ""
        yield key, text, sep
        i += 1


def parse_xfcc(value: str) -> list[XfccElement]:
    """Every element of an ``x-forwarded-client-cert`` value, in order (the last one appended last)."""
    if len(value) > MAX_HEADER_BYTES:
        raise CertHeaderError("x-forwarded-client-cert is too large")
    elements: list[XfccElement] = []
    fields: dict[str, list[str]] = {}
    for key, text, sep in _xfcc_tokens(value):
        name = _XFCC_KEYS.get(key.lower())
        if name is None:
            raise CertHeaderError(f"x-forwarded-client-cert: unknown key {key[:32]!r}")
        if name in fields and name not in _REPEATABLE:
            raise CertHeaderError(f"x-forwarded-client-cert: {key} appears twice in one element")
        fields.setdefault(name, []).append(text)
        if sep in (",", ""):
            elements.append(_element(fields))
            fields = {}
    if fields:  # the text ended in ';': refuse rather than guess which element was meant
        raise CertHeaderError("x-forwarded-client-cert ends with ';'")
    if not elements:
        raise CertHeaderError("x-forwarded-client-cert is empty")
    return elements


def _element(fields: dict[str, list[str]]) -> XfccElement:
    def one(name: str) -> str | None:
        return fields[name][0] if name in fields else None

    return XfccElement(by=tuple(fields.get("by", ())), hash=one("hash"), cert=one("cert"), chain=one("chain"),
                       subject=one("subject"), uris=tuple(fields.get("uris", ())), dns=tuple(fields.get("dns", ())))


def _pem(text: str, what: str) -> tuple[bytes, ...]:
    try:
        return pem_to_der_chain(text)
    except PemError as exc:
        raise CertHeaderError(f"{what}: {exc}") from exc


def xfcc_chain(value: str, element: str = "last", by: str | None = None) -> tuple[bytes, ...]:
    """The chain of the chosen XFCC element (``last``: the one the trusted hop appended; or ``first``).

    ``by``: the element must name this proxy in ``By`` (its own URI SAN), so that with Envoy's
    ``APPEND_FORWARD`` an element a client wrote itself is never taken for the proxy's."""
    elements = parse_xfcc(value)
    chosen = elements[-1] if element == "last" else elements[0]
    if by is not None and by not in chosen.by:
        raise CertHeaderError(f"x-forwarded-client-cert: the element was not written by {by}")
    if chosen.chain:
        chain = _pem(urllib.parse.unquote(chosen.chain), "x-forwarded-client-cert Chain")
        if chosen.cert and _pem(urllib.parse.unquote(chosen.cert), "x-forwarded-client-cert Cert")[0] != chain[0]:
            raise CertHeaderError("x-forwarded-client-cert: Cert is not the first certificate of Chain")
    elif chosen.cert:
        chain = _pem(urllib.parse.unquote(chosen.cert), "x-forwarded-client-cert Cert")
    else:
        raise CertHeaderError("x-forwarded-client-cert: the element has no Cert or Chain "
                              "(Envoy: set_current_client_cert_details with cert: true)")
    if chosen.hash is not None:
        expected = hashlib.sha256(chain[0]).hexdigest()
        if not hmac.compare_digest(chosen.hash.lower().encode(), expected.encode()):
            raise CertHeaderError("x-forwarded-client-cert: Hash does not match the certificate")
    return chain


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def hex_hash_to_x5t(hex_hash: str) -> str:
    """XFCC's hex SHA-256 → the base64url form RFC 8705 uses for ``x5t#S256``."""
    if _SHA256_HEX.fullmatch(hex_hash) is None:
        raise CertHeaderError("Hash is not a hex SHA-256 digest")
    return base64.urlsafe_b64encode(bytes.fromhex(hex_hash)).rstrip(b"=").decode("ascii")


# -- RFC 9440

_SF_BINARY = re.compile(r"\s*:([A-Za-z0-9+/=]*):\s*")


def _sf_binary(item: str, what: str) -> bytes:
    match = _SF_BINARY.fullmatch(item)
    if match is None:
        raise CertHeaderError(f"{what} is not a structured-field byte sequence (:base64:)")
    try:
        der = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertHeaderError(f"{what}: invalid base64") from exc
    if not der:
        raise CertHeaderError(f"{what} is empty")
    return der


def rfc9440_chain(client_cert: str, client_cert_chain: str | None = None) -> tuple[bytes, ...]:
    if len(client_cert) > MAX_HEADER_BYTES or len(client_cert_chain or "") > MAX_HEADER_BYTES:
        raise CertHeaderError("Client-Cert is too large")
    leaf = _sf_binary(client_cert, "Client-Cert")
    rest = [_sf_binary(item, "Client-Cert-Chain") for item in client_cert_chain.split(",")] \
        if client_cert_chain and client_cert_chain.strip() else []
    return (leaf, *rest)


# -- nginx, Traefik, AWS ALB

def nginx_chain(value: str) -> tuple[bytes, ...]:
    return _pem(urllib.parse.unquote(value), "nginx client certificate header")


def traefik_chain(value: str) -> tuple[bytes, ...]:
    bodies = [b.strip() for b in urllib.parse.unquote(value).split(",") if b.strip()]
    if not bodies:
        raise CertHeaderError("X-Forwarded-Tls-Client-Cert is empty")
    pem = "".join(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n" for body in bodies)
    return _pem(pem, "X-Forwarded-Tls-Client-Cert")


def alb_chain(value: str) -> tuple[bytes, ...]:
    # unquote, not unquote_plus: ALB leaves '+' (a base64 character) unencoded.
    return _pem(urllib.parse.unquote(value), "X-Amzn-Mtls-Clientcert")


#: format name → (default header name, parser of (headers, header name) → chain)
HeaderParser = Callable[[Mapping[str, str], str], tuple[bytes, ...] | None]


def _single(parse: Callable[[str], tuple[bytes, ...]]) -> HeaderParser:
    def read(headers: Mapping[str, str], name: str) -> tuple[bytes, ...] | None:
        value = headers.get(name)
        return None if value is None else parse(value)

    return read


def _rfc9440(headers: Mapping[str, str], name: str) -> tuple[bytes, ...] | None:
    value = headers.get(name)
    return None if value is None else rfc9440_chain(value, headers.get(f"{name}-chain"))


FORMATS: dict[str, tuple[str, HeaderParser]] = {
    "xfcc": ("x-forwarded-client-cert", _single(xfcc_chain)),
    "rfc9440": ("client-cert", _rfc9440),
    "nginx": ("ssl-client-cert", _single(nginx_chain)),
    "traefik": ("x-forwarded-tls-client-cert", _single(traefik_chain)),
    "alb": ("x-amzn-mtls-clientcert", _single(alb_chain)),
}


def _is_identity(entry: str) -> bool:
    return entry.lower().startswith(("spiffe://", "dns:"))


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


@dataclass(frozen=True)
class HeaderCertificate:
    """What a request's certificate header gave: a chain, an error, or that it was ignored."""

    chain: tuple[bytes, ...] = ()
    error: str | None = None
    untrusted: bool = False


class CertificateHeaders:
    """The client certificate from a trusted proxy's header, in one configured format."""

    def __init__(self, fmt: str, trusted_proxies: Iterable[str], *, header: str | None = None,
                 xfcc_element: str = "last", xfcc_by: str | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown certificate header format {fmt!r} (one of {', '.join(FORMATS)})")
        default_name, parser = FORMATS[fmt]
        self.format = fmt
        self.header = (header or default_name).lower()
        proxies = list(trusted_proxies)
        self.identities = frozenset(identity_key(p) for p in proxies if _is_identity(p))
        self.trusted = parse_networks(p for p in proxies if not _is_identity(p))
        if fmt == "xfcc":
            self._parse: HeaderParser = _single(lambda v: xfcc_chain(v, xfcc_element, xfcc_by))
        else:
            self._parse = parser
        # A proxy hands over the same client's certificate with every request, from the same address:
        # each distinct header text is parsed once, and each peer address judged once (both bounded).
        self._parsed = functools.lru_cache(maxsize=1024)(self._parse_values)
        self._trusted_address = functools.lru_cache(maxsize=1024)(self._address_trusted)

    def trusts(self, peer: str, caller_names: frozenset[str] = frozenset()) -> bool:
        """A peer is trusted by address (a listed network) or, on a mutual-TLS listener, by the
        identity in its certificate (a listed ``spiffe://…`` or ``dns:NAME``)."""
        if caller_names & self.identities:
            return True
        return bool(self._trusted_address(peer))

    def _address_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client on a dual-stack listener
        return any(address in network for network in self.trusted)

    def read(self, peer: str, headers: Mapping[str, str],
             caller_names: frozenset[str] = frozenset()) -> HeaderCertificate:
        """The certificate of ``headers`` (lower-case names) if ``peer`` is a trusted proxy."""
        if self.header not in headers:
            return HeaderCertificate()
        if not self.trusts(peer, caller_names):
            return HeaderCertificate(untrusted=True)
        return self.parse(headers)

    def parse(self, headers: Mapping[str, str]) -> HeaderCertificate:
        """The certificate of ``headers``, whose sender the caller has already found trusted."""
        found: HeaderCertificate = self._parsed(headers.get(self.header), headers.get(f"{self.header}-chain"))
        return found

    def _parse_values(self, value: str | None, chain: str | None) -> HeaderCertificate:
        headers = {k: v for k, v in ((self.header, value), (f"{self.header}-chain", chain)) if v is not None}
        try:
            parsed = self._parse(headers, self.header)
        except CertHeaderError as exc:
            return HeaderCertificate(error=str(exc))
        return HeaderCertificate(chain=parsed or ())
