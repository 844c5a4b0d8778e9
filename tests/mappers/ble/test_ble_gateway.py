"""BLE end to end: emulated sensors in another process -> BLE mapper (found by entry
point, Bumble central over HCI/TCP) -> twin engine -> durable store, and a desired relay
value over MQTT back to the peripheral."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.mapper_host import discover
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.store.reader import open_reader, read_twin
from edgetwin.gateway.twin.model import WriteState
from edgetwin.mappers.ble.mapper import BleMapper
from edgetwin.simulators.ble import sensor_manifests
from tests.conftest import eventually
from tests.harness.processes import free_port
from tests.mappers.ble.test_ble_mapper import SimProcess

NODE = "edge-ble"


def test_ble_mapper_is_found_through_entry_points() -> None:
    assert discover()["ble"] is BleMapper


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    s = SimProcess(2, beacons=1)
    yield s
    s.close()


@pytest.fixture
async def gateway(tmp_path: Path, sim: SimProcess) -> AsyncIterator[Gateway]:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(sensor_manifests(NODE, count=2, beacons=1)))
    cfg = parse_config(
        {
            "node": NODE,
            "store": {"path": str(tmp_path / "s.db")},
            "mqtt": {"embedded": {"host": "127.0.0.1", "port": free_port()}},
            "manifests": [str(tmp_path / "m.yaml")],
            "mappers": {"ble": {"hci": sim.hci, "maxConnections": 3}},
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 15)
    yield gw
    stop.set()
    await asyncio.wait_for(task, 15)


async def test_sensor_values_reach_the_twin_store(gateway: Gateway) -> None:
    devices = gateway.engine.devices
    for name in ("plant.env-sensor-1", "plant.env-sensor-2"):
        props = devices[name].properties
        await eventually(lambda props=props: all(p.reported is not None for p in props.values()), within=20)  # type: ignore[misc]
        assert devices[name].state == "online"
    beacon = devices["plant.beacon-1"].properties
    await eventually(lambda: all(p.reported is not None for p in beacon.values()), within=20)
    reader = open_reader(gateway.cfg.store.path)

    def stored() -> dict[str, Any]:
        twin = read_twin(reader, "plant.env-sensor-1")
        return twin or {}

    # The engine applies a report before its group commit lands: wait for the store.
    await eventually(lambda: all("reported" in p for p in stored().get("twin", {}).values()), within=10)
    twin = stored()
    assert len(twin["twin"]) == 7
    assert twin["twin"]["pressure"]["reported"]["value"] == 101325.0
    assert twin["twin"]["battery"]["reported"]["value"] == 97
    assert 15 < twin["twin"]["temperature"]["reported"]["value"] < 30
    # Notified temperature keeps moving the version.
    temp = devices["plant.env-sensor-1"].properties["temperature"]
    assert temp.reported is not None
    version = temp.reported.version
    await eventually(lambda: temp.reported is not None and temp.reported.version > version + 2, within=10)


async def test_edge_desired_relay_is_written_to_the_peripheral(gateway: Gateway, sim: SimProcess) -> None:
    prop = gateway.engine.devices["plant.env-sensor-2"].properties["relay"]
    await eventually(lambda: prop.reported is not None, within=20)
    host, port = gateway.cfg.mqtt.host_port
    body = payloads.twin_set_request("relay-1", int(time.time() * 1000), {"relay": True})
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topics.twin_update("plant.env-sensor-2"), body, qos=1)
    await eventually(lambda: prop.write_state is WriteState.APPLIED, within=15)
    assert sim.state("env-sensor-2")["relay"] is True
    assert prop.reported is not None and prop.reported.value is True
