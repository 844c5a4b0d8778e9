#!/usr/bin/env python3
"""BLE benchmark: notifications from emulated sensors into durable twins.

    .venv/bin/python -m scripts.bench.ble [--sensors 10] [--seconds 10]

`edgetwin sim ble` runs in its own process (Bumble peripherals on a virtual link,
notifying temperature and humidity every 2 ms each); this process is the central, over
HCI on TCP. Prints, in one run:
  * baseline: raw bleak-over-Bumble throughput: bleak clients (Bumble backend) subscribed
    to the same characteristics, a callback that only counts: notifications/s and CPU
    seconds per 1,000 notifications (this process);
  * edgetwin: a gateway in this process with the BLE mapper: notifications/s handled
    by the mapper, twin updates/s committed to the durable store (notifications faster
    than commits are coalesced to the latest value per property), CPU seconds per 1,000
    notifications, and the ratio of notifications/s to the baseline.
The gateway publishes to a private mosquitto on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bleak import BleakClient, BleakScanner

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.service import Gateway
from edgetwin.mappers.ble.bumble_backend import BumbleClient, BumbleScanner, close_adapters
from edgetwin.mappers.ble.mapper import BleMapper
from edgetwin.simulators.ble import sensor_manifests
from scripts.bench.ingest import start_mosquitto
from tests.harness.processes import free_port

NOTIFIED = ("2A6E", "2A6F")  # temperature, humidity


def start_sim(sensors: int, interval: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgetwin",
            "sim",
            "ble",
            "--port",
            str(port),
            "--count",
            str(sensors),
            "--notify-interval",
            str(interval),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info["hci"]


async def baseline(hci: str, sensors: int, seconds: float) -> tuple[float, float]:
    count = [0]

    def on_notify(_char: object, _data: bytearray) -> None:
        count[0] += 1

    clients = []
    for i in range(1, sensors + 1):
        device = await BleakScanner.find_device_by_name(f"env-sensor-{i}", backend=BumbleScanner, hci=hci)
        assert device is not None, f"env-sensor-{i} not found"
        client = BleakClient(device, backend=BumbleClient, hci=hci)
        await client.connect()
        for uuid in NOTIFIED:
            await client.start_notify(uuid, on_notify)
        clients.append(client)
    await asyncio.sleep(1)  # settle
    n0, c0, t0 = count[0], time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n, cpu, dt = count[0] - n0, time.process_time() - c0, time.monotonic() - t0
    for client in clients:
        await client.disconnect()
    await close_adapters()
    return n / dt, cpu / n * 1000


async def edgetwin(
    hci: str, sensors: int, seconds: float, tmp: Path, mqtt_port: int
) -> tuple[float, float, float]:
    (tmp / "m.yaml").write_text(
        yaml.safe_dump_all(sensor_manifests("bench", count=sensors, collect_cycle="10s"))
    )
    cfg = parse_config(
        {
            "node": "bench",
            "store": {"path": str(tmp / "s.db")},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
            "manifests": [str(tmp / "m.yaml")],
            "mappers": {"ble": {"hci": hci, "maxConnections": sensors}},
            "log": {"level": "WARNING"},
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 30)
    assert gw.mappers is not None
    mapper = gw.mappers.by_device[f"plant.env-sensor-{sensors}"]
    assert isinstance(mapper, BleMapper)
    devices = list(mapper.devices.values())
    deadline = time.monotonic() + 30
    while not all(d.online for d in devices):
        if time.monotonic() > deadline:
            raise SystemExit("sensors did not come online")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)

    def notifications() -> int:
        return sum(d.notifications for d in devices)

    def versions() -> int:
        return sum(
            p.reported.version
            for dev in gw.engine.devices.values()
            for name, p in dev.properties.items()
            if p.reported is not None and name in ("temperature", "humidity")
        )

    n0, v0, c0, t0 = notifications(), versions(), time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n, v, cpu, dt = notifications() - n0, versions() - v0, time.process_time() - c0, time.monotonic() - t0
    stop.set()
    await asyncio.wait_for(task, 30)
    return n / dt, v / dt, cpu / n * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.002, help="sim notify interval (s)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-ble-"))
    sim, hci = start_sim(args.sensors, args.interval)
    broker = start_mosquitto(tmp)
    mqtt_port = broker.port
    try:
        print(
            f"edgetwin BLE benchmark: {args.sensors} emulated sensors (edgetwin sim ble, another "
            f"process) notifying temperature and humidity every {args.interval * 1000:g} ms, "
            f"{args.seconds:g} s per figure; the gateway on shipped defaults but "
            f"mappers.ble.maxConnections {args.sensors} (all stay connected), durable store and "
            "MQTT on, no uplink; the baseline counts the same notifications through bleak on Bumble",
            flush=True,
        )
        raw_rate, raw_cpu = await baseline(hci, args.sensors, args.seconds)
        print(f"baseline bleak-over-Bumble: {raw_rate:,.0f} notifications/s, {raw_cpu:.3f} CPU s per 1,000")
        rate, commits, cpu = await edgetwin(hci, args.sensors, args.seconds, tmp, mqtt_port)
        print(
            f"edgetwin BLE mapper -> twins: {rate:,.0f} notifications/s, "
            f"{commits:,.0f} twin updates/s committed, "
            f"{cpu:.3f} CPU s per 1,000 notifications"
        )
        print(
            f"CPU per notification: {cpu / raw_cpu:.2f}x the baseline's (goal <= 1.3); "
            f"throughput {rate / raw_rate:.2f}x the baseline's"
        )
    finally:
        broker.stop()
        sim.terminate()
        sim.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
