"""OPA's ``uri.parse`` and ``uri.is_valid`` (RFC 3986 as Go's ``net/url.Parse`` reads it).

OPA answers both with Go's ``url.Parse``, so this is a port of that parser,
with its deviations from the RFC: a scheme is lower-cased; a rootless path
after a scheme is opaque (``mailto:a@b``); the path is percent-decoded, and
``raw_path`` is the path as written only when the default encoding of the
decoded path is not what was written; a host may %-encode non-ASCII bytes
only; a bracketed host must be an IPv6 address (an IPv4 address there is
refused); for ``http`` and ``https`` a host holds at most one colon, before
the port; a control character anywhere is an error. ``uri.parse`` gives the
members OPA gives, each only when not empty (``scheme``, ``hostname``,
``port`` as a string, ``path``, ``raw_path``, ``raw_query``, ``fragment``);
userinfo is checked but not returned. ``uri.is_valid`` is ``false`` for the
empty string and for anything that is not a string.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from pdp.policy.builtins._types import BuiltinError, string

_PATH, _PATH_SEGMENT, _HOST, _ZONE, _USER_PASSWORD, _QUERY_COMPONENT, _FRAGMENT = range(1, 8)
_HEX = "0123456789ABCDEF"
_HOST_ALLOWED = frozenset(b"!$&'()*+,;=:[]<>\"")
_RESERVED = frozenset(b"$&+,/:;=?@")
_SUB_DELIMS_ETC = frozenset(b"!$&'()*+,;=:@")
_USERINFO = frozenset("-._:~!$&'()*+,;=%@")


class _UrlError(ValueError):
    pass


def _go_quote(text: str) -> str:
    """Go's ``strconv.Quote``."""
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                        "\v": "\\v"}[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def _should_escape(c: int, mode: int) -> bool:
    """Go's ``shouldEscape`` (RFC 3986 §2, with Go's choices per part of the URL)."""
    if 0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A or 0x30 <= c <= 0x39:
        return False
    if mode in (_HOST, _ZONE) and c in _HOST_ALLOWED:
        return False
    if c in b"-_.~":
        return False
    if c in _RESERVED:
        if mode == _PATH:
            return c == ord("?")
        if mode == _PATH_SEGMENT:
            return c in b"/;,?"
        if mode == _USER_PASSWORD:
            return c in b"@/?:"
        if mode == _QUERY_COMPONENT:
            return True
        if mode == _FRAGMENT:
            return False
    if mode == _FRAGMENT and c in b"!()*":
        return False
    return True


def _is_hex(c: int) -> bool:
    return chr(c) in "0123456789abcdefABCDEF"


def _unescape(text: str, mode: int) -> str:
    """Go's ``unescape``: %XX decoded, with its checks for hosts and zones."""
    s = text.encode("utf-8", "surrogateescape")
    i, n = 0, 0
    while i < len(s):
        c = s[i]
        if c == ord("%"):
            n += 1
            if i + 2 >= len(s) or not _is_hex(s[i + 1]) or not _is_hex(s[i + 2]):
                bad = s[i:i + 3].decode("utf-8", "replace")
                raise _UrlError(f"invalid URL escape {_go_quote(bad)}")
            triplet = s[i:i + 3]
            if mode == _HOST and int(chr(s[i + 1]), 16) < 8 and triplet != b"%25":
                raise _UrlError(f"invalid URL escape {_go_quote(triplet.decode())}")
            if mode == _ZONE:
                v = int(triplet[1:], 16)
                if triplet != b"%25" and v != 0x20 and _should_escape(v, _HOST):
                    raise _UrlError(f"invalid URL escape {_go_quote(triplet.decode())}")
            i += 3
        else:
            if mode in (_HOST, _ZONE) and c < 0x80 and _should_escape(c, mode):
                raise _UrlError(f"invalid character {_go_quote(chr(c))} in host name")
            i += 1
    if n == 0:
        return text
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] == ord("%"):
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(s[i])
            i += 1
    # Go keeps the bytes as they are, valid UTF-8 or not: so do these strings, until they are given out.
    return out.decode("utf-8", "surrogateescape")


def _escape(text: str, mode: int) -> str:
    return "".join(f"%{_HEX[c >> 4]}{_HEX[c & 15]}" if _should_escape(c, mode) else chr(c)
                   for c in text.encode("utf-8", "surrogateescape"))


def _text(value: str) -> str:
    """A string as OPA gives it out: bytes that are not UTF-8 become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _valid_optional_port(port: str) -> bool:
    return port == "" or (port[0] == ":" and all("0" <= c <= "9" for c in port[1:]))


def _get_scheme(raw: str) -> tuple[str, str]:
    for i, c in enumerate(raw):
        if "a" <= c <= "z" or "A" <= c <= "Z":
            continue
        if "0" <= c <= "9" or c in "+-.":
            if i == 0:
                return "", raw
            continue
        if c == ":":
            if i == 0:
                raise _UrlError("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return "", raw
    return "", raw


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Go's ``netip.ParseAddr`` (an IPv6 address may carry a zone)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise _UrlError(f"invalid host: ParseAddr({_go_quote(text)}): unable to parse IP") from exc


def _parse_host(scheme: str, host: str) -> str:
    bracket = host.rfind("[")
    if bracket > 0:
        raise _UrlError("invalid IP-literal")
    if bracket == 0:
        close = host.rfind("]")
        if close < 0:
            raise _UrlError("missing ']' in host")
        colon_port = host[close + 1:]
        if not _valid_optional_port(colon_port):
            raise _UrlError(f"invalid port {_go_quote(colon_port)} after host")
        unescaped_port = _unescape(colon_port, _HOST)
        hostname = host[1:close]
        zone = hostname.find("%25")
        if zone >= 0:
            unescaped = _unescape(hostname[:zone], _HOST) + _unescape(hostname[zone:], _ZONE)
        else:
            unescaped = _unescape(hostname, _HOST)
        # RFC 3986: only an IPv6 address may be bracketed (an IPv4-mapped one may, a plain IPv4 one not).
        if _parse_addr(unescaped).version == 4:
            raise _UrlError("invalid IP-literal")
        return f"[{unescaped}]{unescaped_port}"
    first = host.find(":")
    if first != -1:
        last = host.rfind(":")
        # RFC 3986 allows no colon in a host; Go enforces that for http and https only (databases list
        # several host:port pairs in one authority).
        i = first if scheme in ("http", "https") else last
        colon_port = host[i:]
        if not _valid_optional_port(colon_port):
            raise _UrlError(f"invalid port {_go_quote(colon_port)} after host")
    return _unescape(host, _HOST)


def _parse_authority(scheme: str, authority: str) -> str:
    at = authority.rfind("@")
    host = _parse_host(scheme, authority[at + 1:] if at >= 0 else authority)
    if at >= 0:
        userinfo = authority[:at]
        if not all(c.isascii() and (c.isalnum() or c in _USERINFO) for c in userinfo):
            raise _UrlError("net/url: invalid userinfo")
        for part in userinfo.split(":", 1):
            _unescape(part, _USER_PASSWORD)
    return host


@dataclass
class _Url:
    scheme: str = ""
    opaque: str = ""
    host: str = ""
    path: str = ""
    raw_path: str = ""
    raw_query: str = ""
    fragment: str = ""

    def split_host_port(self) -> tuple[str, str]:
        host, port = self.host, ""
        colon = host.rfind(":")
        if colon != -1 and _valid_optional_port(host[colon:]):
            host, port = host[:colon], host[colon + 1:]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host, port


def _parse(raw: str) -> _Url:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise _UrlError("net/url: invalid control character in URL")
    url = _Url()
    if raw == "*":
        url.path = "*"
        return url
    scheme, rest = _get_scheme(raw)
    url.scheme = scheme.lower()
    if rest.endswith("?") and rest.count("?") == 1:
        rest = rest[:-1]
    else:
        rest, _, url.raw_query = rest.partition("?")
    if not rest.startswith("/"):
        if url.scheme:
            url.opaque = rest  # a rootless path after a scheme is opaque
            return url
        if ":" in rest.partition("/")[0]:
            raise _UrlError("first path segment in URL cannot contain colon")
    if (url.scheme or not rest.startswith("///")) and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        rest = slash + path
        url.host = _parse_authority(url.scheme, authority)
    url.path = _unescape(rest, _PATH)
    url.raw_path = "" if _escape(url.path, _PATH) == rest else rest
    return url


def parse_url(raw: str) -> _Url:
    """Go's ``url.Parse``; ``ValueError`` worded as Go words it (``parse "…": …``)."""
    before, hash_mark, fragment = raw.partition("#")
    try:
        url = _parse(before)
    except _UrlError as exc:
        raise _UrlError(f"parse {_go_quote(before)}: {exc}") from exc
    if hash_mark and fragment:
        try:
            url.fragment = _unescape(fragment, _FRAGMENT)
        except _UrlError as exc:
            raise _UrlError(f"parse {_go_quote(raw)}: {exc}") from exc
    return url


def parse(uri: Any) -> dict[str, str]:
    """The parts of a URI reference, each present only when not empty."""
    name = "uri.parse"
    text = string(name, 1, uri)
    try:
        url = parse_url(text)
    except _UrlError as exc:
        raise BuiltinError(name, str(exc)) from exc
    hostname, port = url.split_host_port()
    parts = {"scheme": url.scheme, "hostname": hostname, "port": port}
    if url.path:
        parts["path"] = url.path
        parts["raw_path"] = url.raw_path or url.path
    parts["raw_query"] = url.raw_query
    parts["fragment"] = url.fragment
    return {k: _text(v) for k, v in parts.items() if v}


def is_valid(uri: Any) -> bool:
    """Whether ``uri`` is a non-empty string that ``uri.parse`` reads without an error."""
    if not isinstance(uri, str) or not uri:
        return False
    try:
        parse_url(uri)
    except _UrlError:
        return False
    return True
