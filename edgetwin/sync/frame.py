"""The ``Frame`` message of protos/edgetwin/sync/v1/sync.proto in protobuf's binary
encoding, by hand, for the gateway: loading protobuf's runtime for one five-field message
would cost it ~3 MB of its memory. The relay uses the generated code (sync_pb2); a test
checks the two agree on every frame and reject the same bytes (tests/sync/test_frame.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetwin.sync.wire import WireError

# Field numbers of sync.proto's Frame, with protobuf's wire types (0 varint, 2 bytes).
_SEQ, _ACK, _ENCODING, _PAYLOAD, _ECHO = 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1
_MAX_DEPTH = 100  # protobuf's own recursion limit


@dataclass(slots=True)
class Frame:
    """sync.proto's Frame: the same field names and defaults as ``sync_pb2.Frame``."""

    seq: int = 0
    ack: int = 0
    encoding: int = 0
    payload: bytes = b""
    echo: bool = False

    def encode(self) -> bytes:
        """Protobuf's encoding (fields in order, defaults left out, as protobuf writes them)."""
        out = bytearray()
        for number, value in ((_SEQ, self.seq), (_ACK, self.ack)):
            if value:
                out.append(number << 3)
                _varint(out, value)
        if self.encoding:
            out.append(_ENCODING << 3)
            _varint(out, self.encoding & _U64)  # an enum is an int32: negatives take 10 bytes
        if self.payload:
            out.append(_PAYLOAD << 3 | 2)
            _varint(out, len(self.payload))
            out += self.payload
        if self.echo:
            out += b"\x28\x01"
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        """The Frame in ``data``; unknown fields are skipped, as protobuf does. Raises
        :class:`WireError` for bytes protobuf would not parse."""
        frame = cls()
        view = memoryview(data)
        i, end = 0, len(view)
        while i < end:
            number, wire, i = _read_tag(view, i)
            if wire == 0:
                value, i = _read_varint(view, i)
                if number in (_SEQ, _ACK):
                    setattr(frame, "seq" if number == _SEQ else "ack", value)
                elif number == _ENCODING:
                    frame.encoding = _int32(value)
                elif number == _ECHO:
                    frame.echo = value != 0
            elif wire == 2:
                length, i = _read_varint(view, i)
                if i + length > end:
                    raise WireError("a Frame field runs past the end of the message")
                if number == _PAYLOAD:
                    frame.payload = bytes(view[i : i + length])
                i += length
            else:
                i = _skip(view, i, number, wire, 0)
        return frame


def _read_tag(view: memoryview, i: int) -> tuple[int, int, int]:
    tag, i = _read_varint(view, i)
    number, wire = tag >> 3, tag & 7
    if not 0 < number < 1 << 29:
        raise WireError(f"a Frame field numbered {number}, outside protobuf's 1 to 2^29 - 1")
    return number, wire, i


def _skip(view: memoryview, i: int, number: int, wire: int, depth: int) -> int:
    """Past an unknown field of wire type 1, 5 or 3 (a group, up to its end)."""
    if wire in (1, 5):
        i += 8 if wire == 1 else 4
        if i > len(view):
            raise WireError("a Frame field runs past the end of the message")
        return i
    if wire != 3:
        raise WireError(f"a Frame field of wire type {wire} where none can be")
    if depth >= _MAX_DEPTH:
        raise WireError(f"groups nested deeper than {_MAX_DEPTH} in a Frame")
    while True:
        if i >= len(view):
            raise WireError("a group in a Frame that does not end")
        inner, inner_wire, i = _read_tag(view, i)
        if inner_wire == 4:
            if inner != number:
                raise WireError("a group in a Frame ended by another field's end")
            return i
        if inner_wire == 0:
            i = _read_varint(view, i)[1]
        elif inner_wire == 2:
            length, i = _read_varint(view, i)
            i += length
            if i > len(view):
                raise WireError("a Frame field runs past the end of the message")
        else:
            i = _skip(view, i, inner, inner_wire, depth + 1)


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    for n in range(10):
        if i + n >= len(view):
            raise WireError("a Frame ends inside a number")
        byte = view[i + n]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & _U64, i + n + 1
        shift += 7
    raise WireError("a number in a Frame longer than 10 bytes")


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value
