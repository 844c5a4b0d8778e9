"""Modbus config: refused with errors naming device, property and field."""

from __future__ import annotations

from typing import Any

import pytest

from edgetwin.mappers.modbus.config import ModbusConfigError, parse_connection, parse_visitor
from edgetwin.mappers.sdk import PropertyBinding, PropertyType


def prop(kind: PropertyType = PropertyType.INT, writable: bool = False, **visitor: Any) -> PropertyBinding:
    return PropertyBinding(name="flow", type=kind, writable=writable, visitor=visitor)


def test_good_configs() -> None:
    conn = parse_connection("plant.pump-1", {"host": "127.0.0.1", "unitId": 3, "timeout": "500ms"})
    assert (conn.transport, conn.port, conn.unitId, conn.timeout, conn.maxRegisters) == (
        "tcp",
        502,
        3,
        500,
        125,
    )
    v = parse_visitor(
        "plant.pump-1", prop(PropertyType.FLOAT, table="input_register", address=7, dataType="float32")
    )
    assert v.count == 2 and not v.writable
    assert (
        parse_visitor("plant.pump-1", prop(PropertyType.BOOLEAN, True, table="coil", address=1)).dataType
        == "bool"
    )


@pytest.mark.parametrize(
    ("kind", "writable", "visitor", "message"),
    [
        (PropertyType.INT, False, {}, "visitors.configData: missing"),
        (PropertyType.INT, False, {"address": 1}, "visitors.configData.table: is required"),
        (
            PropertyType.INT,
            False,
            {"table": "holding_register", "address": 70000},
            "address: Input should be less",
        ),
        (PropertyType.INT, False, {"table": "coil", "address": 1, "dataType": "int16"}, "holds single bits"),
        (
            PropertyType.BOOLEAN,
            False,
            {"table": "holding_register", "address": 1, "dataType": "bit"},
            "bit: required",
        ),
        (
            PropertyType.STRING,
            False,
            {"table": "holding_register", "address": 1, "dataType": "string"},
            "length: required",
        ),
        (
            PropertyType.FLOAT,
            False,
            {"table": "holding_register", "address": 1, "dataType": "float32", "mask": 3},
            "only for integer types",
        ),
        (
            PropertyType.INT,
            False,
            {"table": "holding_register", "address": 1, "scale": 0.1},
            "use a FLOAT model property",
        ),
        (
            PropertyType.BOOLEAN,
            False,
            {"table": "holding_register", "address": 1},
            "needs a INT or FLOAT or DOUBLE model property",
        ),
        (PropertyType.INT, True, {"table": "input_register", "address": 1}, "read-only in Modbus"),
        (
            PropertyType.INT,
            False,
            {"table": "holding_register", "address": 65535, "dataType": "int32"},
            "runs past 65535",
        ),
        (
            PropertyType.INT,
            False,
            {"table": "holding_register", "address": 1, "colour": "red"},
            "colour: is not a known field",
        ),
    ],
)
def test_bad_visitor_names_device_property_field(
    kind: PropertyType, writable: bool, visitor: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModbusConfigError) as err:
        parse_visitor("plant.pump-1", prop(kind, writable, **visitor))
    text = str(err.value)
    assert text.startswith("device plant.pump-1 property flow: visitors.configData")
    assert message in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "host is required for transport tcp"),
        ({"transport": "rtu"}, "serialPort is required"),
        ({"host": "x", "unitId": 300}, "unitId"),
        ({"host": "x", "maxRegisters": 200}, "maxRegisters"),
        ({"host": "x", "parity": "X"}, "parity"),
    ],
)
def test_bad_connection(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ModbusConfigError) as err:
        parse_connection("plant.pump-1", data)
    assert str(err.value).startswith("device plant.pump-1: spec.protocol.configData")
    assert message in str(err.value)
