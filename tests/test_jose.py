"""pdp.credentials.jose: strict unpadded base64url (RFC 7515 §2, RFC 4648 §5) and strict JSON objects
(RFC 7515 §5.2, RFC 8259)."""

from __future__ import annotations

import base64
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.credentials.jose import DecodeError, b64url_decode, b64url_encode, json_object

HYPOTHESIS = settings(database=None, suppress_health_check=[HealthCheck.too_slow], deadline=None)

B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# -- base64url: what is accepted


@pytest.mark.parametrize(("text", "raw"), [
    ("", b""),
    ("Zg", b"f"),
    ("Zm8", b"fo"),
    ("Zm9v", b"foo"),
    ("Zm9vYg", b"foob"),
    ("-_8", b"\xfb\xff"),
    ("-_-_", b"\xfb\xff\xbf"),
    ("AAAA", b"\x00\x00\x00"),
])
def test_b64url_decode_accepts_canonical_unpadded_base64url(text: str, raw: bytes) -> None:
    assert b64url_decode(text) == raw


def test_b64url_encode_uses_the_url_alphabet_and_no_padding() -> None:
    assert b64url_encode(b"\xfb\xff\xbf") == "-_-_"
    assert b64url_encode(b"\xfb\xff") == "-_8"
    assert b64url_encode(b"f") == "Zg"
    assert "=" not in b64url_encode(bytes(range(256)))


def test_decode_error_is_a_value_error() -> None:
    # Callers that catch ValueError (as pdp.credentials.jws does via DecodeError) must see it.
    assert issubclass(DecodeError, ValueError)


# -- base64url: what is refused


@pytest.mark.parametrize("text", ["Zg==", "Zg=", "Zm8=", "Zm9vYg==", "Zm9v=", "Zm9v====", "===="])
def test_b64url_decode_rejects_padding(text: str) -> None:
    with pytest.raises(DecodeError):
        b64url_decode(text)


@pytest.mark.parametrize("text", [
    "Zm9v+w",        # standard-alphabet '+'
    "Zm9v/w",        # standard-alphabet '/'
    " Zm9v",         # leading space
    "Zm9v ",         # trailing space
    "Zm9v\n",        # trailing newline (a `$`-anchored regex would let this through)
    "Zm\n9v",        # embedded newline (the stdlib decoder skips it)
    "Zm 9v",
    "Zm9v.",
    "Zm9v\x00",
    "Zm\t9v",
    "Zm\u0663v",     # ARABIC-INDIC DIGIT THREE: a Unicode digit, not ASCII
    "\uff3am9v",     # FULLWIDTH LATIN CAPITAL LETTER Z
    "Zm9\u00e9",
])
def test_b64url_decode_rejects_foreign_characters(text: str) -> None:
    with pytest.raises(DecodeError):
        b64url_decode(text)


@pytest.mark.parametrize("text", ["Z", "A", "Zm9vZ", "Zm9vYmFyZ", "AAAAA"])
def test_b64url_decode_rejects_impossible_length(text: str) -> None:
    assert len(text) % 4 == 1
    with pytest.raises(DecodeError):
        b64url_decode(text)


@pytest.mark.parametrize("text", [
    "Zh", "Zj", "Zv",      # one byte: the last character carries 4 stray bits
    "Zm9", "Zm-", "Zm_",   # two bytes: the last character carries 2 stray bits
    "AB", "AAB",
])
def test_b64url_decode_rejects_non_canonical_trailing_bits(text: str) -> None:
    # The stdlib decoder accepts these and silently drops the bits; a strict decoder may not,
    # or one token would have several encodings (and several cache keys).
    base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # proves the lenient decoder takes it
    with pytest.raises(DecodeError):
        b64url_decode(text)


@pytest.mark.parametrize(("length", "stray_bits"), [(1, 4), (2, 2)])
def test_only_final_characters_without_stray_bits_decode(length: int, stray_bits: int) -> None:
    # Of the 64 possible final characters, exactly those whose low ``stray_bits`` bits are zero decode,
    # and each of them to a different value.
    prefix = b64url_encode(b"\x5a" * length)[:-1]
    accepted = {}
    for value, char in enumerate(B64URL_ALPHABET):
        try:
            accepted[char] = b64url_decode(prefix + char)
        except DecodeError:
            assert value % (1 << stray_bits) != 0, char
            continue
        assert value % (1 << stray_bits) == 0, char
    assert len(accepted) == 64 >> stray_bits
    assert len(set(accepted.values())) == len(accepted)


# -- base64url: properties


_B64ISH = st.text(alphabet=B64URL_ALPHABET + "=+/ \n.", max_size=40)


@HYPOTHESIS
@given(st.one_of(st.text(max_size=60), _B64ISH))
def test_b64url_decode_returns_round_tripping_bytes_or_raises_decode_error(text: str) -> None:
    try:
        raw = b64url_decode(text)
    except DecodeError:
        return
    assert isinstance(raw, bytes)
    assert b64url_encode(raw) == text


@HYPOTHESIS
@given(st.binary(max_size=200))
def test_b64url_encode_then_decode_is_identity(raw: bytes) -> None:
    text = b64url_encode(raw)
    assert set(text) <= set(B64URL_ALPHABET)
    assert b64url_decode(text) == raw


# -- JSON objects: what is accepted


def test_json_object_parses_bytes_and_str() -> None:
    assert json_object(b'{"a": 1, "b": [1, 2, {"c": null}]}') == {"a": 1, "b": [1, 2, {"c": None}]}
    assert json_object('{"sub": "caf\\u00e9"}') == {"sub": "caf\u00e9"}
    assert json_object('{"sub": "café"}'.encode()) == {"sub": "caf\u00e9"}


def test_json_object_allows_the_same_name_in_different_objects() -> None:
    assert json_object(b'{"a": {"x": 1}, "b": {"x": 2}}') == {"a": {"x": 1}, "b": {"x": 2}}


# -- JSON objects: what is refused


@pytest.mark.parametrize("data", [
    b'{"a": 1, "a": 2}',
    b'{"a": 1, "a": 1}',                           # even with the same value
    b'{"sub": "alice", "sub": "admin"}',
    b'{"x": {"a": 1, "a": 2}}',                    # nested
    b'{"x": [{"a": 1, "a": 2}]}',                  # inside an array
    b'{"sub": "alice", "\\u0073ub": "admin"}',     # the same name, spelt with an escape
])
def test_json_object_rejects_duplicate_members(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


@pytest.mark.parametrize("data", [
    b'{"exp": NaN}', b'{"exp": Infinity}', b'{"exp": -Infinity}', b'{"a": [1, NaN]}',
])
def test_json_object_rejects_nan_and_infinity(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


@pytest.mark.parametrize("data", [b'{"exp": 1e400}', b'{"nbf": -1e400}'])
def test_json_object_rejects_numbers_that_overflow_to_infinity(data: bytes) -> None:
    try:
        value = json_object(data)
    except DecodeError:
        return
    # Whatever it returns must still be finite JSON.
    assert all(math.isfinite(v) for v in value.values()), value


@pytest.mark.parametrize("data", [b"[]", b"[1, 2]", b"1", b'"s"', b"null", b"true", b"false", b"1.5"])
def test_json_object_rejects_non_object_values(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


@pytest.mark.parametrize("data", [
    b'{"a": "\xff"}',                  # 0xFF never occurs in UTF-8
    b'{"a": "\xc0\xaf"}',              # overlong encoding of '/'
    b'{"a": "\xe2\x82"}',              # truncated sequence
    b'{"\x80": 1}',                    # lone continuation byte in a name
])
def test_json_object_rejects_invalid_utf8(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


@pytest.mark.parametrize("data", [
    '{"sub": "alice"}'.encode("utf-16-le"),
    '{"sub": "alice"}'.encode("utf-16-be"),
    '{"sub": "alice"}'.encode("utf-16"),
    '{"sub": "alice"}'.encode("utf-32"),
    b'{"sub": "\xed\xa0\x80"}',     # a UTF-16 surrogate encoded as if UTF-8 (CESU-8 style): ill-formed UTF-8
], ids=["utf-16-le", "utf-16-be", "utf-16-bom", "utf-32-bom", "encoded-surrogate"])
def test_json_object_rejects_json_that_is_not_utf8(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


@pytest.mark.parametrize("data", [
    b"", b" ", b"{", b"}", b"{'a': 1}", b'{"a": 1}x', b"{}{}", b'{"a": 1,}', b'{a: 1}', b'{"a": undefined}',
    b'{"a": 01}', b"\x00",
])
def test_json_object_rejects_text_that_is_not_json(data: bytes) -> None:
    with pytest.raises(DecodeError):
        json_object(data)


def test_json_object_rejects_deep_nesting_as_decode_error() -> None:
    # A RecursionError escaping the parser would be an internal error, not a refusal.
    depth = 200_000
    with pytest.raises(DecodeError):
        json_object(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")


# -- JSON objects: properties


_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10) \
    | st.floats(allow_nan=False, allow_infinity=False)
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@HYPOTHESIS
@given(st.one_of(st.binary(max_size=80), st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_json_object_returns_a_dict_or_raises_decode_error_on_arbitrary_bytes(data: bytes) -> None:
    try:
        value = json_object(data)
    except DecodeError:
        return
    assert isinstance(value, dict)


@HYPOTHESIS
@given(st.text(max_size=80))
def test_json_object_returns_a_dict_or_raises_decode_error_on_arbitrary_text(data: str) -> None:
    try:
        value = json_object(data)
    except DecodeError:
        return
    assert isinstance(value, dict)


@HYPOTHESIS
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=5))
def test_json_object_round_trips_any_json_object(obj: dict[str, object]) -> None:
    assert json_object(json.dumps(obj).encode()) == obj
    assert json_object(json.dumps(obj, ensure_ascii=False).encode("utf-8")) == obj
