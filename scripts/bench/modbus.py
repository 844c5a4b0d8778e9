#!/usr/bin/env python3
"""Modbus benchmark: 50 devices x 40 holding registers on one loopback pymodbus server.

    .venv/bin/python scripts/bench/modbus.py [--seconds 10]

Prints, in one run:
  * baseline: raw sequential pymodbus reads of the same registers (one request of 40
    registers per device, no decoding, no twin): requests/s and values/s;
  * edgetwin: property values/s through the Modbus mapper into the durable twin store
    (a gateway in this process, collectCycle 1 ms so polling saturates), the requests/s
    the server saw, and the ratio of values/s to the baseline;
  * requests per cycle of the read plan against a naive one-request-per-property plan.
All devices share one TCP connection, as units behind one gateway do: one request at a
time on it. The gateway publishes to a private mosquitto on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgetwin.demo import free_port
from gateway.config import parse_config
from gateway.service import Gateway
from mappers.modbus.config import Visitor
from mappers.modbus.planner import Span, plan_reads

sys.path.insert(0, str(Path(__file__).parent))
from ingest import start_mosquitto

DEVICES, REGISTERS = 50, 40


async def start_server(port: int, counter: list[int]) -> ModbusTcpServer:
    def trace(sending: bool, pdu: Any) -> Any:
        if not sending:
            counter[0] += 1
        return pdu

    devices = [
        SimDevice(
            id=unit,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, values=[unit * 100 + i for i in range(REGISTERS)], datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        for unit in range(1, DEVICES + 1)
    ]
    server = ModbusTcpServer(devices, address=("127.0.0.1", port), trace_pdu=trace)
    await server.serve_forever(background=True)
    return server


async def raw_baseline(port: int, seconds: float, counter: list[int]) -> tuple[float, float]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    start_requests, values = counter[0], 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for unit in range(1, DEVICES + 1):
            result = await client.read_holding_registers(0, count=REGISTERS, device_id=unit)
            values += len(result.registers)
    elapsed = time.perf_counter() - t0
    client.close()
    return (counter[0] - start_requests) / elapsed, values / elapsed


def manifests(port: int) -> list[dict[str, Any]]:
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
                        "collectCycle": 1,
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


async def through_gateway(
    port: int, seconds: float, counter: list[int], tmp: Path, mqtt_port: int
) -> tuple[float, float]:
    (tmp / "m.yaml").write_text(yaml.safe_dump_all(manifests(port)))
    cfg = parse_config(
        {
            "node": "bench",
            "store": {"path": str(tmp / "store.db")},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
            "manifests": [str(tmp / "m.yaml")],
            "log": {"level": "WARNING"},
        }
    )
    gw = Gateway(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await asyncio.wait_for(gw.ready.wait(), 30)
    await asyncio.sleep(1.0)  # warm-up: connections made, first cycle done
    start_values, start_requests = gw.metrics.counters["reported_accepted"], counter[0]
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    values = gw.metrics.counters["reported_accepted"] - start_values
    requests = counter[0] - start_requests
    stop.set()
    await asyncio.wait_for(task, 30)
    return requests / elapsed, values / elapsed


def plan_sizes() -> tuple[int, int]:
    spans = [
        Span(f"r{i}", "holding_register", i, Visitor(table="holding_register", address=i).count)
        for i in range(REGISTERS)
    ]
    return len(plan_reads(spans)) * DEVICES, len(spans) * DEVICES


async def main(seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-modbus-"))
    port, counter = free_port(), [0]
    server = await start_server(port, counter)
    broker, mqtt_port = start_mosquitto(tmp)
    try:
        print(
            f"edgetwin Modbus benchmark: {DEVICES} devices x {REGISTERS} registers, one server, {seconds:g} s"
        )
        raw_rps, raw_vps = await raw_baseline(port, seconds, counter)
        gw_rps, gw_vps = await through_gateway(port, seconds, counter, tmp, mqtt_port)
        planned, naive = plan_sizes()
        print(f"  raw pymodbus reads      {raw_rps:8.0f} requests/s  {raw_vps:9.0f} values/s")
        ratio = gw_vps / raw_vps
        print(
            f"  mapper -> twin store    {gw_rps:8.0f} requests/s  {gw_vps:9.0f} values/s  ratio {ratio:.2f}"
        )
        fewer = naive / planned
        print(
            f"  requests per cycle      {planned} planned vs {naive} naive (one per property): "
            f"{fewer:.0f}x fewer"
        )
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]
        broker.terminate()
        broker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    sys.exit(asyncio.run(main(parser.parse_args().seconds)))
