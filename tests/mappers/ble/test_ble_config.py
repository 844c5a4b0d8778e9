"""BLE manifests are checked when they load, with errors naming device, property and
field; the gateway's `config check` runs the same checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetwin.deviceapi import PropertyType
from edgetwin.mappers.ble.config import BleConfigError, parse_connection, parse_visitor
from edgetwin.mappers.ble.mapper import BleMapper
from edgetwin.mappers.sdk import DeviceBinding, MapperError, PropertyBinding
from edgetwin.simulators.ble import sensor_manifests
from tests.conftest import RecordingHost, run_cli


def check(
    visitor: dict[str, Any],
    kind: PropertyType = PropertyType.FLOAT,
    writable: bool = False,
    conn: dict[str, Any] | None = None,
) -> None:
    prop = PropertyBinding("p", kind, writable, visitor=visitor)
    c = parse_connection("plant.s1", conn or {"name": "s1"})
    parse_visitor("plant.s1", c, prop)


def test_a_good_visitor_passes_and_formats_default_from_the_uuid() -> None:
    check({"characteristic": "2A6E", "notify": True})
    check({"characteristic": "2A19"}, PropertyType.INT)
    check({"characteristic": "2A37", "field": "sensorContact"}, PropertyType.BOOLEAN)
    check(
        {"characteristic": "e7c10001-5e4d-4b7f-9a3c-6d2f00000000", "dataType": "bool"},
        PropertyType.BOOLEAN,
        True,
    )


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        ({}, "configData: address or name is required"),
        ({"address": "F0:00"}, "configData.address: .*not a Bluetooth address"),
        ({"name": "x", "serviceUuid": "zz"}, "configData.serviceUuid: .*not a UUID"),
        ({"name": "x", "source": "radio"}, "configData.source"),
        ({"name": "x", "connectTimeout": "soon"}, "configData.connectTimeout"),
        ({"name": "x", "color": "red"}, "configData.color"),
    ],
)
def test_connection_errors_name_the_field(conn: dict[str, Any], message: str) -> None:
    with pytest.raises(BleConfigError, match=f"device plant.s1: spec.protocol.{message}"):
        parse_connection("plant.s1", conn)


@pytest.mark.parametrize(
    ("visitor", "kind", "writable", "conn", "message"),
    [
        ({}, PropertyType.FLOAT, False, None, "visitors.configData: missing"),
        (
            {"characteristic": "2A6E", "dataType": "int99"},
            PropertyType.FLOAT,
            False,
            None,
            "dataType: 'int99'",
        ),
        ({"characteristic": "2A6E", "format": "kelvin"}, PropertyType.FLOAT, False, None, "format: 'kelvin'"),
        (
            {"characteristic": "2A6E"},
            PropertyType.BOOLEAN,
            False,
            None,
            "temperature needs a FLOAT or DOUBLE",
        ),
        ({"characteristic": "2A37"}, PropertyType.FLOAT, True, None, "heart_rate is read-only"),
        ({"characteristic": "2A37", "field": "pulse"}, PropertyType.INT, False, None, "field: 'pulse'"),
        (
            {"characteristic": "1234", "dataType": "int16", "scale": 0.1},
            PropertyType.INT,
            False,
            None,
            "dataType int16 needs a FLOAT or DOUBLE",
        ),
        ({"characteristic": "1234", "struct": "<Hq!"}, PropertyType.INT, False, None, "struct: '<Hq!'"),
        (
            {"characteristic": "1234", "struct": "<Hh", "field": 2},
            PropertyType.INT,
            False,
            None,
            "field: .*0..1",
        ),
        (
            {"characteristic": "1234", "dataType": "uint8", "bit": 2},
            PropertyType.INT,
            False,
            None,
            "bit: only",
        ),
        (
            {"manufacturerId": 1, "dataType": "uint8"},
            PropertyType.INT,
            False,
            None,
            "characteristic: required",
        ),
        (
            {"characteristic": "2A6E"},
            PropertyType.FLOAT,
            False,
            {"name": "b", "source": "advertisement"},
            "device's source is advertisement",
        ),
        (
            {"manufacturerId": 1, "dataType": "uint8"},
            PropertyType.INT,
            True,
            {"name": "b", "source": "advertisement"},
            "advertisements are read-only",
        ),
        (
            {"characteristic": "2A6E", "notify": True},
            PropertyType.FLOAT,
            False,
            {"name": "x", "keepConnected": False},
            "notify: needs keepConnected",
        ),
    ],
)
def test_visitor_errors_name_device_property_and_field(
    visitor: dict[str, Any], kind: PropertyType, writable: bool, conn: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(BleConfigError, match=f"device plant.s1 property p: .*{message}"):
        check(visitor, kind, writable, conn)


def test_mapper_options_are_checked() -> None:
    host = RecordingHost()
    with pytest.raises(MapperError, match="unknown option 'hcl'"):
        BleMapper(host, {"hcl": "usb:0"})
    with pytest.raises(MapperError, match="maxConnections: a positive integer"):
        BleMapper(host, {"maxConnections": 0})
    with pytest.raises(MapperError, match="reconnectMin <= reconnectMax"):
        BleMapper(host, {"reconnectMin": "10s", "reconnectMax": "1s"})
    BleMapper.validate(DeviceBinding("plant.s1", "plant", "s1", "ble", {"name": "s1"}, ()))


def test_config_check_reports_a_bad_ble_manifest(tmp_path: Path) -> None:
    docs = sensor_manifests("edge-1", count=1, beacons=1)
    docs[1]["spec"]["properties"][0]["visitors"]["configData"]["characteristic"] = "2A6"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "gw.yaml").write_text(
        yaml.safe_dump(
            {
                "node": "edge-1",
                "store": {"path": str(tmp_path / "s.db")},
                "mqtt": {"url": "mqtt://127.0.0.1:1"},
                "manifests": [str(tmp_path / "m.yaml")],
            }
        )
    )
    result = run_cli("config", "check", "--config", str(tmp_path / "gw.yaml"))
    assert result.returncode != 0
    assert "plant.env-sensor-1 property temperature" in result.stderr + result.stdout
    assert "characteristic" in result.stderr + result.stdout
    # The shipped example manifests are valid.
    docs = sensor_manifests("edge-1", count=2, beacons=1)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(docs))
    result = run_cli("config", "check", "--config", str(tmp_path / "gw.yaml"))
    assert result.returncode == 0, result.stderr
