"""Configuration and manifests: good ones load, bad ones are refused naming what."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgetwin.deviceapi import ManifestError
from edgetwin.deviceapi.types import parse_duration_ms
from edgetwin.gateway.config import ConfigError, load_config, parse_config
from edgetwin.gateway.manifests import load_manifests
from tests.conftest import THERMO_PROPS, device_doc, model_doc, run_cli, write_manifests

BASE = {"node": "edge-a", "store": {"path": "s.db"}, "mqtt": {"url": "mqtt://127.0.0.1:1883"}}


def test_minimal_config_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "manifests": "m"}))
    cfg = load_config(path)
    assert cfg.store.path == tmp_path / "s.db"
    assert cfg.manifests == [tmp_path / "m"]
    assert cfg.mqtt.host_port == ("127.0.0.1", 1883)
    assert cfg.mqtt.protocol == "5"


@pytest.mark.parametrize(
    ("text", "ms"),
    [(250, 250), ("250", 250), ("500ms", 500), ("10s", 10_000), ("1.5m", 90_000), ("7d", 604_800_000)],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("bad", ["soon", "-1s", 0, True, "10 parsecs"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(bad)


def test_embedded_broker_speaks_311() -> None:
    cfg = parse_config({**BASE, "mqtt": {"embedded": {"host": "127.0.0.1", "port": 18883}}})
    assert cfg.mqtt.host_port == ("127.0.0.1", 18883) and cfg.mqtt.protocol == "3.1.1"


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"node": "Edge_A"}, "node", "DNS-1123"),
        ({"store": {}}, "store.path", "is required"),
        ({"mqtt": {"url": "tcp://x:1"}}, "mqtt.url", "mqtt://host:port"),
        ({"mqtt": {"url": "mqtt://x:99999"}}, "mqtt.url", "bad port"),
        ({"mqtt": {}}, "mqtt", "exactly one of url"),
        ({"mqtt": {"url": "mqtt://x:1883", "embedded": {}}}, "mqtt", "exactly one of url"),
        ({"mqtt": {"url": "mqtt://x:1883", "receive_maximum": 0}}, "mqtt.receive_maximum", "greater than"),
        ({"mqtt": {"url": "mqtt://x:1883", "tls": {"cert_file": "a.pem"}}}, "mqtt.tls", "go together"),
        (
            {"mqtt": {"url": "mqtt://x:1883", "tls": {"ca_file": "missing.pem"}}},
            "mqtt.tls.ca_file",
            "does not exist",
        ),
        ({"manifests": ["nowhere"]}, "manifests[0]", "does not exist"),
        ({"colour": "blue"}, "colour", "is not a known key"),
        ({"store": {"path": "s.db", "events_max": 5}}, "store.events_max", "greater than"),
    ],
)
def test_bad_config_names_key(tmp_path: Path, change: dict, key: str, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key and problem in str(err.value)


def test_unreadable_and_non_yaml_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def test_manifests_load_and_skip_other_nodes(tmp_path: Path) -> None:
    write_manifests(
        tmp_path / "a.yaml",
        [model_doc("thermostat", "plant", THERMO_PROPS), device_doc("t1", "plant", "thermostat", "edge-a")],
    )
    write_manifests(tmp_path / "sub" / "b.yml", [device_doc("t2", "plant", "thermostat", "edge-b")])
    result = load_manifests([tmp_path], "edge-a")
    assert list(result.devices) == [("plant", "t1")]
    assert result.foreign == ["plant/t2 (node edge-b)"]


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([device_doc("t1", "plant", "missing", "edge-a")], "DeviceModel plant/missing is not defined"),
        (
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc("t1", "plant", "thermostat", "edge-a", properties=[{"name": "humidity"}]),
            ],
            "spec.properties[0].name: 'humidity' is not a property",
        ),
        (
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc(
                    "t1",
                    "plant",
                    "thermostat",
                    "edge-a",
                    properties=[{"name": "temperature", "desired": {"value": 1}}],
                ),
            ],
            "ReadOnly",
        ),
        (
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc(
                    "t1",
                    "plant",
                    "thermostat",
                    "edge-a",
                    properties=[{"name": "setpoint", "desired": {"value": "hot"}}],
                ),
            ],
            "spec.properties[0].desired.value: expected a number",
        ),
        ([model_doc("m", "plant", [{"name": "a/b", "type": "INT"}])], "spec.properties[0].name"),
        ([model_doc("m", "plant", [{"name": "a", "type": "TEXT"}])], "spec.properties[0].type"),
        (
            [model_doc("m", "plant", [{"name": "a", "type": "INT"}, {"name": "a", "type": "INT"}])],
            "listed twice",
        ),
        (
            [{**device_doc("t1", "plant", "thermostat", "edge-a"), "spec": {"nodeName": "edge-a"}}],
            "spec.deviceModelRef: is required",
        ),
        (
            [model_doc("m", "plant", [{"name": "a", "type": "INT"}, {"name": "b", "type": "INT"}])] * 2,
            "defined twice",
        ),
        (
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc(
                    "t1",
                    "plant",
                    "thermostat",
                    "edge-a",
                    protocol={"protocolName": "modbus"},
                    properties=[{"name": "setpoint", "visitors": {"protocolName": "opcua"}}],
                ),
            ],
            "properties[0].visitors.protocolName: 'opcua' is not the device's protocol "
            "(spec.protocol.protocolName: 'modbus')",
        ),
    ],
)
def test_bad_manifests_name_file_object_and_field(tmp_path: Path, docs: list, message: str) -> None:
    write_manifests(tmp_path / "bad.yaml", docs)
    with pytest.raises(ManifestError) as err:
        load_manifests([tmp_path], "edge-a")
    assert message in str(err.value)
    if "defined twice" not in message:
        assert "plant" in str(err.value)


def test_config_check_cli(tmp_path: Path) -> None:
    write_manifests(
        tmp_path / "m" / "a.yaml",
        [model_doc("thermostat", "plant", THERMO_PROPS), device_doc("t1", "plant", "thermostat", "edge-a")],
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "manifests": ["m"]}))
    out = run_cli("config", "check", "--config", str(cfg))
    assert out.returncode == 0 and "1 devices for this node" in out.stdout
    write_manifests(tmp_path / "m" / "b.yaml", [device_doc("t9", "plant", "nope", "edge-a")])
    out = run_cli("config", "check", "--config", str(cfg))
    assert out.returncode == 2 and "DeviceModel plant/nope is not defined" in out.stderr
    # A mapper's own checks run too: a Modbus visitor on a read-only table for a
    # ReadWrite property is refused, naming device, property and field.
    bad = device_doc(
        "t9",
        "plant",
        "thermostat",
        "edge-a",
        protocol={"protocolName": "modbus", "configData": {"host": "127.0.0.1"}},
        properties=[
            {"name": "setpoint", "visitors": {"configData": {"table": "input_register", "address": 3}}}
        ],
    )
    write_manifests(tmp_path / "m" / "b.yaml", [bad])
    out = run_cli("config", "check", "--config", str(cfg))
    assert out.returncode == 2
    assert "device plant.t9 property setpoint: visitors.configData.table" in out.stderr


def test_uplink_config_checks_its_certificate_files(tmp_path: Path) -> None:
    base = {
        "node": "edge-01",
        "store": {"path": str(tmp_path / "s.db")},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
    }
    uplink = {
        "address": "relay:7443",
        "ca_file": "ca.pem",
        "cert_file": "edge-01.pem",
        "key_file": "edge-01-key.pem",
    }
    with pytest.raises(ConfigError, match=r"uplink.ca_file: .*ca.pem does not exist"):
        parse_config({**base, "uplink": uplink}, base=tmp_path)
    for name in ("ca.pem", "edge-01.pem", "edge-01-key.pem"):
        (tmp_path / name).write_text("x")
    cfg = parse_config({**base, "uplink": uplink}, base=tmp_path)
    assert cfg.uplink is not None and cfg.uplink.cert_file == tmp_path / "edge-01.pem"
    assert cfg.uplink.budget_bps == 8000
    with pytest.raises(ConfigError, match=r"uplink\.budget_bps"):
        parse_config({**base, "uplink": {**uplink, "budget_bps": 1}}, base=tmp_path)


def test_a_config_with_three_errors_reports_all_three_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "nod: edge-01\n"  # line 1: a typo of a required key
        "store:\n"
        "  path: s.db\n"
        "  events_max: 5\n"  # line 4: out of range
        "mqtt:\n"
        "  url: mqtt://127.0.0.1:1883\n"
        "  recieve_maximum: 10\n"  # line 7: a typo of an optional key
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert lines == [
        f"{path}:1:1: nod: is not a known key; did you mean node?",
        f"{path}:4:3: store.events_max: Input should be greater than or equal to 100, got 5",
        f"{path}:7:3: mqtt.recieve_maximum: is not a known key; did you mean receive_maximum?",
    ]


def test_a_missing_file_named_in_the_config_points_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**BASE, "manifests": [str(tmp_path), "nowhere.yaml"]}, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "nowhere.yaml" in text)
    assert str(err.value).startswith(f"{path}:{line}:"), str(err.value)
    assert "manifests[1]: " in str(err.value) and "does not exist" in str(err.value)


def test_manifest_errors_of_every_file_at_once_with_file_line_and_suggestion(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.yaml").write_text(
        "apiVersion: edgetwin.io/v1alpha1\n"
        "kind: DeviceModel\n"
        "metadata: {name: thermo, namespace: plant}\n"
        "spec:\n"
        "  properties:\n"
        "  - {name: temperature, type: FLOAT}\n"
        "  - name: setpoint\n"
        "    type: FLOAT\n"
        "    acessMode: ReadWrite\n"  # line 9
    )
    (folder / "b.yaml").write_text(
        "apiVersion: edgetwin.io/v1alpha1\n"
        "kind: Device\n"
        "metadata: {name: t1, namespace: plant}\n"
        "spec:\n"
        "  deviceModelRf: {name: thermo}\n"  # line 5
        "  nodeName: edge-a\n"
        "---\n"
        "apiVersion: edgetwin.io/v1alpha1\n"
        "kind: Device\n"
        "metadata: {name: t2, namespace: plant}\n"
        "spec:\n"
        "  deviceModelRef: {name: nothere}\n"  # line 12
        "  nodeName: edge-a\n"
    )
    with pytest.raises(ManifestError) as err:
        load_manifests([folder], "edge-a")
    a, b = folder / "a.yaml", folder / "b.yaml"
    assert str(err.value).splitlines() == [
        f"{a}:9:5: DeviceModel plant/thermo: spec.properties[1].acessMode: is not a known field; "
        "did you mean accessMode?",
        f"{b}:5:3: Device plant/t1: spec.deviceModelRf: is not a known field; did you mean deviceModelRef?",
        f"{b}:12:20: Device plant/t2: spec.deviceModelRef.name: DeviceModel plant/nothere is not defined "
        "(a model must be in the device's namespace)",
    ]
