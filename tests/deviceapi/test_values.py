"""Typed values: coercion against the model type and limits."""

from __future__ import annotations

import base64
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgetwin.deviceapi.values import MAX_VALUE_BYTES, ValueRejected, coerce_value, value_to_text


@pytest.mark.parametrize(
    ("raw", "kind", "expected"),
    [
        ("23", "INT", 23),
        (23.0, "INT", 23),
        ("1e3", "INT", 1000),
        ("23.5", "FLOAT", 23.5),
        (7, "DOUBLE", 7.0),
        ("true", "BOOLEAN", True),
        ("OFF", "BOOLEAN", False),
        (1, "BOOLEAN", True),
        (12, "STRING", "12"),
        (False, "STRING", "false"),
        ("aGVsbG8=", "BYTES", "aGVsbG8="),
        (b"\x00\x01", "BYTES", "AAE="),
    ],
)
def test_coercion_accepts(raw: object, kind: str, expected: object) -> None:
    got = coerce_value(raw, kind)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("raw", "kind", "reason"),
    [
        ("twelve", "INT", "expected an integer"),
        ("1.5", "INT", "expected an integer"),
        (True, "INT", "boolean"),
        (2**63, "INT", "64-bit"),
        ("nan", "FLOAT", "finite"),
        ("inf", "DOUBLE", "finite"),
        ("maybe", "BOOLEAN", "boolean"),
        (2, "BOOLEAN", "boolean"),
        ("!!", "BYTES", "base64"),
        (None, "INT", "missing"),
        ("x", "COMPLEX", "unknown property type"),
        ("x" * (MAX_VALUE_BYTES + 1), "STRING", "more than"),
    ],
)
def test_coercion_rejects_with_reason(raw: object, kind: str, reason: str) -> None:
    with pytest.raises(ValueRejected) as err:
        coerce_value(raw, kind)
    assert reason in err.value.reason


def test_limits() -> None:
    assert coerce_value("5", "FLOAT", 5, 35) == 5.0
    with pytest.raises(ValueRejected, match="below the minimum 5"):
        coerce_value("4.9", "FLOAT", 5, 35)
    with pytest.raises(ValueRejected, match="above the maximum 35"):
        coerce_value(36, "INT", 5, 35)


@given(st.integers(-(2**63), 2**63 - 1))
def test_int_text_round_trip(n: int) -> None:
    assert coerce_value(value_to_text(coerce_value(n, "INT")), "INT") == n


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_round_trip(x: float) -> None:
    assert coerce_value(value_to_text(coerce_value(x, "FLOAT")), "FLOAT") == x


@given(st.binary(max_size=64))
def test_bytes_canonical(data: bytes) -> None:
    text = coerce_value(base64.b64encode(data).decode(), "BYTES")
    assert isinstance(text, str) and base64.b64decode(text) == data
    assert coerce_value(text, "BYTES") == text


@given(st.booleans())
def test_bool_text_round_trip(b: bool) -> None:
    assert coerce_value(value_to_text(b), "BOOLEAN") is b


def test_float_finite_only() -> None:
    with pytest.raises(ValueRejected):
        coerce_value(math.inf, "FLOAT")
