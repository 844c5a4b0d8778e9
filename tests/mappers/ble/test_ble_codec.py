"""BLE value decoding and encoding: Bluetooth SIG formats byte for byte as the GATT
Specification Supplement defines them, IEEE 11073 numbers, the presentation format
descriptor, custom layouts, and advertising data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgetwin.mappers.ble.adverts import ParsedAdvert, build_ad, parse_ad, uuid_from_le
from edgetwin.mappers.ble.codec import (
    INT_TYPES,
    CodecError,
    Layout,
    PresentationFormat,
    decode_float11073,
    decode_layout,
    decode_sfloat,
    encode_float11073,
    encode_layout,
    encode_sfloat,
    normalize_uuid,
)
from edgetwin.mappers.ble.sig import decode_sig, encode_sig, parse_heart_rate

# --- SIG characteristics -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "data", "value"),
    [
        # 0x2A6E Temperature: sint16, 0.01 degC, little-endian.
        ("temperature", bytes([0x66, 0x08]), 21.5),
        ("temperature", (-1025).to_bytes(2, "little", signed=True), -10.25),
        ("temperature", (32767).to_bytes(2, "little", signed=True), 327.67),
        ("temperature", (-32767).to_bytes(2, "little", signed=True), -327.67),
        # 0x2A6F Humidity: uint16, 0.01 %.
        ("humidity", (4512).to_bytes(2, "little"), 45.12),
        ("humidity", (10000).to_bytes(2, "little"), 100.0),
        # 0x2A6D Pressure: uint32, 0.1 Pa.
        ("pressure", (1013253).to_bytes(4, "little"), 101325.3),
        # 0x2A19 Battery Level: uint8 percent.
        ("battery_level", bytes([87]), 87),
        ("battery_level", bytes([0]), 0),
        ("battery_level", bytes([100]), 100),
    ],
)
def test_sig_scalars_decode_exactly(fmt: str, data: bytes, value: float) -> None:
    got = decode_sig(fmt, data)
    assert got == value
    assert repr(got) == repr(value)  # 21.5, not 21.500000000000004


@pytest.mark.parametrize(
    ("fmt", "data", "message"),
    [
        ("temperature", bytes([0x00, 0x80]), "not known"),
        ("humidity", bytes([0xFF, 0xFF]), "not known"),
        ("battery_level", bytes([101]), "outside 0..100"),
        ("temperature", bytes([0x01]), "needs 2 bytes"),
        ("pressure", bytes(3), "needs 4 bytes"),
    ],
)
def test_sig_special_and_short_values_are_errors(fmt: str, data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_sig(fmt, data)


def test_sig_encoders_are_the_inverse() -> None:
    assert encode_sig("temperature", 21.5) == bytes([0x66, 0x08])
    assert encode_sig("temperature", -10.25) == (-1025).to_bytes(2, "little", signed=True)
    assert encode_sig("humidity", 45.12) == (4512).to_bytes(2, "little")
    assert encode_sig("pressure", 101325.3) == (1013253).to_bytes(4, "little")
    assert encode_sig("battery_level", 87) == bytes([87])
    with pytest.raises(CodecError, match="more precision"):
        encode_sig("temperature", 21.505)
    with pytest.raises(CodecError, match="out of range"):
        encode_sig("temperature", 400)
    with pytest.raises(CodecError, match="not writable"):
        encode_sig("heart_rate", 70)


def test_heart_rate_measurement_fields() -> None:
    # Flags 0x00: uint8 bpm, no contact support, nothing else.
    assert parse_heart_rate(bytes([0x00, 72])) == {
        "heartRate": 72,
        "sensorContact": None,
        "energyExpended": None,
        "rrIntervals": [],
        "rrInterval": None,
    }
    # Flags 0x01: uint16 bpm.
    assert parse_heart_rate(bytes([0x01, 0x2C, 0x01]))["heartRate"] == 300
    # Flags 0x06: contact supported (bit 2) and detected (bit 1); 0x04: supported, not detected.
    assert parse_heart_rate(bytes([0x06, 60]))["sensorContact"] is True
    assert parse_heart_rate(bytes([0x04, 60]))["sensorContact"] is False
    # Flags 0x08: energy expended (kJ) follows the bpm.
    assert parse_heart_rate(bytes([0x08, 72, 0x10, 0x27]))["energyExpended"] == 10000
    # Flags 0x19: uint16 bpm, energy, then two RR intervals in 1/1024 s.
    data = bytes([0x19]) + struct.pack("<HHHH", 80, 5, 1024, 768)
    hr = parse_heart_rate(data)
    assert hr["heartRate"] == 80 and hr["energyExpended"] == 5
    assert hr["rrIntervals"] == [1.0, 0.75] and hr["rrInterval"] == 0.75
    assert decode_sig("heart_rate", data, "rrInterval") == 0.75
    assert decode_sig("heart_rate", data) == 80
    with pytest.raises(CodecError, match="carries no sensorContact"):
        decode_sig("heart_rate", bytes([0x00, 72]), "sensorContact")
    with pytest.raises(CodecError, match="needs 2 bytes"):
        parse_heart_rate(bytes([0x01, 72]))


def test_temperature_measurement_uses_ieee_11073_float() -> None:
    # flags 0 (Celsius), FLOAT mantissa 3650 exponent -2 = 36.5.
    raw = ((-2 & 0xFF) << 24) | 3650
    assert decode_sig("temperature_measurement", bytes([0]) + raw.to_bytes(4, "little")) == 36.5
    with pytest.raises(CodecError, match="NaN"):
        decode_sig("temperature_measurement", bytes([0]) + (0x007FFFFF).to_bytes(4, "little"))


# --- IEEE 11073 SFLOAT / FLOAT ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [(0xF072, 11.4), (0x0072, 114.0), (0x1072, 1140.0), (0xFF9C, -10.0), (0xE001, 0.01), (0x0000, 0.0)],
)
def test_sfloat(raw: int, value: float) -> None:
    assert decode_sfloat(raw) == value


@pytest.mark.parametrize(("raw", "name"), [(0x07FF, "NaN"), (0x0800, "NRes"), (0x07FE, "+INFINITY")])
def test_sfloat_specials(raw: int, name: str) -> None:
    with pytest.raises(CodecError, match=name.replace("+", r"\+")):
        decode_sfloat(raw)


@given(st.integers(-2000, 2000), st.integers(-3, 3))
def test_sfloat_round_trip(mantissa: int, exponent: int) -> None:
    value = decode_sfloat(((exponent & 0xF) << 12) | (mantissa & 0x0FFF))
    assert decode_sfloat(encode_sfloat(value)) == value


@given(st.integers(-8_000_000, 8_000_000), st.integers(-8, 8))
def test_float11073_round_trip(mantissa: int, exponent: int) -> None:
    value = decode_float11073(((exponent & 0xFF) << 24) | (mantissa & 0xFFFFFF))
    assert decode_float11073(encode_float11073(value)) == pytest.approx(value, rel=1e-12)


# --- presentation format --------------------------------------------------------------


def test_presentation_format_descriptor() -> None:
    pf = PresentationFormat.parse(bytes([0x06, 0xFF, 0x00, 0x27, 0x01, 0x00, 0x00]))
    assert (pf.data_type, pf.exponent, pf.unit, pf.namespace) == ("uint16", -1, 0x2700, 1)
    assert pf.decode((123).to_bytes(2, "little")) == 12.3
    assert pf.encode(12.3) == (123).to_bytes(2, "little")
    signed = PresentationFormat.parse(bytes([0x0E, 0xFE, 0x2F, 0x27, 0x01, 0x00, 0x00]))  # sint16, e-2, degC
    assert signed.decode((-550).to_bytes(2, "little", signed=True)) == -5.5
    assert PresentationFormat.parse(bytes([0x01, 0, 0, 0x27, 1, 0, 0])).decode(b"\x01") is True
    text = PresentationFormat.parse(bytes([0x19, 0, 0, 0x27, 1, 0, 0]))
    assert text.decode(b"line-3") == "line-3"
    with pytest.raises(CodecError, match="7 bytes"):
        PresentationFormat.parse(b"\x06\xff")
    with pytest.raises(CodecError, match="0x1b is not a supported"):
        PresentationFormat.parse(bytes([0x1B, 0, 0, 0, 0, 0, 0]))


# --- custom layouts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "data", "value"),
    [
        (Layout("int16", byte_offset=2, byte_order="big", scale=0.01), b"\x00\x00\xf7\x9a", -21.5),
        (Layout("uint24", byte_offset=1), b"\xaa\x01\x02\x03", 0x030201),
        (Layout("int24"), b"\xff\xff\xff", -1),
        (Layout("uint32", scale=0.1, offset=-40), (615).to_bytes(4, "little"), 21.5),
        (Layout("uint8", scale=2, offset=1), b"\x10", 33),
        (Layout("float32"), struct.pack("<f", 34.7), 34.7),
        (Layout("float64", byte_order="big"), struct.pack(">d", 3.25), 3.25),
        (Layout("sfloat"), (0xF072).to_bytes(2, "little"), 11.4),
        (Layout("bool", byte_offset=1, bit=3), b"\x00\x08", True),
        (Layout("bool", byte_offset=1, bit=2), b"\x00\x08", False),
        (Layout("bool"), b"\x02", True),
        (Layout("string", byte_offset=1), b"\x05pump-7\x00\x00", "pump-7"),
        (Layout("string", length=3), b"abcdef", "abc"),
        (Layout("bytes", byte_offset=1, length=2), b"\x00\xde\xad\xff", "3q0="),
        (Layout(struct_format="<HhB", field=1, scale=0.01), struct.pack("<HhB", 7, 125, 5), 1.25),
        (Layout(struct_format=">BI", byte_offset=1, field=1), b"\x00\x01\x00\x00\x01\x00", 256),
    ],
)
def test_custom_layouts(layout: Layout, data: bytes, value: object) -> None:
    got = decode_layout(layout, data)
    assert got == value and type(got) is type(value)


def test_custom_layout_errors_name_the_problem() -> None:
    with pytest.raises(CodecError, match="int32 needs 4 bytes at offset 2, got 5 bytes"):
        decode_layout(Layout("int32", byte_offset=2), bytes(5))
    with pytest.raises(CodecError, match="not UTF-8"):
        decode_layout(Layout("string"), b"\xff\xfe")
    with pytest.raises(CodecError, match="not a finite number"):
        decode_layout(Layout("float32"), struct.pack("<f", float("nan")))
    with pytest.raises(CodecError, match="does not fit uint8"):
        encode_layout(Layout("uint8"), 256)
    with pytest.raises(CodecError, match=r"whole multiple of scale 0\.5"):
        encode_layout(Layout("uint8", scale=0.5), 1.3)


@given(st.sampled_from(sorted(INT_TYPES)), st.data(), st.sampled_from(["little", "big"]))
def test_integer_layouts_round_trip(dt: str, data: st.DataObject, order: str) -> None:
    size, signed = INT_TYPES[dt]
    lo, hi = (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1) if signed else (0, 2 ** (8 * size) - 1)
    value = data.draw(st.integers(lo, hi))
    layout = Layout(dt, byte_offset=data.draw(st.integers(0, 3)), byte_order=order)  # type: ignore[arg-type]
    encoded = encode_layout(layout, value)
    assert len(encoded) == layout.byte_offset + size
    assert decode_layout(layout, encoded) == value


@given(st.integers(-1000, 1000))
def test_scaled_layout_round_trip(raw: int) -> None:
    layout = Layout("int16", scale=0.01, offset=-40)
    value = decode_layout(layout, raw.to_bytes(2, "little", signed=True))
    assert encode_layout(layout, value) == raw.to_bytes(2, "little", signed=True)


def test_writing_one_field_keeps_the_others() -> None:
    current = struct.pack("<HhB", 7, 125, 5)
    layout = Layout(struct_format="<HhB", field=1, scale=0.01)
    assert encode_layout(layout, 2.5, current) == struct.pack("<HhB", 7, 250, 5)
    flag = Layout("bool", byte_offset=1, bit=0)
    assert encode_layout(flag, True, b"\x09\xf0") == b"\x09\xf1"
    assert encode_layout(flag, False, b"\x09\xf1") == b"\x09\xf0"
    assert encode_layout(Layout("uint8", byte_offset=2), 9, b"\x01\x02\x03\x04") == b"\x01\x02\x09\x04"


def test_uuids() -> None:
    assert normalize_uuid("2A6E") == "00002a6e-0000-1000-8000-00805f9b34fb"
    assert normalize_uuid("0x2a6e") == normalize_uuid("2a6e")
    full = "E7C10001-5E4D-4B7F-9A3C-6D2F00000000"
    assert normalize_uuid(full) == full.lower()
    with pytest.raises(CodecError, match="not a UUID"):
        normalize_uuid("2A6")


# --- advertising data -------------------------------------------------------------------


def test_advertising_data_is_parsed_into_bleak_fields() -> None:
    ad = build_ad(
        name="b-1",
        service_uuids16=[0x181A, 0x180F],
        manufacturer=(0x0499, b"\x05\x12\x34"),
        service_data16=(0x181A, b"\x66\x08"),
    )
    parsed = parse_ad(ad + bytes([2, 0x0A, 0xF8]))  # plus TX power -8 dBm
    assert parsed.local_name == "b-1"
    assert parsed.service_uuids == [normalize_uuid("181A"), normalize_uuid("180F")]
    assert parsed.manufacturer_data == {0x0499: b"\x05\x12\x34"}
    assert parsed.service_data == {normalize_uuid("181A"): b"\x66\x08"}
    assert parsed.tx_power == -8


def test_advertising_data_edge_cases() -> None:
    u128 = bytes(range(16))
    data = bytes([17, 0x07]) + u128 + bytes([6, 0x20]) + (0x12345678).to_bytes(4, "little") + b"\x01"
    parsed = parse_ad(data)
    assert parsed.service_uuids == [uuid_from_le(u128)]
    assert uuid_from_le(u128) == "0f0e0d0c-0b0a-0908-0706-050403020100"
    assert parsed.service_data == {"12345678-0000-1000-8000-00805f9b34fb": b"\x01"}
    # A truncated structure ends parsing; what came before it is kept.
    truncated = build_ad(name="ok") + bytes([9, 0xFF, 0x01])
    assert parse_ad(truncated).local_name == "ok"
    assert parse_ad(truncated).manufacturer_data == {}
    # Zero length is padding: parsing stops.
    assert parse_ad(bytes([0, 0, 0])) == ParsedAdvert()
    # A scan response merges into the advertisement.
    adv = parse_ad(build_ad(manufacturer=(1, b"a")))
    adv.merge(parse_ad(build_ad(name="late", flags=None)))
    assert adv.local_name == "late" and adv.manufacturer_data == {1: b"a"}
    with pytest.raises(CodecError, match="31 bytes"):
        build_ad(name="x" * 40)


@given(st.binary(max_size=62))
def test_parse_ad_never_raises_on_garbage(data: bytes) -> None:
    parse_ad(data)
