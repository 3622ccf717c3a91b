"""gRPC request bodies in ``input.parsed_body`` (``policy.proto_descriptor``), read as opa-envoy-plugin reads
them: a real FileDescriptorSet built here, real messages serialized by classes built from it, framed as
gRPC frames them, and the real service over Envoy's gRPC ext_authz."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import serve_pdp
from test_envoy_grpc import envoy_request

from pdp.assemble import build_pdp, policy_files
from pdp.config import load_config, parse_config
from pdp.errors import Denied, LoadError
from pdp.policy.grpc_body import MAX_DEPTH, GrpcMessages
from pdp.policy.input import build_input, parse_body
from pdp.policy.protowire import FLOAT_WEIGHT, MAX_ELEMENTS
from pdp.request import CheckRequest

F = descriptor_pb2.FieldDescriptorProto
GRPC = MappingProxyType({"content-type": "application/grpc"})
WELL_KNOWN = (timestamp_pb2, duration_pb2, struct_pb2, any_pb2, wrappers_pb2, field_mask_pb2)


def _field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, type_name: str = "",
           *, repeated: bool = False, **kw: Any) -> None:
    if type_name:
        kw["type_name"] = type_name
    message.field.add(name=name, number=number, type=kind, label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL,
                      **kw)


def _map(message: descriptor_pb2.DescriptorProto, name: str, number: int, key: int, value: int,
         entry: str) -> None:
    nested = message.nested_type.add(name=entry)
    nested.options.map_entry = True
    _field(nested, "key", 1, key)
    _field(nested, "value", 2, value)
    _field(message, name, number, F.TYPE_MESSAGE, f".test.HelloRequest.{entry}", repeated=True)


def greeter_files(method: str = "SayHello") -> descriptor_pb2.FileDescriptorSet:
    """``test.Greeter`` (unary ``SayHello``, client-streaming ``Upload``) and ``legacy.Archive`` (proto2),
    with the well-known types they import, as ``protoc --include_imports`` writes the set."""
    files = descriptor_pb2.FileDescriptorSet()
    for module in WELL_KNOWN:
        module.DESCRIPTOR.CopyToProto(files.file.add())
    greeter = files.file.add(name="test/greeter.proto", package="test", syntax="proto3",
                             dependency=[m.DESCRIPTOR.name for m in WELL_KNOWN])
    mood = greeter.enum_type.add(name="Mood")
    for number, name in enumerate(("MOOD_UNSPECIFIED", "HAPPY", "SAD")):
        mood.value.add(name=name, number=number)
    hello = greeter.message_type.add(name="HelloRequest")
    address = hello.nested_type.add(name="Address")
    _field(address, "city", 1, F.TYPE_STRING)
    _field(address, "zip_code", 2, F.TYPE_UINT32)
    _field(hello, "name", 1, F.TYPE_STRING)
    _field(hello, "count", 2, F.TYPE_INT64)
    _field(hello, "mood", 3, F.TYPE_ENUM, ".test.Mood")
    _field(hello, "tags", 4, F.TYPE_STRING, repeated=True)
    _map(hello, "labels", 5, F.TYPE_STRING, F.TYPE_INT32, "LabelsEntry")
    _field(hello, "home_address", 6, F.TYPE_MESSAGE, ".test.HelloRequest.Address")
    _field(hello, "blob", 7, F.TYPE_BYTES)
    _field(hello, "ratio", 8, F.TYPE_FLOAT)
    _field(hello, "score", 9, F.TYPE_DOUBLE)
    _field(hello, "when", 10, F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    _field(hello, "timeout", 11, F.TYPE_MESSAGE, ".google.protobuf.Duration")
    _field(hello, "extra", 12, F.TYPE_MESSAGE, ".google.protobuf.Struct")
    _field(hello, "anything", 13, F.TYPE_MESSAGE, ".google.protobuf.Any")
    _field(hello, "limit", 14, F.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    _field(hello, "mask", 15, F.TYPE_MESSAGE, ".google.protobuf.FieldMask")
    hello.oneof_decl.add(name="choice")
    _field(hello, "alias", 16, F.TYPE_STRING, oneof_index=0)
    _field(hello, "number", 17, F.TYPE_INT32, oneof_index=0)
    _map(hello, "by_id", 18, F.TYPE_INT64, F.TYPE_BOOL, "ByIdEntry")
    _field(hello, "value", 19, F.TYPE_MESSAGE, ".google.protobuf.Value")
    _field(hello, "child", 20, F.TYPE_MESSAGE, ".test.HelloRequest")
    _field(hello, "big", 21, F.TYPE_FIXED64)
    greeter.message_type.add(name="HelloReply")
    service = greeter.service.add(name="Greeter")
    service.method.add(name=method, input_type=".test.HelloRequest", output_type=".test.HelloReply")
    service.method.add(name="Upload", input_type=".test.HelloRequest", output_type=".test.HelloReply",
                       client_streaming=True)
    legacy = files.file.add(name="legacy.proto", package="legacy", syntax="proto2")
    old = legacy.message_type.add(name="Old")
    old.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_REQUIRED)
    old.field.add(name="note", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    old.extension_range.add(start=100, end=200)
    legacy.extension.add(name="tag", number=100, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL, extendee=".legacy.Old")
    legacy.service.add(name="Archive").method.add(name="Store", input_type=".legacy.Old",
                                                  output_type=".legacy.Old")
    _levels_file(files.file.add(name="legacy/levels.proto", package="legacy", syntax="proto2"))
    _levels_file(files.file.add(name="edition/levels.proto", package="edition", syntax="editions",
                                edition=descriptor_pb2.EDITION_2023), closed=True)
    return files


def _levels_file(file: descriptor_pb2.FileDescriptorProto, *, closed: bool = False) -> None:
    """``Levels``: a closed enum (proto2's, or an edition's with ``enum_type = CLOSED``) in every place a field
    can hold one, a map with string keys, a float; served by ``Ledger.Rate``."""
    package = file.package
    level = file.enum_type.add(name="Level")
    level.value.add(name="LOW", number=0)
    level.value.add(name="HIGH", number=1)
    if closed:
        level.options.features.enum_type = descriptor_pb2.FeatureSet.CLOSED
    levels = file.message_type.add(name="Levels")
    label = F.LABEL_OPTIONAL
    _field(levels, "level", 1, F.TYPE_ENUM, f".{package}.Level")
    _field(levels, "levels", 2, F.TYPE_ENUM, f".{package}.Level", repeated=True)
    for name, number, value, type_name in (("by_name", 3, F.TYPE_ENUM, f".{package}.Level"),
                                            ("notes", 4, F.TYPE_STRING, "")):
        entry = levels.nested_type.add(name=f"{name.title().replace('_', '')}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=label)
        entry.field.add(name="value", number=2, type=value, label=label, **({"type_name": type_name} if type_name
                                                                             else {}))
        _field(levels, name, number, F.TYPE_MESSAGE, f".{package}.Levels.{entry.name}", repeated=True)
    levels.oneof_decl.add(name="pick")
    _field(levels, "picked", 5, F.TYPE_ENUM, f".{package}.Level", oneof_index=0)
    _field(levels, "inner", 6, F.TYPE_MESSAGE, f".{package}.Levels")
    _field(levels, "ratio", 7, F.TYPE_FLOAT, repeated=True)
    _field(levels, "counts", 8, F.TYPE_INT64, repeated=True)
    file.service.add(name="Ledger").method.add(name="Rate", input_type=f".{package}.Levels",
                                               output_type=f".{package}.Levels")


FILES = greeter_files()
# The classes a client of these services generates (a pool of their own, as protoc's output has).
_CLIENT = descriptor_pool.DescriptorPool()
for _file in FILES.file:
    _CLIENT.Add(_file)
HelloRequest = message_factory.GetMessageClass(_CLIENT.FindMessageTypeByName("test.HelloRequest"))
Old = message_factory.GetMessageClass(_CLIENT.FindMessageTypeByName("legacy.Old"))
MESSAGES = GrpcMessages.from_descriptor_set(FILES.SerializeToString())
SAY_HELLO = ["test.Greeter", "SayHello"]
RATE = ["legacy.Ledger", "Rate"]
RATE_EDITION = ["edition.Ledger", "Rate"]


def frame(message: Message | bytes, *, compressed: int = 0) -> bytes:
    """One gRPC length-prefixed message: the compressed flag, the big-endian length, the message."""
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return bytes([compressed]) + struct.pack(">I", len(data)) + data


def read(body: bytes | str, path: list[str] = SAY_HELLO, *, messages: GrpcMessages | None = MESSAGES,
         headers: Any = GRPC) -> tuple[Any, bool]:
    return parse_body(headers, body, grpc=messages, parsed_path=path)


def refused(body: bytes, path: list[str] = SAY_HELLO) -> str:
    with pytest.raises(Denied) as caught:
        read(body, path)
    assert caught.value.reason.code == "request_invalid"
    return caught.value.detail


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _ld(number: int, data: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(data)) + data


def hello(**kw: Any) -> Message:
    return HelloRequest(**kw)


def test_the_message_is_rendered_as_protojson_renders_it() -> None:
    message = hello(name="alice", count=1 << 40, mood=1, tags=["a", "b"], labels={"x": 1, "y": -2},
                    blob=b"\x00\xffhi", ratio=0.1, score=2.5, number=0, by_id={7: True, -1: False},
                    big=(1 << 64) - 1)
    message.home_address.city = "Oslo"
    message.home_address.zip_code = 150
    message.when.FromSeconds(1_700_000_000)
    message.when.nanos = 5_000_000
    message.timeout.seconds, message.timeout.nanos = -3, -500_000_000
    message.extra.update({"k": [1, "two", None, True, {"n": 1.5}]})
    message.limit.value = 0
    message.mask.paths.extend(["user.display_name", "id"])
    message.anything.Pack(duration_pb2.Duration(seconds=1, nanos=1000))
    assert read(frame(message)) == ({
        "name": "alice", "count": str(1 << 40), "mood": "HAPPY", "tags": ["a", "b"], "labels": {"x": 1, "y": -2},
        "homeAddress": {"city": "Oslo", "zipCode": 150}, "blob": base64.b64encode(b"\x00\xffhi").decode(),
        "ratio": 0.1, "score": 2.5, "when": "2023-11-14T22:13:20.005Z", "timeout": "-3.500s",
        "extra": {"k": [1.0, "two", None, True, {"n": 1.5}]}, "limit": "0", "mask": "user.displayName,id",
        "anything": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1.000001s"},
        "number": 0, "byId": {"7": True, "-1": False}, "big": str((1 << 64) - 1),
    }, False)


def test_fields_without_a_value_are_left_out_and_an_empty_message_is_an_empty_object() -> None:
    assert read(frame(hello(name="", count=0, mood=0))) == ({}, False)
    assert read(frame(b"")) == ({}, False)


def test_floats_nan_infinity_and_unknown_enum_numbers_read_as_protojson_writes_them() -> None:
    message = hello(ratio=float("inf"), score=float("nan"), mood=7)
    assert read(frame(message))[0] == {"ratio": "Infinity", "score": "NaN", "mood": 7}
    assert read(frame(hello(score=float("-inf"), ratio=3.4028234663852886e38)))[0] == \
        {"score": "-Infinity", "ratio": 3.4028235e38}


def test_only_the_first_message_of_the_body_is_read() -> None:
    assert read(frame(hello(name="a")) + frame(hello(name="b")))[0] == {"name": "a"}


def test_an_unknown_service_or_method_is_null() -> None:
    body = frame(hello(name="a"))
    assert read(body, ["test.Nope", "SayHello"]) == (None, False)
    assert read(body, ["test.Greeter", "Nope"]) == (None, False)
    assert read(body, [".test.Greeter", "SayHello"]) == (None, False)  # Go does not drop a leading dot
    assert read(body, ["test.HelloRequest", "SayHello"]) == (None, False)  # a message, not a service


def test_a_client_streaming_method_is_null() -> None:
    assert read(frame(hello(name="a")), ["test.Greeter", "Upload"]) == (None, False)


def test_a_compressed_message_is_null() -> None:
    assert read(frame(hello(name="a"), compressed=1)) == (None, False)


def test_a_length_past_the_body_is_a_truncated_body() -> None:
    assert read(frame(hello(name="alice"))[:-1]) == (None, True)


def test_fewer_than_five_bytes_are_refused() -> None:
    assert "5 bytes" in refused(b"\x00\x00\x00\x00")


def test_a_path_of_other_than_two_segments_is_refused() -> None:
    body = frame(hello(name="a"))
    refused(body, ["test.Greeter", "SayHello", "x"])
    refused(body, ["test.Greeter"])


def test_bytes_that_are_not_the_message_are_refused() -> None:
    assert "test.HelloRequest" in refused(frame(b"\xff\xff\xff"))
    refused(frame(b"\x0a\x05ab"))  # a string field longer than the message


def test_no_descriptor_set_and_a_text_body_are_null() -> None:
    body = frame(hello(name="a"))
    assert read(body, messages=None) == (None, False)
    assert read(body.decode("latin-1")) == (None, False)  # Envoy's 'body': the plugin reads only raw_body


def test_json_in_the_content_type_is_read_as_json_first() -> None:
    assert read(b'{"a": 1}', headers={"content-type": "application/json; application/grpc"}) == ({"a": 1}, False)


def test_a_proto2_message_without_its_required_field_is_refused() -> None:
    assert "required" in refused(frame(Old(note="n").SerializePartialToString()), ["legacy.Archive", "Store"])
    assert read(frame(Old(id="1")), ["legacy.Archive", "Store"]) == ({"id": "1"}, False)


def test_a_proto2_string_that_is_not_utf8_is_refused() -> None:
    refused(frame(b"\x0a\x011\x12\x02\xff\xfe"), ["legacy.Archive", "Store"])


def test_extensions_are_left_out_as_go_reads_them_as_unknown_fields() -> None:
    message = Old(id="1")
    message.Extensions[_CLIENT.FindExtensionByName("legacy.tag")] = 5
    assert read(frame(message), ["legacy.Archive", "Store"]) == ({"id": "1"}, False)


@pytest.mark.parametrize("build", [
    pytest.param(lambda m: m.value.SetInParent(), id="value-without-kind"),
    pytest.param(lambda m: setattr(m.value, "number_value", float("inf")), id="value-infinity"),
    pytest.param(lambda m: setattr(m.when, "seconds", 253402300800), id="timestamp-after-9999"),
    pytest.param(lambda m: setattr(m.when, "nanos", -1), id="timestamp-negative-nanos"),
    pytest.param(lambda m: setattr(m.timeout, "seconds", 315576000001), id="duration-too-long"),
    pytest.param(lambda m: (setattr(m.timeout, "seconds", 1), setattr(m.timeout, "nanos", -1)), id="duration-signs"),
    pytest.param(lambda m: m.mask.paths.append("userName"), id="fieldmask-upper-case"),
    pytest.param(lambda m: m.mask.paths.append("a__b"), id="fieldmask-irreversible"),
    pytest.param(lambda m: m.mask.paths.append("a b"), id="fieldmask-invalid"),
    pytest.param(lambda m: m.anything.Pack(hello(name="x")), id="any-of-a-type-opa-may-not-know"),
    pytest.param(lambda m: setattr(m.anything, "value", b"\x08\x01"), id="any-value-without-type"),
    pytest.param(lambda m: setattr(m.anything, "type_url", "type.googleapis.com/google.protobuf.Nope"),
                 id="any-unresolved"),
])
def test_what_protojson_refuses_to_render_is_refused(build: Any) -> None:
    message = hello(name="a")
    build(message)
    refused(frame(message))


def test_any_empty_and_any_of_a_well_known_type() -> None:
    message = hello()
    message.anything.SetInParent()
    assert read(frame(message))[0] == {"anything": {}}
    message.anything.Pack(struct_pb2.Value(string_value="s"))
    assert read(frame(message))[0] == {"anything": {"@type": "type.googleapis.com/google.protobuf.Value",
                                                    "value": "s"}}


def test_timestamps_and_durations_carry_0_3_6_or_9_fractional_digits() -> None:
    cases = [(0, 0, "1970-01-01T00:00:00Z", "0s"), (1, 120_000, "1970-01-01T00:00:01.000120Z", "1.000120s"),
             (-62135596800, 1, "0001-01-01T00:00:00.000000001Z", "-62135596800.000000001s")]
    for seconds, nanos, stamp, _ in cases:
        message = hello()
        message.when.seconds, message.when.nanos = seconds, nanos
        assert read(frame(message))[0] == {"when": stamp}
    for seconds, nanos, _, span in cases:
        message = hello()
        message.timeout.seconds, message.timeout.nanos = seconds, -nanos if seconds < 0 else nanos
        assert read(frame(message))[0] == {"timeout": span}


def test_messages_nested_past_the_recursion_limit_are_refused_cleanly() -> None:
    def nested(depth: int) -> bytes:
        data = hello(name="leaf").SerializeToString()
        for _ in range(depth):
            data = b"\xa2\x01" + _varint(len(data)) + data  # field 20, 'child', length-delimited
        return data

    assert read(frame(nested(MAX_DEPTH - 1)))[0]["child"]["child"]
    assert "deep" in refused(frame(nested(MAX_DEPTH + 5)))
    assert "deep" in refused(frame(nested(10_000)))
    # An Any inside an Any inside an Any …: each parses on its own, the rendering counts them all.
    inner = any_pb2.Any()
    for _ in range(MAX_DEPTH + 5):
        outer = any_pb2.Any()
        outer.Pack(inner)
        inner = outer
    message = hello()
    message.anything.MergeFromString(inner.SerializeToString())
    assert "deep" in refused(frame(message))


ALL_PATHS = [SAY_HELLO, ["legacy.Archive", "Store"], RATE, RATE_EDITION]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(ALL_PATHS))
def test_any_bytes_are_a_document_or_a_refusal_never_another_error(data: bytes, path: list[str]) -> None:
    try:
        read(frame(data), path)
    except Denied as denied:
        assert denied.reason.code == "request_invalid"


# Fields of the messages above, as bytes that parse often: map entries of any key and value bytes (proto2 string
# keys that are not UTF-8 among them), enum numbers named or not, varints of any length, floats, nesting.
_VARINTS = st.one_of(st.integers(0, 1 << 64).map(lambda n: _varint(n & ((1 << 64) - 1))),
                     st.binary(min_size=1, max_size=11).map(lambda b: bytes(x | 0x80 for x in b[:-1]) + b[-1:]))
_PIECES = st.one_of(
    st.tuples(st.binary(max_size=6), st.binary(max_size=6)).map(lambda kv: _ld(4, _ld(1, kv[0]) + _ld(2, kv[1]))),
    st.tuples(st.binary(max_size=6), _VARINTS).map(lambda kv: _ld(3, _ld(1, kv[0]) + _tag(2, 0) + kv[1])),
    st.tuples(st.sampled_from([1, 2, 5, 12, 16]), _VARINTS).map(lambda nv: _tag(nv[0], 0) + nv[1]),
    st.lists(_VARINTS, max_size=4).map(lambda vs: _ld(2, b"".join(vs))),
    st.binary(min_size=4, max_size=4).map(lambda b: _tag(7, 5) + b),
    st.binary(max_size=16).map(lambda b: _ld(6, b)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=6), st.sampled_from(ALL_PATHS))
def test_likely_fields_are_a_document_or_a_refusal_never_another_error(pieces: list[bytes], path: list[str]) -> None:
    try:
        read(frame(b"".join(pieces)), path)
    except Denied as denied:
        assert denied.reason.code == "request_invalid"


def test_build_input_hands_the_descriptors_to_the_body() -> None:
    request = CheckRequest(method="POST", path="/test.Greeter/SayHello", time=time.time(), host="api.test",
                           headers=GRPC, body=frame(hello(name="alice")))
    doc = build_input(request, None, None, {"method": None, "bound": False}, MESSAGES)
    assert doc["parsed_body"] == {"name": "alice"} and doc["truncated_body"] is False
    assert build_input(request, None, None, {"method": None, "bound": False})["parsed_body"] is None


# -- where protobuf Python reads what Go reads otherwise, or refuses what Go reads


@pytest.mark.parametrize("path", [RATE, RATE_EDITION], ids=["proto2", "editions-closed"])
@pytest.mark.parametrize("payload", [
    pytest.param(_tag(1, 0) + _varint(7), id="singular"),
    pytest.param(_tag(1, 0) + _varint(1) + _tag(1, 0) + _varint(7), id="singular-named-then-not"),
    pytest.param(_tag(1, 0) + _varint((1 << 64) - 1), id="singular-negative"),
    pytest.param(_tag(2, 0) + _varint(1) + _tag(2, 0) + _varint(7), id="repeated"),
    pytest.param(_ld(2, b"\x01\x07\x00"), id="packed"),
    pytest.param(_ld(3, _ld(1, b"k") + _tag(2, 0) + _varint(7)), id="map-value"),
    pytest.param(_tag(5, 0) + _varint(7), id="oneof"),
    pytest.param(_ld(6, _ld(6, _tag(1, 0) + _varint(9))), id="nested"),
])
def test_a_closed_enum_number_the_enum_does_not_name_is_refused(path: list[str], payload: bytes) -> None:
    # protobuf Python moves the number to the unknown fields (the field vanishes); Go keeps it and protojson
    # writes it: a policy denying on the field would miss it here.
    assert "closed enum" in refused(frame(payload), path)


@pytest.mark.parametrize("path", [RATE, RATE_EDITION], ids=["proto2", "editions-closed"])
def test_closed_enum_numbers_the_enum_names_are_read(path: list[str]) -> None:
    payload = (_tag(1, 0) + _varint(1) + _ld(2, b"\x01\x00") + _tag(2, 0) + _varint(1)
               + _ld(3, _ld(1, b"k") + _tag(2, 0) + _varint(1)) + _tag(5, 0) + _varint(0)
               + _tag(1, 0) + _varint((1 << 32) + 1))  # Go and protobuf Python alike keep the low 32 bits
    assert read(frame(payload), path)[0] == {"level": "HIGH", "levels": ["HIGH", "LOW", "HIGH"],
                                             "byName": {"k": "HIGH"}, "picked": "LOW"}


def test_a_proto2_map_key_that_is_not_utf8_is_refused() -> None:
    assert "UTF-8" in refused(frame(_ld(4, _ld(1, b"\xff") + _ld(2, b"v"))), RATE)
    assert "UTF-8" in refused(frame(_ld(4, _ld(1, b"k") + _ld(2, b"\xff"))), RATE)
    assert read(frame(_ld(4, _ld(1, "é".encode()) + _ld(2, b"v"))), RATE)[0] == {"notes": {"é": "v"}}


OVERLONG = b"\xff" * 9 + b"\x7f"  # 10 bytes, the last above 1: past 64 bits


@pytest.mark.parametrize("payload", [
    pytest.param(b"\x10" + OVERLONG, id="value"),
    pytest.param(b"\x10" + b"\x80" * 9 + b"\x02", id="value-bit-64"),
    pytest.param(b"\x10" + b"\x80" * 10 + b"\x00", id="value-11-bytes"),
    pytest.param(b"\x0a" + b"\x81" + b"\x80" * 8 + b"\x02" + b"a", id="length"),
    pytest.param(b"\xf8\x07" + OVERLONG, id="unknown-field"),
    pytest.param(b"\x32\x0b\x10" + OVERLONG, id="in-a-message"),
    pytest.param(b"\xa2\x01\x0b\x10" + OVERLONG, id="in-a-child"),
])
def test_an_overlong_varint_is_refused(payload: bytes) -> None:
    assert "64 bits" in refused(frame(payload))


def test_an_overlong_varint_is_refused_in_packed_elements_and_inside_an_any() -> None:
    assert "64 bits" in refused(frame(_ld(2, b"\x01" + OVERLONG + b"\x00")), RATE)
    duration = _ld(1, b"type.googleapis.com/google.protobuf.Duration") + _ld(2, b"\x08" + OVERLONG)
    assert "64 bits" in refused(frame(_ld(13, duration)))


def test_a_ten_byte_varint_ending_in_1_is_read() -> None:
    assert read(frame(b"\xa9\x01" + b"\xff" * 8), )[0] == {"big": str((1 << 64) - 1)}  # fixed64, for scale
    assert read(frame(b"\x10" + b"\xff" * 9 + b"\x01"))[0] == {"count": "-1"}


# float32 at powers of two (the float32 below is half as far as the one above) and elsewhere, as Go writes them.
@pytest.mark.parametrize(("exponent", "written"), [(-96, 1.2621775e-29), (87, 1.5474251e26), (90, 1.2379401e27),
                                                   (-126, 1.1754944e-38), (0, 1.0), (127, 1.7014118e38)])
def test_float32_powers_of_two_are_written_in_go_shortest_digits(exponent: int, written: float) -> None:
    assert read(frame(hello(ratio=2.0 ** exponent)))[0] == {"ratio": written}
    assert _go_shortest(2.0 ** exponent) == Fraction(repr(written))


def _go_shortest(value: float) -> Fraction:
    """Go's shortest float32 decimal, by exact arithmetic: the fewest digits in the rounding interval (its ends
    in it when the mantissa is even), the closest to the value among those."""
    bits = struct.unpack("<I", struct.pack("<f", abs(value)))[0]
    exact = Fraction(abs(value))
    neighbours = [Fraction(struct.unpack("<f", struct.pack("<I", b))[0]) if b < 0x7F800000 else Fraction(2) ** 128
                  for b in (max(bits - 1, 0), bits + 1)]
    low, high = (exact + neighbours[0]) / 2, (exact + neighbours[1]) / 2
    even = bits % 2 == 0
    for digits in range(1, 10):
        scale = Fraction(10) ** (math.floor(math.log10(abs(value))) - digits + 1)
        best: Fraction | None = None
        for mantissa in range(math.floor(exact / scale) - 1, math.floor(exact / scale) + 3):
            candidate = mantissa * scale
            if mantissa > 0 and (low < candidate < high or (even and candidate in (low, high))) and \
                    (best is None or abs(candidate - exact) < abs(best - exact)):
                best = candidate
        if best is not None:
            return best if value > 0 else -best
    raise AssertionError(value)


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=1, max_value=0x7F7FFFFF), st.booleans())
def test_float32_is_the_shortest_decimal_that_reads_back_and_the_closest_of_those(bits: int, negative: bool) -> None:
    value = struct.unpack("<f", struct.pack("<I", bits | (0x80000000 if negative else 0)))[0]
    written = read(frame(hello(ratio=value)))[0]["ratio"]
    assert struct.unpack("<f", struct.pack("<f", written))[0] == value  # reads back
    assert Fraction(repr(written)) == _go_shortest(value)
    digits = len(repr(abs(written)).split("e")[0].replace(".", "").strip("0"))
    plain = next(d for d in range(1, 10) if _reads_back(f"{value:.{d}g}", value))
    assert digits <= plain  # never longer than the closest decimal that reads back


def _reads_back(text: str, value: float) -> bool:
    try:
        return struct.unpack("<f", struct.pack("<f", float(text)))[0] == value
    except OverflowError:
        return False


# -- what a body may cost

def _timed(call: Any) -> float:
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(("payload", "path"), [
    pytest.param(_ld(20, b"") * (2 << 20), SAY_HELLO, id="empty-messages"),  # ~4 MiB each
    pytest.param(_ld(4, b"") * (2 << 20), SAY_HELLO, id="empty-strings"),
    pytest.param(_ld(11, b"\x08\x01") * (1 << 20), SAY_HELLO, id="durations"),
    pytest.param(_ld(8, b"\x01" * (4 << 20)), RATE, id="packed-varints"),
    pytest.param(_ld(2, b"\x01" * (4 << 20)), RATE, id="packed-closed-enum"),
    pytest.param(_ld(7, b"\x00\x00\x80\x3f" * (1 << 20)), RATE, id="packed-floats"),
    pytest.param((_tag(7, 5) + b"\x00\x00\x80\x3f") * (800 << 10), RATE, id="float-fields"),
])
def test_a_body_of_millions_of_elements_is_refused_before_it_is_built(payload: bytes, path: list[str]) -> None:
    assert "fields and elements" in refused(frame(payload), path)


def test_the_element_bound_keeps_any_4_mib_body_near_the_cost_of_reading_4_mib_of_json() -> None:
    document = b"[" + b"1," * (2 << 20) + b"1]"
    yardstick = _timed(lambda: json.loads(document))
    filler = _ld(1, b"x" * (4 << 20))  # the rest of the 4 MiB, read without work per byte
    most = MAX_ELEMENTS - 2
    bodies = {
        "refused": _ld(20, b"") * (2 << 20),
        "empty-timestamps": _ld(10, b"") * most + filler,
        "empty-messages": _ld(20, b"") * most + filler,
        "floats": _ld(7, b"\xcd\xcc\x4c\x3d" * (most // FLOAT_WEIGHT)),
        "field-mask": _ld(15, _ld(1, b"a_b" * (1 << 20))),
    }
    for name, payload in bodies.items():
        path = RATE if name == "floats" else SAY_HELLO
        spent = _timed(lambda: _read_or_refuse(frame(payload), path))  # noqa: B023 - called at once
        assert spent < 3 * yardstick, (name, spent, yardstick)
    # At the bound itself: one element more is refused.
    assert "fields and elements" in refused(frame(_ld(20, b"") * (MAX_ELEMENTS + 1)))
    assert read(frame(_ld(20, b"") * MAX_ELEMENTS)) == ({"child": {}}, False)


def _read_or_refuse(body: bytes, path: list[str]) -> None:
    try:
        read(body, path)
    except Denied:
        pass


# -- the descriptor file, in the configuration

def test_the_path_is_relative_to_the_config_file_and_a_bad_file_names_the_key(tmp_path: Path) -> None:
    config = parse_config({"policy": {"proto_descriptor": "api.pb"}}, tmp_path)
    assert config.policy.proto_descriptor == tmp_path / "api.pb"
    assert config.policy.proto_descriptor in policy_files(config)
    for content, says in ((None, "cannot read"), (b"\xff\xff", "not a FileDescriptorSet")):
        if content is not None:
            (tmp_path / "api.pb").write_bytes(content)
        with pytest.raises(LoadError) as caught:
            build_pdp(config, probe=False)
        assert caught.value.key == "policy.proto_descriptor" and str(tmp_path / "api.pb") in str(caught.value)
        assert says in str(caught.value)


def test_a_set_without_the_files_it_imports_is_refused(tmp_path: Path) -> None:
    files = greeter_files()
    del files.file[0]  # google/protobuf/timestamp.proto: as protoc writes without --include_imports
    (tmp_path / "api.pb").write_bytes(files.SerializeToString())
    with pytest.raises(LoadError, match=r"imports google/protobuf/timestamp\.proto, which is not in the set"):
        GrpcMessages.load(tmp_path / "api.pb")


# -- end to end: Envoy's gRPC ext_authz, a policy on a field of the gRPC message

POLICY = """package pdp.authz

default result := false

result if {
	input.parsed_path == ["test.Greeter", "SayHello"]
	input.parsed_body.name != "mallory"
}
"""


@pytest.fixture
def greeter_pdp(write_setup: Any, tmp_path: Path) -> Iterator[tuple[Any, Any, Path]]:
    (tmp_path / "greeter.rego").write_text(POLICY)
    (tmp_path / "greeter.pb").write_bytes(FILES.SerializeToString())
    path = write_setup(engine="regorus", policy_paths=["greeter.rego"])
    text = path.read_text()
    path.write_text(text.replace('engine = "regorus"\n', 'engine = "regorus"\nproto_descriptor = "greeter.pb"\n', 1))
    with serve_pdp(load_config(path)) as (_, service):
        assert service.grpc is not None
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
            yield external_auth_pb2_grpc.AuthorizationStub(channel), service, tmp_path


def grpc_call(message: Message | bytes, path: str = "/test.Greeter/SayHello") -> Any:
    request = envoy_request(path=path, method="POST")
    request.attributes.request.http.headers["content-type"] = "application/grpc"
    request.attributes.request.http.raw_body = frame(message)  # with_request_body + pack_as_bytes
    return request


@pytest.mark.integration
def test_a_policy_denying_on_a_field_of_the_grpc_message_denies_over_envoy_grpc(greeter_pdp: Any) -> None:
    stub, _, _ = greeter_pdp
    assert stub.Check(grpc_call(hello(name="alice"))).status.code == code_pb2.OK
    assert stub.Check(grpc_call(hello(name="mallory"))).status.code == code_pb2.PERMISSION_DENIED
    refused = stub.Check(grpc_call(b"\xff\xff\xff"))
    assert refused.status.code != code_pb2.OK and refused.denied_response.status.code == 400


@pytest.mark.integration
def test_the_descriptor_set_is_reloaded_with_the_policy(greeter_pdp: Any) -> None:
    stub, service, tmp_path = greeter_pdp
    renamed = grpc_call(hello(name="mallory"), "/test.Greeter/Greet")
    assert stub.Check(renamed).status.code == code_pb2.PERMISSION_DENIED  # the path the policy names, not this
    (tmp_path / "greeter.pb").write_bytes(greeter_files("SayHi").SerializeToString())
    (tmp_path / "greeter.rego").write_text(POLICY.replace('"SayHello"', '"SayHi"'))
    service.reloader.check(force=True)
    assert stub.Check(grpc_call(hello(name="alice"), "/test.Greeter/SayHi")).status.code == code_pb2.OK
    assert stub.Check(grpc_call(hello(name="mallory"), "/test.Greeter/SayHi")).status.code == \
        code_pb2.PERMISSION_DENIED
