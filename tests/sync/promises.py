"""What the sync promise tests share: the node, a fleet of sensors, reports and a
publisher that waits for the broker's acknowledgements."""

from __future__ import annotations

import json
import time
from typing import Any

import paho.mqtt.client as paho

from edgetwin.gateway.mqtt import topics
from tests.conftest import device_doc, model_doc

NODE = "edge-01"


def publish_many(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(500)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, body, qos=1) for topic, body in messages]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def report(device: str, values: dict[str, Any], event: str = "") -> tuple[str, bytes]:
    body = {
        "event_id": event or f"e{time.monotonic_ns()}",
        "twin": {k: {"actual": {"value": v}} for k, v in values.items()},
    }
    return topics.twin_update(f"plant.{device}"), json.dumps(body).encode()


PROPS = [{"name": f"p{i}", "type": "STRING"} for i in range(10)]


def fleet(count: int, node: str = NODE, prefix: str = "s") -> list[dict[str, Any]]:
    return [model_doc("sensor", "plant", PROPS)] + [
        device_doc(f"{prefix}{i:03d}", "plant", "sensor", node) for i in range(count)
    ]
