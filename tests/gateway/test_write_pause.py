"""A desired write survives outages: while the MQTT broker or the device is down, the
write's attempts are not spent; when it is back the value is written. Real mosquitto
(stopped and started again), a real pymodbus server (stopped and started again)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.twin.model import WriteState
from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests
from tests.conftest import THERMO_PROPS, Collector, device_doc, eventually, model_doc
from tests.harness.processes import Mosquitto, free_port

NODE = "edge-w"
FAST_WRITES = {"attempts": 4, "retry_min": "50ms", "retry_max": "200ms"}


@pytest.fixture
async def gateway_on(tmp_path: Path) -> AsyncIterator[Any]:
    tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(docs: list[dict[str, Any]], mqtt: dict[str, Any]) -> Gateway:
        (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(docs))
        cfg = parse_config(
            {
                "node": NODE,
                "store": {"path": str(tmp_path / "s.db")},
                "mqtt": mqtt,
                "manifests": [str(tmp_path / "m.yaml")],
                "writes": FAST_WRITES,
            }
        )
        gw = Gateway(cfg)
        stop = asyncio.Event()
        tasks.append((stop, asyncio.create_task(gw.run(stop))))
        await asyncio.wait_for(gw.ready.wait(), 15)
        return gw

    yield start
    for stop, task in tasks:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_broker_outage_pauses_deltas_instead_of_failing_the_write(
    tmp_path: Path, gateway_on: Any
) -> None:
    dev = "plant.thermo-1"
    broker = Mosquitto(tmp_path)
    try:
        docs = [
            model_doc("thermostat", "plant", THERMO_PROPS),
            device_doc("thermo-1", "plant", "thermostat", NODE),
        ]
        gw = await gateway_on(docs, {"url": f"mqtt://127.0.0.1:{broker.port}", "keepalive": 5})
        assert gw.bus is not None
        await asyncio.wait_for(gw.bus.connected.wait(), 10)
        # An edge desired value; the (absent) external mapper never applies it.
        body = payloads.twin_set_request("set-1", int(time.time() * 1000), {"setpoint": "21.5"})
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(topics.twin_update(dev), body, qos=1)
        prop = gw.engine.devices[dev].properties["setpoint"]
        await eventually(lambda: prop.write_attempts >= 1)
        # The broker goes away for longer than all attempts would take at this backoff.
        broker.stop()
        await eventually(lambda: not gw.bus.connected.is_set())  # type: ignore[union-attr]
        attempts_when_down = prop.write_attempts
        await asyncio.sleep(3)
        assert prop.write_state is WriteState.PENDING, prop.write_reason
        assert prop.write_attempts == attempts_when_down
        # Back: deltas flow again, and the write completes when the mapper applies it.
        broker.start()
        await asyncio.wait_for(gw.bus.connected.wait(), 20)
        deltas = Collector(broker.port, [topics.twin_update_delta(dev)])
        try:
            delta = await asyncio.to_thread(deltas.json_on, topics.twin_update_delta(dev), 15)
            assert delta["delta"] == {"setpoint": "21.5"}
        finally:
            deltas.close()
        report = json.dumps({"event_id": "m1", "twin": {"setpoint": {"actual": {"value": "21.5"}}}})
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(topics.twin_update(dev), report, qos=1)
        await eventually(lambda: prop.write_state is WriteState.APPLIED)
    finally:
        broker.stop()


async def test_a_device_outage_pauses_mapper_writes_until_the_device_is_back(gateway_on: Any) -> None:
    port = free_port()
    sim = BoilerSimulator("127.0.0.1", port)
    await sim.start()
    try:
        broker_port = free_port()
        gw = await gateway_on(
            boiler_manifests(NODE, "127.0.0.1", port),
            {"embedded": {"host": "127.0.0.1", "port": broker_port}},
        )
        dev = gw.engine.devices["plant.boiler-mb"]
        await eventually(lambda: dev.state == "online")
        await sim.stop()
        await eventually(lambda: dev.state == "offline")
        body = payloads.twin_set_request("set-2", int(time.time() * 1000), {"setpoint": "72.5"})
        async with aiomqtt.Client("127.0.0.1", broker_port) as client:
            await client.publish(topics.twin_update("plant.boiler-mb"), body, qos=1)
        prop = dev.properties["setpoint"]
        await eventually(lambda: prop.desired is not None and prop.desired.value == 72.5)
        await asyncio.sleep(3)  # all 4 attempts would be spent (and failed) by now
        assert prop.write_state is WriteState.PENDING and prop.write_attempts == 0
        await sim.start()
        await eventually(lambda: prop.write_state is WriteState.APPLIED, within=20)
        assert sim.setpoint == 72.5
    finally:
        await sim.stop()
