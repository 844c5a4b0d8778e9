"""Modbus register codec: exact values for every data type and byte/word order."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgetwin.mappers.modbus.codec import CodecError, decode, encode
from edgetwin.mappers.modbus.config import Visitor, register_count

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]


def vis(**kw: Any) -> Visitor:
    kw.setdefault("table", "holding_register")
    kw.setdefault("address", 0)
    return Visitor.model_validate(kw)


# float32 1.5 is 0x3FC00000: bytes A=3F B=C0 C=00 D=00.
@pytest.mark.parametrize(
    ("byte_order", "word_order", "registers"),
    [
        ("big", "big", [0x3FC0, 0x0000]),  # ABCD
        ("big", "little", [0x0000, 0x3FC0]),  # CDAB
        ("little", "big", [0xC03F, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0xC03F]),  # DCBA
    ],
)
def test_float32_layouts(byte_order: str, word_order: str, registers: list[int]) -> None:
    v = vis(dataType="float32", byteOrder=byte_order, wordOrder=word_order)
    assert decode(v, registers) == 1.5
    assert encode(v, 1.5) == registers


@pytest.mark.parametrize(
    ("data_type", "registers", "value"),
    [
        ("int16", [0xFFFE], -2),
        ("uint16", [0xFFFE], 65534),
        ("int32", [0xFFFF, 0xFFFE], -2),
        ("uint32", [0x0001, 0x0000], 65536),
        ("int64", [0x8000, 0, 0, 0], -(2**63)),
        ("uint64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], 2**64 - 1),
        ("float64", [0x4009, 0x21FB, 0x5444, 0x2D18], math.pi),
    ],
)
def test_exact_values(data_type: str, registers: list[int], value: Any) -> None:
    v = vis(dataType=data_type)
    got = decode(v, registers)
    assert got == value and type(got) is type(value)
    assert encode(v, value) == registers


def test_string_bit_scale_mask() -> None:
    text = vis(dataType="string", length=4)
    regs = [0x4142, 0x4344, 0x4500, 0x0000]  # "ABCDE" NUL-padded
    assert decode(text, regs) == "ABCDE" and encode(text, "ABCDE") == regs
    with pytest.raises(CodecError, match="holds 8"):
        encode(text, "ABCDEFGHI")
    bit = vis(dataType="bit", bit=3)
    assert decode(bit, [0b1000]) is True and decode(bit, [0b0111]) is False
    assert encode(bit, True, current=[0b0001]) == [0b1001]
    assert encode(bit, False, current=[0b1111]) == [0b0111]
    assert decode(vis(scale=0.01), [188]) == 1.88
    assert decode(vis(scale=0.1), [3]) == 0.3
    tenth = vis(dataType="int16", scale=0.1, offset=-40)
    assert decode(tenth, [0xFFFB]) == pytest.approx(-40.5)  # -5 * 0.1 - 40
    assert encode(tenth, 21.5) == [615]
    field = vis(dataType="uint16", mask=0x0F00, shift=8)
    assert decode(field, [0xABCD]) == 0xB
    assert encode(field, 0x3, current=[0xABCD]) == [0xA3CD]  # other bits kept
    with pytest.raises(CodecError, match="does not fit mask"):
        encode(field, 0x1F, current=[0])
    with pytest.raises(CodecError, match="current value"):
        encode(field, 1)


def test_range_and_type_errors() -> None:
    with pytest.raises(CodecError, match="out of range"):
        encode(vis(dataType="int16"), 40000)
    with pytest.raises(CodecError, match="out of range"):
        encode(vis(dataType="uint16"), -1)
    with pytest.raises(CodecError, match="needs a number"):
        encode(vis(dataType="uint16"), "x")
    with pytest.raises(CodecError, match="needs 2 registers"):
        decode(vis(dataType="float32"), [1])


ints = {
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint16": st.integers(0, 2**16 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.integers(0, 2**64 - 1),
}


@given(st.sampled_from(sorted(ints)), st.sampled_from(ORDERS), st.data())
def test_integer_round_trip_every_order(data_type: str, orders: tuple[str, str], data: st.DataObject) -> None:
    v = vis(dataType=data_type, byteOrder=orders[0], wordOrder=orders[1])
    n = data.draw(ints[data_type])
    regs = encode(v, n)
    assert len(regs) == register_count(v) and all(0 <= r <= 0xFFFF for r in regs)
    assert decode(v, regs) == n


@given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(ORDERS))
def test_float64_round_trip_every_order(x: float, orders: tuple[str, str]) -> None:
    v = vis(dataType="float64", byteOrder=orders[0], wordOrder=orders[1])
    assert decode(v, encode(v, x)) == x


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(ORDERS))
def test_float32_round_trip_every_order(x: float, orders: tuple[str, str]) -> None:
    v = vis(dataType="float32", byteOrder=orders[0], wordOrder=orders[1])
    regs = encode(v, x)
    got = decode(v, regs)
    # The same float32 bits, written as the shortest decimal.
    assert struct.pack(">f", got) == struct.pack(">f", x)
    assert encode(v, got) == regs
    assert len(repr(got)) <= len(repr(struct.unpack(">f", struct.pack(">f", x))[0]))


def test_float32_reads_as_the_decimal_the_device_meant() -> None:
    v = vis(dataType="float32")
    assert decode(v, encode(v, 34.7)) == 34.7
    assert decode(v, encode(v, 0.1)) == 0.1


@given(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2), st.sampled_from(ORDERS))
def test_decode_then_encode_is_identity_on_registers(regs: list[int], orders: tuple[str, str]) -> None:
    v = vis(dataType="uint32", byteOrder=orders[0], wordOrder=orders[1])
    assert encode(v, decode(v, regs)) == regs
