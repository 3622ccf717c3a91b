"""``uri.parse`` and ``uri.is_valid``: Go's ``net/url.Parse`` as OPA answers with it, beyond OPA's own cases
(tests/data/opa_builtin_cases.yaml): the choices Go makes where RFC 3986 leaves room or where it deviates."""

from __future__ import annotations

from typing import Any

import pytest

from pdp.policy.builtins.uri import is_valid, parse
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError


@pytest.mark.parametrize(("uri", "want"), [
    ("HTTPS://Example.COM/A", {"scheme": "https", "hostname": "Example.COM", "path": "/A", "raw_path": "/A"}),
    ("mailto:user@example.com?subject=hi", {"scheme": "mailto", "raw_query": "subject=hi"}),
    ("/relative/path?x=1", {"path": "/relative/path", "raw_path": "/relative/path", "raw_query": "x=1"}),
    ("//host.example/p", {"hostname": "host.example", "path": "/p", "raw_path": "/p"}),
    ("*", {"path": "*", "raw_path": "*"}),
    ("http://u:p@h.example:8443/", {"scheme": "http", "hostname": "h.example", "port": "8443", "path": "/",
                                    "raw_path": "/"}),
    ("http://h.example:/x", {"scheme": "http", "hostname": "h.example", "path": "/x", "raw_path": "/x"}),
    ("http://[fe80::1%25en0]:80/", {"scheme": "http", "hostname": "fe80::1%en0", "port": "80", "path": "/",
                                    "raw_path": "/"}),
    ("http://[::ffff:10.0.0.1]/", {"scheme": "http", "hostname": "::ffff:10.0.0.1", "path": "/", "raw_path": "/"}),
    ("redis://a:1,b:2/", {"scheme": "redis", "hostname": "a:1,b", "port": "2", "path": "/", "raw_path": "/"}),
    # "~" needs no escape, so "%7E" is not the default encoding: raw_path keeps what was written.
    ("https://example.com/%7Euser", {"scheme": "https", "hostname": "example.com", "path": "/~user",
                                     "raw_path": "/%7Euser"}),
    ("https://example.com/é", {"scheme": "https", "hostname": "example.com", "path": "/é", "raw_path": "/é"}),
    ("https://example.com/a?#", {"scheme": "https", "hostname": "example.com", "path": "/a", "raw_path": "/a"}),
    ("https://example.com/a#b%20c", {"scheme": "https", "hostname": "example.com", "path": "/a", "raw_path": "/a",
                                     "fragment": "b c"}),
])
def test_parse(uri: str, want: dict[str, Any]) -> None:
    assert parse(uri) == want
    assert is_valid(uri) is True


@pytest.mark.parametrize(("uri", "error"), [
    ("http://[1.2.3.4]/", "invalid IP-literal"),
    ("http://[example.com]/", 'invalid host: ParseAddr("example.com")'),
    ("http://a[b]/", "invalid IP-literal"),
    ("http://a:b:80/", 'invalid port ":b:80" after host'),
    ("http://a\tb/", "net/url: invalid control character in URL"),
    (":no-scheme", "missing protocol scheme"),
    ("a:b/c:d", None),  # a scheme and an opaque part: valid
    ("ab:c/d", None),
    ("1a:b", "first path segment in URL cannot contain colon"),
    ("https://example.com/%zz", 'invalid URL escape "%zz"'),
    ("https://example.com/#%zz", 'invalid URL escape "%zz"'),
    ("http://h.example/%", 'invalid URL escape "%"'),
])
def test_errors_are_worded_as_go_words_them(uri: str, error: str | None) -> None:
    if error is None:
        assert is_valid(uri) is True
        return
    assert is_valid(uri) is False
    with pytest.raises(ValueError) as info:
        parse(uri)
    assert str(info.value).startswith("uri.parse: parse \"")
    assert error in str(info.value)


def test_bytes_that_are_not_utf8_are_given_out_as_the_replacement_character() -> None:
    assert parse("http://h/%ff") == {"scheme": "http", "hostname": "h", "path": "/\ufffd", "raw_path": "/%ff"}
    assert parse("http://h/%FF") == {"scheme": "http", "hostname": "h", "path": "/\ufffd", "raw_path": "/\ufffd"}


def test_through_the_engine() -> None:
    source = ("package t\n\nimport rego.v1\n\nhost := uri.parse(input.url).hostname\n\n"
              "ok := uri.is_valid(input.url)\n")
    engine = PolicyEngine(PolicyBundle((("t.rego", source),), {}, "data.t.host", "regorus"))
    assert engine.evaluate({"url": "https://api.example.com:443/v1"}) == "api.example.com"
    assert engine.query("data.t.ok", {"url": 7}) is False
    with pytest.raises(PolicyEvalError, match=r"uri\.parse: operand 1 must be string but got number"):
        engine.evaluate({"url": 7})
