"""Typed property values: how a raw value from MQTT, a manifest or the CLI becomes the
value a twin stores, checked against the model's type and limits.

Values are kept as JSON-native Python values: ``int``, ``float``, ``str``, ``bool``, and
BYTES as a canonical base64 ``str`` so that every value round-trips through JSON.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

Value = int | float | str | bool

# A reported or desired value larger than this is refused: twins are state, not files.
MAX_VALUE_BYTES = 16 * 1024

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TRUE = {"true", "1", "on", "yes"}
_FALSE = {"false", "0", "off", "no"}


class ValueRejected(ValueError):
    """A value does not fit its property's type or limits; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _as_number_text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise ValueRejected(f"expected a number, got {type(raw).__name__} {raw!r:.40}")


def _coerce_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueRejected(f"expected an integer, got boolean {raw}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, float):
        if not raw.is_integer():
            raise ValueRejected(f"expected an integer, got {raw!r}")
        value = int(raw)
    else:
        text = _as_number_text(raw)
        try:
            value = int(text, 10)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise ValueRejected(f"expected an integer, got {raw!r:.40}") from None
            if not as_float.is_integer():
                raise ValueRejected(f"expected an integer, got {raw!r:.40}") from None
            value = int(as_float)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueRejected(f"integer {value} is outside the 64-bit range")
    return value


def _coerce_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueRejected(f"expected a number, got boolean {raw}")
    if isinstance(raw, int | float):
        value = float(raw)
    else:
        try:
            value = float(_as_number_text(raw))
        except ValueError:
            raise ValueRejected(f"expected a number, got {raw!r:.40}") from None
    if not math.isfinite(value):
        raise ValueRejected(f"expected a finite number, got {raw!r:.40}")
    return value


def _coerce_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueRejected(f"expected a boolean (true/false), got {raw!r:.40}")


def _coerce_string(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str | int | float):
        return str(raw)
    raise ValueRejected(f"expected a string, got {type(raw).__name__}")


def _coerce_bytes(raw: Any) -> str:
    if isinstance(raw, bytes | bytearray):
        return base64.b64encode(bytes(raw)).decode("ascii")
    if not isinstance(raw, str):
        raise ValueRejected(f"expected base64 text for BYTES, got {type(raw).__name__}")
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueRejected(f"expected base64 text for BYTES, got {raw!r:.40}") from None
    return base64.b64encode(decoded).decode("ascii")


_FLOATS = frozenset({"FLOAT", "DOUBLE"})
_COERCERS = {
    "INT": _coerce_int,
    "FLOAT": _coerce_float,
    "DOUBLE": _coerce_float,
    "STRING": _coerce_string,
    "BOOLEAN": _coerce_bool,
    "BYTES": _coerce_bytes,
}


def coerce_value(
    raw: Any,
    type_name: str,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Value:
    """Return ``raw`` as a value of ``type_name`` (INT, FLOAT, DOUBLE, STRING, BOOLEAN,
    BYTES), or raise :class:`ValueRejected` naming what is wrong.

    Numbers are checked against ``minimum``/``maximum`` when given; text values longer
    than :data:`MAX_VALUE_BYTES` are refused.
    """
    kind = type(raw)
    if (kind is int and type_name == "INT" and _INT64_MIN <= raw <= _INT64_MAX) or (
        kind is float and type_name in _FLOATS and math.isfinite(raw)
    ):
        # The common case (a mapper's decoded number): nothing to convert.
        _check_range(raw, minimum, maximum)
        return raw  # type: ignore[no-any-return]
    coercer = _COERCERS.get(type_name)
    if coercer is None:
        raise ValueRejected(f"unknown property type {type_name!r}")
    if raw is None:
        raise ValueRejected("value is missing (null)")
    if isinstance(raw, str) and len(raw) > MAX_VALUE_BYTES:
        raise ValueRejected(f"value is {len(raw)} characters, more than {MAX_VALUE_BYTES}")
    value: Value = coercer(raw)  # type: ignore[operator,assignment,unused-ignore]
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_range(value, minimum, maximum)
    return value


def desired_value(
    raw: Any, type_name: str, writable: bool, minimum: float | None = None, maximum: float | None = None
) -> Value:
    """``raw`` as a desired value of its property (the gateway's rule, which ``edgetwin
    twin set`` checks too before it sends), or :class:`ValueRejected`: a ReadOnly
    property takes none, and the value must fit the type and range."""
    if not writable:
        raise ValueRejected("the property is ReadOnly in its model")
    return coerce_value(raw, type_name, minimum, maximum)


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueRejected(f"{value} is below the minimum {minimum:g}")
    if maximum is not None and value > maximum:
        raise ValueRejected(f"{value} is above the maximum {maximum:g}")


def value_to_text(value: Value) -> str:
    """The KubeEdge string form of a value (twin payloads carry values as strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def shortest_float32(x: float) -> float:
    """The shortest decimal that is the same float32 as ``x`` (a device's 34.7 reads as
    34.7, not 34.70000076293945); it encodes back to the identical bits."""
    if not math.isfinite(x):
        return x
    bits = struct.pack(">f", x)
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        try:
            if struct.pack(">f", candidate) == bits:
                return candidate
        except (OverflowError, struct.error):  # rounded past the float32 range
            continue
    return x
