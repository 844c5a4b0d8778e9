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

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.mapper_host import discover
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.store.reader import open_reader, read_twin
from edgetwin.gateway.twin.model import WriteState
from edgetwin.mappers.modbus.mapper import ModbusMapper
from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests
from tests.conftest import eventually
from tests.harness.processes import free_port

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


async def test_a_register_value_the_model_cannot_hold_is_a_read_error_not_an_event_per_poll(
    tmp_path: Path,
) -> None:
    """A uint64 register above 2^63 on an INT property, polled every 200 ms: twin get
    shows the read error (not "-"), and the event log hears of it once."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    from edgetwin.gateway.store.reader import read_events

    port = free_port()
    big = [0xFFFF, 0xFFFF, 0xFFFF, 0xFFF0]  # 2^64 - 16, big-endian words
    server = ModbusTcpServer(
        SimDevice(
            id=1,
            simdata=(
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(i, values=v, datatype=DataType.REGISTERS) for i, v in enumerate([*big, 42])],
                [SimData(0, count=8, values=0, datatype=DataType.REGISTERS)],
            ),
        ),
        address=("127.0.0.1", port),
    )
    await server.serve_forever(background=True)
    model = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "DeviceModel",
        "metadata": {"name": "meter", "namespace": "plant"},
        "spec": {"properties": [{"name": "energy", "type": "INT"}, {"name": "status", "type": "INT"}]},
    }
    device = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": "meter-1", "namespace": "plant"},
        "spec": {
            "deviceModelRef": {"name": "meter"},
            "nodeName": NODE,
            "protocol": {"protocolName": "modbus", "configData": {"host": "127.0.0.1", "port": port}},
            "properties": [
                {
                    "name": "energy",
                    "collectCycle": 200,
                    "visitors": {
                        "protocolName": "modbus",
                        "configData": {"table": "holding_register", "address": 0, "dataType": "uint64"},
                    },
                },
                {
                    "name": "status",
                    "collectCycle": 200,
                    "visitors": {
                        "protocolName": "modbus",
                        "configData": {"table": "holding_register", "address": 4},
                    },
                },
            ],
        },
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all([model, device]))
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
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        props = gw.engine.devices["plant.meter-1"].properties
        await eventually(lambda: props["status"].reported is not None and props["energy"].read_error != "")
        await asyncio.sleep(3)  # about 15 more polls
        assert props["status"].reported is not None and props["status"].reported.version >= 10
        reader = open_reader(cfg.store.path)
        twin = read_twin(reader, "plant.meter-1")
        assert twin is not None
        assert "outside the 64-bit range" in twin["twin"]["energy"]["readError"]
        assert "reported" not in twin["twin"]["energy"]
        events = read_events(reader, "plant.meter-1", limit=1000)
        assert [e["kind"] for e in events if e["property"] == "energy"] == ["rejected"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_cycles_a_slow_device_cannot_keep_are_counted_warned_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that takes 250 ms to answer, polled every 100 ms: the cycles that pass
    without a read are counted (metric), warned about (once, not per cycle) and noted in
    the event log."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    from edgetwin.gateway.store.reader import read_events

    async def slow(*_args: Any) -> None:
        await asyncio.sleep(0.25)

    port = free_port()
    server = ModbusTcpServer(
        SimDevice(
            id=1,
            simdata=(
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(0, count=8, values=False, datatype=DataType.BITS)],
                [SimData(0, count=8, values=7, datatype=DataType.REGISTERS)],
                [SimData(0, count=8, values=0, datatype=DataType.REGISTERS)],
            ),
            action=slow,
        ),
        address=("127.0.0.1", port),
    )
    await server.serve_forever(background=True)
    docs = [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "DeviceModel",
            "metadata": {"name": "slow", "namespace": "plant"},
            "spec": {"properties": [{"name": "value", "type": "INT"}]},
        },
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": "slow-1", "namespace": "plant"},
            "spec": {
                "deviceModelRef": {"name": "slow"},
                "nodeName": NODE,
                "protocol": {"protocolName": "modbus", "configData": {"host": "127.0.0.1", "port": port}},
                "properties": [
                    {
                        "name": "value",
                        "collectCycle": "100ms",
                        "visitors": {
                            "protocolName": "modbus",
                            "configData": {"table": "holding_register", "address": 0},
                        },
                    }
                ],
            },
        },
    ]
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
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        await asyncio.sleep(2.5)  # about 10 reads in 25 cycles
        skipped = gw.metrics.counters["cycles_skipped"]
        reads = gw.engine.devices["plant.slow-1"].properties["value"].last_version
        assert 10 <= skipped <= 20 and 6 <= reads <= 12, (skipped, reads)
        warnings = [r for r in caplog.records if "polling cycles skipped" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].__dict__["device"] == "plant.slow-1"
        await eventually(
            lambda: any(e["kind"] == "cycles_skipped" for e in read_events(open_reader(cfg.store.path)))
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await server.shutdown()  # type: ignore[no-untyped-call]
