"""pdp.certificates.pem.pem_to_der_chain: PEM text in, DER certificates out (leaf first), or PemError."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.certificates.pem import MAX_CHAIN_BYTES, MAX_CHAIN_LENGTH, PemError, pem_to_der_chain
from pdp.devpki import Issued, make_ca, make_client

FUZZ = settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def certs() -> tuple[Issued, Issued, Issued]:
    root = make_ca("pem root")
    inter = make_ca("pem intermediate", issuer=root, path_length=0)
    leaf = make_client(inter)
    return leaf, inter, root


def _block(label: str, body: bytes, eol: str = "\n") -> str:
    """A PEM block with a 64-column base64 body."""
    b64 = base64.b64encode(body).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return eol.join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + eol


# -- well-formed input

def test_single_certificate_bytes(certs):
    leaf, _, _ = certs
    chain = pem_to_der_chain(leaf.pem)
    assert chain == (leaf.der,)
    assert isinstance(chain, tuple)
    assert x509.load_der_x509_certificate(chain[0]) == leaf.cert


def test_single_certificate_str(certs):
    leaf, _, _ = certs
    assert pem_to_der_chain(leaf.pem.decode("ascii")) == (leaf.der,)


def test_several_certificates_keep_their_order(certs):
    leaf, inter, root = certs
    assert pem_to_der_chain(leaf.pem + inter.pem + root.pem) == (leaf.der, inter.der, root.der)
    assert pem_to_der_chain(root.pem + leaf.pem) == (root.der, leaf.der)


def test_crlf_line_endings(certs):
    leaf, inter, _ = certs
    text = (leaf.pem + inter.pem).replace(b"\n", b"\r\n")
    assert b"\r\n" in text
    assert pem_to_der_chain(text) == (leaf.der, inter.der)


def test_text_around_and_between_blocks_is_ignored(certs):
    # RFC 7468 §2: explanatory text outside the encapsulation boundaries is allowed.
    leaf, inter, _ = certs
    text = b"subject=CN=demo client\n" + leaf.pem + b"\nissuer: intermediate\n\n" + inter.pem + b"trailer\n"
    assert pem_to_der_chain(text) == (leaf.der, inter.der)


def test_body_on_one_line_and_unwrapped(certs):
    leaf, _, _ = certs
    b64 = base64.b64encode(leaf.der)
    text = b"-----BEGIN CERTIFICATE-----\n" + b64 + b"\n-----END CERTIFICATE-----\n"
    assert pem_to_der_chain(text) == (leaf.der,)
    # no newline after the header and none before the footer
    text = b"-----BEGIN CERTIFICATE-----" + b64 + b"-----END CERTIFICATE-----"
    assert pem_to_der_chain(text) == (leaf.der,)


def test_exactly_max_chain_length_is_accepted(certs):
    leaf, _, _ = certs
    assert pem_to_der_chain(leaf.pem * MAX_CHAIN_LENGTH) == (leaf.der,) * MAX_CHAIN_LENGTH


# -- refused input

@pytest.mark.parametrize("data", [
    b"",
    "",
    b"hello world",
    "just some text\n",
    b"\x00\xff\xfe garbage \x80",
    b"MIIBszCCAVmgAwIBAgIU",  # base64 without armour
    b"-----BEGIN CERTIFICATE-----",
    b"-----END CERTIFICATE-----\n",
], ids=["empty-bytes", "empty-str", "text", "text-str", "binary", "bare-base64", "lone-begin", "lone-end"])
def test_garbage_is_refused(data):
    with pytest.raises(PemError):
        pem_to_der_chain(data)


def test_der_is_not_pem(certs):
    leaf, _, _ = certs
    with pytest.raises(PemError):
        pem_to_der_chain(leaf.der)


def test_truncated_missing_end_line(certs):
    leaf, _, _ = certs
    text = leaf.pem.replace(b"-----END CERTIFICATE-----\n", b"")
    assert b"-----END" not in text
    with pytest.raises(PemError):
        pem_to_der_chain(text)


def test_truncated_last_block_of_a_chain(certs):
    # A complete first block must not hide a second one that never ends.
    leaf, inter, _ = certs
    truncated = inter.pem[: len(inter.pem) // 2]
    with pytest.raises(PemError, match="truncated or unbalanced"):
        pem_to_der_chain(leaf.pem + truncated)


def test_truncated_first_block_of_a_chain(certs):
    leaf, inter, _ = certs
    truncated = leaf.pem.replace(b"-----END CERTIFICATE-----\n", b"")
    with pytest.raises(PemError):
        pem_to_der_chain(truncated + inter.pem)


def test_mismatched_begin_and_end_labels(certs):
    leaf, _, _ = certs
    text = leaf.pem.replace(b"-----END CERTIFICATE-----", b"-----END PRIVATE KEY-----")
    with pytest.raises(PemError):
        pem_to_der_chain(text)


def test_nested_begin_inside_a_block(certs):
    leaf, _, _ = certs
    body = leaf.pem.split(b"\n", 1)[1]  # without its BEGIN line
    text = b"-----BEGIN CERTIFICATE-----\n" + b"-----BEGIN CERTIFICATE-----\n" + body
    with pytest.raises(PemError):
        pem_to_der_chain(text)


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_private_key_block_is_refused(certs, fmt):
    leaf, _, _ = certs
    key_pem = leaf.key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    assert b"PRIVATE KEY" in key_pem
    with pytest.raises(PemError, match="PRIVATE KEY"):
        pem_to_der_chain(key_pem)
    # also after a valid certificate, and before one
    with pytest.raises(PemError, match="PRIVATE KEY"):
        pem_to_der_chain(leaf.pem + key_pem)
    with pytest.raises(PemError, match="PRIVATE KEY"):
        pem_to_der_chain(key_pem + leaf.pem)


@pytest.mark.parametrize("label", ["PUBLIC KEY", "X509 CRL", "CERTIFICATE REQUEST", "TRUSTED CERTIFICATE"])
def test_other_block_types_are_refused(certs, label):
    leaf, _, _ = certs
    with pytest.raises(PemError, match="unexpected PEM block"):
        pem_to_der_chain(_block(label, leaf.der))


@pytest.mark.parametrize("body", [
    b"MIIB!!!!\n",          # '!' is not base64
    b"MIIB-_AA\n",          # base64url alphabet is not PEM's
    b"MII\x00BAA==\n",      # NUL byte
    b"\xc3\xa9AAA\n",       # non-ASCII
], ids=["bang", "base64url", "nul", "non-ascii"])
def test_body_outside_the_base64_alphabet(body):
    text = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
    # A "-" in the body ends the block early, so base64url bodies read as a block with no END.
    with pytest.raises(PemError, match=r"not base64|no PEM certificate"):
        pem_to_der_chain(text)


@pytest.mark.parametrize("body", [
    b"A\n",            # impossible length
    b"AAAAA\n",        # not a multiple of four
    b"AA=A\n",         # padding in the middle
    b"=AAA\n",         # padding first
    b"AA==\nAA==\n",   # padded lines glued together (data after padding)
], ids=["one-char", "five-chars", "inner-padding", "leading-padding", "data-after-padding"])
def test_invalid_base64_body(body):
    text = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
    with pytest.raises(PemError, match="base64"):
        pem_to_der_chain(text)


@pytest.mark.parametrize("body", [b"", b"\n", b"\r\n", b"   \n\t\n"], ids=["nothing", "lf", "crlf", "blanks"])
def test_empty_body(body):
    text = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
    with pytest.raises(PemError, match="empty"):
        pem_to_der_chain(text)


def test_empty_body_after_a_valid_certificate(certs):
    leaf, _, _ = certs
    with pytest.raises(PemError, match="empty"):
        pem_to_der_chain(leaf.pem + b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")


def test_oversize_input_is_refused_before_parsing(certs):
    leaf, _, _ = certs
    # A valid certificate followed by enough padding to go one byte over the limit.
    data = leaf.pem + b"\n" * (MAX_CHAIN_BYTES + 1 - len(leaf.pem))
    assert len(data) == MAX_CHAIN_BYTES + 1
    with pytest.raises(PemError, match="larger than"):
        pem_to_der_chain(data)
    with pytest.raises(PemError, match="larger than"):
        pem_to_der_chain(data.decode("ascii"))
    # one byte less is fine
    assert pem_to_der_chain(data[:-1]) == (leaf.der,)


def test_oversize_str_is_measured_after_encoding(certs):
    leaf, _, _ = certs
    text = leaf.pem.decode("ascii") + " " * (MAX_CHAIN_BYTES + 1 - len(leaf.pem))
    with pytest.raises(PemError, match="larger than"):
        pem_to_der_chain(text)


def test_more_than_max_chain_length_certificates(certs):
    leaf, _, _ = certs
    data = leaf.pem * (MAX_CHAIN_LENGTH + 1)
    assert len(data) <= MAX_CHAIN_BYTES  # refused for the count, not the size
    with pytest.raises(PemError, match=f"more than {MAX_CHAIN_LENGTH}"):
        pem_to_der_chain(data)


def test_non_ascii_text_is_refused_not_crashed():
    with pytest.raises(PemError):
        pem_to_der_chain("-----BEGIN CERTIFICATE-----\nAAéA\n-----END CERTIFICATE-----\n")
    with pytest.raises(PemError):
        pem_to_der_chain("\ud800 lone surrogate")


# -- property: a tuple of non-empty bytes, or PemError, for any input

def _check_contract(data: bytes | str) -> None:
    try:
        result = pem_to_der_chain(data)
    except PemError:
        return
    assert isinstance(result, tuple)
    assert 1 <= len(result) <= MAX_CHAIN_LENGTH
    assert all(isinstance(der, bytes) and der for der in result)


@FUZZ
@given(st.text())
def test_any_text_gives_chain_or_pem_error(data):
    _check_contract(data)


@FUZZ
@given(st.binary())
def test_any_bytes_gives_chain_or_pem_error(data):
    _check_contract(data)


_FRAGMENTS = st.sampled_from([
    "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----", "-----BEGIN PRIVATE KEY-----",
    "-----END PRIVATE KEY-----", "-----BEGIN ", "-----END ", "-----", "CERTIFICATE", "\n", "\r\n", "\r", " ",
    "\t", "=", "==", "AAAA", "MIIB", "QUJD", "+/", "A", "-", "_", "é", "\x00", "\ud800",
])


@FUZZ
@given(st.lists(_FRAGMENTS | st.text(max_size=8), max_size=40))
def test_pem_like_text_gives_chain_or_pem_error(parts):
    text = "".join(parts)
    _check_contract(text)
    _check_contract(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=MAX_CHAIN_LENGTH),
       st.sampled_from(["\n", "\r\n"]))
def test_well_formed_blocks_round_trip(bodies, eol):
    text = "".join(_block("CERTIFICATE", b, eol) for b in bodies)
    assert pem_to_der_chain(text) == tuple(bodies)
