"""Emulated BLE peripherals for the demo, tests and benchmarks (``edgetwin sim ble``).

One process holds a virtual radio (a Bumble ``LocalLink``), ``count`` environmental
sensors and ``beacons`` advertisement-only sensors, each with its own emulated
controller. Centrals attach over HCI on TCP: every client connection to ``port`` gets a
fresh emulated controller on the same link (so a gateway restart starts clean), and its
connections end when the client goes away. The gateway reaches it with
``ble: {hci: "tcp-client:127.0.0.1:PORT"}``.

Each sensor ``{prefix}-{i}`` (random static address ``F0:00:00:00:{i:04X}``) advertises its name
and the Environmental Sensing service and serves:

========================  ======================================  ====================
service                   characteristic                          access
========================  ======================================  ====================
Environmental Sensing     Temperature 0x2A6E (sint16, 0.01 degC)  read, notify
0x181A                    Humidity 0x2A6F (uint16, 0.01 %)        read, notify
                          Pressure 0x2A6D (uint32, 0.1 Pa)        read
Battery 0x180F            Battery Level 0x2A19 (uint8, %)         read, notify
Heart Rate 0x180D         Measurement 0x2A37 (uint8 bpm, RR)      notify
edgetwin sim              relay ...0001 (uint8 0/1)               read, write, notify
e7c10000-5e4d-4b7f-...    status ...0002 (struct <HhB: counter,   read
                          vibration 0.01 mm/s, flags)
                          flow ...0003 (uint16 + descriptor       read, notify
                          0x2904: exponent -1)
========================  ======================================  ====================

Beacons ``beacon-{i}`` (address ``F1:00:00:00:{i:04X}``) never connect; they
advertise their name, manufacturer data for company 0xFFFF (``<hHB``: temperature 0.01 degC,
humidity 0.01 %, battery %) and service data for 0x181A (sint16 temperature 0.01 degC).

Faults, as lines on stdin (also used by tests): ``drop NAME`` ends the device's
connections from its side; ``silence NAME SECONDS`` makes it go quiet (no answers, no
notifications, no advertisements) for that long; ``quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import sys
import time
from typing import Any

from bumble.controller import Controller
from bumble.transport.common import StreamPacketSink, StreamPacketSource

from edgetwin.simulators.ble_peripherals import (
    BEACON_COMPANY,
    FLOW_UUID,
    RELAY_UUID,
    STATUS_UUID,
    CancellingController,
    FaultLink,
    SimBeacon,
    SimSensor,
)

# The emulated controllers warn ("!!! no connection for handle") when a packet for a
# connection that one side just closed crosses the virtual link: a radio drops it
# silently, and so do they here.
logging.getLogger("bumble.controller").setLevel(logging.ERROR)


class CentralServer:
    """HCI over TCP: each client connection gets a fresh central controller on the link."""

    def __init__(self, sim: BleSimulator) -> None:
        self.sim = sim
        self.count = 0

    def protocol(self) -> asyncio.Protocol:
        sim = self.sim
        self.count += 1
        index = self.count

        class Central(StreamPacketSource):
            controller: Controller | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.WriteTransport)
                self.controller = CancellingController(
                    f"central-{index}",
                    host_source=self,
                    host_sink=StreamPacketSink(transport),
                    link=sim.link,
                )

            def connection_lost(self, exc: Exception | None) -> None:
                if self.controller is not None:
                    asyncio.get_running_loop().create_task(sim.detach(self.controller))
                super().on_transport_lost()

        return Central()


class BleSimulator:
    """The emulated radio, its peripherals, and the HCI-over-TCP port for centrals."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9000,
        count: int = 1,
        beacons: int = 0,
        prefix: str = "env-sensor",
        notify_interval: float = 1.0,
    ) -> None:
        self.host, self.port = host, port
        self.link = FaultLink()
        self.sensors = [SimSensor(self.link, i + 1, f"{prefix}-{i + 1}") for i in range(count)]
        self.beacons = [SimBeacon(self.link, i + 1, f"beacon-{i + 1}") for i in range(beacons)]
        self.notify_interval = notify_interval
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._silence: dict[str, asyncio.TimerHandle] = {}

    @property
    def hci(self) -> str:
        return f"tcp-client:{self.host}:{self.port}"

    def find(self, name: str) -> SimSensor | SimBeacon:
        devices: list[SimSensor | SimBeacon] = [*self.sensors, *self.beacons]
        for dev in devices:
            if dev.name == name:
                return dev
        raise KeyError(name)

    async def start(self) -> None:
        devices: list[SimSensor | SimBeacon] = [*self.sensors, *self.beacons]
        for dev in devices:
            await dev.start()
        central = CentralServer(self)
        self._server = await asyncio.get_running_loop().create_server(central.protocol, self.host, self.port)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()

    async def detach(self, controller: Controller) -> None:
        """A central went away: end its connections from the peripherals' side."""
        peers = {str(c.peer_address).split("/")[0] for c in controller.le_connections.values()}
        mine = {str(controller.random_address).split("/")[0], str(controller.public_address).split("/")[0]}
        for sensor in self.sensors:
            for connection in list(sensor.device.connections.values()):
                if str(connection.peer_address).split("/")[0] in mine or sensor.address in peers:
                    with contextlib.suppress(Exception):
                        await connection.disconnect()
        with contextlib.suppress(KeyError):
            self.link.remove_controller(controller)

    async def _run(self) -> None:
        start = time.monotonic()
        next_beacon = start
        me = asyncio.current_task()
        # Bumble can swallow a cancellation that lands inside a notify (seen as a demo
        # that never stopped under load): stop() is asked for, so stop.
        while me is None or not me.cancelling():
            t = time.monotonic() - start
            for sensor in self.sensors:
                sensor.step(t)
                if sensor.controller not in self.link.silent:
                    with contextlib.suppress(Exception):
                        await sensor.notify()
            if time.monotonic() >= next_beacon:
                next_beacon += 1.0
                for beacon in self.beacons:
                    if beacon.controller not in self.link.silent:
                        await beacon.step(t)
            await asyncio.sleep(self.notify_interval)

    async def drop(self, name: str) -> None:
        dev = self.find(name)
        if isinstance(dev, SimSensor):
            await dev.drop()

    def silence(self, name: str, seconds: float) -> None:
        dev = self.find(name)
        self.link.silent.add(dev.controller)
        if name in self._silence:
            self._silence[name].cancel()

        def wake() -> None:
            self.link.silent.discard(dev.controller)
            self._silence.pop(name, None)

        self._silence[name] = asyncio.get_running_loop().call_later(seconds, wake)

    async def command(self, line: str) -> str:
        """Run one control line; returns what to print."""
        parts = line.split()
        if not parts:
            return ""
        try:
            if parts[0] == "drop" and len(parts) == 2:
                await self.drop(parts[1])
            elif parts[0] == "silence" and len(parts) == 3:
                self.silence(parts[1], float(parts[2]))
            elif parts[0] == "state" and len(parts) == 2:
                dev = self.find(parts[1])
                s = dev.state
                return json.dumps(
                    {
                        "relay": s.relay,
                        "writes": [w.hex() for w in s.writes],
                        "temperature": s.temperature,
                        "connections": len(dev.device.connections),
                    }
                )
            else:
                usage = "drop NAME | silence NAME SECONDS | state NAME | quit"
                return f"error: unknown command {line.strip()!r} ({usage})"
        except KeyError:
            return f"error: no device {parts[1]!r}"
        except ValueError as exc:
            return f"error: {exc}"
        return "ok"


def _readable_stream(file: Any) -> bool:
    """Whether the event loop can watch ``file`` for lines: a pipe, a socket or a
    terminal. epoll refuses /dev/null and regular files (asyncio would log a traceback
    from its reader callback, not raise), and a closed stdin has no descriptor."""
    try:
        fd = file.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, ValueError, OSError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def serve(host: str, port: int, count: int, beacons: int, prefix: str, notify_interval: float) -> None:
    sim = BleSimulator(host, port, count, beacons, prefix, notify_interval)
    await sim.start()
    print(
        json.dumps(
            {
                "ready": True,
                "hci": sim.hci,
                "sensors": [{"name": s.name, "address": s.address} for s in sim.sensors],
                "beacons": [{"name": b.name, "address": b.address} for b in sim.beacons],
            }
        ),
        flush=True,
    )
    if not _readable_stream(sys.stdin):  # /dev/null, a file, closed: no control lines
        await asyncio.Event().wait()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # no usable stdin: run until stopped
        await asyncio.Event().wait()
    while True:
        line = (await reader.readline()).decode()
        if not line:
            await asyncio.Event().wait()  # stdin closed: keep serving
        if line.strip() == "quit":
            break
        answer = await sim.command(line)
        if answer:
            print(answer, flush=True)
    await sim.stop()


def sensor_manifests(
    node: str,
    count: int = 1,
    beacons: int = 0,
    namespace: str = "plant",
    prefix: str = "env-sensor",
    keep_connected: bool = True,
    collect_cycle: str = "2s",
) -> list[dict[str, Any]]:
    """DeviceModels and Devices for the emulated sensors and beacons (the demo and tests
    use them; they are also the worked example in docs/mappers/ble.md)."""

    def visitor(**config: Any) -> dict[str, Any]:
        return {"protocolName": "ble", "configData": config}

    def prop(name: str, cycle: str | None = None, **config: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "visitors": visitor(**config)}
        if cycle:
            out["collectCycle"] = cycle
        return out

    notify = keep_connected
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "DeviceModel",
            "metadata": {"name": "ble-env-sensor", "namespace": namespace},
            "spec": {
                "protocol": "ble",
                "properties": [
                    {"name": "temperature", "type": "FLOAT", "unit": "degC"},
                    {"name": "humidity", "type": "FLOAT", "unit": "%"},
                    {"name": "pressure", "type": "FLOAT", "unit": "Pa"},
                    {"name": "battery", "type": "INT", "unit": "%"},
                    {"name": "flow", "type": "FLOAT", "unit": "l/s"},
                    {"name": "vibration", "type": "FLOAT", "unit": "mm/s"},
                    {"name": "relay", "type": "BOOLEAN", "accessMode": "ReadWrite"},
                ],
            },
        }
    ]
    for i in range(1, count + 1):
        out.append(
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": f"{prefix}-{i}", "namespace": namespace},
                "spec": {
                    "deviceModelRef": {"name": "ble-env-sensor"},
                    "nodeName": node,
                    "protocol": {
                        "protocolName": "ble",
                        "configData": {
                            "name": f"{prefix}-{i}",
                            "serviceUuid": "181A",
                            "keepConnected": keep_connected,
                        },
                    },
                    "properties": [
                        prop("temperature", collect_cycle, characteristic="2A6E", notify=notify),
                        prop("humidity", collect_cycle, characteristic="2A6F", notify=notify),
                        prop("pressure", collect_cycle, characteristic="2A6D"),
                        prop("battery", collect_cycle, characteristic="2A19", report="change"),
                        prop("flow", collect_cycle, characteristic=FLOW_UUID, format="presentation"),
                        prop(
                            "vibration",
                            collect_cycle,
                            characteristic=STATUS_UUID,
                            struct="<HhB",
                            field=1,
                            scale=0.01,
                        ),
                        prop("relay", collect_cycle, characteristic=RELAY_UUID, dataType="bool"),
                    ],
                },
            }
        )
    if beacons:
        out.append(
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "DeviceModel",
                "metadata": {"name": "ble-beacon", "namespace": namespace},
                "spec": {
                    "protocol": "ble",
                    "properties": [
                        {"name": "temperature", "type": "FLOAT", "unit": "degC"},
                        {"name": "humidity", "type": "FLOAT", "unit": "%"},
                        {"name": "battery", "type": "INT", "unit": "%"},
                    ],
                },
            }
        )
    for i in range(1, beacons + 1):
        mfr = {"manufacturerId": BEACON_COMPANY}
        out.append(
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": f"beacon-{i}", "namespace": namespace},
                "spec": {
                    "deviceModelRef": {"name": "ble-beacon"},
                    "nodeName": node,
                    "protocol": {
                        "protocolName": "ble",
                        "configData": {"name": f"beacon-{i}", "source": "advertisement"},
                    },
                    "properties": [
                        prop("temperature", collect_cycle, dataType="int16", scale=0.01, **mfr),
                        prop("humidity", collect_cycle, dataType="uint16", byteOffset=2, scale=0.01, **mfr),
                        prop("battery", collect_cycle, dataType="uint8", byteOffset=4, **mfr),
                    ],
                },
            }
        )
    return out
