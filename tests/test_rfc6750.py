"""RFC 6750 §3: the ``WWW-Authenticate: Bearer`` challenge pdp sends with a denial."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp import reasons
from pdp.credentials.rfc6750 import challenge

# RFC 6750 §3: quoted values hold only %x20-21 / %x23-5B / %x5D-7E (no '"', no '\', ASCII printable).
_QUOTED = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_PARAM = rf"[a-z_]+={_QUOTED}"
_CHALLENGE = re.compile(rf"Bearer {_PARAM}(, {_PARAM})*")
_SAFE = set(chr(c) for c in (0x20, 0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F)))


def params(header: str) -> list[tuple[str, str]]:
    assert _CHALLENGE.fullmatch(header), header
    return re.findall(r'([a-z_]+)="([^"]*)"', header)


def test_realm_only_when_no_error() -> None:
    # §3.1: a request without credentials gets a challenge without an error code.
    assert challenge(realm="pdp") == 'Bearer realm="pdp"'


def test_error_and_description() -> None:
    assert challenge(realm="pdp", error="invalid_token", description="the access token expired") == (
        'Bearer realm="pdp", error="invalid_token", error_description="the access token expired"')


def test_description_without_error_is_left_out() -> None:
    assert challenge(realm="api", description="ignored") == 'Bearer realm="api"'


def test_empty_error_means_no_error() -> None:
    assert challenge(realm="api", error="", description="x") == 'Bearer realm="api"'


def test_scope_with_and_without_error() -> None:
    assert challenge(realm="r", error="insufficient_scope", description="needs more", scope="read write") == (
        'Bearer realm="r", error="insufficient_scope", error_description="needs more", scope="read write"')
    assert challenge(realm="r", scope="admin") == 'Bearer realm="r", scope="admin"'


def test_parameter_order_is_realm_error_description_scope() -> None:
    names = [n for n, _ in params(challenge(realm="r", error="e", description="d", scope="s"))]
    assert names == ["realm", "error", "error_description", "scope"]


def test_quote_and_backslash_are_stripped_from_description() -> None:
    header = challenge(realm="pdp", error="invalid_token", description='say "hi" \\o/ to C:\\temp')
    assert header == 'Bearer realm="pdp", error="invalid_token", error_description="say hi o/ to C:temp"'


def test_non_ascii_and_controls_are_stripped_from_description() -> None:
    header = challenge(realm="pdp", error="invalid_token", description="caf\u00e9 \u2603 ok\r\n\t\x00\x7f!")
    assert header == 'Bearer realm="pdp", error="invalid_token", error_description="caf  ok!"'


def test_realm_is_quoted_and_stripped_too() -> None:
    assert challenge(realm='my "realm"\\\u00e9') == 'Bearer realm="my realm"'


def test_quoting_cannot_inject_a_parameter() -> None:
    header = challenge(realm="pdp", error="invalid_token", description='x", error="insufficient_scope')
    assert [n for n, _ in params(header)] == ["realm", "error", "error_description"]
    assert dict(params(header))["error"] == "invalid_token"


@pytest.mark.parametrize("reason", [r for r in reasons.all_reasons() if r.challenge], ids=lambda r: r.code)
def test_every_challenging_reason_renders_a_valid_challenge(reason: reasons.Reason) -> None:
    header = challenge(realm="pdp", error=reason.oauth_error, description=reason.description)
    found = dict(params(header))
    assert found["realm"] == "pdp"
    if reason.oauth_error:
        assert found["error"] == reason.oauth_error
        assert found["error_description"] == reason.description
    else:
        assert "error" not in found and "error_description" not in found


@settings(max_examples=200, database=None, deadline=None)
@given(realm=st.text(max_size=40), error=st.sampled_from(["invalid_request", "invalid_token", "insufficient_scope"]),
       description=st.text(max_size=80), scope=st.one_of(st.none(), st.text(max_size=30)))
def test_any_text_yields_a_well_formed_challenge(realm: str, error: str, description: str,
                                                 scope: str | None) -> None:
    header = challenge(realm=realm, error=error, description=description, scope=scope)
    found = dict(params(header))
    assert found["realm"] == "".join(c for c in realm if c in _SAFE)
    assert found["error"] == error
    if description:
        assert found["error_description"] == "".join(c for c in description if c in _SAFE)
    if scope:
        assert found["scope"] == "".join(c for c in scope if c in _SAFE)
