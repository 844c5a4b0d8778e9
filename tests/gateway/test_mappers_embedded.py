"""Mapper plugins through the SDK, on the embedded (amqtt) broker, in one process."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt
import pytest

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.mapper_host import GROUP, Plugins, discover
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.twin.model import WriteState
from edgetwin.mappers.sdk import DeviceBinding, MapperError, PollingMapper, Value
from edgetwin.mappers.virtual import VirtualMapper
from tests.conftest import THERMO_PROPS, device_doc, eventually, model_doc, write_manifests
from tests.harness.processes import free_port

NODE = "edge-m"


def test_virtual_mapper_is_found_through_entry_points() -> None:
    assert discover()["virtual"] is VirtualMapper


def test_plugins_load_when_asked_for_and_a_broken_one_counts_as_not_installed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugins = Plugins()
    plugins._points = {
        "virtual": EntryPoint("virtual", "edgetwin.mappers.virtual:VirtualMapper", GROUP),
        "broken": EntryPoint("broken", "edgetwin_no_such_module:Mapper", GROUP),
        "notamapper": EntryPoint("notamapper", "builtins:dict", GROUP),
    }
    assert sorted(plugins) == ["broken", "notamapper", "virtual"]  # names, nothing loaded
    assert plugins._loaded == {}
    assert plugins.get("virtual") is VirtualMapper
    assert list(plugins._loaded) == ["virtual"]
    with caplog.at_level(logging.ERROR, "edgetwin.gateway.mapper_host"):
        assert "broken" not in plugins
        assert "broken" not in plugins  # tried once, logged once
        assert plugins.get("notamapper") is None
    assert [r.getMessage() for r in caplog.records] == [
        "cannot load mapper plugin",
        "entry point is not a Mapper subclass",
    ]
    assert "nope" not in plugins


class BusyMapper(PollingMapper):
    """A device that reads fine but refuses every write."""

    protocol: ClassVar[str] = "busy"

    async def read(self, device: DeviceBinding) -> dict[str, Any]:
        return {"count": 1}

    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        raise MapperError("device busy (Modbus exception 6)")


class BuggyMapper(PollingMapper):
    """A plugin with bugs: read() raises on its first call, write() always raises."""

    protocol: ClassVar[str] = "buggy"
    reads = 0

    async def read(self, device: DeviceBinding) -> dict[str, Any]:
        type(self).reads += 1
        if type(self).reads == 1:
            raise ValueError("unexpected register layout")
        return {"count": type(self).reads}

    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        raise KeyError(prop)


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    # The busy mapper stands in for an installed plugin; discovery itself is tested above.
    monkeypatch.setattr(
        "edgetwin.gateway.mapper_host.discover",
        lambda: {"virtual": VirtualMapper, "busy": BusyMapper, "buggy": BuggyMapper},
    )
    manifests = write_manifests(
        tmp_path / "m.yaml",
        [
            model_doc("thermostat", "plant", THERMO_PROPS),
            device_doc(
                "sim-1",
                "plant",
                "thermostat",
                NODE,
                protocol={"protocolName": "virtual"},
                properties=[
                    {
                        "name": "count",
                        "collectCycle": "100ms",
                        "visitors": {"configData": {"signal": "counter"}},
                    },
                    {"name": "setpoint", "desired": {"value": "18.5"}},
                ],
            ),
            device_doc("sim-off", "plant", "thermostat", NODE, protocol={"protocolName": "virtual"}),
            device_doc(
                "busy-1",
                "plant",
                "thermostat",
                NODE,
                protocol={"protocolName": "busy"},
                properties=[{"name": "enabled", "desired": {"value": True}}],
            ),
            device_doc("ext-1", "plant", "thermostat", NODE),
            device_doc(
                "buggy-1",
                "plant",
                "thermostat",
                NODE,
                protocol={"protocolName": "buggy"},
                properties=[
                    {"name": "count", "collectCycle": "50ms"},
                    {"name": "setpoint", "desired": {"value": 20}},
                ],
            ),
        ],
    )
    port = free_port()
    cfg = parse_config(
        {
            "node": NODE,
            # The threaded commit path; the MQTT tests run the default (auto: inline here).
            "store": {"path": str(tmp_path / "s.db"), "commit_mode": "thread"},
            "mqtt": {"embedded": {"host": "127.0.0.1", "port": port}},
            "manifests": [str(manifests)],
            "mappers": {"virtual": {"offline": {"plant.sim-off": True}}},
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 15)
    await asyncio.wait_for(gw.bus.connected.wait(), 15)  # type: ignore[union-attr]
    yield gw
    stop.set()
    await asyncio.wait_for(task, 15)


async def test_mapper_reports_and_desired_write_round_trip(gateway: Gateway) -> None:
    props = gateway.engine.devices["plant.sim-1"].properties
    await eventually(lambda: props["count"].reported is not None and props["count"].reported.version >= 5)
    values = [props["count"].reported.value]  # type: ignore[union-attr]
    await eventually(lambda: props["count"].reported.value > values[0])  # type: ignore[union-attr]
    # Desired from the manifest went to the mapper, which wrote and reported it back.
    await eventually(lambda: props["setpoint"].write_state is WriteState.APPLIED)
    assert props["setpoint"].reported is not None and props["setpoint"].reported.value == 18.5
    assert gateway.engine.devices["plant.sim-1"].state == "online"
    await eventually(lambda: gateway.engine.devices["plant.sim-off"].state == "offline")


async def test_failed_writes_keep_the_reason_and_retry(gateway: Gateway) -> None:
    prop = gateway.engine.devices["plant.busy-1"].properties["enabled"]
    await eventually(lambda: prop.write_attempts >= 2, within=10)
    assert prop.write_state is WriteState.PENDING
    assert prop.write_reason == "device busy (Modbus exception 6)"
    assert gateway.metrics.counters["mapper_write_errors"] >= 2


async def test_plugin_bugs_do_not_stop_polling_and_are_kept_as_reasons(gateway: Gateway) -> None:
    props = gateway.engine.devices["plant.buggy-1"].properties
    await eventually(lambda: props["count"].reported is not None and props["count"].reported.version >= 3)
    await eventually(lambda: props["setpoint"].write_reason != "")
    assert props["setpoint"].write_reason == "'setpoint'"  # the KeyError, as the plugin raised it
    assert props["setpoint"].write_state is WriteState.PENDING


async def test_hw_topics_work_on_the_embedded_broker(gateway: Gateway) -> None:
    host, port = gateway.cfg.mqtt.host_port
    topic = "$hw/events/device/plant.ext-1/twin/update"
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(f"{topic}/result", qos=1)
        body = {"event_id": "emb-1", "twin": {"label": {"actual": {"value": "ok"}}}}
        await client.publish(topic, json.dumps(body), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                doc = json.loads(message.payload)  # type: ignore[arg-type]
                if doc.get("event_id") == "emb-1":
                    break
    assert doc["twin"]["label"]["actual"]["value"] == "ok"
    assert gateway.engine.devices["plant.ext-1"].properties["label"].reported is not None


async def test_the_cadence_skips_and_counts_only_slots_that_passed_without_a_start() -> None:
    from edgetwin.mappers.sdk import Cadence
    from tests.conftest import RecordingHost

    now = [0.0]
    starts: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    host = RecordingHost()
    cadence = Cadence(host, "d", 100, clock=lambda: now[0], sleep=sleep)
    for work_s in (0.0, 0.13, 0.0, 0.26, 0.0, 0.0, 0.95):
        starts.append(round(now[0], 3))
        now[0] += work_s
        await cadence.wait()
    # 130 ms of work: the next cycle starts late inside its slot (done, not skipped);
    # 260 ms: one whole slot passed without a start; 950 ms from 0.7 s: the slots from
    # 0.8 to 1.6 s (eight) passed, the one from 1.6 s is still open at 1.65 s.
    assert starts == [0.0, 0.1, 0.23, 0.3, 0.56, 0.6, 0.7]
    assert host.skipped == {"d": 9} and cadence.skipped == 9
