"""The BLE mapper through bleak's public API against emulated peripherals in another
process (`edgetwin sim ble`: Bumble controllers on a virtual link, the central's
controller reached over HCI on TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from bleak import BleakClient, BleakScanner

from edgetwin.gateway.manifests import parse_object
from edgetwin.gateway.mapper_host import binding
from edgetwin.mappers.ble.bumble_backend import BumbleClient, BumbleScanner, close_adapters
from edgetwin.mappers.ble.mapper import BleMapper
from edgetwin.mappers.ble.sig import decode_sig
from edgetwin.mappers.sdk import DeviceBinding
from edgetwin.simulators.ble import sensor_manifests
from edgetwin.simulators.ble_peripherals import FLOW_UUID, RELAY_UUID
from tests.conftest import EDGETWIN, RecordingHost, eventually
from tests.harness.processes import free_port

SENSORS = 20

pytestmark = pytest.mark.usefixtures("dump_tasks_when_stuck")


class SimProcess:
    """`edgetwin sim ble` in its own process, driven through its stdin commands."""

    def __init__(self, count: int, beacons: int, notify_interval: float = 0.2) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                EDGETWIN,
                "sim",
                "ble",
                "--port",
                str(self.port),
                "--count",
                str(count),
                "--beacons",
                str(beacons),
                "--notify-interval",
                str(notify_interval),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.info = json.loads(self._next(20))
        assert self.info["ready"]
        self.hci: str = self.info["hci"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()

    def _next(self, timeout: float = 5) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: self._lines, timeout):
                raise TimeoutError("the simulator did not answer")
            return self._lines.pop(0)

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._next()

    def state(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.command(f"state {name}"))
        return result

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    s = SimProcess(SENSORS, beacons=1)
    yield s
    s.close()


@pytest.fixture
async def adapters() -> AsyncIterator[None]:
    yield
    await close_adapters()


def bindings(docs: list[dict[str, Any]]) -> dict[str, DeviceBinding]:
    objs = [parse_object(d, "test") for d in docs]
    models = {o.metadata.name: o for o in objs if o is not None and o.kind == "DeviceModel"}
    out: dict[str, DeviceBinding] = {}
    for o in objs:
        if o is not None and o.kind == "Device":
            b = binding(o, models[o.spec.deviceModelRef.name])  # type: ignore[union-attr, arg-type]
            out[b.name] = b
    return out


def mapper(host: RecordingHost, sim: SimProcess, **options: Any) -> BleMapper:
    return BleMapper(host, {"hci": sim.hci, "reconnectMin": "100ms", "reconnectMax": "2s", **options})


# --- bleak's public API over the Bumble backend ----------------------------------------


async def test_read_notify_and_write_round_trips_through_bleak(sim: SimProcess, adapters: None) -> None:
    device = await BleakScanner.find_device_by_name(
        "env-sensor-5", timeout=10, backend=BumbleScanner, hci=sim.hci
    )
    assert device is not None and device.address == "F0:00:00:00:00:05"
    async with BleakClient(device, backend=BumbleClient, hci=sim.hci) as client:
        assert client.is_connected
        battery = await client.read_gatt_char("2A19")
        assert decode_sig("battery_level", battery) == 97
        pressure = await client.read_gatt_char("2A6D")
        assert decode_sig("pressure", pressure) == 101325.0
        # Notifications.
        got: list[bytearray] = []
        await client.start_notify("2A6E", lambda _c, data: got.append(data))
        await eventually(lambda: len(got) >= 3, within=5)
        await client.stop_notify("2A6E")
        assert all(15 < decode_sig("temperature", bytes(g)) < 30 for g in got)  # type: ignore[operator]
        # Write with and without response, read back.
        await client.write_gatt_char(RELAY_UUID, b"\x01", response=True)
        assert await client.read_gatt_char(RELAY_UUID) == bytearray(b"\x01")
        await client.write_gatt_char(RELAY_UUID, b"\x00", response=False)
        await eventually(lambda: sim.state("env-sensor-5")["relay"] is False, within=5)
        assert sim.state("env-sensor-5")["writes"] == ["01", "00"]
        # The presentation format descriptor is visible through bleak's service model.
        flow = client.services.get_characteristic(FLOW_UUID)
        assert flow is not None
        descriptor = flow.get_descriptor("00002904-0000-1000-8000-00805f9b34fb")
        assert descriptor is not None
        assert bytes(await client.read_gatt_descriptor(descriptor.handle))[:2] == b"\x06\xff"
    assert not client.is_connected


async def test_scanner_reports_advertisement_fields(sim: SimProcess, adapters: None) -> None:
    seen: dict[str, Any] = {}
    async with BleakScanner(
        lambda d, adv: seen.__setitem__(d.address, adv), backend=BumbleScanner, hci=sim.hci
    ):
        await eventually(lambda: "F1:00:00:00:00:01" in seen and "F0:00:00:00:00:01" in seen, within=5)
    beacon = seen["F1:00:00:00:00:01"]
    assert beacon.local_name == "beacon-1"
    assert set(beacon.manufacturer_data) == {0xFFFF} and len(beacon.manufacturer_data[0xFFFF]) == 5
    assert "0000181a-0000-1000-8000-00805f9b34fb" in beacon.service_data
    sensor = seen["F0:00:00:00:00:01"]
    assert sensor.local_name == "env-sensor-1"
    assert sensor.service_uuids == [
        "0000181a-0000-1000-8000-00805f9b34fb",
        "0000180f-0000-1000-8000-00805f9b34fb",
    ]
    # A service UUID filter passes only matching advertisers.
    filtered: set[str] = set()
    async with BleakScanner(
        lambda d, _a: filtered.add(d.address), ["180F"], backend=BumbleScanner, hci=sim.hci
    ):
        await asyncio.sleep(0.5)
    assert filtered and not any(a.startswith("F1:") for a in filtered)


# --- the mapper -------------------------------------------------------------------------


async def test_mapper_reports_every_property_and_writes_the_relay(sim: SimProcess) -> None:
    b = bindings(sensor_manifests("edge", count=1, collect_cycle="500ms"))["env-sensor-1"]
    BleMapper.validate(b)
    host = RecordingHost()
    m = mapper(host, sim)
    await m.start([b])
    try:
        values = host.values.setdefault(b.id, {})
        await eventually(lambda: len(values) == 7, within=15)
        assert host.states[b.id][-1] == "online"
        assert values["pressure"] == 101325.0
        assert values["battery"] == 97
        assert 1.0 <= values["vibration"] <= 2.0  # struct field 1, scale 0.01
        assert 9.0 <= values["flow"] <= 15.0  # decoded by the device's presentation format
        assert values["relay"] is False
        # Notified properties keep coming without reads.
        rt = m.devices[b.id]
        before = rt.notifications
        await eventually(lambda: rt.notifications >= before + 5, within=5)
        await m.write(b, "relay", True)
        assert sim.state("env-sensor-1")["relay"] is True
        assert values["relay"] is True  # read back and reported
        await m.write(b, "relay", "off")
        assert sim.state("env-sensor-1")["relay"] is False
    finally:
        await m.stop()


async def test_missing_characteristic_marks_only_that_property(sim: SimProcess) -> None:
    docs = sensor_manifests("edge", count=2, collect_cycle="500ms")
    docs[0]["spec"]["properties"].append({"name": "ghost", "type": "INT"})
    docs[2]["spec"]["properties"].append(
        {
            "name": "ghost",
            "visitors": {
                "protocolName": "ble",
                "configData": {"characteristic": "2A99", "dataType": "uint8"},
            },
        }
    )
    b = bindings(docs)["env-sensor-2"]
    host = RecordingHost()
    m = mapper(host, sim)
    await m.start([b])
    try:
        await eventually(lambda: "ghost" in host.errors.get(b.id, {}), within=15)
        assert (
            host.errors[b.id]["ghost"]
            == "characteristic 00002a99-0000-1000-8000-00805f9b34fb not found on the device"
        )
        await eventually(lambda: len(host.values.get(b.id, {})) == 7, within=10)
    finally:
        await m.stop()


async def test_beacon_advertisements_become_properties(sim: SimProcess) -> None:
    b = bindings(sensor_manifests("edge", count=0, beacons=1, collect_cycle="500ms"))["beacon-1"]
    host = RecordingHost()
    m = mapper(host, sim)
    await m.start([b])
    try:
        await eventually(lambda: len(host.values.get(b.id, {})) == 3, within=10)
        values = host.values[b.id]
        assert values["battery"] == 97
        assert 16 < values["temperature"] < 22 and 40 < values["humidity"] < 60
        assert host.states[b.id] == ["online"]
        # Values follow the advertisements (the beacon changes them every second).
        first = len(host.reports)
        await eventually(lambda: len(host.reports) >= first + 2, within=5)
    finally:
        await m.stop()


async def test_peripheral_drop_and_silence_mark_offline_then_resume(sim: SimProcess) -> None:
    docs = sensor_manifests("edge", count=3, collect_cycle="1s")
    b = bindings(docs)["env-sensor-3"]
    b.config["requestTimeout"] = "2s"  # type: ignore[index]
    b.config["scanTimeout"] = "1s"  # type: ignore[index]
    host = RecordingHost()
    m = mapper(host, sim)
    await m.start([b])
    rt = m.devices[b.id]
    try:
        await eventually(lambda: host.states.get(b.id) == ["online"] and rt.notifications > 3, within=15)
        # 1. The peripheral ends the connection.
        sim.command("drop env-sensor-3")
        await eventually(lambda: host.states[b.id][-2:] == ["offline", "online"], within=10)
        assert rt.connects == 2
        seen = rt.notifications
        await eventually(lambda: rt.notifications >= seen + 3, within=5)  # resubscribed
        # 2. The peripheral goes silent for 10 s (out of range: no answers, no adverts).
        reports_before = len(host.reports)
        sim.command("silence env-sensor-3 10")
        silenced = time.monotonic()
        await eventually(lambda: host.states[b.id][-1] == "offline", within=6)
        assert time.monotonic() - silenced < 5  # a read timed out within requestTimeout + a cycle
        attempts_start = rt.connects
        await eventually(lambda: host.states[b.id][-1] == "online", within=30)
        back = time.monotonic() - silenced
        assert 10 <= back < 20, back  # not before it is back, and soon after (backoff capped at 2 s)
        assert rt.connects == attempts_start + 1
        seen = rt.notifications
        await eventually(lambda: rt.notifications >= seen + 3, within=5)
        assert len(host.reports) > reports_before
    finally:
        await m.stop()


async def test_fifty_disconnect_cycles_leave_tasks_and_memory_flat(sim: SimProcess) -> None:
    b = bindings(sensor_manifests("edge", count=4, collect_cycle="1s"))["env-sensor-4"]
    host = RecordingHost()
    m = mapper(host, sim)
    await m.start([b])
    rt = m.devices[b.id]

    async def cycle() -> None:
        connects = rt.connects
        sim.command("drop env-sensor-4")
        await eventually(lambda: rt.connects == connects + 1 and host.states[b.id][-1] == "online", within=10)
        host.reports.clear()
        host.states[b.id] = host.states[b.id][-1:]

    try:
        await eventually(lambda: host.states.get(b.id) == ["online"], within=15)
        for _ in range(5):  # warm up caches and lazily created objects
            await cycle()
        await asyncio.sleep(0.5)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        tracemalloc.start()
        mem_before = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            await cycle()
        await asyncio.sleep(0.5)
        gc.collect()
        mem_after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        tasks_after = len(asyncio.all_tasks())
        assert rt.connects == 56
        # Short-lived event tasks come and go; a leak would add at least one per reconnect.
        assert tasks_after <= tasks_before, (tasks_before, tasks_after)
        assert mem_after - mem_before < 256 * 1024, f"grew {mem_after - mem_before} bytes over 50 reconnects"
    finally:
        await m.stop()


async def test_twenty_peripherals_on_five_slots_each_report_every_cycle(sim: SimProcess) -> None:
    cycle = 4.0
    docs = sensor_manifests("edge", count=SENSORS, keep_connected=False, collect_cycle="4s")
    devices = list(bindings(docs).values())
    assert len(devices) == SENSORS
    host = RecordingHost()
    m = mapper(host, sim, maxConnections=5)
    start = time.monotonic()
    await m.start(devices)
    try:
        await asyncio.sleep(3 * cycle + 0.5)
    finally:
        await m.stop()
    assert m.slots.peak <= 5
    assert m.slots.peak >= 2  # connections did overlap
    for d in devices:
        times = [t - start for t, dev, values in host.reports if dev == d.id and "pressure" in values]
        # A report in every cycle window: [0, 4 s), [4 s, 8 s), [8 s, 12 s).
        for k in range(3):
            assert any(k * cycle <= t < (k + 1) * cycle for t in times), (d.id, k, times)


PERIPHERAL = """
import asyncio, struct, sys
from bumble.device import Device
from bumble.gatt import Characteristic, Service
from bumble.hci import Address
from bumble.transport import open_transport
from edgetwin.mappers.ble.adverts import build_ad

async def main():
    t = await open_transport(sys.argv[1])
    dev = Device.with_hci("thermo", Address("F2:00:00:00:00:01"), t.source, t.sink)
    props = Characteristic.Properties.READ | Characteristic.Properties.NOTIFY
    temp = Characteristic("2A6E", props, Characteristic.READABLE, struct.pack("<h", 2150))
    dev.add_services([Service("181A", [temp])])
    await dev.power_on()
    ad = build_ad(name="thermo", service_uuids16=[0x181A])
    await dev.start_advertising(advertising_data=ad, auto_restart=True)
    i = 0
    while True:
        await asyncio.sleep(0.1)
        i += 1
        await dev.notify_subscribers(temp, struct.pack("<h", 2150 + i % 50))

asyncio.run(main())
"""


@pytest.fixture
def controllers_app(tmp_path: Any) -> Iterator[str]:
    """Bumble's controllers app (two HCI TCP ports on one virtual link) with a plain
    Bumble peripheral on one port; yields the HCI spec of the other, for the central."""
    import sys

    from tests.harness.processes import wait_port

    central, peripheral = free_port(), free_port()
    app = [sys.executable, "-m", "bumble.apps.controllers"]
    ports = [f"tcp-server:127.0.0.1:{central}", f"tcp-server:127.0.0.1:{peripheral}"]
    procs = [subprocess.Popen([*app, *ports], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_port(peripheral)
        wait_port(central)
        script = tmp_path / "peripheral.py"
        script.write_text(PERIPHERAL)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), f"tcp-client:127.0.0.1:{peripheral}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield f"tcp-client:127.0.0.1:{central}"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


async def test_works_with_bumbles_own_controllers_app(controllers_app: str) -> None:
    """A peripheral nobody here wrote the link for: Bumble's stock controllers app."""
    host = RecordingHost()
    m = BleMapper(host, {"hci": controllers_app})
    b = bindings(
        [
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "DeviceModel",
                "metadata": {"name": "thermo", "namespace": "plant"},
                "spec": {"properties": [{"name": "temperature", "type": "FLOAT"}]},
            },
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": "thermo", "namespace": "plant"},
                "spec": {
                    "deviceModelRef": {"name": "thermo"},
                    "nodeName": "edge",
                    "protocol": {
                        "protocolName": "ble",
                        "configData": {"name": "thermo", "serviceUuid": "181A"},
                    },
                    "properties": [
                        {
                            "name": "temperature",
                            "visitors": {
                                "protocolName": "ble",
                                "configData": {"characteristic": "2A6E", "notify": True},
                            },
                        }
                    ],
                },
            },
        ]
    )["thermo"]
    await m.start([b])
    try:
        await eventually(lambda: len(host.reports) >= 5, within=20)
        assert host.states[b.id] == ["online"]
        assert 21.5 <= host.values[b.id]["temperature"] < 22.0
    finally:
        await m.stop()


async def test_an_unreachable_peripheral_does_not_delay_the_others_reconnects(sim: SimProcess) -> None:
    """env-sensor-17 goes out of range for good while env-sensor-18 keeps dropping its
    connection: 18 is back within about a scan window each time, however long 17's
    own connect attempts would take (connectTimeout 10 s)."""
    docs = bindings(sensor_manifests("edge", count=18, collect_cycle="1s"))
    dead, live = docs["env-sensor-17"], docs["env-sensor-18"]
    for b in (dead, live):
        b.config["requestTimeout"] = "1s"  # type: ignore[index]
        b.config["scanTimeout"] = "2s"  # type: ignore[index]
    host = RecordingHost()
    m = mapper(host, sim, reconnectMin="50ms", reconnectMax="200ms")
    await m.start([dead, live])
    try:
        await eventually(
            lambda: host.states.get(dead.id) == ["online"] and host.states.get(live.id) == ["online"],
            within=15,
        )
        sim.command("silence env-sensor-17 120")
        await eventually(lambda: host.states[dead.id][-1] == "offline", within=10)
        took = []
        for _ in range(6):
            await asyncio.sleep(0.5)
            before = len(host.states[live.id])
            sim.command("drop env-sensor-18")
            dropped = time.monotonic()
            await eventually(
                lambda before=before: (
                    host.states[live.id][before:][-1:] == ["online"]
                    and len(host.states[live.id]) >= before + 2
                ),
                within=30,
            )
            took.append(time.monotonic() - dropped)
        assert max(took) < 3.0, took
    finally:
        sim.command("silence env-sensor-17 0.01")
        await m.stop()


async def test_a_read_cancelled_in_flight_does_not_answer_the_next_request(
    sim: SimProcess, adapters: None, caplog: pytest.LogCaptureFixture
) -> None:
    """ATT allows one request in flight: a request whose caller is cancelled (a session
    restarted, a poll timed out) still gets its response, which must not be taken as the
    answer to the next request (Bumble matches responses by order only)."""
    device = await BleakScanner.find_device_by_name(
        "env-sensor-6", timeout=10, backend=BumbleScanner, hci=sim.hci
    )
    assert device is not None
    async with BleakClient(device, backend=BumbleClient, hci=sim.hci) as client:
        for _ in range(20):
            cancelled = asyncio.create_task(client.read_gatt_char("2A19"))  # battery: 1 byte
            for _ in range(3):  # the request leaves, its response has not come back yet
                await asyncio.sleep(0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            pressure = await client.read_gatt_char("2A6D")  # pressure: 4 bytes
            assert decode_sig("pressure", pressure) == 101325.0
    stray = [
        r.getMessage() for r in caplog.records if r.name.startswith("bumble") and "!!!" in r.getMessage()
    ]
    assert stray == []


async def test_a_connection_attempt_cancelled_in_flight_leaves_the_peripheral_reachable(
    sim: SimProcess, adapters: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that gives up on a connection (a device's session restarted when its
    definition came from the cluster) must not leave a connection the controller made
    and the host forgot: the peripheral stops advertising to it and stays offline."""
    device = await BleakScanner.find_device_by_name(
        "env-sensor-7", timeout=10, backend=BumbleScanner, hci=sim.hci
    )
    assert device is not None
    for spins in (0, 1, 2, 3, 5, 8, 12, 20, 40, 80):
        client = BleakClient(device, backend=BumbleClient, hci=sim.hci, timeout=10)
        attempt = asyncio.create_task(client.connect())
        for _ in range(spins):  # cancel at a different point of the attempt each time
            await asyncio.sleep(0)
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attempt
        if client.is_connected:
            await client.disconnect()
        async with BleakClient(device, backend=BumbleClient, hci=sim.hci, timeout=10) as again:
            assert decode_sig("battery_level", await again.read_gatt_char("2A19")) == 97
    stray = [
        r.getMessage() for r in caplog.records if r.name.startswith("bumble") and "!!!" in r.getMessage()
    ]
    assert stray == []
