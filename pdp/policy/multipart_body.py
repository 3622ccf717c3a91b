"""``multipart/form-data`` request bodies (RFC 7578, on RFC 2046 section 5.1's multipart syntax) read as
opa-envoy-plugin reads them into ``input.parsed_body``.

The plugin reads such a body with Go's ``mime.ParseMediaType`` and ``mime/multipart.Reader``: the
``boundary`` parameter of the content type (no ``boundary``: no parsed body), then every part whose
``Content-Disposition`` is ``form-data`` with a ``name`` (a part without one is skipped), as
``{name: [value, ...]}`` in the order the parts come; a part whose ``Content-Type`` contains
``application/json`` is that JSON value, any other part is its text (a file's too: named by ``name``,
not ``filename``). This module is a reading of those Go functions, so that a policy on a form field
decides on pdp what it decides on OPA-Envoy:

- the media type and its parameters: lower-cased names, token or quoted-string values (a backslash
  escapes a tspecial, else stands for itself), RFC 2231 ``name*=utf-8''%xx`` and ``name*0``/``name*1*``
  continuations, a parameter given twice with two values is an error;
- the body: lines before the first ``--boundary`` line are skipped, spaces and tabs may follow a
  boundary, lines end in CRLF (or LF when the first boundary line does), part headers are MIME headers
  (case-insensitive names, folded lines) ended by an empty line, a part ends at CRLF ``--boundary``,
  ``--boundary--`` ends the body and what follows is ignored; a part with
  ``Content-Transfer-Encoding: quoted-printable`` is decoded as Go's ``mime/quotedprintable`` decodes.

Anything Go refuses is a ``MultipartError`` (the request is refused). Where Go is laxer than this
module cares to follow, this module refuses instead, never accepts more: a header name with a space
in it, a body that ends inside a part's headers (Go stops there and keeps the fields read so far), a
part without a name whose quoted-printable text does not decode, and a body past a bound
(``LimitExceeded``: ``MAX_PARTS``, ``MAX_HEADER_LINES``, ``MAX_HEADER_BYTES``, their ``_TOTAL``s,
``MAX_PARAMS``, ``MAX_BOUNDARY``, ``MAX_QP_LINES``). The work is linear in the body (no regular
expression that can backtrack, no rescans), and the bounds keep its Python-level steps few.

Text is bytes as Go keeps it until the end, then read as UTF-8 with U+FFFD for what is not, as pdp
reads the JSON and form bodies.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from typing import Any

#: More parts than this and the request is refused (Go reads any number; the body limit bounds it).
MAX_PARTS = 1000
#: Header lines (folded lines counted) and bytes of headers one part may have.
MAX_HEADER_LINES = 100
MAX_HEADER_BYTES = 64 * 1024
#: The same for all the parts together.
MAX_HEADER_LINES_TOTAL = 10_000
MAX_HEADER_BYTES_TOTAL = 256 * 1024
#: Parameters one media type or disposition may have.
MAX_PARAMS = 100
#: The longest boundary read (RFC 2046 allows 70 characters; Go's reader works up to ~4 KiB).
MAX_BOUNDARY = 1000
#: Lines of quoted-printable text, all the parts together (RFC 7578 deprecates the encoding in forms).
MAX_QP_LINES = 10_000

# Go's readers read lines through a 4096-byte bufio buffer: a longer line is an error there
# (bufio.ErrBufferFull), between parts and inside quoted-printable text alike.
_GO_LINE_BUFFER = 4096
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
# unicode.IsSpace: the White_Space property (Python's str.isspace also takes U+001C..U+001F).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"
# RFC 7230 tchar: what a header name may be made of.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What a header value may hold (Go's validHeaderValueByte): tab, printable ASCII, any byte >= 0x80.
_HEADER_VALUE_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_BLANKS = re.compile(rb"[ \t]*")
_SPACES = re.compile("[" + re.escape(_GO_SPACE) + "]*")
_TOKEN = re.compile("[" + "".join(re.escape(chr(c)) for c in range(0x21, 0x7F) if chr(c) not in _TSPECIALS) + "]*")
# A quoted-string as Go reads one: a backslash escapes a tspecial only, before anything else it is
# itself (what MSIE sends for a file path); no CR or LF. Written as plain runs, each backslash taking the
# character after it with it (a tspecial it escapes, or a plain character that is itself either way):
# one reading per character, so a failed match backs off in linear time, and no possessive quantifier
# (Python 3.11's re raises SystemError on one holding a capturing group).
_QUOTED = re.compile(r'"([^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*)"')
_ESCAPED = re.compile(r"\\([" + re.escape("".join(sorted(_TSPECIALS))) + "])")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
# What quoted-printable text may hold unescaped (Go: tab, CR, LF, printable ASCII, and any byte >= 0x80).
_QP_BYTES = b"\t\n\r" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_CRLF = b"\r\n"
# What follows a boundary for it to be one (Go's matchAfterPrefix): white space, a line end, "--", the end.
_DELIMITER_END = rb"(?=[ \t\r\n]|--|\Z)"


class MultipartError(ValueError):
    """The body (or the content type) is not the multipart form it says it is."""


class LimitExceeded(MultipartError):
    """The body is past one of this module's bounds: refused even where Go would read on."""


def _skip_space(v: str, i: int) -> int:
    return _SPACES.match(v, i).end()  # type: ignore[union-attr]  # "*": always matches


def _token_end(v: str, i: int) -> int:
    return _TOKEN.match(v, i).end()  # type: ignore[union-attr]


def _go_lower(s: str) -> str:
    # strings.ToLower maps rune by rune (U+0130 to "i"; Python's full mapping gives two characters).
    return s.lower() if s.isascii() else "".join("i" if c == "\u0130" else c.lower() for c in s)


def _check_media_type(mediatype: str) -> None:
    end = _token_end(mediatype, 0)
    if end == 0:
        raise MultipartError("no media type")
    if end == len(mediatype):
        return
    if mediatype[end] != "/":
        raise MultipartError("expected a slash after the media type")
    sub_end = _token_end(mediatype, end + 1)
    if sub_end == end + 1:
        raise MultipartError("expected a token after the slash")
    if sub_end != len(mediatype):
        raise MultipartError("unexpected text after the media subtype")


def _consume_value(v: str, i: int) -> tuple[str, int] | None:
    """A token or quoted-string at ``v[i:]``: (value, where the rest begins), None when there is none."""
    if i >= len(v):
        return None
    if v[i] != '"':
        end = _token_end(v, i)
        return (v[i:end], end) if end > i else None
    quoted = _QUOTED.match(v, i)
    # split keeps each escaped character as a piece of its own and drops its backslash (in C; sub with a
    # "\1" template expands each match in Python).
    return None if quoted is None else ("".join(_ESCAPED.split(quoted[1])), quoted.end())


def _consume_param(v: str, i: int) -> tuple[str, str, int] | None:
    j = _skip_space(v, i)
    if j >= len(v) or v[j] != ";":
        return None
    j = _skip_space(v, j + 1)
    end = _token_end(v, j)
    if end == j:
        return None
    name = v[j:end].lower()
    j = _skip_space(v, end)
    if j >= len(v) or v[j] != "=":
        return None
    value = _consume_value(v, _skip_space(v, j + 1))
    return None if value is None else (name, value[0], value[1])


def _percent_unescape(s: str) -> str | None:
    raw = s.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return s
    out = bytearray()
    i = 0
    while i < len(raw):
        j = raw.find(b"%", i)
        if j < 0:
            out += raw[i:]
            break
        out += raw[i:j]
        if j + 2 >= len(raw) or raw[j + 1] not in _HEX or raw[j + 2] not in _HEX:
            return None
        out.append(int(raw[j + 1:j + 3], 16))
        i = j + 3
    return out.decode("utf-8", "surrogateescape")


def _decode_2231(v: str) -> str | None:
    pieces = v.split("'", 2)
    if len(pieces) != 3:
        return None
    charset = _go_lower(pieces[0])
    if charset not in ("us-ascii", "utf-8"):
        return None  # Go reads no other charset (nor an empty one); the language is ignored
    return _percent_unescape(pieces[2])


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type lower-cased, parameters) as Go's ``mime.ParseMediaType``; ``MultipartError`` where it
    errs. Text that is not UTF-8 travels as surrogate escapes (``errors="surrogateescape"``)."""
    semi = value.find(";")
    base = value if semi < 0 else value[:semi]
    mediatype = _go_lower(base).strip(_GO_SPACE)
    _check_media_type(mediatype)
    params: dict[str, str] = {}
    continuation: dict[str, dict[str, str]] = {}
    count = 0
    i = len(base)
    while i < len(value):
        i = _skip_space(value, i)
        if i == len(value):
            break
        param = _consume_param(value, i)
        if param is None:
            if value[i:].strip(_GO_SPACE) == ";":
                break  # a trailing semicolon
            raise MultipartError("a media type parameter that does not parse")
        key, text, i = param
        count += 1
        if count > MAX_PARAMS:
            raise LimitExceeded(f"more than {MAX_PARAMS} parameters")
        target = params
        if "*" in key:
            target = continuation.setdefault(key.partition("*")[0], {})
        if key in target and target[key] != text:
            raise MultipartError("a media type parameter given twice")
        target[key] = text
    for key, pieces in continuation.items():
        if key + "*" in pieces:
            decoded = _decode_2231(pieces[key + "*"])
            if decoded is not None:
                params[key] = decoded
            continue
        joined: list[str] = []
        valid = False
        n = 0
        while True:
            simple = f"{key}*{n}"
            if simple in pieces:
                joined.append(pieces[simple])
            elif simple + "*" in pieces:
                piece = pieces[simple + "*"]
                decoded = _decode_2231(piece) if n == 0 else (_percent_unescape(piece) or "")
                if decoded is not None:
                    joined.append(decoded)
            else:
                break
            valid = True
            n += 1
        if valid:
            params[key] = "".join(joined)
    return mediatype, params


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _quoted_printable(raw: bytes, budget: list[int]) -> bytes:
    """Go's ``mime/quotedprintable.Reader``: ``=XX`` (either case), soft line breaks (``=`` CRLF or LF, and
    ``=`` at the very end), white space at a line end dropped, ``=`` not before two hex digits and not
    at a line end kept as it is; other control bytes and lines of 4 KiB are errors."""
    if raw.translate(None, _QP_BYTES):
        raise MultipartError("quoted-printable text with a control byte")
    if raw.count(b"\n") >= budget[0]:
        raise LimitExceeded(f"more than {MAX_QP_LINES} lines of quoted-printable text")
    segments = raw.split(b"\n")  # each line without its LF; the last one is what follows the last LF
    budget[0] -= len(segments) - 1
    if max(map(len, segments)) >= _GO_LINE_BUFFER:
        raise MultipartError("a quoted-printable line longer than Go reads")
    out: list[bytes] = []
    last = len(segments) - 1
    for k, segment in enumerate(segments):
        line = segment.rstrip(b" \t\r")
        soft = line.endswith(b"=")
        if soft:
            after = segment[len(line):]
            line = line[:-1]
            if not ((after == b"" and (k < last or line)) or (after == b"\r" and k < last)):
                raise MultipartError("quoted-printable text with bytes after a soft line break")
        out.append(_qp_escapes(line) if b"=" in line else line)
        if not soft and k < last:
            out.append(_CRLF if segment.endswith(b"\r") else b"\n")
    return b"".join(out)


def _qp_escapes(line: bytes) -> bytes:
    # Go reads "=" then two hex digits as a byte, and an "=" before anything else as itself unless
    # it ends the line or comes before a CR. binascii reads both the same but for "==", which it takes
    # as one "=" (Go: a literal "=", then whatever the second one begins), so an "=" before another is
    # written "=3D" first. bytes.replace keeps it in C whatever the line holds; a run of "=" takes two
    # rounds, the first leaving "==" only where two of its replacements meet.
    if line.endswith(b"=") or b"=\r" in line:
        raise MultipartError("quoted-printable text with a bad escape")
    while b"==" in line:
        line = line.replace(b"==", b"=3D=")
    return binascii.a2b_qp(line)


class _Reader:
    """Go's ``multipart.Reader`` over a whole body."""

    def __init__(self, data: bytes, boundary: bytes) -> None:
        self.data = data
        self.pos = 0
        self.parts_read = 0
        self.header_lines = 0
        self.header_bytes = 0
        self.part_header_lines = 0
        self.qp_budget = [MAX_QP_LINES]
        self.nl = _CRLF
        self.dash_boundary = b"--" + boundary
        self.dash_boundary_dash = self.dash_boundary + b"--"
        # A line that ends the preamble: a boundary line (CRLF or LF) or, while lines end in CRLF, the
        # closing one (or the closing one without a line end, at the end of the body). One search in C
        # finds it past any number of lines that only look like one ("--boundaryX").
        preamble_end = re.escape(self.dash_boundary) + rb"(?:[ \t]*\r?\n|--[ \t]*(?:\r\n|\Z))"
        self.preamble_end_here = re.compile(preamble_end)
        self.preamble_end_later = re.compile(rb"\n" + preamble_end)

    def _line(self) -> tuple[bytes, bool]:
        """The next line with its LF, or what is left and True at the end (bufio ``ReadSlice``)."""
        start = self.pos
        end = self.data.find(b"\n", start, start + _GO_LINE_BUFFER)
        if end < 0:
            if len(self.data) - start >= _GO_LINE_BUFFER:
                raise MultipartError("a line between parts longer than Go reads")
            self.pos = len(self.data)
            return self.data[start:], True
        self.pos = end + 1
        return self.data[start:end + 1], False

    def _skip_preamble(self) -> None:
        """Up to the first line that is a boundary or the closing boundary: the lines Go skips one by one
        (checking only that each fits its buffer) skipped at once, in a single pass."""
        data, start = self.data, self.pos
        if self.preamble_end_here.match(data, start):
            return
        found = self.preamble_end_later.search(data, start)
        if found is None:
            raise MultipartError("the body ends before its closing boundary")
        end = found.start()
        # No line before it as long as Go's buffer: every _GO_LINE_BUFFER bytes from a line's start hold
        # an LF. Jumping to just past the last LF of each window takes two steps per window at most.
        at = start
        while end - at >= _GO_LINE_BUFFER:
            lf = data.rfind(b"\n", at, at + _GO_LINE_BUFFER)
            if lf < 0:
                raise MultipartError("a line between parts longer than Go reads")
            at = lf + 1
        self.pos = end + 1

    def _is_final_boundary(self, line: bytes) -> bool:
        if not line.startswith(self.dash_boundary_dash):
            return False
        rest = line[len(self.dash_boundary_dash):].lstrip(b" \t")
        return not rest or rest == self.nl

    def _is_delimiter_line(self, line: bytes) -> bool:
        if not line.startswith(self.dash_boundary):
            return False
        rest = line[len(self.dash_boundary):].lstrip(b" \t")
        if self.parts_read == 0 and rest == b"\n":
            self.nl = b"\n"  # as Go: the first boundary line decides that lines end in a bare LF
        return rest == self.nl

    def next_part(self) -> tuple[dict[str, list[str]], bytes] | None:
        """(headers by lower-cased name, raw body) of the next part; None after the closing boundary."""
        expect_new_part = False
        while True:
            if self.parts_read == 0:
                self._skip_preamble()
            line, at_end = self._line()
            if self._is_final_boundary(line):
                return None
            if at_end:
                raise MultipartError("the body ends before its closing boundary")
            if self._is_delimiter_line(line):
                self.parts_read += 1
                if self.parts_read > MAX_PARTS:
                    raise LimitExceeded(f"more than {MAX_PARTS} parts")
                headers = self._headers()
                return headers, self._body()
            if expect_new_part:
                raise MultipartError("a line where a boundary was expected")
            if self.parts_read == 0:
                continue  # the preamble
            if line == self.nl:
                expect_new_part = True
                continue
            raise MultipartError("a line where a boundary was expected")

    def _header_line(self) -> bytes | None:
        """A header line without its CRLF or LF; None at the end (bufio ``ReadLine``)."""
        start = self.pos
        if start >= len(self.data):
            return None
        end = self.data.find(b"\n", start)
        if end < 0:
            self.pos = len(self.data)
            return self.data[start:]
        self.pos = end + 1
        return self.data[start:end - 1 if end > start and self.data[end - 1] == 0x0D else end]

    def _headers(self) -> dict[str, list[str]]:
        """The part's MIME header (Go's ``textproto.Reader.ReadMIMEHeader``)."""
        data, start = self.data, self.pos
        if start < len(data) and data[start] in b" \t":
            raise MultipartError("a part header that begins with white space")
        self.part_header_lines = 0
        headers: dict[str, list[str]] = {}
        while True:
            line = self._header_line()
            if line is None:
                # Go returns io.EOF here and the plugin keeps the fields read so far: refused instead.
                raise MultipartError("the body ends inside a part's headers")
            if not line:
                self.header_bytes += self.pos - start
                return headers
            if b":" not in line:
                raise MultipartError("a part header line without a colon")
            pieces = [line.strip(b" \t")]
            self._count_header_line(start)
            while self.pos < len(data) and data[self.pos] in b" \t":  # folded onto the line before
                self.pos = _BLANKS.match(data, self.pos).end()  # type: ignore[union-attr]  # always matches
                more = self._header_line()
                if more is None:
                    break
                pieces += (b" ", more.strip(b" \t"))
                self._count_header_line(start)
            name, _, value = b"".join(pieces).partition(b":")
            # Go also takes a name with a space before the colon (and then no lookup finds it): refused.
            if not name or name.translate(None, _TCHAR):
                raise MultipartError("a part header name that is not a token")
            if value.translate(None, _HEADER_VALUE_BYTES):
                raise MultipartError("a part header value with a control byte")
            key = name.decode("ascii").lower()
            headers.setdefault(key, []).append(value.lstrip(b" \t").decode("utf-8", "surrogateescape"))

    def _count_header_line(self, start: int) -> None:
        self.header_lines += 1
        self.part_header_lines += 1
        if self.part_header_lines > MAX_HEADER_LINES or self.pos - start > MAX_HEADER_BYTES:
            raise LimitExceeded("a part with too many headers")
        if self.header_lines > MAX_HEADER_LINES_TOTAL or self.header_bytes + self.pos - start > MAX_HEADER_BYTES_TOTAL:
            raise LimitExceeded("too many part headers")

    def _matches_after(self, at: int) -> bool:
        """Whether a boundary prefix ending at ``at`` is a boundary (Go's ``matchAfterPrefix``; ``_DELIMITER_END``
        is the same test for a search)."""
        if at == len(self.data):
            return True
        c = self.data[at]
        if c in b" \t\r\n":
            return True
        return c == 0x2D and at + 1 < len(self.data) and self.data[at + 1] == 0x2D

    def _body(self) -> bytes:
        """The part's body, up to the CRLF before the next boundary (Go's ``scanUntilBoundary``)."""
        data, start = self.data, self.pos
        search = start
        if data.startswith(self.dash_boundary, start):
            if self._matches_after(start + len(self.dash_boundary)):
                return b""
            search = start + len(self.dash_boundary)
        # One search in C past every "\r\n--boundaryX" that is not a delimiter (Go steps over each one;
        # two candidates cannot overlap, as a boundary holds no CR or LF, so the first match is Go's).
        found = re.compile(re.escape(self.nl + self.dash_boundary) + _DELIMITER_END).search(data, search)
        if found is None:
            raise MultipartError("the body ends before its closing boundary")
        self.pos = found.start()
        return data[start:self.pos]


def _form_name(headers: dict[str, list[str]]) -> str:
    """Go's ``Part.FormName``: ``name`` of a ``form-data`` disposition, "" otherwise or when it does not parse."""
    disposition = headers.get("content-disposition")
    try:
        kind, params = parse_media_type(disposition[0] if disposition else "")
    except LimitExceeded:
        raise
    except MultipartError:
        return ""
    return params.get("name", "") if kind == "form-data" else ""


def read_form(content_type: str, payload: bytes, decode_json: Callable[[str], Any]) -> dict[str, list[Any]] | None:
    """``{name: [value, ...]}`` of a ``multipart/form-data`` body, None when the content type has no
    ``boundary``; ``MultipartError`` for what is not such a body. ``decode_json`` reads a JSON part (its
    ``ValueError`` or ``RecursionError`` is a ``MultipartError``)."""
    _, params = parse_media_type(content_type)
    boundary = params.get("boundary")
    if boundary is None:
        return None
    raw_boundary = boundary.encode("utf-8", "surrogateescape")
    if not raw_boundary:
        raise MultipartError("the boundary is empty")
    if len(raw_boundary) > MAX_BOUNDARY:
        raise LimitExceeded(f"a boundary longer than {MAX_BOUNDARY} bytes")
    reader = _Reader(payload, raw_boundary)
    values: dict[str, list[Any]] = {}
    while (part := reader.next_part()) is not None:
        headers, raw = part
        encoding = headers.get("content-transfer-encoding", [""])[0]
        if encoding.isascii() and encoding.lower() == "quoted-printable":
            raw = _quoted_printable(raw, reader.qp_budget)
        name = _form_name(headers)
        if not name:
            continue
        text = raw.decode("utf-8", "replace")
        if "application/json" in headers.get("content-type", [""])[0]:
            try:
                value = decode_json(text)
            except (ValueError, RecursionError):
                raise MultipartError(f"part {reader.parts_read} is not the JSON its content-type says") from None
        else:
            value = text
        values.setdefault(_text(name), []).append(value)
    return values
