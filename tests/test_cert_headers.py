"""pdp.adapters.cert_headers: client certificates handed over in headers by TLS-terminating proxies.

Every header value here is built from real certificates (``pki`` fixture, ``pdp.devpki``) exactly the
way the proxy in question writes it: Envoy XFCC, RFC 9440, nginx, Traefik and AWS ALB.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pdp.adapters.cert_headers import (
    FORMATS,
    MAX_HEADER_BYTES,
    CertHeaderError,
    CertificateHeaders,
    HeaderCertificate,
    XfccElement,
    alb_chain,
    hex_hash_to_x5t,
    nginx_chain,
    parse_xfcc,
    rfc9440_chain,
    traefik_chain,
    xfcc_chain,
)

from pdp.certificates.pem import PemError, pem_to_der_chain
from pdp.devpki import Issued, make_client

FUZZ = settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BY = "spiffe://example.org/ns/edge/sa/envoy"
OUTER_BY = "spiffe://example.org/ns/outer/sa/lb"
SUBJECT = "CN=demo client,O=pdp dev"
CLIENT_URI = "spiffe://example.org/demo/client"


# -- how each proxy writes the header

def hex_sha256(issued: Issued) -> str:
    return hashlib.sha256(issued.der).hexdigest()


def quoted_pem(*certs: Issued) -> str:
    """URL-encoded PEM, as Envoy's Cert/Chain and nginx's $ssl_client_escaped_cert."""
    return urllib.parse.quote(b"".join(c.pem for c in certs).decode(), safe="")


def envoy_element(leaf: Issued | None, *, chain: tuple[Issued, ...] = (), by: str | None = BY,
                  subject: str = SUBJECT, uris: tuple[str, ...] = (CLIENT_URI,),
                  dns: tuple[str, ...] = ("a.example", "b.example"), cert: bool = True,
                  hash_of: Issued | None = None) -> str:
    """One XFCC element in Envoy's order: By, Hash, Cert, Chain, Subject, URI, DNS (joined by ';')."""
    parts = []
    if by is not None:
        parts.append(f"By={by}")
    hashed = hash_of or leaf
    if hashed is not None:
        parts.append(f"Hash={hex_sha256(hashed)}")
    if cert and leaf is not None:
        parts.append(f'Cert="{quoted_pem(leaf)}"')
    if chain:
        parts.append(f'Chain="{quoted_pem(*chain)}"')
    parts.append(f'Subject="{subject}"')
    parts += [f"URI={u}" for u in uris] or ["URI="]
    parts += [f"DNS={d}" for d in dns]
    return ";".join(parts)


def sf_binary(der: bytes) -> str:
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def traefik_value(*certs: Issued) -> str:
    """Traefik passTLSClientCert pem: bodies without delimiters or newlines, ',' between, query-escaped."""
    bodies = ["".join(c.pem.decode().strip().splitlines()[1:-1]) for c in certs]
    return urllib.parse.quote(",".join(bodies), safe="")


def alb_value(*certs: Issued) -> str:
    """AWS ALB X-Amzn-Mtls-Clientcert: URL-encoded PEM with '+', '=' and '/' left as they are."""
    return urllib.parse.quote(b"".join(c.pem for c in certs).decode(), safe="+=/")


@pytest.fixture(scope="module")
def plus_leaf(pki) -> Issued:
    """A client certificate whose PEM body holds '+', '/' and '=' padding-free body chars (almost always the first)."""
    for _ in range(50):
        leaf = make_client(pki.intermediate)
        body = b"".join(leaf.pem.splitlines()[1:-1])
        if b"+" in body and b"/" in body:
            return leaf
    raise AssertionError("no certificate with '+' and '/' in its PEM body")  # pragma: no cover


# -- XFCC: parse_xfcc

def test_parse_xfcc_single_envoy_element_every_field(pki):
    value = envoy_element(pki.client, chain=(pki.client, pki.intermediate))
    assert parse_xfcc(value) == [XfccElement(
        by=(BY,), hash=hex_sha256(pki.client), cert=quoted_pem(pki.client),
        chain=quoted_pem(pki.client, pki.intermediate), subject=SUBJECT, uris=(CLIENT_URI,),
        dns=("a.example", "b.example"))]


def test_parse_xfcc_proxy_chain_keeps_every_element_in_order(pki):
    first = envoy_element(pki.other, by=OUTER_BY, subject="CN=demo client,O=pdp dev",
                          uris=("spiffe://example.org/demo/other",), dns=("outer.example",))
    second = envoy_element(pki.client, chain=(pki.client, pki.intermediate), uris=(CLIENT_URI, "urn:x:y"))
    elements = parse_xfcc(f"{first},{second}")
    assert len(elements) == 2
    assert elements[0] == XfccElement(by=(OUTER_BY,), hash=hex_sha256(pki.other), cert=quoted_pem(pki.other),
                                      subject=SUBJECT, uris=("spiffe://example.org/demo/other",),
                                      dns=("outer.example",))
    assert elements[1].by == (BY,)
    assert elements[1].hash == hex_sha256(pki.client)
    assert elements[1].cert == quoted_pem(pki.client)
    assert elements[1].chain == quoted_pem(pki.client, pki.intermediate)
    assert elements[1].uris == (CLIENT_URI, "urn:x:y")
    assert elements[1].dns == ("a.example", "b.example")


def test_parse_xfcc_three_elements_whitespace_around_elements(pki):
    a = envoy_element(pki.other, by=OUTER_BY, dns=())
    b = envoy_element(pki.admin, by="spiffe://example.org/mid", dns=("mid.example",))
    c = envoy_element(pki.client)
    elements = parse_xfcc(f"  {a} ,\t{b}  ,  {c}  ")
    assert [e.by for e in elements] == [(OUTER_BY,), ("spiffe://example.org/mid",), (BY,)]
    assert [e.hash for e in elements] == [hex_sha256(pki.other), hex_sha256(pki.admin), hex_sha256(pki.client)]
    assert elements[0].dns == ()
    assert elements[1].dns == ("mid.example",)
    assert elements[2].dns == ("a.example", "b.example")


def test_parse_xfcc_repeated_by_uri_dns():
    value = "By=spiffe://a;By=spiffe://b;URI=spiffe://u1;DNS=d1;URI=spiffe://u2;DNS=d2;DNS=d3"
    (element,) = parse_xfcc(value)
    assert element.by == ("spiffe://a", "spiffe://b")
    assert element.uris == ("spiffe://u1", "spiffe://u2")
    assert element.dns == ("d1", "d2", "d3")
    assert element.hash is None and element.cert is None and element.chain is None and element.subject is None


def test_parse_xfcc_quoted_values_hold_separators_and_escaped_quotes():
    value = (r'By="spiffe://a,b;c=d";Subject="CN=\"Demo, Inc.\";x=y,O=pdp dev";'
             r'URI=spiffe://u,DNS="x,y";By=z')
    elements = parse_xfcc(value)
    assert elements == [
        XfccElement(by=("spiffe://a,b;c=d",), subject='CN="Demo, Inc.";x=y,O=pdp dev', uris=("spiffe://u",)),
        XfccElement(by=("z",), dns=("x,y",)),
    ]


def test_parse_xfcc_escaped_backslash():
    (element,) = parse_xfcc(r'Subject="a\\b\"c"')
    assert element.subject == 'a\\b"c'


def test_parse_xfcc_keys_are_case_insensitive(pki):
    value = (f'by={BY};HASH={hex_sha256(pki.client)};cert="{quoted_pem(pki.client)}";'
             f'CHAIN="{quoted_pem(pki.client)}";subject="{SUBJECT}";Uri=u1;uri=u2;dns=d1;DnS=d2')
    (element,) = parse_xfcc(value)
    assert element == XfccElement(by=(BY,), hash=hex_sha256(pki.client), cert=quoted_pem(pki.client),
                                  chain=quoted_pem(pki.client), subject=SUBJECT, uris=("u1", "u2"),
                                  dns=("d1", "d2"))


def test_parse_xfcc_accepts_the_empty_subject_and_uri_envoy_writes(pki):
    # Envoy always writes Subject="" and URI= for a certificate without a subject or URI SAN.
    value = f'Hash={hex_sha256(pki.client)};Cert="{quoted_pem(pki.client)}";Subject="";URI='
    (element,) = parse_xfcc(value)
    assert element.subject == ""
    assert element.uris == ("",)
    assert xfcc_chain(value) == (pki.client.der,)


@pytest.mark.parametrize("value", [
    pytest.param("", id="empty header"),
    pytest.param('Cert="abc', id="unterminated quote"),
    pytest.param('By=a;Subject="CN=x,O=y', id="unterminated quote later"),
    pytest.param('Subject="ends in backslash\\', id="unterminated after backslash"),
    pytest.param("Hash", id="no equals"),
    pytest.param("By=a;Hash", id="second pair without equals"),
    pytest.param("By=a,DNS", id="second element without equals"),
    pytest.param("Foo=bar", id="unknown key"),
    pytest.param("By=a;SAN=spiffe://x", id="unknown key SAN"),
    pytest.param("Hash=aa;Hash=bb", id="Hash twice"),
    pytest.param("Cert=a;cert=b", id="Cert twice differing case"),
    pytest.param("Chain=a;CHAIN=b", id="Chain twice"),
    pytest.param('Subject="a";Subject="b"', id="Subject twice"),
    pytest.param('Subject="CN=x"trailing', id="text after closing quote"),
    pytest.param('Subject="CN=x" y;By=a', id="text after closing quote and space"),
    pytest.param('By=a"b', id="quote inside unquoted value"),
    pytest.param('"By"=a', id="quote in key"),
    pytest.param("=a", id="empty key"),
    pytest.param("By=a;=b", id="empty key later"),
    pytest.param("By=a,,By=b", id="empty element"),
    pytest.param("By=a;;By=b", id="empty pair"),
    pytest.param("By=" + "a" * MAX_HEADER_BYTES, id="oversize"),
])
def test_parse_xfcc_malformed(value):
    with pytest.raises(CertHeaderError):
        parse_xfcc(value)


@pytest.mark.parametrize(("value", "message"), [
    ("Foo=bar", "unknown key 'Foo'"),
    ("Foo=bar,By=a", "unknown key 'Foo'"),
    ("By=a;SAN=spiffe://x", "unknown key 'SAN'"),
    ('Subject="CN=x"y=z', "text after a quoted value"),
    ('Subject="CN=x" y;By=a', "text after a quoted value"),
    ('Cert="abc', "unterminated"),
    ("By=a;Hash", "without '='"),
    ('By=a"b', "quote inside an unquoted value"),
])
def test_parse_xfcc_malformed_says_why(value, message):
    with pytest.raises(CertHeaderError, match=message):
        parse_xfcc(value)


def test_parse_xfcc_spaces_after_a_quoted_value(pki):
    value = f'Subject="a" ;Cert="{quoted_pem(pki.other)}"  , By=b;Cert="{quoted_pem(pki.client)}" '
    elements = parse_xfcc(value)
    assert [(e.subject, e.by) for e in elements] == [("a", ()), (None, ("b",))]
    assert xfcc_chain(value) == (pki.client.der,)
    assert xfcc_chain(value, "first") == (pki.other.der,)


def test_parse_xfcc_size_limit_boundary():
    at_limit = "By=" + "a" * (MAX_HEADER_BYTES - 3)
    assert len(at_limit) == MAX_HEADER_BYTES
    assert parse_xfcc(at_limit)[0].by == ("a" * (MAX_HEADER_BYTES - 3),)
    with pytest.raises(CertHeaderError, match="too large"):
        parse_xfcc(at_limit + "a")


def test_parse_xfcc_duplicate_key_error_names_the_key():
    with pytest.raises(CertHeaderError, match="Subject appears twice"):
        parse_xfcc('Subject="a";Subject="b"')


def test_parse_xfcc_same_key_in_separate_elements_is_fine():
    assert [e.hash for e in parse_xfcc("Hash=aa,Hash=bb")] == ["aa", "bb"]


def test_parse_xfcc_trailing_semicolon_does_not_drop_the_last_element(pki):
    outer = envoy_element(pki.other, by=OUTER_BY)
    inner = envoy_element(pki.client)
    value = f"{outer},{inner};"
    # Either refuse the trailing ';' or keep the element it ends; never silently lose it.
    try:
        elements = parse_xfcc(value)
    except CertHeaderError:
        elements = None
    if elements is not None:
        assert len(elements) == 2
        assert elements[-1].hash == hex_sha256(pki.client)
    try:
        chain = xfcc_chain(value)
    except CertHeaderError:
        return
    assert chain == (pki.client.der,)  # today: pki.other's certificate, the *first* element's


# -- XFCC: xfcc_chain

def test_xfcc_chain_single_element_with_cert(pki):
    assert xfcc_chain(envoy_element(pki.client)) == (pki.client.der,)


def test_xfcc_chain_picks_the_last_element_by_default_and_the_first_on_request(pki):
    value = ",".join([envoy_element(pki.other, by=OUTER_BY), envoy_element(pki.admin, by="spiffe://mid"),
                      envoy_element(pki.client)])
    assert xfcc_chain(value) == (pki.client.der,)
    assert xfcc_chain(value, "last") == (pki.client.der,)
    assert xfcc_chain(value, "first") == (pki.other.der,)


def test_xfcc_chain_prefers_chain_over_cert(pki):
    value = envoy_element(pki.client, chain=(pki.client, pki.intermediate))
    assert xfcc_chain(value) == (pki.client.der, pki.intermediate.der)


def test_xfcc_chain_full_chain_to_the_root(pki):
    value = envoy_element(pki.client, chain=(pki.client, pki.intermediate, pki.root))
    assert xfcc_chain(value) == (pki.client.der, pki.intermediate.der, pki.root.der)


def test_xfcc_chain_chain_without_cert(pki):
    value = envoy_element(pki.client, chain=(pki.client, pki.intermediate), cert=False)
    assert "Cert=" not in value
    assert xfcc_chain(value) == (pki.client.der, pki.intermediate.der)


def test_xfcc_chain_chain_must_start_with_cert(pki):
    value = envoy_element(pki.client, chain=(pki.other, pki.intermediate), hash_of=pki.other)
    with pytest.raises(CertHeaderError, match="first certificate of Chain"):
        xfcc_chain(value)


def test_xfcc_chain_chain_with_leaf_last_is_refused(pki):
    value = envoy_element(pki.client, chain=(pki.intermediate, pki.client), hash_of=pki.intermediate)
    with pytest.raises(CertHeaderError):
        xfcc_chain(value)


def test_xfcc_chain_hash_must_match_the_leaf(pki):
    value = envoy_element(pki.client, hash_of=pki.other)
    with pytest.raises(CertHeaderError, match="Hash does not match"):
        xfcc_chain(value)


def test_xfcc_chain_hash_checked_against_chain_leaf(pki):
    value = envoy_element(pki.client, chain=(pki.client, pki.intermediate), cert=False, hash_of=pki.intermediate)
    with pytest.raises(CertHeaderError, match="Hash does not match"):
        xfcc_chain(value)


def test_xfcc_chain_hash_of_the_last_element_is_checked_even_when_the_first_matches(pki):
    good = envoy_element(pki.other, by=OUTER_BY)
    bad = envoy_element(pki.client, hash_of=pki.admin)
    value = f"{good},{bad}"
    assert xfcc_chain(value, "first") == (pki.other.der,)
    with pytest.raises(CertHeaderError, match="Hash"):
        xfcc_chain(value)


def test_xfcc_chain_uppercase_hash_is_accepted(pki):
    value = f'HASH={hex_sha256(pki.client).upper()};CERT="{quoted_pem(pki.client)}"'
    assert xfcc_chain(value) == (pki.client.der,)


@pytest.mark.parametrize("bad_hash", ["", "00", "zz", "0" * 64])
def test_xfcc_chain_bad_hash_values(pki, bad_hash):
    with pytest.raises(CertHeaderError, match="Hash"):
        xfcc_chain(f'Hash={bad_hash};Cert="{quoted_pem(pki.client)}"')


def test_xfcc_chain_envoy_str_replace_encoding(pki, plus_leaf):
    # Envoy's own encoder: PEM with only '\n', ' ', '+', '/' and '=' percent-encoded.
    def envoy_encode(*certs: Issued) -> str:
        pem = b"".join(c.pem for c in certs).decode()
        for raw, enc in (("\n", "%0A"), (" ", "%20"), ("+", "%2B"), ("/", "%2F"), ("=", "%3D")):
            pem = pem.replace(raw, enc)
        return pem

    value = (f'By={BY};Hash={hex_sha256(plus_leaf)};Cert="{envoy_encode(plus_leaf)}";'
             f'Chain="{envoy_encode(plus_leaf, pki.intermediate)}";Subject="{SUBJECT}";URI={CLIENT_URI}')
    assert "-----BEGIN%20CERTIFICATE-----%0A" in value and "%2B" in value
    assert xfcc_chain(value) == (plus_leaf.der, pki.intermediate.der)


def test_xfcc_chain_without_hash_is_accepted(pki):
    assert xfcc_chain(f'Cert="{quoted_pem(pki.client)}"') == (pki.client.der,)


def test_xfcc_chain_hash_only_element_names_the_envoy_setting(pki):
    value = f"By={BY};Hash={hex_sha256(pki.client)};Subject=\"{SUBJECT}\";URI={CLIENT_URI}"
    with pytest.raises(CertHeaderError, match="set_current_client_cert_details"):
        xfcc_chain(value)


def test_xfcc_chain_last_element_without_cert_is_refused_even_if_the_first_has_one(pki):
    value = f"{envoy_element(pki.other, by=OUTER_BY)},By={BY};Hash={hex_sha256(pki.client)}"
    assert xfcc_chain(value, "first") == (pki.other.der,)
    with pytest.raises(CertHeaderError, match="set_current_client_cert_details"):
        xfcc_chain(value)


@pytest.mark.parametrize("value", [
    pytest.param('Cert=""', id="empty Cert"),
    pytest.param('Chain="";Cert=""', id="empty Chain and Cert"),
    pytest.param('Cert="not a certificate"', id="Cert not PEM"),
    pytest.param('Chain="%2D%2D%2D%2D%2DBEGIN%20CERTIFICATE"', id="Chain truncated"),
    pytest.param('Cert="-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"', id="Cert bad base64"),
])
def test_xfcc_chain_unreadable_certificates(value):
    with pytest.raises(CertHeaderError):
        xfcc_chain(value)


def test_xfcc_chain_truncated_url_encoded_cert(pki):
    quoted = quoted_pem(pki.client)
    with pytest.raises(CertHeaderError):
        xfcc_chain(f'Cert="{quoted[: len(quoted) // 2]}"')


def test_xfcc_chain_bad_chain_beside_good_cert(pki):
    value = f'Cert="{quoted_pem(pki.client)}";Chain="garbage"'
    with pytest.raises(CertHeaderError, match="Chain"):
        xfcc_chain(value)


# -- hex_hash_to_x5t

def test_hex_hash_to_x5t_is_the_certificate_thumbprint(pki):
    for issued in (pki.client, pki.other, pki.intermediate):
        assert hex_hash_to_x5t(hex_sha256(issued)) == issued.thumbprint
        assert hex_hash_to_x5t(hex_sha256(issued).upper()) == issued.thumbprint


def test_hex_hash_to_x5t_from_a_parsed_envoy_header(pki):
    value = f"{envoy_element(pki.other, by=OUTER_BY)},{envoy_element(pki.client)}"
    element = parse_xfcc(value)[-1]
    assert element.hash is not None
    x5t = hex_hash_to_x5t(element.hash)
    assert x5t == pki.client.thumbprint
    assert len(x5t) == 43 and "=" not in x5t


@pytest.mark.parametrize("value", [
    pytest.param("zz" * 32, id="non-hex"),
    pytest.param("g" + "0" * 63, id="one non-hex char"),
    pytest.param("0x" + "0" * 62, id="0x prefix"),
    pytest.param(":".join(["ab"] * 32), id="colon separated"),
    pytest.param("0" * 63, id="odd length"),
    pytest.param("0" * 62, id="31 bytes"),
    pytest.param("0" * 66, id="33 bytes"),
    pytest.param("0" * 40, id="sha1 length"),
    pytest.param("", id="empty"),
    pytest.param("é" * 64, id="non-ascii"),
])
def test_hex_hash_to_x5t_refuses(value):
    with pytest.raises(CertHeaderError):
        hex_hash_to_x5t(value)


@pytest.mark.parametrize("where", ["leading", "trailing", "between bytes"])
def test_hex_hash_to_x5t_refuses_whitespace(pki, where):
    digest = hex_sha256(pki.client)
    value = {"leading": " " + digest, "trailing": digest + "\n",
             "between bytes": " ".join(digest[i:i + 2] for i in range(0, 64, 2))}[where]
    # xfcc_chain refuses this very Hash; the conversion should not turn it into a thumbprint either.
    with pytest.raises(CertHeaderError):
        xfcc_chain(f'Hash="{value}";Cert="{quoted_pem(pki.client)}"')
    with pytest.raises(CertHeaderError):
        hex_hash_to_x5t(value)


# -- RFC 9440

def test_rfc9440_leaf_only(pki):
    assert rfc9440_chain(sf_binary(pki.client.der)) == (pki.client.der,)
    assert rfc9440_chain(sf_binary(pki.client.der), None) == (pki.client.der,)
    assert rfc9440_chain(sf_binary(pki.client.der), "") == (pki.client.der,)
    assert rfc9440_chain(sf_binary(pki.client.der), "   ") == (pki.client.der,)


def test_rfc9440_with_chain(pki):
    chain = f"{sf_binary(pki.intermediate.der)}, {sf_binary(pki.root.der)}"
    assert rfc9440_chain(sf_binary(pki.client.der), chain) == (pki.client.der, pki.intermediate.der, pki.root.der)


def test_rfc9440_chain_without_space_and_with_surrounding_whitespace(pki):
    chain = f" {sf_binary(pki.intermediate.der)},{sf_binary(pki.root.der)} "
    assert rfc9440_chain(f" {sf_binary(pki.client.der)} ", chain) == (
        pki.client.der, pki.intermediate.der, pki.root.der)


@pytest.mark.parametrize("leaf", [
    pytest.param("", id="empty"),
    pytest.param("::", id="empty byte sequence"),
    pytest.param("AAAA", id="no colons"),
    pytest.param(":AAAA", id="no closing colon"),
    pytest.param("AAAA:", id="no opening colon"),
    pytest.param(":AAAA:x", id="text after"),
    pytest.param('"AAAA"', id="string not bytes"),
    pytest.param(":AA-_:", id="base64url alphabet"),
    pytest.param(":AAA:", id="bad padding"),
    pytest.param(":A===:", id="bad padding 2"),
    pytest.param(":AA==AAAA:", id="padding in the middle"),
    pytest.param(":AAAA:, :AAAA:", id="list in Client-Cert"),
    pytest.param(":" + "A" * MAX_HEADER_BYTES + ":", id="oversize"),
])
def test_rfc9440_bad_client_cert(leaf):
    with pytest.raises(CertHeaderError):
        rfc9440_chain(leaf)


@pytest.mark.parametrize("chain", [
    pytest.param("::", id="empty item"),
    pytest.param(":AAAA:, ", id="trailing comma"),
    pytest.param(":AAAA:,,:AAAA:", id="empty member"),
    pytest.param("AAAA", id="no colons"),
    pytest.param(":AAA:", id="bad base64"),
    pytest.param(":AAAA: :AAAA:", id="missing comma"),
    pytest.param(":" + "A" * MAX_HEADER_BYTES + ":", id="oversize"),
])
def test_rfc9440_bad_client_cert_chain(pki, chain):
    with pytest.raises(CertHeaderError, match="Client-Cert"):
        rfc9440_chain(sf_binary(pki.client.der), chain)


# -- nginx $ssl_client_escaped_cert

def test_nginx_escaped_leaf(pki):
    value = quoted_pem(pki.client)
    assert "\n" not in value and "%0A" in value and "%20" in value  # really escaped
    assert nginx_chain(value) == (pki.client.der,)


def test_nginx_escaped_chain_of_two(pki):
    assert nginx_chain(quoted_pem(pki.client, pki.intermediate)) == (pki.client.der, pki.intermediate.der)


def test_nginx_escaped_plus_in_body(pki, plus_leaf):
    value = quoted_pem(plus_leaf)
    assert "%2B" in value
    assert nginx_chain(value) == (plus_leaf.der,)


@pytest.mark.parametrize("value", ["", "-", "%2D%2D%2D%2D%2DBEGIN%20CERTIFICATE%2D%2D%2D%2D%2D", "A" * 70000])
def test_nginx_bad(value):
    with pytest.raises(CertHeaderError, match="nginx"):
        nginx_chain(value)


def test_nginx_truncated(pki):
    value = quoted_pem(pki.client, pki.intermediate)
    with pytest.raises(CertHeaderError):
        nginx_chain(value[: len(value) - 40])


# -- Traefik X-Forwarded-Tls-Client-Cert

def test_traefik_one_certificate(pki):
    value = traefik_value(pki.client)
    assert "BEGIN" not in value and "%0A" not in value and "\n" not in value
    assert traefik_chain(value) == (pki.client.der,)


def test_traefik_two_certificates(pki):
    value = traefik_value(pki.client, pki.intermediate)
    assert "%2C" in value
    assert traefik_chain(value) == (pki.client.der, pki.intermediate.der)


def test_traefik_unescaped_separator_and_body(pki, plus_leaf):
    bodies = ["".join(c.pem.decode().strip().splitlines()[1:-1]) for c in (plus_leaf, pki.intermediate)]
    value = urllib.parse.quote(bodies[0], safe="") + "," + urllib.parse.quote(bodies[1], safe="")
    assert traefik_chain(value) == (plus_leaf.der, pki.intermediate.der)


@pytest.mark.parametrize("value", ["", ",", " , ", "%2C", "!!!!", "AAA"])
def test_traefik_bad(value):
    with pytest.raises(CertHeaderError, match="X-Forwarded-Tls-Client-Cert"):
        traefik_chain(value)


def test_traefik_full_pem_instead_of_bodies_is_refused(pki):
    with pytest.raises(CertHeaderError):
        traefik_chain(quoted_pem(pki.client))


# -- AWS ALB X-Amzn-Mtls-Clientcert

def test_alb_leaf_with_plus_in_body(plus_leaf):
    value = alb_value(plus_leaf)
    assert "+" in value and "/" in value and "%2B" not in value
    assert "%0A" in value and "%20" in value  # newlines and spaces are encoded
    assert alb_chain(value) == (plus_leaf.der,)
    # The premise: decoding '+' as a space would have broken the certificate.
    try:
        assert pem_to_der_chain(urllib.parse.unquote_plus(value)) != (plus_leaf.der,)
    except PemError:
        pass


def test_alb_chain_of_two(pki, plus_leaf):
    assert alb_chain(alb_value(plus_leaf, pki.intermediate)) == (plus_leaf.der, pki.intermediate.der)


def test_alb_fully_encoded_also_decodes(plus_leaf):
    assert alb_chain(quoted_pem(plus_leaf)) == (plus_leaf.der,)


@pytest.mark.parametrize("value", ["", "+", "-----BEGIN%20CERTIFICATE-----%0A", "A" * 70000])
def test_alb_bad(value):
    with pytest.raises(CertHeaderError, match="X-Amzn-Mtls-Clientcert"):
        alb_chain(value)


# -- CertificateHeaders

def header_values(pki, leaf: Issued | None = None) -> dict[str, dict[str, str]]:
    """For each format: the headers its proxy sends for leaf + intermediate."""
    leaf = leaf or pki.client
    return {
        "xfcc": {"x-forwarded-client-cert": envoy_element(leaf, chain=(leaf, pki.intermediate))},
        "rfc9440": {"client-cert": sf_binary(leaf.der), "client-cert-chain": sf_binary(pki.intermediate.der)},
        "nginx": {"ssl-client-cert": quoted_pem(leaf, pki.intermediate)},
        "traefik": {"x-forwarded-tls-client-cert": traefik_value(leaf, pki.intermediate)},
        "alb": {"x-amzn-mtls-clientcert": alb_value(leaf, pki.intermediate)},
    }


def test_formats_are_the_five_documented():
    assert set(FORMATS) == {"xfcc", "rfc9440", "nginx", "traefik", "alb"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_certificate_headers_trusted_proxy_is_read(pki, fmt):
    headers = header_values(pki)[fmt]
    reader = CertificateHeaders(fmt, ["10.0.0.0/8"])
    assert reader.header == FORMATS[fmt][0]
    found = reader.read("10.1.2.3", headers)
    assert found == HeaderCertificate(chain=(pki.client.der, pki.intermediate.der))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_certificate_headers_loopback_proxy_is_read(pki, fmt):
    found = CertificateHeaders(fmt, ["127.0.0.1/32"]).read("127.0.0.1", header_values(pki)[fmt])
    assert found.chain == (pki.client.der, pki.intermediate.der)
    assert found.error is None and not found.untrusted


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("peer", ["10.1.2.3", "127.0.0.2", "192.168.0.1", "::1", "", "not-an-ip",
                                  "127.0.0.1:4567", "unix:/run/proxy.sock"])
def test_certificate_headers_untrusted_peer_is_ignored(pki, fmt, peer):
    reader = CertificateHeaders(fmt, ["127.0.0.1/32"])
    found = reader.read(peer, header_values(pki)[fmt])
    assert found == HeaderCertificate(untrusted=True)
    assert found.chain == () and found.error is None


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_certificate_headers_absent_header(pki, fmt):
    reader = CertificateHeaders(fmt, ["10.0.0.0/8"])
    assert reader.read("10.1.2.3", {"host": "api.test"}) == HeaderCertificate()
    assert reader.read("192.0.2.1", {}) == HeaderCertificate()  # absent from an untrusted peer: nothing to count


def test_certificate_headers_rfc9440_chain_header_alone_is_absent(pki):
    reader = CertificateHeaders("rfc9440", ["10.0.0.0/8"])
    assert reader.read("10.1.2.3", {"client-cert-chain": sf_binary(pki.intermediate.der)}) == HeaderCertificate()


def test_certificate_headers_rfc9440_without_chain_header(pki):
    reader = CertificateHeaders("rfc9440", ["10.0.0.0/8"])
    assert reader.read("10.1.2.3", {"client-cert": sf_binary(pki.client.der)}).chain == (pki.client.der,)


@pytest.mark.parametrize(("fmt", "name", "value"), [
    ("xfcc", "x-forwarded-client-cert", "By=a;Hash"),
    ("xfcc", "x-forwarded-client-cert", "By=spiffe://x;Hash=00"),
    ("rfc9440", "client-cert", "AAAA"),
    ("nginx", "ssl-client-cert", "garbage"),
    ("traefik", "x-forwarded-tls-client-cert", ""),
    ("alb", "x-amzn-mtls-clientcert", "-----BEGIN%20CERTIFICATE-----"),
])
def test_certificate_headers_broken_header_from_trusted_peer_is_an_error(fmt, name, value):
    reader = CertificateHeaders(fmt, ["10.0.0.0/8"])
    found = reader.read("10.1.2.3", {name: value})
    assert found.chain == ()
    assert found.untrusted is False
    assert found.error
    # The same broken header from anyone else is not parsed at all.
    assert reader.read("192.0.2.1", {name: value}) == HeaderCertificate(untrusted=True)


def test_certificate_headers_broken_rfc9440_chain_is_an_error(pki):
    reader = CertificateHeaders("rfc9440", ["10.0.0.0/8"])
    found = reader.read("10.1.2.3", {"client-cert": sf_binary(pki.client.der), "client-cert-chain": ":AAA:"})
    assert found.chain == () and found.error and "Client-Cert-Chain" in found.error


def test_certificate_headers_xfcc_hash_mismatch_is_an_error(pki):
    reader = CertificateHeaders("xfcc", ["10.0.0.0/8"])
    found = reader.read("10.1.2.3", {"x-forwarded-client-cert": envoy_element(pki.client, hash_of=pki.admin)})
    assert found.chain == () and found.error is not None and "Hash" in found.error


@pytest.mark.parametrize(("fmt", "value_key"), [
    ("nginx", "ssl-client-cert"),
    ("xfcc", "x-forwarded-client-cert"),
    ("traefik", "x-forwarded-tls-client-cert"),
    ("alb", "x-amzn-mtls-clientcert"),
])
def test_certificate_headers_custom_header_name(pki, fmt, value_key):
    value = header_values(pki)[fmt][value_key]
    reader = CertificateHeaders(fmt, ["10.0.0.0/8"], header="X-SSL-Cert")
    assert reader.header == "x-ssl-cert"
    assert reader.read("10.1.2.3", {"x-ssl-cert": value}).chain == (pki.client.der, pki.intermediate.der)
    # The default name is no longer read.
    assert reader.read("10.1.2.3", {value_key: value}) == HeaderCertificate()
    assert reader.read("192.0.2.1", {"x-ssl-cert": value}) == HeaderCertificate(untrusted=True)


def test_certificate_headers_custom_header_name_rfc9440_reads_its_chain_header(pki):
    reader = CertificateHeaders("rfc9440", ["10.0.0.0/8"], header="x-client-cert")
    headers = {"x-client-cert": sf_binary(pki.client.der), "x-client-cert-chain": sf_binary(pki.intermediate.der),
               "client-cert-chain": sf_binary(pki.root.der)}
    assert reader.read("10.1.2.3", headers).chain == (pki.client.der, pki.intermediate.der)


def test_certificate_headers_xfcc_element_choice(pki):
    value = f"{envoy_element(pki.other, by=OUTER_BY)},{envoy_element(pki.client)}"
    headers = {"x-forwarded-client-cert": value}
    assert CertificateHeaders("xfcc", ["10.0.0.0/8"]).read("10.1.2.3", headers).chain == (pki.client.der,)
    last = CertificateHeaders("xfcc", ["10.0.0.0/8"], xfcc_element="last")
    assert last.read("10.1.2.3", headers).chain == (pki.client.der,)
    first = CertificateHeaders("xfcc", ["10.0.0.0/8"], xfcc_element="first")
    assert first.read("10.1.2.3", headers).chain == (pki.other.der,)


def test_certificate_headers_ipv6_networks(pki):
    headers = header_values(pki)["nginx"]
    reader = CertificateHeaders("nginx", ["2001:db8:1::/48", "::1/128"])
    assert reader.read("2001:db8:1::17", headers).chain == (pki.client.der, pki.intermediate.der)
    assert reader.read("::1", headers).chain == (pki.client.der, pki.intermediate.der)
    assert reader.read("2001:db8:2::17", headers) == HeaderCertificate(untrusted=True)
    assert reader.read("127.0.0.1", headers) == HeaderCertificate(untrusted=True)


def test_certificate_headers_mixed_networks_and_host_bits(pki):
    reader = CertificateHeaders("nginx", ["10.1.2.3/8", "192.0.2.7", "fd00::/8"])
    assert reader.trusts("10.200.0.1")
    assert reader.trusts("192.0.2.7")
    assert not reader.trusts("192.0.2.8")
    assert reader.trusts("fd12::1")
    assert not reader.trusts("fe80::1")


@pytest.mark.parametrize("peer", ["", "not-an-ip", "10.1.2.3:443", "[10.1.2.3]", "10.1.2", "10.1.2.3.4",
                                  "2001:db8::1::2", "localhost", " 10.1.2.3x"])
def test_certificate_headers_unparseable_peer_is_untrusted(pki, peer):
    reader = CertificateHeaders("nginx", ["0.0.0.0/0", "::/0"])
    assert not reader.trusts(peer)
    assert reader.read(peer, header_values(pki)["nginx"]) == HeaderCertificate(untrusted=True)


def test_certificate_headers_no_trusted_proxies_trusts_nobody(pki):
    reader = CertificateHeaders("nginx", [])
    assert not reader.trusts("127.0.0.1")
    assert reader.read("127.0.0.1", header_values(pki)["nginx"]) == HeaderCertificate(untrusted=True)


@pytest.mark.parametrize("fmt", ["", "XFCC", "envoy", "haproxy", "rfc-9440"])
def test_certificate_headers_unknown_format(fmt):
    with pytest.raises(ValueError, match="unknown certificate header format"):
        CertificateHeaders(fmt, ["127.0.0.1/32"])


def test_certificate_headers_bad_network_is_a_value_error():
    with pytest.raises(ValueError):
        CertificateHeaders("nginx", ["not-a-network"])


# -- robustness: arbitrary text gives a chain or CertHeaderError, nothing else

def _fragments(pki) -> list[str]:
    q_client = quoted_pem(pki.client)
    q_chain = quoted_pem(pki.client, pki.intermediate)
    return [
        "By=", "Hash=", "Cert=", "Chain=", "Subject=", "URI=", "DNS=", "cert=", "HASH=", "SAN=",
        ";", ",", "=", '"', "\\", '\\"', " ", "\t", ":", "%", "%2", "%2D", "%0A", "+", "/", "==",
        BY, hex_sha256(pki.client), hex_sha256(pki.other), q_client, q_chain, q_client[:100], q_chain[-100:],
        f'"{q_client}"', f'"{q_chain}"', sf_binary(pki.client.der), sf_binary(b""), "::",
        traefik_value(pki.client), alb_value(pki.client), "-----BEGIN CERTIFICATE-----\n",
        "-----END CERTIFICATE-----\n", "MIIB", "AAAA", "é", "\x00", "\r\n",
    ]


def _values(data, pki) -> str:
    return data.draw(st.one_of(
        st.text(max_size=200),
        st.text(alphabet='=;,"\\ \tabcHCByURIDNS%:+/-', max_size=80),
        st.lists(st.sampled_from(_fragments(pki)), max_size=12).map("".join),
    ))


PARSERS = {
    "parse_xfcc": parse_xfcc,
    "xfcc_chain": xfcc_chain,
    "xfcc_chain_first": lambda v: xfcc_chain(v, "first"),
    "nginx_chain": nginx_chain,
    "traefik_chain": traefik_chain,
    "alb_chain": alb_chain,
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_parsers_never_raise_anything_but_cert_header_error(pki, name, data):
    value = _values(data, pki)
    try:
        result = PARSERS[name](value)
    except CertHeaderError:
        return
    if name == "parse_xfcc":
        assert result and all(isinstance(e, XfccElement) for e in result)
    else:
        assert isinstance(result, tuple) and result and all(isinstance(d, bytes) and d for d in result)


@FUZZ
@given(data=st.data())
def test_rfc9440_never_raises_anything_but_cert_header_error(pki, data):
    leaf = _values(data, pki)
    chain = data.draw(st.one_of(st.none(), st.just(""), st.text(max_size=200),
                                st.lists(st.sampled_from(_fragments(pki)), max_size=8).map("".join)))
    try:
        result = rfc9440_chain(leaf, chain)
    except CertHeaderError:
        return
    assert isinstance(result, tuple) and result and all(isinstance(d, bytes) and d for d in result)


@FUZZ
@given(data=st.data())
def test_hex_hash_to_x5t_never_raises_anything_but_cert_header_error(data):
    value = data.draw(st.one_of(st.text(max_size=80), st.text(alphabet="0123456789abcdefABCDEF", max_size=80)))
    try:
        x5t = hex_hash_to_x5t(value)
    except CertHeaderError:
        return
    assert base64.urlsafe_b64decode(x5t + "=") == bytes.fromhex(value)



def test_an_ipv4_client_on_a_dual_stack_listener_is_matched_by_its_ipv4_network(pki):
    headers = CertificateHeaders("nginx", ["10.0.0.0/8"])
    value = urllib.parse.quote(pki.client.pem.decode(), safe="")
    assert headers.read("::ffff:10.1.2.3", {"ssl-client-cert": value}).chain == (pki.client.der,)
    assert headers.read("::ffff:192.0.2.1", {"ssl-client-cert": value}).untrusted



def test_xfcc_by_requires_the_element_to_be_the_proxys_own(pki):
    cert = urllib.parse.quote(pki.client.pem.decode(), safe="")
    proxy = "spiffe://example.org/gateway"
    ours = f'By={proxy};Cert="{cert}"'
    forged = f'By=spiffe://example.org/client;Cert="{cert}"'
    assert xfcc_chain(ours, by=proxy) == (pki.client.der,)
    with pytest.raises(CertHeaderError, match="not written by"):
        xfcc_chain(forged, by=proxy)
    with pytest.raises(CertHeaderError):
        xfcc_chain(f'Cert="{cert}"', by=proxy)
    headers = CertificateHeaders("xfcc", ["127.0.0.1/32"], xfcc_by=proxy)
    assert headers.read("127.0.0.1", {"x-forwarded-client-cert": forged}).error
