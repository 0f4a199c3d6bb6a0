"""Protobuf wire-format walking, to say which string field of a rejected message is bad UTF-8.

protobuf refuses a whole message with "String field had bad UTF-8" and no field name; a client
deserves the name. Only called for messages that already failed to parse.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor


def bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field in `data` whose bytes are not UTF-8, or None."""
    try:
        return _walk(data, descriptor, prefix)
    except IndexError:  # truncated or malformed: no field to name
        return None


def _walk(data: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            _, pos = _varint(data, pos)
        elif wire_type == 1:  # fixed64
            pos += 8
        elif wire_type == 5:  # fixed32
            pos += 4
        elif wire_type == 2:  # length-delimited: string, bytes, message, packed repeated
            size, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
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
        else:  # groups (deprecated) or garbage
            return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
