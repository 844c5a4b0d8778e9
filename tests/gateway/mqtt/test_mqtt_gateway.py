"""The gateway against a real mosquitto, with mosquitto_pub / mosquitto_sub and the
edgetwin CLI as the outside clients."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    THERMO_PROPS,
    Collector,
    GatewayProcess,
    publish,
    run_cli,
    thermostat_gateway,
    update_payload,
)
from tests.harness.processes import Mosquitto

NODE = "edge-a"
DEV = "plant.thermo-1"
TOPIC_UPDATE = f"$hw/events/device/{DEV}/twin/update"


@pytest.fixture(scope="module")
def gateway(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = thermostat_gateway(
        tmp_path_factory.mktemp("gw"), mosquitto.port, NODE, [("plant", "thermo-1"), ("plant", "thermo-2")]
    )
    yield gw
    assert gw.stop() == 0, gw.log.read_text()[-2000:]


def twin_get(gw: GatewayProcess, device: str = "plant/thermo-1") -> dict:
    out = run_cli("twin", "get", device, "--json", "--config", str(gw.config))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_update_shows_in_twin_get_and_retained_value(gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    results = Collector(mosquitto.port, [f"{TOPIC_UPDATE}/result"])
    publish(
        mosquitto.port,
        TOPIC_UPDATE,
        update_payload({"temperature": "23.5", "count": "7"}, "ev-1", 1_700_000_000_000),
    )
    result = results.json_on(f"{TOPIC_UPDATE}/result", where=lambda d: d["event_id"] == "ev-1")
    assert result["twin"]["temperature"]["actual"]["value"] == "23.5"
    assert "rejected" not in result
    results.close()

    twin = twin_get(gateway)
    assert twin["twin"]["temperature"]["reported"] == {
        "value": 23.5,
        "timestamp": 1_700_000_000_000,
        "version": 1,
    }
    assert twin["twin"]["count"]["reported"]["value"] == 7

    # A subscriber arriving later gets the retained value (mosquitto_sub as the client).
    sub = subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(mosquitto.port),
            "-t",
            f"edgetwin/{NODE}/plant/thermo-1/temperature",
            "-C",
            "1",
            "-W",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert json.loads(sub.stdout) == {"value": 23.5, "timestamp": 1_700_000_000_000, "version": 1}

    # Human-readable form names the property and value.
    out = run_cli("twin", "get", "plant/thermo-1", "--config", str(gateway.config))
    assert out.returncode == 0 and "temperature" in out.stdout and "23.5" in out.stdout


def test_twin_set_produces_delta_and_is_shown(gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    deltas = Collector(mosquitto.port, [f"$hw/events/device/{DEV}/twin/update/delta"])
    out = run_cli("twin", "set", "plant/thermo-1", "setpoint=21.5", "--config", str(gateway.config))
    assert out.returncode == 0, out.stderr
    assert "setpoint" in out.stdout and "21.5" in out.stdout
    delta = deltas.json_on(f"$hw/events/device/{DEV}/twin/update/delta")
    assert delta["delta"] == {"setpoint": "21.5"}
    assert delta["twin"]["setpoint"]["expected"]["value"] == "21.5"
    deltas.close()

    twin = twin_get(gateway)
    assert twin["twin"]["setpoint"]["desired"]["value"] == 21.5
    assert twin["twin"]["setpoint"]["desired"]["origin"] == "edge"
    assert twin["twin"]["setpoint"]["desired"]["writeState"] == "pending"

    # The mapper applies it and reports the new actual value: the write is confirmed.
    publish(mosquitto.port, TOPIC_UPDATE, update_payload({"setpoint": "21.5"}, "ev-sp"))
    for _ in range(50):
        twin = twin_get(gateway)
        if twin["twin"]["setpoint"]["desired"]["writeState"] == "applied":
            break
        time.sleep(0.1)
    assert twin["twin"]["setpoint"]["desired"]["writeState"] == "applied"


def test_twin_set_rejects_read_only_and_out_of_range(gateway: GatewayProcess) -> None:
    out = run_cli("twin", "set", "plant/thermo-1", "temperature=3", "--config", str(gateway.config))
    assert out.returncode == 1
    assert "ReadOnly" in out.stderr
    out = run_cli("twin", "set", "plant/thermo-1", "setpoint=99", "--config", str(gateway.config))
    assert out.returncode == 1
    assert "above the maximum 35" in out.stderr


def test_twin_get_over_mqtt_and_state_update(gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    dev = "plant.thermo-2"
    col = Collector(
        mosquitto.port,
        [f"$hw/events/device/{dev}/twin/get/result", f"$hw/events/device/{dev}/state/update/result"],
    )
    publish(mosquitto.port, f"$hw/events/device/{dev}/twin/update", update_payload({"label": "north wall"}))
    publish(mosquitto.port, f"$hw/events/device/{dev}/twin/get", json.dumps({"event_id": "g1"}))
    got = col.json_on(f"$hw/events/device/{dev}/twin/get/result", where=lambda d: d["event_id"] == "g1")
    assert got["twin"]["label"]["actual"]["value"] == "north wall"
    assert got["twin"]["enabled"]["metadata"]["type"] == "boolean"

    publish(
        mosquitto.port,
        f"$hw/events/device/{dev}/state/update",
        json.dumps({"event_id": "s1", "state": "online"}),
    )
    st = col.json_on(f"$hw/events/device/{dev}/state/update/result", where=lambda d: d["event_id"] == "s1")
    assert st["device"]["state"] == "online"
    col.close()
    assert twin_get(gateway, "plant/thermo-2")["state"] == "online"


def test_malformed_payloads_are_rejected_counted_and_nothing_else_lost(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    dev = "plant.thermo-2"
    topic = f"$hw/events/device/{dev}/twin/update"
    col = Collector(
        mosquitto.port,
        [f"{topic}/result", f"edgetwin/{NODE}/gateway/metrics", "$hw/events/device/+/twin/update/result"],
    )
    publish(mosquitto.port, topic, update_payload({"count": "1"}, "good-1"))
    publish(mosquitto.port, topic, b"this is not json {")
    publish(
        mosquitto.port,
        topic,
        json.dumps({"event_id": "bad-type", "twin": {"count": {"actual": {"value": "twelve"}}}}),
    )
    publish(mosquitto.port, topic, json.dumps({"event_id": "bad-shape", "twin": "nope"}))
    publish(
        mosquitto.port,
        topic,
        json.dumps(
            {"event_id": "x", "twin": {"count": {"actual": {"value": "9" * 10}}}, "pad": "p" * 70_000}
        ),
    )
    publish(
        mosquitto.port, "$hw/events/device/plant.ghost/twin/update", update_payload({"count": "5"}, "ghost")
    )
    # A device of another node is unknown to this gateway.
    publish(
        mosquitto.port,
        "$hw/events/device/plant.other-node/twin/update",
        update_payload({"count": "5"}, "foreign"),
    )
    publish(mosquitto.port, topic, update_payload({"count": "2", "nonexistent": "1"}, "good-2"))

    bad = col.json_on(f"{topic}/result", where=lambda d: d.get("event_id") == "bad-type")
    assert bad["code"] == 400 and "expected an integer" in bad["rejected"]["count"]
    shape = col.json_on(f"{topic}/result", where=lambda d: d.get("event_id") == "bad-shape")
    assert "twin" in shape["reason"]
    ghost = col.json_on(
        "$hw/events/device/plant.ghost/twin/update/result", where=lambda d: d.get("event_id") == "ghost"
    )
    assert ghost["code"] == 404 and "plant.ghost" in ghost["reason"]
    foreign = col.json_on("$hw/events/device/plant.other-node/twin/update/result")
    assert foreign["code"] == 404
    good = col.json_on(f"{topic}/result", where=lambda d: d.get("event_id") == "good-2")
    assert good["twin"]["count"]["actual"]["value"] == "2"
    assert "not a property" in good["rejected"]["nonexistent"]

    metrics = col.json_on(
        f"edgetwin/{NODE}/gateway/metrics",
        timeout=15,
        where=lambda d: d.get("rejected_oversize", 0) >= 1 and d.get("rejected_unknown_device", 0) >= 2,
    )
    assert metrics["rejected_not_json"] >= 1
    assert metrics["rejected_bad_shape"] >= 1
    assert metrics["rejected_values"] >= 2
    col.close()

    twin = twin_get(gateway, "plant/thermo-2")
    assert twin["twin"]["count"]["reported"]["value"] == 2
    # Only the two good values were accepted: versions 1 and 2, nothing in between.
    assert twin["twin"]["count"]["reported"]["version"] == 2
    log = gateway.log.read_text()
    assert "rejected MQTT message" in log and "not JSON" in log


def test_embedded_broker_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"node: edge-a\nstore: {{path: s.db}}\nmqtt: {{embedded: {{host: 127.0.0.1, port: {port}}}}}\n"
        )
        out = run_cli("gateway", "run", "--config", str(cfg))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: edge-a\nstore: {path: x.db}\nmqtt: {url: 'http://nope'}\n")
    out = run_cli("gateway", "run", "--config", str(cfg))
    assert out.returncode == 2
    assert "mqtt.url" in out.stderr and "mqtt://host:port" in out.stderr
    cfg.write_text("node: edge-a\nstore: {path: x.db}\nmqtt: {url: 'mqtt://127.0.0.1:1'}\nmanifest: []\n")
    out = run_cli("gateway", "run", "--config", str(cfg))
    assert out.returncode == 2 and "manifest: is not a known key" in out.stderr


def test_twin_events_shows_the_local_event_log(gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    dev = "plant.thermo-1"
    col = Collector(mosquitto.port, [f"$hw/events/device/{dev}/twin/update/result"])
    publish(
        mosquitto.port, f"$hw/events/device/{dev}/twin/update", update_payload({"temperature": "999"}, "hot")
    )
    col.json_on(f"$hw/events/device/{dev}/twin/update/result", where=lambda d: d.get("event_id") == "hot")
    col.close()
    out = run_cli(
        "twin", "events", "plant/thermo-1", "--kind", "rejected", "--json", "--config", str(gateway.config)
    )
    assert out.returncode == 0, out.stderr
    events = json.loads(out.stdout)
    assert any(
        e["property"] == "temperature" and "above the maximum 150" in e["detail"]["reason"] for e in events
    )
    text = run_cli("twin", "events", "--config", str(gateway.config))
    assert text.returncode == 0 and "rejected" in text.stdout and "above the maximum 150" in text.stdout


def test_an_update_published_twice_is_answered_twice_and_applied_once(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    """A publisher that resends (QoS 1 is at least once) does not make a new version;
    a new message with the same value does."""
    results = Collector(mosquitto.port, [f"{TOPIC_UPDATE}/result"])
    body = update_payload({"label": "twice"}, "ev-twice")
    publish(mosquitto.port, TOPIC_UPDATE, body)
    publish(mosquitto.port, TOPIC_UPDATE, body)
    for _ in range(100):
        answers = [p for t, p, _ in results.messages if json.loads(p)["event_id"] == "ev-twice"]
        if len(answers) == 2:
            break
        time.sleep(0.05)
    results.close()
    assert len(answers) == 2 and answers[0] == answers[1]
    first = twin_get(gateway)["twin"]["label"]["reported"]["version"]
    assert json.loads(answers[0])["twin"]["label"]["metadata"]["version"] == first
    publish(mosquitto.port, TOPIC_UPDATE, update_payload({"label": "twice"}, "ev-twice-2"))
    for _ in range(100):
        if twin_get(gateway)["twin"]["label"]["reported"]["version"] == first + 1:
            break
        time.sleep(0.05)
    assert twin_get(gateway)["twin"]["label"]["reported"]["version"] == first + 1


def test_twin_list_shows_source_readiness_and_pending_reported_values(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    results = Collector(mosquitto.port, [f"{TOPIC_UPDATE}/result"])
    publish(mosquitto.port, TOPIC_UPDATE, update_payload({"count": "3"}, "ev-list"))
    results.json_on(f"{TOPIC_UPDATE}/result", where=lambda d: d["event_id"] == "ev-list")
    results.close()
    for _ in range(50):
        out = run_cli("twin", "list", "--config", str(gateway.config))
        row = next(line.split() for line in out.stdout.splitlines() if line.startswith("plant.thermo-1"))
        if "pending" in row:
            break
        time.sleep(0.1)
    assert out.returncode == 0, out.stderr
    # DEVICE SOURCE READY STATE PROPERTIES OUTBOX: a reported value the cloud has not taken
    # (no uplink here) is pending.
    assert row[:2] == ["plant.thermo-1", "manifest"] and row[2] == "True" and row[5] == "pending", row
    listed = json.loads(run_cli("twin", "list", "--json", "--config", str(gateway.config)).stdout)
    entry = next(d for d in listed if d["device"] == "plant.thermo-1")
    assert entry["outbox"] is True and entry["ready"] is True and entry["properties"] == len(THERMO_PROPS)
