"""Bluetooth SIG characteristics the BLE mapper decodes and encodes by name (GATT
Specification Supplement): ESS temperature, humidity and pressure, battery level, heart
rate measurement, health thermometer; looked up by name or by 16-bit UUID."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgetwin.deviceapi import Value
from edgetwin.mappers.ble.codec import (
    CodecError,
    _need,
    decode_float11073,
    normalize_uuid,
    scale_decimal,
)

# --- Bluetooth SIG characteristics ------------------------------------------------------


def _temperature(data: bytes, field: str | None) -> Value:
    # 0x2A6E Temperature: sint16, 0.01 degC; 0x8000 means "value is not known".
    _need(data, 0, 2, "temperature")
    raw = int.from_bytes(data[:2], "little", signed=True)
    if raw == -0x8000:
        raise CodecError("temperature: value is not known (0x8000)")
    return scale_decimal(raw, -2)


def _humidity(data: bytes, field: str | None) -> Value:
    # 0x2A6F Humidity: uint16, 0.01 %; 0xFFFF means "value is not known".
    _need(data, 0, 2, "humidity")
    raw = int.from_bytes(data[:2], "little")
    if raw == 0xFFFF:
        raise CodecError("humidity: value is not known (0xFFFF)")
    return scale_decimal(raw, -2)


def _pressure(data: bytes, field: str | None) -> Value:
    # 0x2A6D Pressure: uint32, 0.1 Pa.
    _need(data, 0, 4, "pressure")
    return scale_decimal(int.from_bytes(data[:4], "little"), -1)


def _battery_level(data: bytes, field: str | None) -> Value:
    # 0x2A19 Battery Level: uint8, percent, 0..100.
    _need(data, 0, 1, "battery level")
    if data[0] > 100:
        raise CodecError(f"battery level {data[0]} is outside 0..100")
    return data[0]


HEART_RATE_FIELDS = ("heartRate", "sensorContact", "energyExpended", "rrInterval")


def parse_heart_rate(data: bytes) -> dict[str, Any]:
    """0x2A37 Heart Rate Measurement: flags, then uint8 or uint16 bpm, optional energy
    expended (uint16, kJ) and RR intervals (uint16 each, 1/1024 s)."""
    _need(data, 0, 2, "heart rate measurement")
    flags = data[0]
    pos = 1
    if flags & 0x01:
        _need(data, pos, 2, "heart rate (uint16)")
        bpm = int.from_bytes(data[pos : pos + 2], "little")
        pos += 2
    else:
        bpm = data[pos]
        pos += 1
    out: dict[str, Any] = {"heartRate": bpm}
    # Bits 1-2: bit 2 says contact detection is supported, bit 1 whether contact is made.
    out["sensorContact"] = bool(flags & 0x02) if flags & 0x04 else None
    if flags & 0x08:
        _need(data, pos, 2, "energy expended")
        out["energyExpended"] = int.from_bytes(data[pos : pos + 2], "little")
        pos += 2
    else:
        out["energyExpended"] = None
    rr: list[float] = []
    if flags & 0x10:
        while pos + 2 <= len(data):
            rr.append(int.from_bytes(data[pos : pos + 2], "little") / 1024)
            pos += 2
    out["rrIntervals"] = rr
    out["rrInterval"] = rr[-1] if rr else None
    return out


def _heart_rate(data: bytes, field: str | None) -> Value:
    parsed = parse_heart_rate(data)
    value = parsed[field or "heartRate"]
    if value is None:
        raise CodecError(f"heart rate measurement carries no {field}")
    assert isinstance(value, int | float | bool)
    return value


def _temperature_measurement(data: bytes, field: str | None) -> Value:
    # 0x2A1C Temperature Measurement: flags (bit 0: Fahrenheit), IEEE 11073 FLOAT.
    _need(data, 0, 5, "temperature measurement")
    return decode_float11073(int.from_bytes(data[1:5], "little"))


def _encode_scaled(value: Value, exponent: int, size: int, signed: bool, what: str) -> bytes:
    if isinstance(value, str | bool):
        raise CodecError(f"{what}: expected a number, got {value!r:.40}")
    raw = value * 10**-exponent
    rounded = round(raw)
    if not math.isclose(rounded, raw, rel_tol=0, abs_tol=1e-6):
        raise CodecError(f"{what}: {value} has more precision than 1e{exponent}")
    try:
        return int(rounded).to_bytes(size, "little", signed=signed)
    except OverflowError:
        raise CodecError(f"{what}: {value} is out of range") from None


@dataclass(frozen=True, slots=True)
class SigFormat:
    name: str
    uuid: str  # 16-bit
    decode: Any  # (data, field) -> Value
    encode: Any | None  # (value) -> bytes
    fields: tuple[str, ...] = ()
    kind: str = "number"  # number | integer | boolean (for checking against the model)


SIG_FORMATS: dict[str, SigFormat] = {
    f.name: f
    for f in (
        SigFormat(
            "temperature",
            "2a6e",
            _temperature,
            lambda v: _encode_scaled(v, -2, 2, True, "temperature"),
        ),
        SigFormat("humidity", "2a6f", _humidity, lambda v: _encode_scaled(v, -2, 2, False, "humidity")),
        SigFormat("pressure", "2a6d", _pressure, lambda v: _encode_scaled(v, -1, 4, False, "pressure")),
        SigFormat(
            "battery_level",
            "2a19",
            _battery_level,
            lambda v: _encode_scaled(v, 0, 1, False, "battery level"),
            kind="integer",
        ),
        SigFormat("heart_rate", "2a37", _heart_rate, None, fields=HEART_RATE_FIELDS),
        SigFormat("temperature_measurement", "2a1c", _temperature_measurement, None),
    )
}
SIG_BY_UUID = {normalize_uuid(f.uuid): f for f in SIG_FORMATS.values()}


def decode_sig(name: str, data: bytes, field: str | None = None) -> Value:
    """Decode a standard characteristic by its format name (``temperature``...)."""
    return SIG_FORMATS[name].decode(bytes(data), field)  # type: ignore[no-any-return]


def encode_sig(name: str, value: Value) -> bytes:
    fmt = SIG_FORMATS[name]
    if fmt.encode is None:
        raise CodecError(f"{name} is not writable")
    return fmt.encode(value)  # type: ignore[no-any-return]
