"""Devices managed from the cluster (#11), end to end as a user meets them: the real
kubectl against the Kubernetes API emulator, the relay (as its service account, with the
shipped RBAC), the link simulator, the gateway, mosquitto, and Modbus servers (pymodbus)
and BLE peripherals (Bumble) the gateway polls.

Each timing promise (5 s to serve, reconfigure or stop; 60 s to show a cut link) is
measured from the kubectl command (or the link event) to what the device or kubectl
shows."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests
from edgetwin.simulators.stack import Stack, StackOptions, until
from tests.harness.processes import Mosquitto, free_port

NODE = "edge-01"


def boiler(name: str, sim: BoilerSimulator) -> dict[str, Any]:
    """A cluster Device for a simulated boiler (the model comes with ``model()``)."""
    device = boiler_manifests(NODE, sim.host, sim.port)[1]
    device["metadata"]["name"] = name
    return device


def model() -> dict[str, Any]:
    return boiler_manifests(NODE, "127.0.0.1", 1)[0]


@pytest.fixture
async def sims() -> AsyncIterator[list[BoilerSimulator]]:
    started = [BoilerSimulator("127.0.0.1", free_port()) for _ in range(3)]
    for sim in started:
        await sim.start()
    yield started
    for sim in started:
        await sim.stop()


@pytest.fixture
async def stack_factory(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Any]:
    stacks: list[Stack] = []

    async def make(**options: Any) -> Stack:
        stack = Stack(
            tmp_path / f"stack{len(stacks)}",
            StackOptions(node=NODE, mqtt_url=f"mqtt://127.0.0.1:{mosquitto.port}", **options),
        )
        stacks.append(stack)
        await stack.start()
        await stack.connected()
        return stack

    yield make
    for stack in stacks:
        await stack.stop()


async def reported(stack: Stack, device: str, prop: str) -> str | None:
    """A reported value as kubectl shows it."""
    path = f'jsonpath={{.status.twins[?(@.propertyName=="{prop}")].reported.value}}'
    result = await stack.kubectl("get", "device", device, "-n", "plant", "-o", path)
    return result.stdout.strip() or None if result.returncode == 0 else None


async def requests_per_s(sim: BoilerSimulator, seconds: float) -> float:
    before = sim.requests
    await asyncio.sleep(seconds)
    return (sim.requests - before) / seconds


async def last_request_after(sim: BoilerSimulator, since: float, quiet_s: float, within: float) -> float:
    """Seconds from ``since`` (monotonic) to the simulator's last request, once it has
    had none for ``quiet_s``; fails if requests go on past ``within``."""
    last_count, last_change = sim.requests, since
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        if sim.requests != last_count:
            last_count, last_change = sim.requests, now
        elif now - last_change >= quiet_s:
            return last_change - since
        assert now - since < within + quiet_s, f"still polled {now - since:.1f} s later"


EDITOR = """\
import sys, yaml
path = sys.argv[1]
doc = yaml.safe_load(open(path))
for prop in doc["spec"]["properties"]:
    if prop["name"] == "supply_temp":
        prop["visitors"]["configData"] = {
            "table": "holding_register", "address": 0, "dataType": "int16", "scale": 0.1
        }
open(path, "w").write(yaml.safe_dump(doc))
"""


async def test_kubectl_apply_edit_and_delete_serve_reconfigure_and_stop_a_modbus_device(
    stack_factory: Any, sims: list[BoilerSimulator], tmp_path: Path
) -> None:
    stack = await stack_factory()
    sim_a, sim_b, _ = sims
    gw = stack.gateway
    # apply: values in kubectl within 5 s
    started = time.monotonic()
    await stack.apply([model(), boiler("boiler-a", sim_a), boiler("boiler-b", sim_b)])
    took = await until(
        lambda: all_reported(stack, ["boiler-a", "boiler-b"], "supply_temp"),
        within=5,
        every=0.1,
        what="values",
    )
    print(f"apply -> values in kubectl: {time.monotonic() - started:.2f} s (poll {took:.2f} s)")
    # edit: supply_temp now read from the setpoint register (65.0 on the simulator)
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR)
    started = time.monotonic()
    result = await stack.kubectl(
        "edit", "device", "boiler-a", "-n", "plant", env={"KUBE_EDITOR": f"{sys.executable} {editor}"}
    )
    assert result.returncode == 0, result.stderr
    await until(lambda: value_is(stack, "boiler-a", "supply_temp", "65"), within=5, every=0.1, what="edit")
    print(f"kubectl edit -> new register read: {time.monotonic() - started:.2f} s")
    assert gw.engine.devices["plant.boiler-b"].properties["supply_temp"].reported is not None
    # delete: no more requests to that device within 5 s; the other keeps its cadence
    cadence = await requests_per_s(sim_b, 3)
    started = time.monotonic()
    result = await stack.kubectl("delete", "device", "boiler-a", "-n", "plant")
    assert result.returncode == 0, result.stderr
    stopped_after = await last_request_after(sim_a, started, quiet_s=3, within=5)
    print(f"kubectl delete -> last request to the device after {stopped_after:.2f} s")
    assert stopped_after <= 5
    after = await requests_per_s(sim_b, 3)
    assert after >= 0.8 * cadence, (cadence, after)
    await until(lambda: "plant.boiler-a" not in gw.engine.devices, within=5)
    assert "plant.boiler-a" not in gw.engine.outbox
    count = "SELECT COUNT(*) FROM twin_property WHERE device_id = 'plant.boiler-a'"
    await until(lambda: gw.store.conn.execute(count).fetchone()[0] == 0, within=5, what="rows deleted")
    events = gw.store.conn.execute(
        "SELECT kind, detail FROM events WHERE device_id = 'plant.boiler-a' AND kind = 'removed'"
    ).fetchall()
    assert events and "deleted in the cluster" in events[-1][1]


async def all_reported(stack: Stack, devices: list[str], prop: str) -> bool:
    return all([await reported(stack, d, prop) for d in devices])


async def value_is(stack: Stack, device: str, prop: str, want: str) -> bool:
    value = await reported(stack, device, prop)
    return value is not None and float(value) == float(want)


async def test_a_device_created_while_the_gateway_was_offline_is_served_when_the_link_returns(
    stack_factory: Any, sims: list[BoilerSimulator]
) -> None:
    stack = await stack_factory()
    sim_a, sim_b, sim_c = sims
    await stack.apply([model(), boiler("boiler-a", sim_a), boiler("boiler-b", sim_b)])
    await until(lambda: all_reported(stack, ["boiler-a", "boiler-b"], "supply_temp"), within=10)
    stack.link.cut()
    await stack.apply([boiler("boiler-c", sim_c)])
    await asyncio.sleep(1)
    assert sim_c.requests == 0
    started = time.monotonic()
    stack.link.restore()
    await until(lambda: sim_c.requests > 0, within=5, every=0.05, what="boiler-c polled")
    polled = time.monotonic() - started
    await until(lambda: all_reported(stack, ["boiler-c"], "supply_temp"), within=5, every=0.1)
    print(f"link back -> new device polled {polled:.2f} s, in kubectl {time.monotonic() - started:.2f} s")
    # A gateway restarted with the link cut serves every cluster-defined device it had.
    await stack.stop_gateway()
    stack.link.cut()
    counts = [s.requests for s in sims]
    await stack.start_gateway()
    await until(lambda: all(s.requests > c for s, c in zip(sims, counts, strict=True)), within=5)
    gw = stack.gateway
    assert {"plant.boiler-a", "plant.boiler-b", "plant.boiler-c"} <= set(gw.engine.devices)
    assert not gw.uplink.connected.is_set()
    stack.link.restore()


async def test_a_device_the_gateway_cannot_serve_shows_ready_false_naming_the_field(
    stack_factory: Any, sims: list[BoilerSimulator]
) -> None:
    stack = await stack_factory()
    sim_a, sim_b, _ = sims
    bad = boiler("boiler-bad", sim_b)
    bad["spec"]["properties"][0]["visitors"]["configData"]["table"] = "holding_registers"  # a typo
    await stack.apply([model(), boiler("boiler-a", sim_a), bad])

    async def ready(name: str) -> str:
        path = '{.status.conditions[?(@.type=="Ready")].status}'
        result = await stack.kubectl("get", "device", name, "-n", "plant", "-o", f"jsonpath={path}")
        return result.stdout.strip()

    await until(lambda: ready_is(ready, "boiler-bad", "False"), within=10, what="Ready=False")
    await until(lambda: ready_is(ready, "boiler-a", "True"), within=10, what="Ready=True")
    table = await stack.kubectl("get", "devices", "-n", "plant", "-o", "wide")
    row = next(line for line in table.stdout.splitlines() if line.startswith("boiler-bad"))
    assert "False" in row.split()
    described = await stack.kubectl("describe", "device", "boiler-bad", "-n", "plant")
    assert "spec.properties[0].visitors.configData.table" in described.stdout, described.stdout
    assert "holding_registers" in described.stdout
    # The rest is served: the good device is polled and reported, the bad one not at all.
    assert await reported(stack, "boiler-a", "supply_temp") is not None or await until(
        lambda: all_reported(stack, ["boiler-a"], "supply_temp"), within=5
    )
    before = sim_b.requests
    await asyncio.sleep(2)
    assert sim_b.requests == before
    # Fixed with kubectl: served within 5 s.
    fix = json.dumps(
        [{"op": "replace", "path": "/spec/properties/0/visitors/configData/table", "value": "input_register"}]
    )
    started = time.monotonic()
    result = await stack.kubectl("patch", "device", "boiler-bad", "-n", "plant", "--type", "json", "-p", fix)
    assert result.returncode == 0, result.stderr
    await until(lambda: sim_b.requests > before, within=5, what="the fixed device polled")
    await until(lambda: ready_is(ready, "boiler-bad", "True"), within=5, what="Ready=True after the fix")
    print(f"fixed -> polled and Ready in {time.monotonic() - started:.2f} s")


async def ready_is(ready: Any, name: str, want: str) -> bool:
    return bool(await ready(name) == want)


async def test_after_a_store_wipe_values_flow_again_and_the_clouds_desired_values_come_back(
    stack_factory: Any, sims: list[BoilerSimulator]
) -> None:
    stack = await stack_factory()
    sim_a = sims[0]
    device = boiler("boiler-a", sim_a)
    await stack.apply([model(), device])
    await until(lambda: all_reported(stack, ["boiler-a"], "supply_temp"), within=10)
    names = [p["name"] for p in device["spec"]["properties"]]
    index = names.index("setpoint")
    patch = json.dumps([{"op": "add", "path": f"/spec/properties/{index}/desired", "value": {"value": "70"}}])
    result = await stack.kubectl("patch", "device", "boiler-a", "-n", "plant", "--type", "json", "-p", patch)
    assert result.returncode == 0, result.stderr
    await until(lambda: sim_a.setpoint == 70.0, within=10, what="the desired setpoint written")
    await until(lambda: value_is(stack, "boiler-a", "setpoint", "70"), within=10)
    # New hardware: the store is gone; meanwhile someone turned the knob on the device.
    await stack.stop_gateway()
    for suffix in ("", "-wal", "-shm"):
        await asyncio.to_thread(Path(f"{stack.dir / 'store.db'}{suffix}").unlink, missing_ok=True)
    await turn_the_knob(sim_a, 50.0)
    started = time.monotonic()
    await stack.start_gateway()
    await until(
        lambda: sim_a.setpoint == 70.0, within=10, what="the cloud's desired value back at the device"
    )
    print(f"store wiped -> desired value back at the device in {time.monotonic() - started:.2f} s")
    # New reported values reach kubectl (the relay does not ignore the restarted versions).
    await turn_the_knob(sim_a, 71.5)  # changed on the device itself: the edge reports it
    started = time.monotonic()
    await until(
        lambda: value_is(stack, "boiler-a", "setpoint", "71.5"), within=5, every=0.1, what="new value"
    )
    print(f"new value after the wipe in kubectl: {time.monotonic() - started:.2f} s")


async def turn_the_knob(sim: BoilerSimulator, setpoint: float) -> None:
    """Another Modbus master (a panel on site) writes the setpoint register."""
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient(sim.host, port=sim.port)
    await client.connect()
    try:
        result = await client.write_register(0, round(setpoint * 10), device_id=sim.unit)
        assert not result.isError()
    finally:
        client.close()
    assert sim.setpoint == setpoint


async def test_kubectl_get_gateways_shows_a_cut_link_and_the_backlog_draining(
    stack_factory: Any, sims: list[BoilerSimulator]
) -> None:
    from edgetwin.cloud.gateway_status import GatewayTiming

    stack = await stack_factory(relay={"gateway": GatewayTiming(interval_s=5.0)})
    sim_a, sim_b, _ = sims
    await stack.apply([model(), boiler("boiler-a", sim_a), boiler("boiler-b", sim_b)])
    await until(lambda: all_reported(stack, ["boiler-a", "boiler-b"], "supply_temp"), within=10)

    async def columns() -> dict[str, str]:
        table = await stack.kubectl("get", "gateways")
        header, *rows = table.stdout.splitlines() or [""]
        starts = [header.index(h) for h in header.split()]
        if not rows:
            return {}
        row = rows[0]
        bounds = [*starts, len(row) + 1]
        return {h: row[bounds[i] : bounds[i + 1]].strip() for i, h in enumerate(header.split())}

    await until(lambda: cell_is(columns, "CONNECTED", "True"), within=10)
    await until(lambda: cell_is(columns, "DEVICES", "2"), within=10)
    cols = await columns()
    assert cols["NAME"] == NODE and cols["VERSION"]
    started = time.monotonic()
    stack.link.blackhole()  # silently: nothing gets through any more, nothing says so
    await until(lambda: cell_is(columns, "CONNECTED", "False"), within=60, every=1, what="disconnected")
    print(f"link cut -> kubectl shows disconnected after {time.monotonic() - started:.1f} s")
    status = await stack.gateway_status()
    condition = status["conditions"][0]
    assert condition["reason"] == "LinkDead" and "the link is dead" in condition["message"]
    assert stack.gateway.engine.backlog()[0] > 0  # values kept coming at the edge
    stack.link.restore()
    await until(lambda: cell_is(columns, "CONNECTED", "True"), within=15, what="reconnected")
    backlog_seen = (await stack.gateway_status()).get("backlog", 0)
    await until(lambda: cell_is(columns, "BACKLOG", "0"), within=30, every=0.5, what="drained")
    print(f"after restore: backlog {backlog_seen} on reconnect, drained to 0")
    assert backlog_seen > 0


async def test_a_device_changing_faster_than_answers_come_back_keeps_a_young_oldest(
    stack_factory: Any, sims: list[BoilerSimulator]
) -> None:
    # Its status changes every 100 ms and an answer takes 0.6 s to come back, so the
    # device never leaves the outbox; OLDEST must stay about a round trip, not grow from
    # the first change (it did: 20 s after 20 s).
    stack = await stack_factory()
    fast = boiler("boiler-a", sims[0])
    for prop in fast["spec"]["properties"]:
        prop["collectCycle"] = "100ms"
        prop.pop("reportCycle", None)
    await stack.apply([model(), fast])
    await until(lambda: all_reported(stack, ["boiler-a"], "supply_temp"), within=10)
    stack.link.latency_s = 0.3
    engine = stack.gateway.engine
    ages, pending = [], 0
    started = time.monotonic()
    while time.monotonic() - started < 8:
        count, since = engine.backlog()
        pending += count > 0
        ages.append(0 if since is None else int(time.time() * 1000) - since)
        await asyncio.sleep(0.1)
    print(f"fast device: in the backlog in {pending} of {len(ages)} samples, oldest at most {max(ages)} ms")
    assert pending > len(ages) // 2, "the device was not changing faster than answers came back"
    assert max(ages) < 3_000


async def cell_is(columns: Any, name: str, want: str) -> bool:
    return bool((await columns()).get(name) == want)


async def test_deleting_a_ble_device_releases_its_connection(stack_factory: Any) -> None:
    from edgetwin.simulators.ble import sensor_manifests
    from tests.mappers.ble.test_ble_mapper import SimProcess

    sim = SimProcess(2, beacons=0)
    try:
        stack = await stack_factory(gateway={"mappers": {"ble": {"hci": sim.hci, "maxConnections": 3}}})
        docs = sensor_manifests(NODE, count=2, beacons=0)
        await stack.apply(docs)
        gw = stack.gateway
        await until(
            lambda: all(
                gw.engine.devices.get(f"plant.env-sensor-{i}") is not None
                and gw.engine.devices[f"plant.env-sensor-{i}"].state == "online"
                for i in (1, 2)
            ),
            within=30,
            what="both sensors online",
        )
        assert sim.state("env-sensor-1")["connections"] == 1
        started = time.monotonic()
        result = await stack.kubectl("delete", "device", "env-sensor-1", "-n", "plant")
        assert result.returncode == 0, result.stderr
        await until(
            lambda: sim.state("env-sensor-1")["connections"] == 0, within=5, every=0.1, what="released"
        )
        print(f"kubectl delete -> BLE connection released in {time.monotonic() - started:.2f} s")
        assert sim.state("env-sensor-2")["connections"] == 1
        assert gw.engine.devices["plant.env-sensor-2"].state == "online"
    finally:
        sim.close()
