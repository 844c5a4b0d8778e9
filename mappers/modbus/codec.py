"""Register <-> value conversion for every visitor data type, exact to the bit.

Byte order is the order of the two bytes inside each register, word order the order of
the registers of a multi-register value, so for the 32-bit value with bytes A B C D
(A most significant) the four layouts devices use are::

    byteOrder big,    wordOrder big     -> registers AB CD   ("ABCD", Modbus default)
    byteOrder big,    wordOrder little  -> registers CD AB   ("CDAB", word swap)
    byteOrder little, wordOrder big     -> registers BA DC   ("BADC", byte swap)
    byteOrder little, wordOrder little  -> registers DC BA   ("DCBA")

Numbers then go through mask and shift (integers), and ``value = raw * scale + offset``.
Writes invert it; a masked field or a single bit is written read-modify-write.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from edgetwin.deviceapi.values import shortest_float32
from edgetwin.mappers.modbus.config import INTEGER_TYPES, Visitor, register_count
from edgetwin.mappers.sdk import Value

_STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}


class CodecError(ValueError):
    """A value cannot be converted (out of range, wrong type, bad registers)."""


def _registers_to_bytes(registers: Sequence[int], byte_order: str, word_order: str) -> bytes:
    words = list(registers)
    if word_order == "little":
        words.reverse()
    data = bytearray()
    for w in words:
        hi, lo = (w >> 8) & 0xFF, w & 0xFF
        data += bytes((lo, hi)) if byte_order == "little" else bytes((hi, lo))
    return bytes(data)


def _bytes_to_registers(data: bytes, byte_order: str, word_order: str) -> list[int]:
    words = []
    for i in range(0, len(data), 2):
        a, b = data[i], data[i + 1]
        words.append((b << 8 | a) if byte_order == "little" else (a << 8 | b))
    if word_order == "little":
        words.reverse()
    return words


def decode(v: Visitor, registers: Sequence[int] = (), bits: Sequence[bool] = ()) -> Value:
    """The value of a property from the registers (or bits) read at its address."""
    dt = v.dataType or "uint16"
    if dt == "uint16" and registers and v.plain:
        raw16 = registers[0]  # the common case: one register as it is
        if 0 <= raw16 <= 0xFFFF:
            return raw16
    if dt == "bool":
        if not bits:
            raise CodecError("no bit read")
        return bool(bits[0])
    count = register_count(v)
    if len(registers) < count:
        raise CodecError(f"{dt} needs {count} registers, got {len(registers)}")
    regs = registers[:count]
    if any(not 0 <= r <= 0xFFFF for r in regs):
        raise CodecError(f"register values must be 0..65535, got {list(regs)}")
    if dt == "bit":
        assert v.bit is not None
        return bool((regs[0] >> v.bit) & 1)
    data = _registers_to_bytes(regs, v.byteOrder, v.wordOrder)
    if dt == "string":
        return data.split(b"\x00", 1)[0].decode("latin-1").rstrip(" ")
    raw: int | float = struct.unpack(">" + _STRUCT[dt], data)[0]
    if dt == "float32":
        raw = shortest_float32(float(raw))
    if dt in INTEGER_TYPES:
        assert isinstance(raw, int)
        if v.mask is not None:
            raw &= v.mask
        raw >>= v.shift
    if v.scale == 1.0 and v.offset == 0.0:
        return raw
    value = raw * v.scale + v.offset
    # Integer raw values with integral scale/offset stay integers (INT properties).
    if dt in INTEGER_TYPES and float(v.scale).is_integer() and float(v.offset).is_integer():
        return int(value)
    # 15 significant digits (what a double guarantees) drop the noise of the scaling
    # arithmetic: 188 * 0.01 is 1.88, not 1.8800000000000001.
    return float(f"{value:.15g}")


def encode(v: Visitor, value: Value, current: Sequence[int] = ()) -> list[int]:
    """Registers to write for ``value``. A masked field or a bit needs ``current`` (the
    registers as read) so that the other bits are kept."""
    dt = v.dataType or "uint16"
    if dt == "bool":
        raise CodecError("coils are written with encode_bit")
    if dt == "bit":
        assert v.bit is not None
        if not current:
            raise CodecError("writing one bit of a register needs the register's current value")
        on = _as_bool(value)
        reg = current[0] | (1 << v.bit) if on else current[0] & ~(1 << v.bit)
        return [reg & 0xFFFF]
    if dt == "string":
        if not isinstance(value, str):
            raise CodecError(f"string property needs text, got {type(value).__name__}")
        raw_text = value.encode("latin-1", errors="strict")
        size = register_count(v) * 2
        if len(raw_text) > size:
            raise CodecError(f"text is {len(raw_text)} bytes, the field holds {size}")
        return _bytes_to_registers(raw_text.ljust(size, b"\x00"), v.byteOrder, v.wordOrder)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{dt} needs a number, got {value!r}")
    raw = (value - v.offset) / v.scale if (v.scale != 1.0 or v.offset != 0.0) else value
    fmt = ">" + _STRUCT[dt]
    if dt in INTEGER_TYPES:
        if isinstance(raw, float):
            if not math.isfinite(raw):
                raise CodecError(f"{value!r} is not a finite number")
            raw = round(raw)
        field = int(raw) << v.shift
        if v.mask is not None:
            if field & ~v.mask:
                raise CodecError(f"{value!r} does not fit mask 0x{v.mask:X} with shift {v.shift}")
            if not current:
                raise CodecError("writing a masked field needs the registers' current value")
            old = struct.unpack(
                fmt, _registers_to_bytes(current[: register_count(v)], v.byteOrder, v.wordOrder)
            )[0]
            field = (old & ~v.mask) | field
        try:
            data = struct.pack(fmt, field)
        except struct.error:
            raise CodecError(f"{value!r} is out of range for {dt}") from None
    else:
        try:
            data = struct.pack(fmt, float(raw))
        except (struct.error, OverflowError):
            raise CodecError(f"{value!r} is out of range for {dt}") from None
    return _bytes_to_registers(data, v.byteOrder, v.wordOrder)


def encode_bit(value: Value) -> bool:
    """The coil state to write for ``value``."""
    return _as_bool(value)


def _as_bool(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CodecError(f"a bit needs true or false, got {value!r}")
