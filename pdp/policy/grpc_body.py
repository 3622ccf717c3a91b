"""gRPC request payloads read into ``input.parsed_body`` as opa-envoy-plugin reads them (its
``proto_descriptor`` setting; ``envoyauth/request.go``, ``getParsedBody`` and ``getGRPCBody``).

A gRPC call of method ``M`` on service ``pkg.S`` is an HTTP/2 POST to ``/pkg.S/M`` whose body is a
sequence of length-prefixed messages (gRPC over HTTP/2, ``doc/PROTOCOL-HTTP2.md``): one byte, the
compressed flag, then the message's length as a big-endian 32-bit unsigned integer, then the message.
The plugin, given a FileDescriptorSet (``protoc --include_imports --descriptor_set_out=…``), reads the
first message of the body Envoy sends (``with_request_body`` with ``pack_as_bytes``) as the method's
input type and renders it with Go's ``protojson.Marshal``. This module does the same:

- the path has other than 2 segments, or the body is shorter than the 5-byte prefix: an error (the
  request is refused);
- a compressed message (flag not 0): not read, no error (null);
- a length past the end of the body: null, ``truncated_body`` true (Envoy cut the body);
- a service or method the descriptors do not name, or a client-streaming method: null;
- a message that does not parse as the input type (or lacks a proto2 ``required`` field, as Go's
  ``proto.Unmarshal`` checks; or holds a varint past 64 bits, which protobuf Python truncates and Go
  refuses): an error;
- a number a closed enum (proto2's, or an edition's ``CLOSED``) does not name, in a field of that enum:
  an error. Go keeps it in the field and writes the number; protobuf Python moves it to the unknown fields,
  so the field would vanish from the document. Refused rather than rendered otherwise;
- more than ``protowire.MAX_ELEMENTS`` (50,000) fields and packed elements in the message, the messages in
  its ``Any`` fields included, a ``float`` counting two: an error, found in one pass over the bytes before
  anything is built, so that a 4 MiB body of one-byte elements costs milliseconds rather than seconds and
  hundreds of megabytes (``pdp.policy.protowire``).

The rendering is protojson's with its default options: fields by their JSON names, fields without a
value left out, 64-bit integers as decimal strings, enums by name (the number when the enum does not
name it), bytes as standard base64, floats as their shortest decimal (a ``float`` as Go's shortest
float32: the fewest digits that read back, the closest of those; ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` as strings), map keys as strings, and the well-known types in their JSON forms.
Extensions are left out: Go parses the message with its global type registry, which does not know the
descriptor set's extensions, so they are unknown fields there. Where protojson fails, this module
fails too: a ``google.protobuf.Value`` with no kind or a non-finite number, a ``Timestamp`` or
``Duration`` out of range, a ``FieldMask`` path that does not convert to lowerCamelCase and back, a
proto2 string (or map key) that is not UTF-8; nothing else escapes, what does not render is refused.
An ``Any`` is read when it is empty or holds a well-known type; which other types resolve depends on
what the OPA-Envoy binary was built with, so this module refuses any other rather than render what OPA
may refuse. Messages nest at most ``MAX_DEPTH`` deep (protobuf
Python's parser limit; Go's is deeper): past it the request is refused.
"""

from __future__ import annotations

import base64
import datetime
import functools
import math
import re
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from pdp.errors import LoadError
from pdp.policy import protowire

KEY = "policy.proto_descriptor"
#: Messages nested deeper than this are refused (protobuf Python's parser stops at 100).
MAX_DEPTH = 100

_PREFIX = 5
_WRAPPERS = frozenset(f"google.protobuf.{n}Value" for n in
                      ("Bool", "Int32", "Int64", "UInt32", "UInt64", "Float", "Double", "String", "Bytes"))
#: The types an ``Any`` may hold here: every OPA-Envoy binary knows the well-known types.
_ANY_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls for cls in (
        any_pb2.Any, timestamp_pb2.Timestamp, duration_pb2.Duration, field_mask_pb2.FieldMask, empty_pb2.Empty,
        struct_pb2.Struct, struct_pb2.Value, struct_pb2.ListValue, wrappers_pb2.BoolValue, wrappers_pb2.Int32Value,
        wrappers_pb2.Int64Value, wrappers_pb2.UInt32Value, wrappers_pb2.UInt64Value, wrappers_pb2.FloatValue,
        wrappers_pb2.DoubleValue, wrappers_pb2.StringValue, wrappers_pb2.BytesValue)}
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})
_MESSAGE_TYPES = frozenset({FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP})
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})
_IRREVERSIBLE = re.compile(r"[A-Z]|_(?![a-z])")
_FULL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_TIMESTAMP_MIN, _TIMESTAMP_MAX = -62135596800, 253402300799  # 0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z
_DURATION_MAX = 315576000000
_NANOS_MAX = 999999999
_EPOCH = datetime.datetime(1970, 1, 1)
_F32, _U32, _TWO_F32, _TWO_U32 = struct.Struct("<f"), struct.Struct("<I"), struct.Struct("<2f"), struct.Struct("<2I")
_LOG10_2 = math.log10(2)


class GrpcBodyError(ValueError):
    """The body is not the gRPC message its path names (opa-envoy-plugin refuses the request)."""


class GrpcMessages:
    """The input message class of every method of every service in a FileDescriptorSet, built once."""

    def __init__(self, methods: dict[tuple[str, str], type[Message] | None]) -> None:
        #: (service full name, method name) → the input message class; None for a client-streaming method.
        self.methods = methods

    @classmethod
    def from_descriptor_set(cls, data: bytes) -> GrpcMessages:
        """Read a serialized ``FileDescriptorSet``; ``ValueError`` when it is not one, or a file's imports
        are not in it (``protoc --include_imports``)."""
        files = descriptor_pb2.FileDescriptorSet()
        try:
            files.ParseFromString(data)
        except DecodeError as exc:
            raise ValueError(f"not a FileDescriptorSet: {exc}") from None
        by_name = {f.name: f for f in files.file}
        if len(by_name) != len(files.file):
            raise ValueError("a file is in the set twice")
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        for name in by_name:
            _add(pool, by_name, name, added, ())
        methods: dict[tuple[str, str], type[Message] | None] = {}
        for name in by_name:
            for service in pool.FindFileByName(name).services_by_name.values():
                for method in service.methods:
                    methods[(service.full_name, method.name)] = \
                        None if method.client_streaming else message_factory.GetMessageClass(method.input_type)
        return cls(methods)

    @classmethod
    def load(cls, path: Path, key: str = KEY) -> GrpcMessages:
        """The descriptor set at ``path``; ``LoadError`` naming ``key`` and the file when it will not do."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoadError(key, f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_descriptor_set(data)
        except (ValueError, TypeError) as exc:  # the pool's own refusals are TypeError
            raise LoadError(key, f"{path}: {exc}") from None


def _add(pool: descriptor_pool.DescriptorPool, by_name: dict[str, descriptor_pb2.FileDescriptorProto], name: str,
         added: set[str], importing: tuple[str, ...]) -> None:
    """Add ``name`` after its imports (the pool builds a file only once its imports are in it)."""
    if name in added:
        return
    if name in importing:
        raise ValueError(f"{name} imports itself (through {' → '.join(importing)})")
    if len(importing) > 100:
        raise ValueError(f"imports nest more than 100 deep at {name}")
    proto = by_name[name]
    for dependency in proto.dependency:
        if dependency not in by_name:
            raise ValueError(f"{name} imports {dependency}, which is not in the set (protoc --include_imports)")
        _add(pool, by_name, dependency, added, (*importing, name))
    pool.Add(proto)
    added.add(name)


def read_grpc_body(raw: bytes, parsed_path: list[str], messages: GrpcMessages) -> tuple[Any, bool]:
    """(parsed_body, truncated_body) of a gRPC request body, as the plugin computes them; raises
    ``GrpcBodyError`` where the plugin refuses the request."""
    if len(parsed_path) != 2:
        raise GrpcBodyError(f"a gRPC path is /service/method, not {len(parsed_path)} segments")
    if len(raw) < _PREFIX:
        raise GrpcBodyError("less than the 5 bytes of a gRPC message prefix")
    if raw[0] != 0:  # compressed: the plugin does not decompress
        return None, False
    size = int.from_bytes(raw[1:_PREFIX], "big")
    if size > len(raw) - _PREFIX:
        return None, True
    # Looked up as the path spells it, as Go's FindDescriptorByName does (a leading dot finds nothing).
    message_class = messages.methods.get((parsed_path[0], parsed_path[1]))
    if message_class is None:
        return None, False
    message = message_class()
    name = message.DESCRIPTOR.full_name
    budget = protowire.Budget()
    try:
        # First what Go refuses and protobuf Python takes, and the count, before anything is built.
        protowire.check(raw, _PREFIX, _PREFIX + size, message.DESCRIPTOR, budget, max_depth=MAX_DEPTH)
        message.ParseFromString(raw[_PREFIX:_PREFIX + size])
    except protowire.WireError as exc:
        raise GrpcBodyError(f"the message is not a {name}: {exc}") from None
    except DecodeError as exc:
        raise GrpcBodyError(f"the message is not a {name}: {_decode_error(exc)}") from None
    if not message.IsInitialized():  # Go's proto.Unmarshal checks proto2 required fields
        raise GrpcBodyError(f"the {name} lacks required fields")
    try:
        return render(message, budget), False
    except GrpcBodyError:
        raise
    except (ValueError, OverflowError, RecursionError) as exc:  # UnicodeDecodeError among them: a refusal
        raise GrpcBodyError(f"the {name} does not render: {exc}") from None


def _decode_error(exc: DecodeError) -> str:
    text = str(exc)
    return f"nested more than {MAX_DEPTH} deep" if "MaxDepth" in text else text.rpartition(": ")[2] or text


def render(message: Message, budget: protowire.Budget | None = None) -> Any:
    """``message`` as Go's ``protojson.Marshal`` renders it, decoded as JSON; ``GrpcBodyError`` where
    protojson fails. The messages an ``Any`` holds count against ``budget`` (a body's elements)."""
    return _message(message, 0, budget or protowire.Budget())


def _message(message: Message, depth: int, budget: protowire.Budget) -> Any:
    if depth > MAX_DEPTH:
        raise GrpcBodyError(f"the message nests more than {MAX_DEPTH} deep")
    descriptor: Descriptor = message.DESCRIPTOR
    known = _WELL_KNOWN.get(descriptor.full_name)
    if known is not None:
        try:
            return known(message, depth, budget)
        except (AttributeError, KeyError, IndexError) as exc:  # a google.protobuf type of another shape
            raise GrpcBodyError(f"{descriptor.full_name} is not the well-known type: {exc}") from None
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.is_extension:
            continue
        out[field.json_name] = _field(field, value, depth, budget)
    return out


@functools.lru_cache(maxsize=4096)
def _map_fields(field: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor] | None:
    """The key and value fields of a map field's entry; None for another field."""
    entry = field.message_type
    if entry is None or not entry.GetOptions().map_entry:
        return None
    return entry.fields_by_number[1], entry.fields_by_number[2]


def _field(field: FieldDescriptor, value: Any, depth: int, budget: protowire.Budget) -> Any:
    map_fields = _map_fields(field)
    if map_fields is not None:
        key_field, value_field = map_fields
        try:
            items = list(value.items())
        except UnicodeDecodeError:  # a proto2 string key that is not UTF-8: protojson's WriteName refuses it
            raise GrpcBodyError(f"a key of {field.name} is not UTF-8") from None
        return {_map_key(key_field, k): _singular(value_field, v, depth, budget) for k, v in items}
    if field.is_repeated:
        return [_singular(field, v, depth, budget) for v in value]
    return _singular(field, value, depth, budget)


def _map_key(field: FieldDescriptor, key: Any) -> str:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if key else "false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return _text(key)
    return str(key)


def _singular(field: FieldDescriptor, value: Any, depth: int, budget: protowire.Budget) -> Any:
    kind = field.type
    if kind in _MESSAGE_TYPES:
        return _message(value, depth + 1, budget)
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        if enum.full_name == "google.protobuf.NullValue":
            return None
        named = enum.values_by_number.get(value)  # the first of aliases, as Go's ByNumber
        return named.name if named is not None else value
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(value)
    if kind == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if kind in _INT64_TYPES:
        return str(value)
    if kind in _FLOAT_TYPES:
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value if kind == FieldDescriptor.TYPE_DOUBLE else _float32(value)
    return value  # bool, 32-bit integers


def _text(value: Any) -> str:
    if not isinstance(value, str):  # a proto2 string that is not UTF-8 (Python hands over the bytes)
        raise GrpcBodyError("a string field is not UTF-8")
    return value


def _float32(value: float) -> float:
    """A finite float32 as Go's ``strconv.FormatFloat(v, 'g', -1, 32)`` writes it (Ryū, shortest): the
    decimal of fewest digits that reads back as ``value``, the closest to ``value`` among those.

    (A double is Python's ``repr`` already: the same rule at 64 bits. How protojson then spells a number —
    ``1e+21``, ``0.000001`` where Python writes ``1e-06`` — is the same number.)"""
    if value == 0:
        return value
    bits = _U32.unpack(_F32.pack(value))[0]
    exponent = bits >> 23 & 0xFF
    # What reads back as ``value`` lies between the midpoints to the float32s either side (both are doubles).
    below, above = _TWO_F32.unpack(_TWO_U32.pack(bits - 1, bits + 1))
    low, high = (value + below) / 2, (value + above) / 2
    if value < 0:
        low, high = high, low
    even = bits % 2 == 0
    if bits & 0x7FFFFF == 0 and exponent > 1:
        # A power of two: the float32 below is half as far as the one above, so the closest decimal of some
        # length may fall outside where the next one on the far side does not. Every length, in order.
        for digits in range(1, 10):
            nearest = f"{value:.{digits - 1}e}"
            if _holds(nearest, value, low, high, even):
                return float(nearest)
            mantissa, _, power = nearest.partition("e")
            step = 1 if (abs(float(nearest)) < abs(value)) == (value > 0) else -1
            other = f"{int(mantissa.replace('.', '')) + step}e{int(power) - digits + 1}"
            if _holds(other, value, low, high, even):
                return float(other)
        return value  # not reached: 9 digits always read back
    # Otherwise the interval is symmetric, so when a decimal of n digits reads back, the closest of n + 1 digits
    # does too: a search over the length, from where the float32's spacing puts it.
    guess = int(math.log10(abs(value)) - (max(exponent, 1) - 150) * _LOG10_2) + 1
    first, last, found = 1, 9, ""
    digits = 9 if guess > 9 else 1 if guess < 1 else guess
    while True:
        nearest = f"{value:.{digits - 1}e}"
        if _holds(nearest, value, low, high, even):
            last, found = digits, nearest
        else:
            first = digits + 1
        if first >= last:
            return float(found or f"{value:.{last - 1}e}")
        digits = last - 1 if digits == last and digits == guess else (first + last) // 2


def _holds(text: str, value: float, low: float, high: float, even: bool) -> bool:
    """Whether the decimal ``text`` reads back as ``value``, the float32 whose interval is ``low`` to ``high``
    (correctly rounded, ties to the even one)."""
    candidate = float(text)
    if low < candidate < high:
        return True
    if candidate != low and candidate != high:
        return False
    # On a midpoint as a double: the decimal itself may lie either side of it, or on it.
    exact, middle, at = Fraction(text), Fraction(candidate), Fraction(value)
    return (exact == middle and even) or abs(exact - at) < abs(middle - at)

# -- the well-known types (protojson's well_known_types.go)

def _any(message: Message, depth: int, budget: protowire.Budget) -> Any:
    fields = message.DESCRIPTOR.fields_by_number
    type_url, value = getattr(message, fields[1].name), getattr(message, fields[2].name)
    if not type_url:
        if value:
            raise GrpcBodyError("google.protobuf.Any: type_url is not set")
        return {}
    name = type_url.rpartition("/")[2]
    held = _ANY_TYPES.get(name)
    if held is None:
        raise GrpcBodyError(f"google.protobuf.Any: {type_url!r} is not a type this reading resolves")
    inner = held()
    try:
        protowire.check(value, 0, len(value), inner.DESCRIPTOR, budget, depth=depth + 1, max_depth=MAX_DEPTH)
        inner.ParseFromString(value)
    except protowire.WireError as exc:
        raise GrpcBodyError(f"google.protobuf.Any: {type_url!r} does not parse: {exc}") from None
    except DecodeError as exc:
        raise GrpcBodyError(f"google.protobuf.Any: {type_url!r} does not parse: {_decode_error(exc)}") from None
    return {"@type": type_url, "value": _message(inner, depth + 1, budget)}


def _timestamp(message: Message, depth: int, budget: protowire.Budget) -> Any:
    fields = message.DESCRIPTOR.fields_by_number
    seconds, nanos = getattr(message, fields[1].name), getattr(message, fields[2].name)
    if not _TIMESTAMP_MIN <= seconds <= _TIMESTAMP_MAX:
        raise GrpcBodyError(f"google.protobuf.Timestamp: seconds out of range {seconds}")
    if not 0 <= nanos <= _NANOS_MAX:
        raise GrpcBodyError(f"google.protobuf.Timestamp: nanos out of range {nanos}")
    # A naive datetime without microseconds: YYYY-MM-DDTHH:MM:SS, the year in 4 digits.
    text = (_EPOCH + datetime.timedelta(seconds=seconds)).isoformat()
    return f"{text}{_fraction(nanos)}Z"


def _duration(message: Message, depth: int, budget: protowire.Budget) -> Any:
    fields = message.DESCRIPTOR.fields_by_number
    seconds, nanos = getattr(message, fields[1].name), getattr(message, fields[2].name)
    if not -_DURATION_MAX <= seconds <= _DURATION_MAX:
        raise GrpcBodyError(f"google.protobuf.Duration: seconds out of range {seconds}")
    if not -_NANOS_MAX <= nanos <= _NANOS_MAX:
        raise GrpcBodyError(f"google.protobuf.Duration: nanos out of range {nanos}")
    if (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise GrpcBodyError("google.protobuf.Duration: signs of seconds and nanos do not match")
    sign = "-" if seconds < 0 or nanos < 0 else ""
    return f"{sign}{abs(seconds)}{_fraction(abs(nanos))}s"


def _fraction(nanos: int) -> str:
    """0, 3, 6 or 9 fractional digits, as protojson writes them."""
    if nanos == 0:
        return ""
    text = f".{nanos:09d}"
    for _ in range(2):
        text = text.removesuffix("000")
    return text.removesuffix(".000")


def _field_mask(message: Message, depth: int, budget: protowire.Budget) -> Any:
    paths = getattr(message, message.DESCRIPTOR.fields_by_number[1].name)
    out = []
    for path in paths:
        if not _FULL_NAME.fullmatch(path):
            raise GrpcBodyError(f"google.protobuf.FieldMask.paths contains invalid path: {path!r}")
        # Go converts to lowerCamelCase and back (strs.JSONCamelCase, JSONSnakeCase) and refuses what does not
        # come back: exactly the paths with an upper-case letter or an underscore before other than a-z.
        if _IRREVERSIBLE.search(path):
            raise GrpcBodyError(f"google.protobuf.FieldMask.paths contains irreversible value {path!r}")
        out.append(_camel(path))
    return ",".join(out)


def _camel(name: str) -> str:
    """Go's ``strs.JSONCamelCase`` of a path it converts back: an underscore is dropped, the a-z after it
    upper-cased (without a loop over characters: a path may be megabytes long)."""
    if name.count("_") > 26:  # one pass over the string per letter beats a part per underscore
        for lower in "abcdefghijklmnopqrstuvwxyz":
            name = name.replace("_" + lower, lower.upper())
        return name
    parts = name.split("_")
    # Each part after an underscore begins with a-z (else the path is irreversible, refused before), and
    # has no upper case to lower: capitalize() upper-cases its first letter alone.
    return parts[0] + "".join(map(str.capitalize, parts[1:]))


def _wrapper(message: Message, depth: int, budget: protowire.Budget) -> Any:
    field = message.DESCRIPTOR.fields_by_number[1]
    return _singular(field, getattr(message, field.name), depth, budget)


def _struct(message: Message, depth: int, budget: protowire.Budget) -> Any:
    field = message.DESCRIPTOR.fields_by_number[1]
    return _field(field, getattr(message, field.name), depth, budget)


def _value(message: Message, depth: int, budget: protowire.Budget) -> Any:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise GrpcBodyError("google.protobuf.Value: none of the oneof fields is set")
    field = message.DESCRIPTOR.fields_by_name[kind]
    value = getattr(message, kind)
    if field.type == FieldDescriptor.TYPE_DOUBLE and not math.isfinite(value):
        raise GrpcBodyError(f"google.protobuf.Value.number_value: invalid {value} value")
    return _singular(field, value, depth, budget)


def _empty(message: Message, depth: int, budget: protowire.Budget) -> Any:
    return {}


_WELL_KNOWN: dict[str, Callable[[Message, int, protowire.Budget], Any]] = {
    "google.protobuf.Any": _any,
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
    "google.protobuf.FieldMask": _field_mask,
    "google.protobuf.Struct": _struct,
    "google.protobuf.ListValue": _struct,  # its one field, 'values', rendered as a list
    "google.protobuf.Value": _value,
    "google.protobuf.Empty": _empty,
    **dict.fromkeys(_WRAPPERS, _wrapper),
}
