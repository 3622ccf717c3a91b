"""A check of a protobuf message's wire format (protobuf encoding spec, "Message Structure"), as Go's
``protowire`` and ``proto.Unmarshal`` (through ``dynamicpb``) read it, run before protobuf Python parses the
message, for what the two readers take differently and for the work a body may cost.

One walk over the bytes, linear in their length, descending into the fields the descriptor names as messages,
map entries and groups (Go parses those eagerly too) and into every group, and refusing:

- a varint of more than 10 bytes, or of 10 whose last byte is more than 1 (Go's ``errCodeOverflow``; protobuf
  Python keeps the low 64 bits) — tags, lengths, values and packed elements alike;
- a tag of field number 0 or past 2^29 - 1, a wire type 6 or 7, an end-group tag without its group, a length or
  a fixed-size value past the end;
- a number a closed enum (proto2, or editions with ``enum_type = CLOSED``) does not name, in a field the
  descriptor gives that enum: protobuf Python moves it to the unknown fields, where Go keeps it in the field
  and ``protojson`` writes the number;
- more than ``MAX_ELEMENTS`` fields and packed elements in all (a budget shared with the messages an ``Any``
  holds; a ``float`` counts ``FLOAT_WEIGHT``, as finding its shortest decimal costs about as much as that many
  others), before any of them is built: 4 MiB of one-byte elements would otherwise cost seconds and hundreds
  of megabytes;
- messages and groups nested more than ``max_depth`` deep.

The contents of a length-delimited field the descriptor does not name as a message (strings, bytes, unknown
fields, extensions) are not read, as Go does not read them.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

#: Fields and packed elements one body may hold, in all.
MAX_ELEMENTS = 50_000
#: What a float32 field or element counts for (``MAX_ELEMENTS / FLOAT_WEIGHT`` floats at most).
FLOAT_WEIGHT = 2
#: Go's ``protowire.MaxValidNumber``.
MAX_NUMBER = (1 << 29) - 1

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
# What a field the descriptor names asks of the walk (by wire type: 0 for varints, 2 for length-delimited).
_MESSAGE, _GROUP, _PACKED_VARINT, _PACKED_FIXED32, _PACKED_FIXED64, _CLOSED_ENUM, _FLOAT = range(7)
_FIXED32_TYPES = frozenset({FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32})
_FIXED64_TYPES = frozenset({FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE})
_VARINT_TYPES = frozenset({FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                           FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
                           FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM})
# Nine continuation bytes and then anything but a last byte of 0 or 1: an over-long varint.
_OVERLONG = re.compile(rb"[\x80-\xff]{9}[^\x00\x01]")
_LOW_BYTES = bytes(range(0x80))

_Entry = tuple[int, Any, bool]  # (what to do, the sub-message's descriptor or the enum's numbers, repeated)


class WireError(ValueError):
    """The bytes are not a message Go reads as this module's caller would render it."""


class Budget:
    """What is left of ``MAX_ELEMENTS`` for one body."""

    __slots__ = ("left",)

    def __init__(self, left: int = MAX_ELEMENTS) -> None:
        self.left = left


def check(data: bytes, start: int, end: int, descriptor: Descriptor, budget: Budget, *, depth: int = 0,
          max_depth: int = 100) -> None:
    """Walk ``data[start:end]`` as a ``descriptor`` message; ``WireError`` where Go refuses it, where protobuf
    Python would read a closed enum's field differently, or past the budget or ``max_depth``."""
    _Walk(data, budget, max_depth).message(start, end, _table(descriptor), depth, 0)


@functools.lru_cache(maxsize=4096)
def _table(descriptor: Descriptor) -> dict[int, _Entry]:
    """The fields of ``descriptor`` that the walk reads into, by number (extensions are unknown fields to Go)."""
    table: dict[int, _Entry] = {}
    for field in descriptor.fields:
        kind = field.type
        repeated = field.is_repeated
        if kind == FieldDescriptor.TYPE_MESSAGE:
            table[field.number] = (_MESSAGE, field.message_type, repeated)
        elif kind == FieldDescriptor.TYPE_GROUP:
            table[field.number] = (_GROUP, field.message_type, repeated)
        elif kind == FieldDescriptor.TYPE_ENUM and field.enum_type.is_closed:
            numbers = frozenset(value.number for value in field.enum_type.values)
            table[field.number] = (_CLOSED_ENUM, numbers, repeated)
        elif kind == FieldDescriptor.TYPE_FLOAT:
            table[field.number] = (_FLOAT, None, repeated)
        elif repeated and kind in _VARINT_TYPES:
            table[field.number] = (_PACKED_VARINT, None, True)
        elif repeated and kind in _FIXED32_TYPES:
            table[field.number] = (_PACKED_FIXED32, None, True)
        elif repeated and kind in _FIXED64_TYPES:
            table[field.number] = (_PACKED_FIXED64, None, True)
    return table


def _int32(value: int) -> int:
    """A varint's value as an enum number: its low 32 bits, signed (Go's ``EnumNumber(int32(v))``)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class _Walk:
    __slots__ = ("budget", "data", "max_depth")

    def __init__(self, data: bytes, budget: Budget, max_depth: int) -> None:
        self.data, self.budget, self.max_depth = data, budget, max_depth

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        """(value, position after it): Go's ``protowire.ConsumeVarint``."""
        data = self.data
        value = shift = 0
        while True:
            if pos >= end:
                raise WireError("a varint runs past the end")
            byte = data[pos]
            pos += 1
            if shift == 63 and byte > 1:
                raise WireError("a varint overflows 64 bits")
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    def spend(self, count: int) -> None:
        self.budget.left -= count
        if self.budget.left < 0:
            raise WireError(f"more than {MAX_ELEMENTS} fields and elements")

    def message(self, pos: int, end: int, table: dict[int, _Entry], depth: int, group: int) -> int:
        """Walk fields from ``pos`` to ``end`` (a group: to its end-group tag, ``group`` being its number); the
        position after them."""
        if depth > self.max_depth:
            raise WireError(f"nested more than {self.max_depth} deep")
        data = self.data
        while pos < end:
            byte = data[pos]
            if byte < 0x80:
                tag, pos = byte, pos + 1
            else:
                tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == _END_GROUP:
                if group and number == group:
                    return pos
                raise WireError("an end-group tag without its group")
            if not 1 <= number <= MAX_NUMBER:
                raise WireError(f"field number {number}")
            self.spend(1)
            entry = table.get(number)
            if wire == _VARINT:
                if pos < end and data[pos] < 0x80:
                    value, pos = data[pos], pos + 1
                else:
                    value, pos = self.varint(pos, end)
                if entry is not None and entry[0] == _CLOSED_ENUM and _int32(value) not in entry[1]:
                    raise WireError(f"field {number}: {_int32(value)} is not a value of its closed enum")
            elif wire == _LENGTH:
                if pos < end and data[pos] < 0x80:
                    length, pos = data[pos], pos + 1
                else:
                    length, pos = self.varint(pos, end)
                if length > end - pos:
                    raise WireError("a length runs past the end")
                if length and entry is not None:  # an empty message or packed field holds nothing to check
                    self.length_delimited(pos, pos + length, entry, depth)
                pos += length
            elif wire == _FIXED64:
                pos += 8
            elif wire == _FIXED32:
                pos += 4
                if entry is not None and entry[0] == _FLOAT:
                    self.spend(FLOAT_WEIGHT - 1)
            elif wire == _START_GROUP:
                inner = _table(entry[1]) if entry is not None and entry[0] == _GROUP else {}
                pos = self.message(pos, end, inner, depth + 1, number)
                continue
            else:
                raise WireError(f"wire type {wire}")
            if pos > end:
                raise WireError("a fixed-size value runs past the end")
        if group:
            raise WireError("a group without its end-group tag")
        return pos

    def length_delimited(self, pos: int, stop: int, entry: _Entry, depth: int) -> None:
        kind, what, repeated = entry
        if kind == _MESSAGE:
            self.message(pos, stop, _table(what), depth + 1, 0)
        elif not repeated:  # a scalar or a group in a length-delimited field: unknown to Go, not read
            return
        elif kind == _PACKED_FIXED32 or kind == _PACKED_FIXED64 or kind == _FLOAT:
            size = 8 if kind == _PACKED_FIXED64 else 4
            if (stop - pos) % size:
                raise WireError("a packed field is not a whole number of fixed-size values")
            self.spend((stop - pos) // size * (FLOAT_WEIGHT if kind == _FLOAT else 1))
        elif kind == _PACKED_VARINT:
            data = self.data
            if stop > pos and data[stop - 1] >= 0x80:
                raise WireError("a varint runs past the end")
            # Counted and checked in C: one element per last byte (below 0x80).
            self.spend((stop - pos) - len(data[pos:stop].translate(None, _LOW_BYTES)))
            if _OVERLONG.search(data, pos, stop):
                raise WireError("a varint overflows 64 bits")
        elif kind == _CLOSED_ENUM:
            while pos < stop:
                value, pos = self.varint(pos, stop)
                self.spend(1)
                if _int32(value) not in what:
                    raise WireError(f"{_int32(value)} is not a value of its closed enum")
