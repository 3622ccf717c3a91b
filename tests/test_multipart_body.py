"""``multipart/form-data`` bodies in ``input.parsed_body``, read as opa-envoy-plugin reads them.

Unit tests of the reader (bodies built with Python's own ``email`` package or written out byte by
byte), then a deny rule on a form field through every entry point that carries a body: a rule that
fires on OPA-Envoy and not on pdp would be a bypass.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from email.encoders import encode_7or8bit
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import HTTP, SMTP
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st
from servers import serve_pdp

from pdp import reasons
from pdp.config import load_config
from pdp.errors import Denied
from pdp.policy import multipart_body
from pdp.policy.input import parse_body
from pdp.policy.multipart_body import MultipartError, parse_media_type
from pdp.policy.redaction import REDACTED, redacted_input

CT = "multipart/form-data; boundary=b0undary"


def _part(name: str | None, value: str, *, disposition: str = "form-data", extra: str = "") -> str:
    head = f"Content-Disposition: {disposition}" + (f'; name="{name}"' if name is not None else "")
    return f"--b0undary\r\n{head}\r\n{extra}\r\n{value}\r\n"


def _form(*parts: str, end: str = "--b0undary--\r\n") -> str:
    return "".join(parts) + end


def _parse(body: str | bytes, content_type: str = CT, **headers: str) -> tuple[Any, bool]:
    return parse_body({"content-type": content_type, **headers}, body)


def _refused(body: str | bytes, content_type: str = CT) -> str:
    with pytest.raises(Denied) as caught:
        _parse(body, content_type)
    assert caught.value.reason is reasons.REQUEST_INVALID
    return caught.value.detail


def _email_form(*parts: tuple[str, Any]) -> tuple[str, bytes]:
    """A form as Python's ``email`` package writes one (CRLF line ends): (content type, body)."""
    form = MIMEMultipart("form-data", boundary="py-boundary-1")
    for name, part in parts:
        part.add_header("Content-Disposition", "form-data", name=name)
        form.attach(part)
    raw = form.as_bytes(policy=HTTP)
    body = raw.partition(b"\r\n\r\n")[2]
    return str(form["Content-Type"]), body


# -- the reader -------------------------------------------------------------------------------------


def test_simple_fields() -> None:
    assert _parse(_form(_part("a", "1"), _part("b", "two words"))) == ({"a": ["1"], "b": ["two words"]}, False)


def test_a_repeated_name_is_a_list_in_order() -> None:
    assert _parse(_form(_part("a", "1"), _part("b", "x"), _part("a", "2"), _part("a", "3"))) == (
        {"a": ["1", "2", "3"], "b": ["x"]}, False)


def test_a_file_part_is_its_text_under_its_name() -> None:
    part = _part("upload", "line 1\r\nline 2", extra="Content-Type: text/plain\r\n").replace(
        'name="upload"', 'name="upload"; filename="notes.txt"')
    assert _parse(_form(part)) == ({"upload": ["line 1\r\nline 2"]}, False)


def test_a_json_part_is_its_json_value() -> None:
    body = _form(_part("meta", '{"role": "admin", "n": [1, 2.5], "s": "\\ud800"}',
                       extra="Content-Type: application/json; charset=utf-8\r\n"), _part("meta", "plain"))
    assert _parse(body) == ({"meta": [{"role": "admin", "n": [1, 2.5], "s": "\ufffd"}, "plain"]}, False)


def test_a_part_without_a_name_is_skipped() -> None:
    assert _parse(_form(_part(None, "x"), _part("", "y"), _part("a", "1"))) == ({"a": ["1"]}, False)
    assert _parse("--b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0undary--") == ({}, False)


def test_a_disposition_other_than_form_data_is_skipped() -> None:
    body = _form(_part("a", "1", disposition="attachment"), _part("b", "2", disposition="Form-Data"),
                 _part("c", "3", disposition="form-data; name=x; name=y"))  # a parameter twice: no name
    assert _parse(body) == ({"b": ["2"]}, False)


def test_rfc_2231_names() -> None:
    body = _form(
        "--b0undary\r\nContent-Disposition: form-data; name*=UTF-8''%C3%A9t%C3%A9\r\n\r\nsummer\r\n",
        "--b0undary\r\nContent-Disposition: form-data; name*0*=utf-8''%C3; name*1*=%A9; name*2=x\r\n\r\ny\r\n",
        # an encoded name wins over a plain one, as in Go
        "--b0undary\r\nContent-Disposition: form-data; name=plain; name*=us-ascii'en'fancy\r\n\r\nz\r\n",
        # an unknown charset: no name, skipped
        "--b0undary\r\nContent-Disposition: form-data; name*=latin-1''caf%E9\r\n\r\nw\r\n")
    assert _parse(body) == ({"été": ["summer"], "éx": ["y"], "fancy": ["z"]}, False)


def test_a_quoted_name_with_escapes() -> None:
    body = _form("--b0undary\r\nContent-Disposition: form-data; name=\"say \\\"hi\\\"\"\r\n\r\n1\r\n",
                 # a backslash before a letter stands for itself (MSIE's file paths)
                 "--b0undary\r\nContent-Disposition: form-data; name=\"C:\\dir\"\r\n\r\n2\r\n")
    assert _parse(body) == ({'say "hi"': ["1"], "C:\\dir": ["2"]}, False)


def test_a_backslash_before_a_plain_character_is_itself_not_a_crash() -> None:
    # Python 3.11's re raised SystemError on these (a possessive repeat holding a capturing group)
    body = b'--b\r\nContent-Disposition: form-data; name="\\;\\a"\r\n\r\nv\r\n--b--'
    assert parse_body({"content-type": "multipart/form-data; boundary=b"}, body) == ({";\\a": ["v"]}, False)
    body = b'--b\r\nContent-Disposition: form-data; filename="C:\\dir\\file"; name=a\r\n\r\nv\r\n--b--'
    assert parse_body({"content-type": "multipart/form-data; boundary=b"}, body) == ({"a": ["v"]}, False)
    content_type = 'multipart/form-data; boundary="\\;\\b"'
    assert parse_media_type(content_type)[1] == {"boundary": ";\\b"}
    body = b"--;\\b\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--;\\b--"
    assert parse_body({"content-type": content_type}, body) == ({"a": ["v"]}, False)


def _go_consume_value(v: str) -> tuple[str, str] | None:
    """Go's ``mime.consumeValue`` for a quoted-string, line by line: (value, rest), None where Go gives up."""
    out: list[str] = []
    i = 1
    while i < len(v):
        c = v[i]
        if c == '"':
            return "".join(out), v[i + 1:]
        if c == "\\" and i + 1 < len(v) and v[i + 1] in '()<>@,;:\\"/[]?=':
            out.append(v[i + 1])
            i += 2
            continue
        if c in "\r\n":
            return None
        out.append(c)
        i += 1
    return None


# Quoted-string text from pieces, escapes and lone backslashes among them
QUOTED_TEXT = st.lists(st.sampled_from(["\\", "\\;", "\\a", '\\"', "\\\\", '"', ";", "=", "a", " ", "\t", "\r",
                                        "\n", "(", "/", "\xe9", "*", "'", "%"]), max_size=12).map("".join)


@settings(max_examples=500, deadline=None)
@given(QUOTED_TEXT)
def test_any_quoted_string_reads_as_go_reads_it(text: str) -> None:
    found = multipart_body._consume_value('"' + text, 0)
    expected = _go_consume_value('"' + text)
    assert (None if found is None else (found[0], ('"' + text)[found[1]:])) == expected


@settings(max_examples=500, deadline=None)
@example("\\;\\a", "", '; name="{}"', "; boundary=b{}")
@example("", "\\;\\b", "; name={}", '; boundary="{}"')
@given(QUOTED_TEXT, QUOTED_TEXT, st.sampled_from(['; name="{}"', "; name={}", '; filename="{}"; name=a', "{}",
                                                  '; name*="{}"', "; name*0*={}"]),
       st.sampled_from(['; boundary=b{}', '; boundary="{}"', '; boundary="b"; x="{}"', "{}"]))
def test_any_parameters_parse_or_are_refused(disposition: str, media: str, disposition_form: str,
                                             media_form: str) -> None:
    body = f"--b\r\nContent-Disposition: form-data{disposition_form.format(disposition)}\r\n\r\nv\r\n--b--"
    try:
        parse_body({"content-type": "multipart/form-data" + media_form.format(media)}, body.encode())
    except Denied as denied:
        assert denied.reason is reasons.REQUEST_INVALID


def test_no_possessive_quantifier_or_atomic_group_in_the_reader() -> None:
    # Python 3.11's re mishandles them (SystemError): none in the patterns the reader compiles
    reader = multipart_body._Reader(b"", b"b")
    patterns = [p for p in [*vars(multipart_body).values(), *vars(reader).values()] if isinstance(p, re.Pattern)]
    patterns.append(re.compile(multipart_body._DELIMITER_END))
    assert len(patterns) >= 8
    for pattern in patterns:
        text = pattern.pattern if isinstance(pattern.pattern, str) else pattern.pattern.decode("latin-1")
        unescaped = re.sub(r"\\\\.", "", text, flags=re.S)
        assert not re.search(r"[*+?}]\+|\(\?>", unescaped), pattern


def test_preamble_epilogue_padding_and_header_case() -> None:
    body = ("This is the preamble.\r\n--b0undary-not\r\n"
            "--b0undary \t\r\ncontent-DISPOSITION:   form-data;\r\n name=a\r\n\r\n1\r\n"
            "--b0undary--  \r\nepilogue\r\n--b0undary\r\nContent-Disposition: form-data; name=b\r\n\r\n2\r\n")
    assert _parse(body) == ({"a": ["1"]}, False)


def test_a_value_with_a_boundary_lookalike_stays_whole() -> None:
    value = "x\r\n--b0undaryX\r\n--b0undar\n--b0undary"
    assert _parse(_form(_part("a", value[:-len("\n--b0undary")]), _part("b", "2"))) == (
        {"a": ["x\r\n--b0undaryX\r\n--b0undar"], "b": ["2"]}, False)


def test_bare_lf_line_ends_when_the_first_boundary_line_has_one() -> None:
    body = "--b0undary\nContent-Disposition: form-data; name=a\n\n1\n--b0undary\n" \
           "Content-Disposition: form-data; name=b\n\n2\r\n3\n--b0undary--\n"
    assert _parse(body) == ({"a": ["1"], "b": ["2\r\n3"]}, False)


def test_quoted_printable_is_decoded() -> None:
    qp = "Content-Transfer-Encoding: quoted-printable\r\n"
    body = _form(_part("a", "caf=C3=A9 =3d =\r\nsoft  \r\nx=y", extra=qp))
    assert _parse(body) == ({"a": ["café = soft\r\nx=y"]}, False)
    assert "quoted-printable" in _refused(_form(_part("a", "bad\x01byte", extra=qp)))
    assert "quoted-printable" in _refused(_form(_part("a", "a= \r\nb", extra=qp)))
    # a part without a name is checked too (Go may or may not notice): refused, never looser
    assert "quoted-printable" in _refused(_form(_part(None, "bad\x01byte", extra=qp)))


def test_bodies_written_by_python_email() -> None:
    content_type, body = _email_form(("note", MIMEText("héllo", "plain", "utf-8")),
                                     ("doc", MIMEApplication(b'{"role": "admin"}', "json", encode_7or8bit)),
                                     ("note", MIMEText("second", "plain")))
    # MIMEText writes UTF-8 text in base64: Go does not decode base64, so neither does pdp
    assert _parse(body, content_type) == (
        {"note": ["aMOpbGxv\r\n", "second"], "doc": [{"role": "admin"}]}, False)
    message = EmailMessage(policy=SMTP)
    message.set_content("plain café", cte="quoted-printable")
    content_type, body = _email_form(("q", message))
    assert b"caf=C3=A9" in body
    assert _parse(body, content_type) == ({"q": ["plain café\r\n"]}, False)


def test_non_utf8_bytes_read_as_replacement_characters() -> None:
    body = b'--b0undary\r\nContent-Disposition: form-data; name="n\xff"\r\n\r\nv\xfe\xc3\xa9\r\n--b0undary--'
    assert _parse(body) == ({"n\ufffd": ["v\ufffdé"]}, False)


def test_missing_boundary_parameter_is_null() -> None:
    assert _parse(_form(_part("a", "1")), "multipart/form-data") == (None, False)
    assert _parse(_form(_part("a", "1")), "multipart/form-data; charset=utf-8;") == (None, False)


def test_no_body_is_null() -> None:
    assert _parse("") == (None, False)
    assert _parse(b"") == (None, False)


def test_truncated_by_content_length_is_null_and_truncated() -> None:
    body = _form(_part("a", "1"))
    assert _parse(body[:20], **{"content-length": str(len(body))}) == (None, True)
    assert _parse(body, **{"content-length": str(len(body))}) == ({"a": ["1"]}, False)
    assert _parse(body, **{"content-length": "-1"}) == ({"a": ["1"]}, False)


def test_missing_closing_boundary_is_refused() -> None:
    assert "closing boundary" in _refused(_form(_part("a", "1"), end=""))
    assert "closing boundary" in _refused("--b0undary\r\nContent-Disposition: form-data; name=a\r\n\r\n1")
    assert "closing boundary" in _refused("no boundary line at all")
    assert "closing boundary" in _refused(_form(_part("a", "1"), end="--b0undary"))
    # Go stops without an error at the end of a part's headers (keeping what it read): refused instead
    assert "headers" in _refused("--b0undary\r\nContent-Disposition: form-data; name=a\r\n")


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; boundary=", "multipart/form-data; boundary", "multipart/form-data; boundary=\"x",
    "multipart/form-data; boundary=a; boundary=b", "multipart/form-data/x; boundary=a",
    "multipart/form-data boundary=a", "multipart/form-data; boundary=a b",
])
def test_a_malformed_media_type_is_refused(content_type: str) -> None:
    _refused(_form(_part("a", "1")), content_type)


def test_an_empty_boundary_is_refused() -> None:
    assert "empty" in _refused(_form(_part("a", "1")), 'multipart/form-data; boundary=""')


def test_malformed_part_headers_are_refused() -> None:
    for head in ("Content-Disposition form-data", " Content-Disposition: form-data; name=a",
                 "Content-Disposition : form-data; name=a", "Bad\x01Name: x", "X: a\x00b"):
        _refused(f"--b0undary\r\n{head}\r\n\r\n1\r\n--b0undary--")
    _refused("--b0undary\r\nX: 1\r\nY: 2\r\n\r\nv\r\n--b0undary--".replace(
        "X: 1\r\n", "X: 1\r\n" * (multipart_body.MAX_HEADER_LINES + 1)))


def test_a_line_where_a_boundary_belongs_is_refused() -> None:
    _refused(_part("a", "1") + "--b0undary\rgarbage\r\n--b0undary--")
    _refused(_part("a", "1") + "--b0undary x\r\n--b0undary--")


def test_too_many_parts_are_refused() -> None:
    many = _form(*[_part("a", "1")] * multipart_body.MAX_PARTS)
    assert len(_parse(many)[0]["a"]) == multipart_body.MAX_PARTS
    assert "parts" in _refused(_form(*[_part("a", "1")] * (multipart_body.MAX_PARTS + 1)))


def test_a_part_that_is_not_its_json_is_refused() -> None:
    json_type = "Content-Type: application/json\r\n"
    for value in ("{", "", "NaN", '{"a": 1} x'):
        assert "JSON" in _refused(_form(_part("a", value, extra=json_type)))


def test_the_plugins_content_type_order() -> None:
    body = _form(_part("a", "1"))
    assert _parse(body, "application/grpc; x=multipart/form-data; boundary=b0undary") == (None, False)
    assert _parse(body, "text/plain") == (None, False)


def test_the_work_is_bounded() -> None:
    started = time.perf_counter()
    # a value made of near-boundaries, a preamble of a million lines, quoted-printable made of escapes
    value = "\r\n--b0undar" * 80_000
    assert _parse(_form(_part("a", value)))[0] == {"a": [value]}
    assert _parse("\n" * 1_000_000 + _form(_part("a", "1")))[0] == {"a": ["1"]}
    qp = "Content-Transfer-Encoding: quoted-printable\r\n"
    assert _parse(_form(_part("a", ("=41" * 1000 + "=\r\n") * 300, extra=qp)))[0] == {"a": ["A" * 300_000]}
    assert time.perf_counter() - started < 5
    # past a bound: refused, where Go would read on (and spend)
    assert "longer" in _refused("p" * 5000 + "\r\n" + _form(_part("a", "1")))
    params = "; x=1" * (multipart_body.MAX_PARAMS - 1)
    assert _parse(_form(f"--b0undary\r\nContent-Disposition: form-data; name=a{params}\r\n\r\n1\r\n"))[0] == {
        "a": ["1"]}
    assert "parameters" in _refused(_form(f"--b0undary\r\nContent-Disposition: form-data; name=a{params}; y=2\r\n"
                                          "\r\n1\r\n"))
    assert "quoted-printable" in _refused(_form(_part("a", "x\r\n" * multipart_body.MAX_QP_LINES, extra=qp)))
    big_header = "X: " + "y" * 1000 + "\r\n"
    assert "headers" in _refused(_form(*[_part("a", "1", extra=big_header)] * 300))
    assert "boundary" in _refused(_form(_part("a", "1")), "multipart/form-data; boundary=" + "b" * 1001)


def _crafted_bodies(size: int) -> dict[str, bytes]:
    """Bodies of about ``size`` bytes made to cost a reader per line or per lookalike (boundary ``b``)."""
    head = b"--b\r\nContent-Disposition: form-data; name=a\r\n"
    qp = head + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    return {
        "lookalike preamble": b"--b-\n" * (size // 5) + head + b"\r\nv\r\n--b--",
        "empty-line preamble": b"\n" * size + head + b"\r\nv\r\n--b--",
        "near delimiters": head + b"\r\n" + b"\r\n--bX" * (size // 6) + b"\r\n--b--",
        "quoted-printable of =x": qp + (b"=x" * 2000 + b"\r\n") * (size // 4002) + b"\r\n--b--",
        "quoted-printable of ==": qp + (b"=" * 3999 + b"x\r\n") * (size // 4002) + b"\r\n--b--",
    }


def _parse_crafted(body: bytes) -> None:
    assert parse_body({"content-type": "multipart/form-data; boundary=b"}, body)[0]["a"]


def test_crafted_bodies_read_no_slower_than_json_of_their_size() -> None:
    size = 4 << 20
    array = b"[" + b"0," * (size // 2 - 1) + b"0]"

    def best_of_3(read: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            read()
            times.append(time.perf_counter() - started)
        return min(times)

    json_time = best_of_3(lambda: json.loads(array))
    for label, body in _crafted_bodies(size).items():
        assert best_of_3(functools.partial(_parse_crafted, body)) < 5 * json_time, label


def test_crafted_preambles_and_values_take_few_steps_and_little_memory() -> None:
    # Steps counted as Python and C function calls: one search per body, not one loop per line or lookalike
    _parse_crafted(_crafted_bodies(1 << 10)["lookalike preamble"])  # the patterns compiled first
    for label, body in _crafted_bodies(4 << 20).items():
        if label.startswith("quoted-printable"):
            continue  # a loop per line there, bounded by MAX_QP_LINES
        calls = 0

        def count(frame: object, event: str, arg: object) -> None:
            nonlocal calls
            calls += event in ("call", "c_call")

        sys.setprofile(count)
        try:
            _parse_crafted(body)
        finally:
            sys.setprofile(None)
        assert calls < len(body) // 1024, label
        tracemalloc.start()
        try:
            _parse_crafted(body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # the body as text (parse_body decodes it) and a value as bytes and text: never a list of its lines
        assert peak < 4 * len(body), label


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters='"\\\r\n'),
                                  min_size=1, max_size=8),
                          st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)), max_size=6),
       st.sampled_from(["\r\n", "\n"]))
def test_any_form_reads_back(fields: list[tuple[str, str]], nl: str) -> None:
    boundary = "hyp-b0undary"
    body = "".join(f"--{boundary}{nl}Content-Disposition: form-data; name=\"{name}\"{nl}{nl}{value}{nl}"
                   for name, value in fields) + f"--{boundary}--{nl}"
    expected: dict[str, list[str]] = {}
    for name, value in fields:
        expected.setdefault(name, []).append(value)
    if any(nl + "--" + boundary in value + nl for _, value in fields):
        return  # a value holding the delimiter is not a value of this form
    if not fields and nl == "\n":
        # Go takes LF line ends only from a first boundary line: "--b--" LF alone is not one (CRLF is)
        _refused(body.encode(), f"multipart/form-data; boundary={boundary}")
        return
    assert _parse(body.encode(), f"multipart/form-data; boundary={boundary}") == (expected, False)


def test_parse_media_type_as_go() -> None:
    assert parse_media_type(' Multipart/Form-Data ;BOUNDARY="a\\"b" ; Charset=utf-8;') == (
        "multipart/form-data", {"boundary": 'a"b', "charset": "utf-8"})
    assert parse_media_type("form-data; name=a; name=a") == ("form-data", {"name": "a"})
    for bad in ("", "/x", "a/", "a/b/c", "a b", "form-data; name=a; name=b", "x; =1", "x; a"):
        with pytest.raises(MultipartError):
            parse_media_type(bad)


def test_multipart_fields_are_redacted_in_recorded_inputs() -> None:
    body = _form(_part("password", "hunter2"), _part("password", "again"), _part("note", "code=abc"),
                 _part("meta", '{"client_secret": "s", "keep": 1}', extra="Content-Type: application/json\r\n"),
                 _part("token", '{"a": 1}', extra="Content-Type: application/json\r\n"), _part("user", "ann"))
    parsed, _ = _parse(body)
    out = redacted_input({"parsed_body": parsed, "attributes": {"request": {"http": {"body": body}}}})
    assert out["parsed_body"] == {"password": [REDACTED, REDACTED], "note": [REDACTED],
                                  "meta": [{"client_secret": REDACTED, "keep": 1}], "token": REDACTED,
                                  "user": ["ann"]}
    assert out["attributes"]["request"]["http"]["body"] == REDACTED


# -- a deny rule on a form field, through every entry point that carries a body -------------------------

POLICY = """package envoy.authz

import rego.v1

default allow := false

allow if {
  input.parsed_path == ["upload"]
  not blocked
}

blocked if "delete" in input.parsed_body.action

blocked if input.parsed_body.meta[_].role == "admin"
"""

BENIGN = _form(_part("action", "read"), _part("meta", '{"role": "user"}', extra="Content-Type: application/json\r\n"))
BY_FIELD = _form(_part("action", "read"), _part("action", "delete"))
BY_JSON_PART = _form(_part("meta", '{"role": "admin"}', extra="Content-Type: application/json\r\n"))
MALFORMED = _form(_part("action", "delete"), end="")


@pytest.fixture
def service(write_setup: Any, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    policy = tmp_path / "multipart-policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(POLICY)
    path: Path = write_setup(engine="regorus", policy_paths=[str(policy)])
    path.write_text(path.read_text().replace("[policy]\n", '[policy]\ndecision = "envoy/authz/allow"\n', 1))
    with serve_pdp(load_config(path)) as (url, svc):
        yield url, svc


def _envoy_check(stub: Any, *, body: str = "", raw_body: bytes = b"") -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="POST", path="/upload", host="api.test", scheme="https", protocol="HTTP/1.1", body=body,
        raw_body=raw_body)
    http.headers.update({":authority": "api.test", "content-type": CT})
    return stub.Check(external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http))))


@pytest.mark.integration
def test_a_deny_rule_on_a_multipart_field_fires_on_every_entry_point(service: tuple[str, Any]) -> None:
    url, svc = service
    outcomes: dict[str, list[tuple[str, int]]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for entry in ("envoy body", "envoy raw_body"):
            answers = [_envoy_check(stub, body=b) if entry == "envoy body" else _envoy_check(stub, raw_body=b.encode())
                       for b in (BENIGN, BY_FIELD, BY_JSON_PART, MALFORMED)]
            outcomes[entry] = [
                ("allow" if a.status.code == code_pb2.OK else
                 json.loads(a.denied_response.body)["reason"], a.denied_response.status.code) for a in answers]
    checks = [httpx.post(f"{url}/v1/check", json={
        "method": "POST", "path": "/upload", "host": "api.test", "headers": {"content-type": CT}, "body": b}).json()
        for b in (BENIGN, BY_FIELD, BY_JSON_PART, MALFORMED)]
    outcomes["/v1/check"] = [("allow" if c["allowed"] else c["reason"], 0 if c["allowed"] else c["status"])
                             for c in checks]
    expected = [("allow", 0), ("policy_denied", 403), ("policy_denied", 403), ("request_invalid", 400)]
    assert outcomes == {entry: expected for entry in ("envoy body", "envoy raw_body", "/v1/check")}
