"""Modbus end to end: boiler simulator -> Modbus mapper (found by entry point) ->
twin engine -> durable store, and a desired setpoint back to the device."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from edgetwin.demo import free_port
from gateway.config import parse_config
from gateway.mapper_host import discover
from gateway.mqtt import payloads, topics
from gateway.service import Gateway
from gateway.store.store import open_reader, read_twin
from gateway.twin.engine import WriteState
from mappers.modbus.mapper import ModbusMapper
from mappers.modbus.sim import BoilerSimulator, boiler_manifests
from tests.conftest import eventually

NODE = "edge-mb"


def test_modbus_mapper_is_found_through_entry_points() -> None:
    assert discover()["modbus"] is ModbusMapper


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, BoilerSimulator]]:
    sim = BoilerSimulator("127.0.0.1", free_port())
    await sim.start()
    docs = boiler_manifests(NODE, sim.host, sim.port)
    # One more property at an address the device does not have.
    docs[0]["spec"]["properties"].append({"name": "ghost", "type": "INT"})
    docs[1]["spec"]["properties"].append(
        {
            "name": "ghost",
            "collectCycle": "1s",
            "visitors": {"protocolName": "modbus", "configData": {"table": "input_register", "address": 40}},
        }
    )
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(docs))
    cfg = parse_config(
        {
            "node": NODE,
            "store": {"path": str(tmp_path / "s.db")},
            "mqtt": {"embedded": {"host": "127.0.0.1", "port": free_port()}},
            "manifests": [str(tmp_path / "m.yaml")],
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 15)
    yield gw, sim
    stop.set()
    await asyncio.wait_for(task, 15)
    await sim.stop()


async def test_values_reach_the_twin_store_and_a_bad_address_is_marked(
    running: tuple[Gateway, BoilerSimulator],
) -> None:
    gw, _ = running
    props = gw.engine.devices["plant.boiler-mb"].properties
    await eventually(
        lambda: all(
            props[p].reported is not None for p in ("supply_temp", "pressure", "setpoint", "run", "alarm")
        )
    )
    assert props["setpoint"].reported.value == 65.0  # type: ignore[union-attr]
    assert props["run"].reported.value is True  # type: ignore[union-attr]
    await eventually(lambda: props["ghost"].read_error != "")
    assert props["ghost"].read_error == "Modbus exception 2 (illegal data address)"
    assert gw.engine.devices["plant.boiler-mb"].state == "online"
    reader = open_reader(gw.cfg.store.path)

    # The engine applies a report before its group commit lands: wait for the store.
    def stored() -> dict[str, Any]:
        return (read_twin(reader, "plant.boiler-mb") or {}).get("twin", {})  # type: ignore[no-any-return]

    await eventually(
        lambda: (
            "readError" in stored().get("ghost", {})
            and all("reported" in stored().get(p, {}) for p in ("supply_temp", "pressure", "setpoint"))
        )
    )
    twin = read_twin(reader, "plant.boiler-mb")
    assert twin is not None
    assert twin["twin"]["ghost"]["readError"].startswith("Modbus exception 2")
    assert 0 < twin["twin"]["supply_temp"]["reported"]["value"] < 100


async def test_edge_desired_setpoint_is_written_to_the_device(
    running: tuple[Gateway, BoilerSimulator],
) -> None:
    gw, sim = running
    prop = gw.engine.devices["plant.boiler-mb"].properties["setpoint"]
    await eventually(lambda: prop.reported is not None)
    # As `edgetwin twin set` does it: an edge desired value over MQTT.
    host, port = gw.cfg.mqtt.host_port
    body = payloads.twin_set_request("set-1", int(time.time() * 1000), {"setpoint": "72.5"})
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topics.twin_update("plant.boiler-mb"), body, qos=1)
    await eventually(lambda: prop.write_state is WriteState.APPLIED)
    assert sim.setpoint == 72.5  # landed in the device's holding register
    assert prop.reported is not None and prop.reported.value == 72.5
