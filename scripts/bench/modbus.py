#!/usr/bin/env python3
"""Modbus benchmark, end to end: 50 devices x 40 holding registers on a pymodbus TCP
server in its own process, every register changing on every read.

    .venv/bin/python -m scripts.bench.modbus [--seconds 10] [--values per_property]

Prints, in one run (CPU is this process's, so the server and mosquitto are not in it):
  * raw pymodbus: sequential reads of 40 registers per device, no decoding, no twin:
    requests/s, values/s and CPU-us per value (the baseline);
  * a one-request-per-tag poller (what ThingsBoard IoT Gateway's Modbus connector does):
    values/s and CPU-us per value;
  * edgetwin saturating (collectCycle 1 ms): values/s through the mapper into the
    durable store and onto MQTT, and the ratio to the raw baseline (goal >= 0.25);
  * edgetwin on the plant workload, every register every 100 ms (20,000 points/s):
    points/s delivered, the share of polling cycles done, CPU-us per point (goal <= 25 on
    one core), and what mosquitto received from the gateway (messages/s).
``--values`` picks how values are published on MQTT (``mqtt.values``: per_property,
per_device, both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pymodbus.client import AsyncModbusTcpClient

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.service import Gateway
from scripts.bench.ingest import start_mosquitto
from tests.harness.processes import free_port, wait_port

DEVICES, REGISTERS = 50, 40

SERVER = """
import asyncio, sys
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

DEVICES, REGISTERS = int(sys.argv[2]), int(sys.argv[3])
tick = [0]

async def action(function_code, start_address, address, count, registers, set_values):
    if set_values is None:  # every read sees new values
        tick[0] += 1
        base = tick[0] & 0x3FFF
        for i in range(len(registers)):
            registers[i] = base + i
    return None

async def main():
    devices = [
        SimDevice(
            id=unit,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, values=[0] * REGISTERS, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )
        for unit in range(1, DEVICES + 1)
    ]
    server = ModbusTcpServer(devices, address=("127.0.0.1", int(sys.argv[1])))
    await server.serve_forever()

asyncio.run(main())
"""


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(DEVICES), str(REGISTERS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


async def raw_baseline(port: int, seconds: float, per_tag: bool = False) -> tuple[float, float, float]:
    """requests/s, values/s, CPU-us per value of a plain pymodbus poller."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    requests = values = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for unit in range(1, DEVICES + 1):
            if per_tag:
                for i in range(REGISTERS):
                    result = await client.read_holding_registers(i, count=1, device_id=unit)
                    values += len(result.registers)
                    requests += 1
            else:
                result = await client.read_holding_registers(0, count=REGISTERS, device_id=unit)
                values += len(result.registers)
                requests += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    client.close()
    return requests / elapsed, values / elapsed, cpu / values * 1e6


def manifests(port: int, cycle_ms: int) -> list[dict[str, Any]]:
    model = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "DeviceModel",
        "metadata": {"name": "regs", "namespace": "bench"},
        "spec": {"properties": [{"name": f"r{i}", "type": "INT"} for i in range(REGISTERS)]},
    }
    devices = [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": f"d{unit}", "namespace": "bench"},
            "spec": {
                "deviceModelRef": {"name": "regs"},
                "nodeName": "bench",
                "protocol": {
                    "protocolName": "modbus",
                    "configData": {"host": "127.0.0.1", "port": port, "unitId": unit},
                },
                "properties": [
                    {
                        "name": f"r{i}",
                        "collectCycle": cycle_ms,
                        "visitors": {
                            "protocolName": "modbus",
                            "configData": {"table": "holding_register", "address": i},
                        },
                    }
                    for i in range(REGISTERS)
                ],
            },
        }
        for unit in range(1, DEVICES + 1)
    ]
    return [model, *devices]


class TopicCounter:
    """Counts what the gateway publishes on its value topics, as a subscriber sees it
    (mosquitto_sub in another process; mosquitto's $SYS counters leave out retained
    publishes)."""

    def __init__(self, mqtt_port: int) -> None:
        self.count = 0
        self.proc = subprocess.Popen(
            [
                shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub",
                "-p",
                str(mqtt_port),
                "-t",
                "edgetwin/bench/#",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            self.count += 1

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


async def through_gateway(
    port: int, seconds: float, tmp: Path, mqtt_port: int, cycle_ms: int, values_mode: str
) -> dict[str, float]:
    run = tmp / f"run{cycle_ms}"
    run.mkdir()
    (run / "m.yaml").write_text(yaml.safe_dump_all(manifests(port, cycle_ms)))
    cfg = parse_config(
        {
            "node": "bench",
            "store": {"path": str(run / "store.db")},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}", "values": values_mode},
            "manifests": [str(run / "m.yaml")],
            "log": {"level": "ERROR"},
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 30)
    counter = TopicCounter(mqtt_port)
    await asyncio.sleep(2.0)  # warm-up: connections made, first cycles done, retained sent
    counters = gw.metrics.counters
    v0, s0 = counters["reported_accepted"], counters["cycles_skipped"]
    m0 = counter.count
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    values, skipped = counters["reported_accepted"] - v0, counters["cycles_skipped"] - s0
    m1 = counter.count
    counter.close()
    stop.set()
    await asyncio.wait_for(task, 30)
    cycles = DEVICES * elapsed * 1000 / cycle_ms
    return {
        "values_s": values / elapsed,
        "cpu_us": cpu / max(1, values) * 1e6,
        "cpu_share": cpu / elapsed,
        "cycles_done": 1 - skipped / cycles,
        "mqtt_s": (m1 - m0) / elapsed,
    }


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} CPUs"


async def main(seconds: float, values_mode: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-modbus-"))
    port = free_port()
    server = start_server(port)
    broker = start_mosquitto(tmp)
    mqtt_port = broker.port
    try:
        print(
            f"edgetwin Modbus benchmark: {DEVICES} devices x {REGISTERS} registers (all changing), "
            f"{seconds:g} s per figure, mqtt.values={values_mode}; {load()}"
        )
        _, raw_vps, raw_us = await raw_baseline(port, seconds)
        print(f"  raw pymodbus (40 per request)   {raw_vps:9.0f} values/s  {raw_us:5.1f} CPU-us/value")
        _, tag_vps, tag_us = await raw_baseline(port, seconds, per_tag=True)
        print(
            f"  one request per tag             {tag_vps:9.0f} values/s  {tag_us:5.1f} CPU-us/value  "
            f"(edgetwin plans {REGISTERS}x fewer requests)"
        )
        sat = await through_gateway(port, seconds, tmp, mqtt_port, 1, values_mode)
        ratio = sat["values_s"] / raw_vps
        print(
            f"  edgetwin, saturating            {sat['values_s']:9.0f} values/s  "
            f"{sat['cpu_us']:5.1f} CPU-us/value  ratio to raw {ratio:.2f} (goal >= 0.25)"
        )
        plant = await through_gateway(port, seconds, tmp, mqtt_port, 100, values_mode)
        print(
            f"  edgetwin, 50 x 40 @ 100 ms      {plant['values_s']:9.0f} points/s  "
            f"{plant['cpu_us']:5.1f} CPU-us/point (goal 20,000 at <= 25)\n"
            f"                                  cycles done {plant['cycles_done']:.1%}, "
            f"CPU {plant['cpu_share']:.0%} of a core, MQTT {plant['mqtt_s']:.0f} msg/s from the gateway"
        )
        print(json.dumps({"raw": raw_vps, "per_tag": tag_vps, "saturating": sat, "plant": plant}))
    finally:
        server.terminate()
        server.wait()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # no per-cycle warnings in the figures
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--values", default="per_property", choices=["per_property", "per_device", "both"])
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.values)))
