"""Characteristic and advertisement values <-> twin values: pure functions, no I/O.

Three kinds of decoder:

* **Bluetooth SIG formats** of the standard characteristics (GATT Specification
  Supplement): Temperature 0x2A6E, Humidity 0x2A6F, Pressure 0x2A6D, Battery Level
  0x2A19, Heart Rate Measurement 0x2A37, Temperature Measurement 0x2A1C. Chosen by
  ``format`` or, by default, by the characteristic's UUID.
* **Characteristic Presentation Format** (descriptor 0x2904): a format code and a
  decimal exponent read from the peripheral itself.
* **Custom layouts**: a data type at a byte offset (or a field of a ``struct`` layout),
  byte order, then ``value = raw * scale + offset``.

Every decoder has an encoder for writes where the format is writable. Scaled numbers are
computed as ``raw / 10**n`` for decimal exponents (one correctly rounded operation, so
2150 with exponent -2 is exactly 21.5) and rounded to 15 significant digits otherwise.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

from edgetwin.deviceapi import Value
from edgetwin.deviceapi.values import shortest_float32

ByteOrder = Literal["little", "big"]


class CodecError(ValueError):
    """A value cannot be decoded or encoded; the message says what is wrong."""


# 16-bit SIG UUIDs in the Bluetooth base UUID.
BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"


def normalize_uuid(text: str) -> str:
    """``"2A6E"``, ``"0x2a6e"`` or a 128-bit UUID -> the lower-case 128-bit form bleak uses."""
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    if len(t) == 4 and all(c in "0123456789abcdef" for c in t):
        return f"0000{t}{BASE_UUID_SUFFIX}"
    if len(t) == 8 and all(c in "0123456789abcdef" for c in t):
        return f"{t}{BASE_UUID_SUFFIX}"
    parts = t.split("-")
    if [len(p) for p in parts] == [8, 4, 4, 4, 12] and all(c in "0123456789abcdef" for p in parts for c in p):
        return t
    raise CodecError(f"not a UUID: {text!r} (use 16-bit like 2A6E or 128-bit like 0000xxxx-...)")


def short_uuid(uuid128: str) -> str | None:
    """The 16-bit form (``"2a6e"``) of a SIG UUID, else None."""
    if uuid128.endswith(BASE_UUID_SUFFIX) and uuid128.startswith("0000"):
        return uuid128[4:8]
    return None


def _need(data: bytes, start: int, size: int, what: str) -> None:
    if start + size > len(data):
        raise CodecError(f"{what} needs {size} bytes at offset {start}, got {len(data)} bytes in all")


def _tidy(x: float) -> float:
    # 15 significant digits (what a double guarantees) drop the noise of the scaling.
    return float(f"{x:.15g}")


def scale_decimal(raw: int, exponent: int) -> int | float:
    """``raw * 10**exponent`` exactly rounded: 2150, -2 -> 21.5."""
    if exponent >= 0:
        factor: int = 10**exponent
        return raw * factor
    divisor: int = 10**-exponent
    return raw / divisor


# --- IEEE 11073-20601 SFLOAT (16 bit) and FLOAT (32 bit), used by health profiles ---


def _specials(mantissa_bits: int) -> dict[int, str]:
    """The reserved mantissa codes: the same five around 2**(bits-1) in both sizes."""
    top = 1 << (mantissa_bits - 1)
    return {top - 1: "NaN", top: "NRes", top - 2: "+INFINITY", top + 2: "-INFINITY", top + 1: "reserved"}


_SFLOAT_SPECIAL = _specials(12)
_FLOAT_SPECIAL = _specials(24)


def _decode_11073(
    raw: int, mantissa_bits: int, specials: dict[int, str], name: str, hex_digits: int
) -> float:
    """An IEEE 11073 number: a signed decimal exponent above a signed mantissa."""
    mantissa = raw & ((1 << mantissa_bits) - 1)
    if mantissa in specials:
        raise CodecError(f"{name} special value {specials[mantissa]} (0x{raw:0{hex_digits}x})")
    if mantissa >= 1 << (mantissa_bits - 1):
        mantissa -= 1 << mantissa_bits
    exponent = raw >> mantissa_bits
    exponent_bits = hex_digits * 4 - mantissa_bits
    if exponent >= 1 << (exponent_bits - 1):
        exponent -= 1 << exponent_bits
    return float(scale_decimal(mantissa, exponent))


def decode_sfloat(raw: int) -> float:
    """A 16-bit IEEE 11073 SFLOAT: 4-bit signed exponent, 12-bit signed mantissa."""
    return _decode_11073(raw, 12, _SFLOAT_SPECIAL, "SFLOAT", 4)


def decode_float11073(raw: int) -> float:
    """A 32-bit IEEE 11073 FLOAT: 8-bit signed exponent, 24-bit signed mantissa."""
    return _decode_11073(raw, 24, _FLOAT_SPECIAL, "FLOAT", 8)


def _to_mantissa(value: float, bits: int, max_exp: int) -> tuple[int, int]:
    """The (mantissa, exponent) with the most precision that fits ``bits`` signed bits."""
    limit = (1 << (bits - 1)) - 3  # the top codes are special values
    for exponent in range(-max_exp, max_exp + 1):
        mantissa = round(value / 10**exponent) if exponent >= 0 else round(value * 10**-exponent)
        if -limit <= mantissa <= limit:
            return mantissa, exponent
    raise CodecError(f"{value} does not fit an IEEE 11073 {'SFLOAT' if bits == 12 else 'FLOAT'}")


def encode_sfloat(value: float) -> int:
    m, e = _to_mantissa(value, 12, 7)
    return ((e & 0xF) << 12) | (m & 0x0FFF)


def encode_float11073(value: float) -> int:
    m, e = _to_mantissa(value, 24, 127)
    return ((e & 0xFF) << 24) | (m & 0xFFFFFF)


# --- custom layouts -------------------------------------------------------------------

INT_TYPES: dict[str, tuple[int, bool]] = {
    "uint8": (1, False),
    "int8": (1, True),
    "uint16": (2, False),
    "int16": (2, True),
    "uint24": (3, False),
    "int24": (3, True),
    "uint32": (4, False),
    "int32": (4, True),
    "uint48": (6, False),
    "int48": (6, True),
    "uint64": (8, False),
    "int64": (8, True),
}
FLOAT_TYPES = {"float32": 4, "float64": 8}
MEDICAL_TYPES = {"sfloat": 2, "float": 4}  # IEEE 11073
DATA_TYPES = (*INT_TYPES, *FLOAT_TYPES, *MEDICAL_TYPES, "bool", "string", "bytes")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a value sits in a characteristic's (or advertisement's) bytes and how to
    read it. ``struct``/``field`` is the alternative to ``data_type``/``byte_offset``:
    a Python struct layout such as ``"<hHB"`` and the index of the field to take."""

    data_type: str = "uint8"
    byte_offset: int = 0
    byte_order: ByteOrder = "little"  # Bluetooth is little-endian unless a device says otherwise
    length: int | None = None  # string/bytes: bytes to take (default: the rest)
    bit: int | None = None  # bool: one bit of the byte at byte_offset
    scale: float = 1.0
    offset: float = 0.0
    struct_format: str | None = None
    field: int = 0

    @property
    def size(self) -> int:
        if self.struct_format is not None:
            return struct.calcsize(self.struct_format)
        if self.data_type in INT_TYPES:
            return INT_TYPES[self.data_type][0]
        if self.data_type in FLOAT_TYPES:
            return FLOAT_TYPES[self.data_type]
        if self.data_type in MEDICAL_TYPES:
            return MEDICAL_TYPES[self.data_type]
        if self.data_type == "bool":
            return 1
        return self.length or 0

    @property
    def scaled(self) -> bool:
        return self.scale != 1.0 or self.offset != 0.0


def _apply_scale(raw: int | float, layout: Layout) -> int | float:
    if not layout.scaled:
        return raw
    value = raw * layout.scale + layout.offset
    if isinstance(raw, int) and float(layout.scale).is_integer() and float(layout.offset).is_integer():
        return int(value)
    return _tidy(value)


def decode_layout(layout: Layout, data: bytes) -> Value:
    """Decode one value from ``data`` by ``layout``; raises :class:`CodecError`."""
    if layout.struct_format is not None:
        _need(data, layout.byte_offset, layout.size, f"struct {layout.struct_format!r}")
        fields = struct.unpack_from(layout.struct_format, data, layout.byte_offset)
        if layout.field >= len(fields):
            raise CodecError(
                f"struct {layout.struct_format!r} has {len(fields)} fields, no field {layout.field}"
            )
        raw = fields[layout.field]
        if isinstance(raw, bytes):
            return raw.rstrip(b"\x00").decode("utf-8", errors="replace")
        if isinstance(raw, bool):
            return raw
        return _apply_scale(raw, layout)
    dt, start = layout.data_type, layout.byte_offset
    order: ByteOrder = layout.byte_order
    if dt in INT_TYPES:
        size, signed = INT_TYPES[dt]
        _need(data, start, size, dt)
        return _apply_scale(int.from_bytes(data[start : start + size], order, signed=signed), layout)
    if dt in FLOAT_TYPES:
        size = FLOAT_TYPES[dt]
        _need(data, start, size, dt)
        fmt = ("<" if order == "little" else ">") + ("f" if size == 4 else "d")
        (x,) = struct.unpack_from(fmt, data, start)
        if not math.isfinite(x):
            raise CodecError(f"{dt} is not a finite number ({x})")
        if size == 4:
            x = shortest_float32(x)
        return _apply_scale(x, layout)
    if dt in MEDICAL_TYPES:
        size = MEDICAL_TYPES[dt]
        _need(data, start, size, dt)
        raw = int.from_bytes(data[start : start + size], order)
        return _apply_scale(decode_sfloat(raw) if dt == "sfloat" else decode_float11073(raw), layout)
    if dt == "bool":
        _need(data, start, 1, dt)
        byte = data[start]
        return bool(byte >> layout.bit & 1) if layout.bit is not None else byte != 0
    # string / bytes: the rest, or length bytes
    end = len(data) if layout.length is None else start + layout.length
    _need(data, start, end - start, dt)
    chunk = bytes(data[start:end])
    if dt == "string":
        try:
            return chunk.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"string is not UTF-8: {exc.reason} at byte {exc.start}") from None
    import base64

    return base64.b64encode(chunk).decode("ascii")


def _unscale(value: Value, layout: Layout, integer: bool) -> int | float:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        raise CodecError(f"expected a number, got {value!r:.40}")
    raw = (value - layout.offset) / layout.scale if layout.scaled else value
    if integer:
        rounded = round(raw)
        if not math.isclose(rounded, raw, rel_tol=0, abs_tol=1e-6):
            raise CodecError(f"{value} is not a whole multiple of scale {layout.scale:g}")
        return int(rounded)
    return float(raw)


def encode_layout(layout: Layout, value: Value, current: bytes = b"") -> bytes:
    """The bytes to write for ``value``. Fields of a larger characteristic keep the rest
    of ``current`` (the last value read), so writing one field leaves the others alone."""
    if layout.struct_format is not None:
        if not current:
            raise CodecError("writing one field of a struct layout needs the characteristic read first")
        fields = list(struct.unpack_from(layout.struct_format, current, layout.byte_offset))
        old = fields[layout.field]
        fields[layout.field] = (
            str(value).encode() if isinstance(old, bytes) else _unscale(value, layout, isinstance(old, int))
        )
        try:
            packed = struct.pack(layout.struct_format, *fields)
        except struct.error as exc:
            raise CodecError(f"{value} does not fit struct field {layout.field}: {exc}") from None
        return current[: layout.byte_offset] + packed + current[layout.byte_offset + len(packed) :]
    dt = layout.data_type
    order: ByteOrder = layout.byte_order
    if dt in INT_TYPES:
        size, signed = INT_TYPES[dt]
        raw = _unscale(value, layout, integer=True)
        assert isinstance(raw, int)
        try:
            chunk = raw.to_bytes(size, order, signed=signed)
        except OverflowError:
            raise CodecError(f"{value} does not fit {dt}") from None
    elif dt in FLOAT_TYPES:
        fmt = ("<" if order == "little" else ">") + ("f" if FLOAT_TYPES[dt] == 4 else "d")
        try:
            chunk = struct.pack(fmt, _unscale(value, layout, integer=False))
        except (OverflowError, struct.error):
            raise CodecError(f"{value} does not fit {dt}") from None
    elif dt in MEDICAL_TYPES:
        x = float(_unscale(value, layout, integer=False))
        raw = encode_sfloat(x) if dt == "sfloat" else encode_float11073(x)
        chunk = raw.to_bytes(MEDICAL_TYPES[dt], order)
    elif dt == "bool":
        flag = _as_bool(value)
        if layout.bit is not None:
            byte = current[layout.byte_offset] if len(current) > layout.byte_offset else 0
            byte = byte | (1 << layout.bit) if flag else byte & ~(1 << layout.bit)
            chunk = bytes([byte])
        else:
            chunk = b"\x01" if flag else b"\x00"
    elif dt == "string":
        chunk = str(value).encode("utf-8")
        if layout.length is not None:
            if len(chunk) > layout.length:
                raise CodecError(f"string of {len(chunk)} bytes does not fit length {layout.length}")
            chunk = chunk.ljust(layout.length, b"\x00")
    else:  # bytes, as base64 text
        import base64
        import binascii

        try:
            chunk = base64.b64decode(str(value), validate=True)
        except binascii.Error:
            raise CodecError("bytes values are base64 text") from None
    start = layout.byte_offset
    if not current and start == 0:
        return chunk
    base = bytearray(current.ljust(start, b"\x00"))
    base[start : start + len(chunk)] = chunk
    return bytes(base)


def _as_bool(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    text = value.strip().lower()
    if text in ("true", "1", "on"):
        return True
    if text in ("false", "0", "off"):
        return False
    raise CodecError(f"expected a boolean, got {value!r:.40}")


# --- Characteristic Presentation Format (descriptor 0x2904) ---------------------------

PRESENTATION_DESCRIPTOR = normalize_uuid("2904")

# Format codes (Bluetooth Assigned Numbers, 2.4.1) that carry a number or text.
_PF_TYPES: dict[int, str] = {
    0x01: "bool",
    0x04: "uint8",
    0x06: "uint16",
    0x07: "uint24",
    0x08: "uint32",
    0x09: "uint48",
    0x0A: "uint64",
    0x0C: "int8",
    0x0E: "int16",
    0x0F: "int24",
    0x10: "int32",
    0x11: "int48",
    0x12: "int64",
    0x14: "float32",
    0x15: "float64",
    0x16: "sfloat",
    0x17: "float",
    0x19: "string",
}


@dataclass(frozen=True, slots=True)
class PresentationFormat:
    """A parsed 0x2904 descriptor."""

    format: int
    exponent: int
    unit: int
    namespace: int
    description: int

    @classmethod
    def parse(cls, data: bytes) -> PresentationFormat:
        if len(data) != 7:
            raise CodecError(f"a presentation format descriptor has 7 bytes, got {len(data)}")
        fmt, exponent, unit, namespace, description = struct.unpack("<BbHBH", data)
        if fmt not in _PF_TYPES:
            raise CodecError(f"presentation format 0x{fmt:02x} is not a supported number or text format")
        return cls(fmt, exponent, unit, namespace, description)

    @property
    def data_type(self) -> str:
        return _PF_TYPES[self.format]

    def decode(self, data: bytes) -> Value:
        value = decode_layout(Layout(data_type=self.data_type), data)
        if self.exponent and isinstance(value, int) and not isinstance(value, bool):
            return scale_decimal(value, self.exponent)
        if self.exponent and isinstance(value, float):
            return _tidy(value * 10.0**self.exponent)
        return value

    def encode(self, value: Value) -> bytes:
        if self.exponent and self.data_type in INT_TYPES:
            if isinstance(value, str):
                raise CodecError(f"expected a number, got {value!r:.40}")
            raw = float(value) / 10.0**self.exponent
            if not math.isclose(round(raw), raw, rel_tol=0, abs_tol=1e-6):
                raise CodecError(f"{value} is not a whole multiple of 1e{self.exponent}")
            value = round(raw)
        return encode_layout(Layout(data_type=self.data_type), value)
