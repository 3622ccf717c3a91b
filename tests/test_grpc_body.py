"""gRPC request bodies in ``input.parsed_body`` (``policy.proto_descriptor``), read as opa-envoy-plugin reads
them: a real FileDescriptorSet built here, real messages serialized by classes built from it, framed as
gRPC frames them, and the real service over Envoy's gRPC ext_authz."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
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
    return files


FILES = greeter_files()
# The classes a client of these services generates (a pool of their own, as protoc's output has).
_CLIENT = descriptor_pool.DescriptorPool()
for _file in FILES.file:
    _CLIENT.Add(_file)
HelloRequest = message_factory.GetMessageClass(_CLIENT.FindMessageTypeByName("test.HelloRequest"))
Old = message_factory.GetMessageClass(_CLIENT.FindMessageTypeByName("legacy.Old"))
MESSAGES = GrpcMessages.from_descriptor_set(FILES.SerializeToString())
SAY_HELLO = ["test.Greeter", "SayHello"]


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


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([["test.Greeter", "SayHello"], ["legacy.Archive", "Store"]]))
def test_any_bytes_are_a_document_or_a_refusal_never_another_error(data: bytes, path: list[str]) -> None:
    try:
        read(frame(data), path)
    except Denied as denied:
        assert denied.reason.code == "request_invalid"


def test_build_input_hands_the_descriptors_to_the_body() -> None:
    request = CheckRequest(method="POST", path="/test.Greeter/SayHello", time=time.time(), host="api.test",
                           headers=GRPC, body=frame(hello(name="alice")))
    doc = build_input(request, None, None, {"method": None, "bound": False}, MESSAGES)
    assert doc["parsed_body"] == {"name": "alice"} and doc["truncated_body"] is False
    assert build_input(request, None, None, {"method": None, "bound": False})["parsed_body"] is None


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
