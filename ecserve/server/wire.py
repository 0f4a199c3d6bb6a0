"""Protobuf wire-format walking, to say which string field of a rejected message is bad UTF-8.

protobuf refuses a whole message with "String field had bad UTF-8" and no field name; a client
deserves the name. Only called for messages that already failed to parse.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor


class Malformed(ValueError):
    """Not protobuf wire format (truncated, an over-long varint, an unknown wire type)."""


def bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field in `data` whose bytes are not UTF-8, or None."""
    try:
        return _walk(data, descriptor, prefix)
    except (IndexError, Malformed):  # no field to name
        return None


def largest_field(data: bytes, descriptor: Descriptor) -> str:
    """The top-level field taking the most bytes of `data` (keys included), without parsing
    the message: one linear pass, for a request refused for its size before any other work."""
    sizes: dict[str, int] = {}
    pos = 0
    try:
        while pos < len(data):
            start = pos
            key, pos = _varint(data, pos)
            pos = _skip(data, pos, key & 7)
            field = descriptor.fields_by_number.get(key >> 3)
            name = field.name if field is not None else "request"
            sizes[name] = sizes.get(name, 0) + min(pos, len(data)) - start
    except Malformed:
        pass
    return max(sizes, key=sizes.__getitem__, default="request")


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """The position after a field's value."""
    if wire_type == 0:
        return _varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    if wire_type == 2:
        size, pos = _varint(data, pos)
        return pos + size
    raise Malformed(f"wire type {wire_type}")


def _walk(data: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key & 7 != 2:  # not length-delimited: no string inside
            pos = _skip(data, pos, key & 7)
            continue
        size, pos = _varint(data, pos)  # string, bytes, message or packed repeated
        chunk, pos = data[pos:pos + size], pos + size
        field = descriptor.fields_by_number.get(key >> 3)
        if field is None:
            continue
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _walk(chunk, field.message_type, name + ".")
            if found is not None:
                return found
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """At most 10 bytes, as protobuf's: a run of continuation bytes (a body of 0xFF) would
    otherwise build an ever larger int, in time quadratic in its length."""
    value = 0
    for shift in range(0, 70, 7):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise Malformed("varint longer than 10 bytes")
