"""pdp.certificates.spiffe: SPIFFE IDs per the SPIFFE ID standard §2."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.certificates.spiffe import MAX_LENGTH, SpiffeId, SpiffeIdError, is_spiffe_uri, parse_spiffe_id

FUZZ = settings(max_examples=300, database=None, deadline=None)

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEGMENT_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize(("uri", "domain", "path"), [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/demo/client", "example.org", "/demo/client"),
    ("spiffe://example.org/a", "example.org", "/a"),
    ("spiffe://prod-1.example_corp.org/ns/default/sa/Web-Frontend", "prod-1.example_corp.org",
     "/ns/default/sa/Web-Frontend"),
    ("spiffe://example.org/a.b/c-d/e_f/...", "example.org", "/a.b/c-d/e_f/..."),  # only "." and ".." are banned
    ("spiffe://example.org/.hidden/..x", "example.org", "/.hidden/..x"),
    ("spiffe://0/1", "0", "/1"),
    ("spiffe://a_b-c.d/UPPER/lower/123", "a_b-c.d", "/UPPER/lower/123"),
])
def test_valid_ids(uri, domain, path):
    sid = parse_spiffe_id(uri)
    assert sid == SpiffeId(domain, path)
    assert sid.trust_domain == domain
    assert sid.path == path
    assert str(sid) == uri


@pytest.mark.parametrize("uri", [
    # scheme
    "", "spiffe:", "spiffe:/", "spiffe:/example.org/a", "http://example.org/a", "https://example.org/a",
    "SPIFFE://example.org/a", "Spiffe://example.org/a", "spiffe//example.org/a", " spiffe://example.org/a",
    "urn:spiffe:example.org:a", "example.org/a",
    # trust domain
    "spiffe://", "spiffe:///a", "spiffe://Example.org/a", "spiffe://EXAMPLE.ORG", "spiffe://example.org:8443/a",
    "spiffe://example.org:/a", "spiffe://user@example.org/a", "spiffe://user:pw@example.org/a",
    "spiffe://exa mple.org/a", "spiffe://exämple.org/a", "spiffe://example%2Eorg/a", "spiffe://[::1]/a",
    "spiffe://example.org?x=1", "spiffe://example.org#frag", "spiffe://example.org\n",
    # path
    "spiffe://example.org/", "spiffe://example.org/a/", "spiffe://example.org//a", "spiffe://example.org/a//b",
    "spiffe://example.org/.", "spiffe://example.org/..", "spiffe://example.org/a/./b", "spiffe://example.org/a/../b",
    "spiffe://example.org/a?x=1", "spiffe://example.org/a?", "spiffe://example.org/a#frag", "spiffe://example.org/a#",
    "spiffe://example.org/a%20b", "spiffe://example.org/%41", "spiffe://example.org/a b", "spiffe://example.org/ä",
    "spiffe://example.org/a:b", "spiffe://example.org/a@b", "spiffe://example.org/a+b", "spiffe://example.org/a~b",
    "spiffe://example.org/a\\b", "spiffe://example.org/a\n", "spiffe://example.org/a\x00",
])
def test_invalid_ids(uri):
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(uri)


def test_spiffe_id_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_spiffe_id("spiffe://Example.org")


def test_length_limit_is_2048_bytes():
    prefix = "spiffe://example.org/"
    exactly = prefix + "a" * (MAX_LENGTH - len(prefix))
    assert MAX_LENGTH == 2048
    assert len(exactly.encode()) == 2048
    assert str(parse_spiffe_id(exactly)) == exactly
    with pytest.raises(SpiffeIdError, match="2048"):
        parse_spiffe_id(exactly + "a")


def test_length_limit_counts_bytes_not_characters():
    # 1000 two-byte characters: far below 2048 characters, above 2048 bytes. Refused either way,
    # but for the length (bytes), before the character check.
    uri = "spiffe://example.org/" + "é" * 1100
    assert len(uri) < 2048 < len(uri.encode("utf-8"))
    with pytest.raises(SpiffeIdError, match="2048"):
        parse_spiffe_id(uri)


def test_long_trust_domain_and_many_segments_within_limit():
    uri = "spiffe://" + "d" * 200 + "".join(f"/s{i}" for i in range(300))
    assert len(uri) <= MAX_LENGTH
    sid = parse_spiffe_id(uri)
    assert sid.trust_domain == "d" * 200
    assert str(sid) == uri


def test_spiffe_id_is_frozen_and_hashable():
    sid = parse_spiffe_id("spiffe://example.org/a")
    assert {sid: 1}[SpiffeId("example.org", "/a")] == 1
    with pytest.raises(AttributeError):
        sid.path = "/b"  # type: ignore[misc]


@pytest.mark.parametrize(("uri", "expected"), [
    ("spiffe://example.org/a", True),
    ("SPIFFE://example.org/a", True),   # looks like one (and is then refused by parse_spiffe_id)
    ("spiffe://", True),
    ("https://example.org", False),
    ("spiffe:/example.org", False),
    ("", False),
])
def test_is_spiffe_uri(uri, expected):
    assert is_spiffe_uri(uri) is expected


# -- properties

def _check(uri: str) -> None:
    try:
        sid = parse_spiffe_id(uri)
    except SpiffeIdError:
        return
    assert isinstance(sid, SpiffeId)
    assert str(sid) == uri
    assert parse_spiffe_id(str(sid)) == sid
    assert len(uri.encode("utf-8")) <= MAX_LENGTH


@FUZZ
@given(st.text())
def test_any_string_parses_and_round_trips_or_raises(uri):
    _check(uri)


@FUZZ
@given(st.text(alphabet=SEGMENT_CHARS + "/:@?#%.[] \n", max_size=60))
def test_spiffe_prefixed_strings_parse_and_round_trip_or_raise(rest):
    _check("spiffe://" + rest)


_DOMAIN = st.text(alphabet=TD_CHARS, min_size=1, max_size=40)
_SEGMENT = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@FUZZ
@given(_DOMAIN, st.lists(_SEGMENT, max_size=10))
def test_every_valid_id_is_accepted(domain, segments):
    path = "".join("/" + s for s in segments)
    uri = f"spiffe://{domain}{path}"
    sid = parse_spiffe_id(uri)
    assert sid == SpiffeId(domain, path)
    assert str(sid) == uri


@FUZZ
@given(_DOMAIN, st.lists(_SEGMENT, min_size=1, max_size=5), st.integers(min_value=0, max_value=5),
       st.sampled_from(["", ".", "..", "a b", "a%2F", "a?b", "a#b", "é", "a:b"]))
def test_one_bad_segment_spoils_the_id(domain, segments, where, bad):
    segments = list(segments)
    segments.insert(min(where, len(segments)), bad)
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(f"spiffe://{domain}" + "".join("/" + s for s in segments))


@FUZZ
@given(st.text(alphabet=TD_CHARS + "ABCXYZ:@", min_size=1, max_size=30).filter(
    lambda d: any(c in d for c in "ABCXYZ:@")))
def test_trust_domain_with_upper_case_port_or_userinfo_is_refused(domain):
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(f"spiffe://{domain}/a")
