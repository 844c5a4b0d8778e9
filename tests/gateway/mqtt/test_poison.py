"""Nothing a peer publishes can wedge the gateway: messages that the JSON parser itself
chokes on (deep nesting, integers of thousands of digits, invalid UTF-8) are refused,
counted and acknowledged like any bad input, so the broker never redelivers them and
every other message keeps flowing, also across a restart. Real mosquitto, the gateway
in a subprocess."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.conftest import (
    THERMO_PROPS,
    Collector,
    GatewayProcess,
    device_doc,
    model_doc,
    update_payload,
    write_config,
    write_manifests,
)
from tests.harness.processes import Mosquitto

NODE = "edge-p"
DEV = "plant.thermo-1"
UPDATE = f"$hw/events/device/{DEV}/twin/update"


@pytest.fixture
def gateway(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[GatewayProcess]:
    manifests = write_manifests(
        tmp_path / "m" / "devices.yaml",
        [model_doc("thermostat", "plant", THERMO_PROPS), device_doc("thermo-1", "plant", "thermostat", NODE)],
    )
    config = write_config(tmp_path, NODE, mosquitto.port, manifests.parent)
    gw = GatewayProcess(config, mosquitto.port, NODE, tmp_path / "gateway.log").start()
    yield gw
    gw.stop()


def publish_many(port: int, topic: str, payloads: list[bytes]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


POISON = [
    b"[" * 50_000,  # RecursionError inside json.loads
    b'{"event_id": "deep", "twin": ' + b"[" * 30_000 + b"}",
    b'{"event_id": "big", "twin": {"count": {"actual": {"value": ' + b"9" * 5_000 + b"}}}}",
    b'{"event_id": "utf8", "twin": {"count": {"actual": {"value": "\xff\xfe"}}}}',
]


def test_poison_payloads_are_refused_and_acknowledged_and_later_updates_flow(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    results = Collector(mosquitto.port, [f"{UPDATE}/result", f"edgetwin/{NODE}/gateway/metrics"])
    try:
        # More than the session's receive maximum (1,000): if poison were never
        # acknowledged, the broker would stop delivering to the gateway for good.
        publish_many(mosquitto.port, UPDATE, [POISON[i % len(POISON)] for i in range(1_100)])
        valid = update_payload({"temperature": "21.5"}, "after-poison").encode()
        publish_many(mosquitto.port, UPDATE, [valid])
        answer = results.json_on(f"{UPDATE}/result", 30, where=lambda d: d.get("event_id") == "after-poison")
        assert answer["twin"]["temperature"]["actual"]["value"] == "21.5"
        # Each poison message was answered with the reason, and counted.
        deep = results.json_on(f"{UPDATE}/result", 10, where=lambda d: d.get("code") == 400)
        assert deep["reason"]
        metrics = results.json_on(
            f"edgetwin/{NODE}/gateway/metrics",
            15,
            where=lambda d: d.get("rejected_bad_shape", 0) + d.get("rejected_not_json", 0) >= 1_100,
        )
        assert metrics["rejected_bad_shape"] >= 825 and metrics["rejected_not_json"] >= 275
    finally:
        results.close()
    log = gateway.log.read_text()
    assert "Traceback" not in log
    # Rejections are logged at most 10 per minute per kind, not once per message.
    assert log.count("rejected MQTT message") <= 20

    # Nothing is left for the broker to redeliver: a restarted gateway answers a new
    # update at once, and no poison comes back.
    gateway.stop()
    results = Collector(mosquitto.port, [f"{UPDATE}/result"])
    try:
        gateway.start()
        valid = update_payload({"temperature": "22.5"}, "after-restart").encode()
        publish_many(mosquitto.port, UPDATE, [valid])
        results.json_on(f"{UPDATE}/result", 20, where=lambda d: d.get("event_id") == "after-restart")
        time.sleep(0.5)
        redelivered = [json.loads(p) for t, p, _ in results.messages if t == f"{UPDATE}/result"]
        assert [d.get("event_id") for d in redelivered] == ["after-restart"]
    finally:
        results.close()
