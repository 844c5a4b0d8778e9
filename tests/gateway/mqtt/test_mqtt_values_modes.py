"""``mqtt.values``: retained values per property (the default), one document per device,
or both, against a real mosquitto. The per-device form is the cheap one for devices that
report many values at once (docs/mqtt.md, "Retained values for local apps")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import (
    THERMO_PROPS,
    Collector,
    GatewayProcess,
    device_doc,
    model_doc,
    publish,
    update_payload,
    write_config,
    write_manifests,
)
from tests.harness.processes import Mosquitto

TOPIC_UPDATE = "$hw/events/device/plant.thermo-1/twin/update"


def retained_after_two_reports(node: str, mode: str, mosquitto: Mosquitto, tmp: Path) -> dict[str, dict]:
    """Start a gateway in ``mode``, report twice, and return the retained messages a
    subscriber arriving afterwards receives on the device's value topics."""
    manifests = write_manifests(
        tmp / "manifests" / "devices.yaml",
        [model_doc("thermostat", "plant", THERMO_PROPS), device_doc("thermo-1", "plant", "thermostat", node)],
    )
    mqtt = {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "values": mode}
    config = write_config(tmp, node, mosquitto.port, manifests.parent, mqtt=mqtt)
    gw = GatewayProcess(config, mosquitto.port, node, tmp / "gateway.log").start()
    try:
        results = Collector(mosquitto.port, [f"{TOPIC_UPDATE}/result"])
        publish(
            mosquitto.port, TOPIC_UPDATE, update_payload({"temperature": "21.5", "count": "3"}, "m1", 1_000)
        )
        publish(mosquitto.port, TOPIC_UPDATE, update_payload({"temperature": "22.5"}, "m2", 2_000))
        # Values are published after the commit and before the answer.
        results.json_on(f"{TOPIC_UPDATE}/result", where=lambda d: d["event_id"] == "m2")
        results.close()
        late = Collector(mosquitto.port, [f"edgetwin/{node}/plant/thermo-1/+"])
        time.sleep(0.5)  # every retained message of the subscription arrives at once
        with late.cond:
            got = {t: json.loads(p) for t, p, retained in late.messages if retained}
        late.close()
    finally:
        assert gw.stop() == 0, gw.log.read_text()[-2000:]
    return {t.rsplit("/", 1)[1]: d for t, d in got.items() if not t.endswith(("/_state", "/_spec"))}


@pytest.mark.parametrize("mode", ["per_property", "per_device", "both"])
def test_values_mode_publishes_the_forms_chosen(mode: str, mosquitto: Mosquitto, tmp_path: Path) -> None:
    # A node per mode: retained messages of an earlier mode stay on the shared broker.
    got = retained_after_two_reports(f"edge-{mode.replace('_', '-')}", mode, mosquitto, tmp_path)
    latest = {
        "temperature": {"value": 22.5, "timestamp": 2_000, "version": 2},
        "count": {"value": 3, "timestamp": 1_000, "version": 1},
    }
    want: dict[str, dict] = {}
    if mode != "per_device":
        want |= latest
    if mode != "per_property":
        want["_values"] = latest  # one document, the latest of every value
    assert got == want
