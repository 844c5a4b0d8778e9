"""The Modbus mapper against real pymodbus servers: TCP on loopback, RTU over a
socat pseudo-terminal pair. Expected register contents come from pymodbus's own
converter (an independent implementation), byte-swapped by hand where needed."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgetwin.deviceapi import PropertyType
from edgetwin.mappers.modbus.mapper import ModbusMapper
from edgetwin.mappers.sdk import DeviceBinding, PropertyBinding
from tests.conftest import RecordingHost, eventually
from tests.harness.processes import free_port

DT = ModbusClientMixin.DATATYPE


def oracle(value: Any, kind: Any, byte_order: str, word_order: str) -> list[int]:
    regs = ModbusClientMixin.convert_to_registers(value, kind, word_order=word_order)  # type: ignore[arg-type]
    if byte_order == "little":
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    return list(regs)


# (name, model type, visitor, raw value written by the oracle, expected twin value)
CASES: list[tuple[str, PropertyType, dict[str, Any], list[int], Any]] = []
_addr = 0
for bo in ("big", "little"):
    for wo in ("big", "little"):
        for name, kind, dtype, value in [
            ("i16", PropertyType.INT, DT.INT16, -12345),
            ("u16", PropertyType.INT, DT.UINT16, 54321),
            ("i32", PropertyType.INT, DT.INT32, -123456789),
            ("u32", PropertyType.INT, DT.UINT32, 3_000_000_000),
            ("i64", PropertyType.INT, DT.INT64, -(2**62) - 7),
            ("u64", PropertyType.INT, DT.UINT64, 2**63 + 11),
            ("f32", PropertyType.FLOAT, DT.FLOAT32, 1234.5),
            ("f64", PropertyType.DOUBLE, DT.FLOAT64, math.pi),
        ]:
            if dtype in (DT.INT16, DT.UINT16) and wo == "little":
                continue  # one register: word order does not apply
            regs = oracle(value, dtype, bo, wo)
            visitor = {
                "table": "holding_register",
                "address": _addr,
                "dataType": dtype.name.lower(),
                "byteOrder": bo,
                "wordOrder": wo,
            }
            CASES.append((f"{name}_{bo[0]}{wo[0]}", kind, visitor, regs, value))
            _addr += len(regs)
CASES += [
    (
        "text",
        PropertyType.STRING,
        {"table": "holding_register", "address": 200, "dataType": "string", "length": 3},
        [0x4845, 0x4C4C, 0x4F00],
        "HELLO",
    ),
    (
        "flag",
        PropertyType.BOOLEAN,
        {"table": "holding_register", "address": 210, "dataType": "bit", "bit": 5},
        [0b100000],
        True,
    ),
    (
        "scaled",
        PropertyType.FLOAT,
        {"table": "holding_register", "address": 211, "dataType": "int16", "scale": 0.1, "offset": -40},
        [615],
        21.5,
    ),
    (
        "nibble",
        PropertyType.INT,
        {"table": "holding_register", "address": 212, "mask": 0x00F0, "shift": 4},
        [0xABCD],
        0xC,
    ),
    (
        "setpoint",
        PropertyType.FLOAT,
        {"table": "holding_register", "address": 213, "dataType": "float32"},
        oracle(20.0, DT.FLOAT32, "big", "big"),
        20.0,
    ),
]


def binding(
    dev_id: str,
    config: dict[str, Any],
    cases: list[tuple[str, PropertyType, dict[str, Any], list[int], Any]],
    cycle_ms: int = 100,
) -> DeviceBinding:
    props = tuple(
        PropertyBinding(name=n, type=k, writable=n == "setpoint", visitor=v, collect_cycle_ms=cycle_ms)
        for n, k, v, _, _ in cases
    )
    return DeviceBinding(dev_id, "plant", dev_id, "modbus", config, props)


def sim_device(
    cases: list[tuple[str, PropertyType, dict[str, Any], list[int], Any]], unit: int = 1
) -> SimDevice:
    regs = [0] * 256
    for _, _, v, raw, _ in cases:
        regs[v["address"] : v["address"] + len(raw)] = raw
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, count=48, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=regs, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
        ),
    )


@contextlib.asynccontextmanager
async def tcp_server(
    device: SimDevice, port: int, counter: list[int] | None = None
) -> AsyncIterator[ModbusTcpServer]:
    def trace(sending: bool, pdu: Any) -> Any:
        if not sending and counter is not None:
            counter[0] += 1
        return pdu

    server = ModbusTcpServer(device, address=("127.0.0.1", port), trace_pdu=trace)
    await server.serve_forever(background=True)
    try:
        yield server
    finally:
        await server.shutdown()


async def run_mapper(devices: list[DeviceBinding]) -> tuple[ModbusMapper, RecordingHost]:
    host = RecordingHost()
    mapper = ModbusMapper(host)
    for d in devices:
        ModbusMapper.validate(d)
    await mapper.start(devices)
    return mapper, host


async def test_every_type_and_order_decodes_exactly_over_tcp() -> None:
    port = free_port()
    async with tcp_server(sim_device(CASES), port):
        mapper, host = await run_mapper([binding("plant.all", {"host": "127.0.0.1", "port": port}, CASES)])
        try:
            await eventually(lambda: len(host.values.get("plant.all", {})) == len(CASES))
        finally:
            await mapper.stop()
    got = host.values["plant.all"]
    for name, _, _, _, expected in CASES:
        assert got[name] == expected, name
        assert type(got[name]) is type(expected), name
    assert host.states["plant.all"] == ["online"]


async def test_desired_write_lands_and_is_read_back() -> None:
    port = free_port()
    cases = [c for c in CASES if c[0] in ("setpoint", "nibble", "flag")]
    async with tcp_server(sim_device(cases), port):
        dev = binding("plant.w", {"host": "127.0.0.1", "port": port}, cases)
        mapper, host = await run_mapper([dev])
        try:
            await mapper.write(dev, "setpoint", 72.25)
            assert host.values["plant.w"]["setpoint"] == 72.25  # reported from the read-back
            raw = AsyncModbusTcpClient("127.0.0.1", port=port)
            await raw.connect()
            regs = (await raw.read_holding_registers(213, count=2, device_id=1)).registers
            raw.close()
            assert regs == oracle(72.25, DT.FLOAT32, "big", "big")
        finally:
            await mapper.stop()


def _blocks() -> tuple[list[tuple[str, PropertyType, dict[str, Any], list[int], Any]], SimDevice]:
    cases: list[tuple[str, PropertyType, dict[str, Any], list[int], Any]] = []
    for base, n in ((0, 34), (1000, 33), (3000, 33)):
        cases += [
            (f"r{base + i}", PropertyType.INT, {"table": "holding_register", "address": base + i}, [i], i)
            for i in range(n)
        ]
    cases += [(f"c{i}", PropertyType.BOOLEAN, {"table": "coil", "address": i}, [], False) for i in range(40)]
    regs = [0] * 3100
    for _, _, v, raw, _ in cases:
        if raw:
            regs[v["address"]] = raw[0]
    device = SimDevice(
        id=1,
        simdata=(
            [SimData(0, count=48, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=regs, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
        ),
    )
    return cases, device


async def test_hundred_registers_in_three_blocks_and_forty_coils_take_four_requests() -> None:
    cases, device = _blocks()
    assert len([c for c in cases if c[2]["table"] == "holding_register"]) == 100
    port, counter = free_port(), [0]
    async with tcp_server(device, port, counter):
        mapper, host = await run_mapper(
            [binding("plant.b", {"host": "127.0.0.1", "port": port}, cases, cycle_ms=200)]
        )
        try:
            await eventually(lambda: len(host.values.get("plant.b", {})) == 140)
            before, cycles_before = counter[0], len(host.reports)
            await asyncio.sleep(2.0)
            cycles = len(host.reports) - cycles_before
            per_cycle = (counter[0] - before) / cycles
        finally:
            await mapper.stop()
    assert cycles >= 5
    assert per_cycle <= 4, f"{per_cycle} requests per cycle"


async def test_illegal_address_marks_only_that_property() -> None:
    cases = [c for c in CASES if c[0] in ("u16_bb", "scaled")]
    bad = (
        "ghost",
        PropertyType.INT,
        {"table": "holding_register", "address": 260},
        [],
        None,
    )  # past the block
    port = free_port()
    async with tcp_server(sim_device(cases), port):
        dev = binding("plant.x", {"host": "127.0.0.1", "port": port, "maxGap": 100}, [*cases, bad])
        mapper, host = await run_mapper([dev])
        try:
            await eventually(
                lambda: "ghost" in host.errors.get("plant.x", {}) and len(host.values.get("plant.x", {})) == 2
            )
            reports = len(host.reports)
            await eventually(lambda: len(host.reports) >= reports + 3)  # the others keep reporting
        finally:
            await mapper.stop()
    assert host.errors["plant.x"]["ghost"] == "Modbus exception 2 (illegal data address)"
    assert set(host.values["plant.x"]) == {"u16_bb", "scaled"}
    assert host.states["plant.x"] == ["online"]


async def test_server_restart_is_followed_by_reconnect_within_5s() -> None:
    cases = [c for c in CASES if c[0] == "u32_bb"]
    port = free_port()
    async with tcp_server(sim_device(cases), port):
        mapper, host = await run_mapper(
            [binding("plant.r", {"host": "127.0.0.1", "port": port, "timeout": "300ms"}, cases)]
        )
        await eventually(lambda: bool(host.reports))
    try:
        await eventually(lambda: host.states["plant.r"][-1] == "offline")
        async with tcp_server(sim_device(cases), port):
            restarted = time.monotonic()
            count = len(host.reports)
            await eventually(lambda: len(host.reports) > count, within=5.0)
            assert time.monotonic() - restarted < 5.0
            assert host.states["plant.r"][-1] == "online"
    finally:
        await mapper.stop()


async def test_a_dead_device_does_not_slow_the_others() -> None:
    cases = [c for c in CASES if c[0] == "u16_bb"]
    port = free_port()

    async def cycle_rate(devices: list[DeviceBinding]) -> float:
        mapper, host = await run_mapper(devices)
        try:
            await eventually(lambda: bool(host.reports))
            start = len([r for r in host.reports if r[1] == "plant.alive"])
            await asyncio.sleep(2.0)
            return (len([r for r in host.reports if r[1] == "plant.alive"]) - start) / 2.0
        finally:
            await mapper.stop()

    # A device that never answers: a TCP listener that accepts and stays silent.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = silent.sockets[0].getsockname()[1]
    async with tcp_server(sim_device(cases), port):
        alive = binding("plant.alive", {"host": "127.0.0.1", "port": port}, cases, cycle_ms=50)
        dead = binding(
            "plant.dead", {"host": "127.0.0.1", "port": dead_port, "timeout": "300ms"}, cases, cycle_ms=50
        )
        alone = await cycle_rate([alive])
        together = await cycle_rate([alive, dead])
    silent.close()
    assert alone > 10
    assert together >= alone * 0.9, f"{together:.1f} cycles/s with a dead neighbour vs {alone:.1f} alone"


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("socat is not installed; scripts/test installs it")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("socat did not create the pty pair")
        time.sleep(0.02)
    yield str(a), str(b)
    proc.terminate()
    proc.wait()


async def test_rtu_over_a_pseudo_terminal(pty_pair: tuple[str, str]) -> None:
    server_end, client_end = pty_pair
    cases = [c for c in CASES if c[0] in ("i32_lb", "f32_bl", "text", "setpoint")]
    server = ModbusSerialServer(
        sim_device(cases, unit=7), framer=FramerType.RTU, port=server_end, baudrate=19200
    )
    await server.serve_forever(background=True)
    try:
        dev = binding(
            "plant.rtu",
            {"transport": "rtu", "serialPort": client_end, "baudrate": 19200, "unitId": 7},
            cases,
            cycle_ms=200,
        )
        mapper, host = await run_mapper([dev])
        try:
            await eventually(lambda: len(host.values.get("plant.rtu", {})) == len(cases))
            for name, _, _, _, expected in cases:
                assert host.values["plant.rtu"][name] == expected, name
            await mapper.write(dev, "setpoint", 55.5)
            assert host.values["plant.rtu"]["setpoint"] == 55.5
        finally:
            await mapper.stop()
    finally:
        await server.shutdown()


async def test_report_strategies_cycle_change_deadband_and_silence() -> None:
    props = [
        PropertyBinding(
            "every", PropertyType.INT, False, visitor={"table": "holding_register", "address": 0}
        ),
        PropertyBinding(
            "changes",
            PropertyType.INT,
            False,
            visitor={"table": "holding_register", "address": 1, "report": "change"},
        ),
        PropertyBinding(
            "band",
            PropertyType.FLOAT,
            False,
            visitor={
                "table": "holding_register",
                "address": 2,
                "report": "change",
                "deadband": 0.5,
                "scale": 0.1,
            },
            report_cycle_ms=10_000,
        ),
    ]
    dev = DeviceBinding("plant.rep", "plant", "rep", "modbus", {"host": "127.0.0.1", "port": 1}, tuple(props))
    mapper = ModbusMapper(RecordingHost())
    await mapper.start([dev])  # nothing listens on port 1: the poll task only retries
    rt = mapper.devices["plant.rep"]
    try:
        assert mapper.due_reports(rt, {"every": 1, "changes": 1, "band": 20.0}, now=100.0) == {
            "every": 1,
            "changes": 1,
            "band": 20.0,
        }
        assert mapper.due_reports(rt, {"every": 1, "changes": 1, "band": 20.4}, now=101.0) == {"every": 1}
        assert mapper.due_reports(rt, {"every": 1, "changes": 2, "band": 20.6}, now=102.0) == {
            "every": 1,
            "changes": 2,
            "band": 20.6,
        }
        # Within the deadband, but reportCycle (10 s) of silence has passed.
        assert mapper.due_reports(rt, {"every": 1, "changes": 2, "band": 20.7}, now=112.7) == {
            "every": 1,
            "band": 20.7,
        }
    finally:
        await mapper.stop()


def test_sim_modbus_cli_serves_the_boiler() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgetwin"), "sim", "modbus", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        assert b"boiler simulator on" in proc.stdout.readline()

        async def read() -> list[int]:
            client = AsyncModbusTcpClient("127.0.0.1", port=port)
            await client.connect()
            result = await client.read_holding_registers(0, count=2, device_id=1)
            client.close()
            return list(result.registers)

        assert asyncio.run(read()) == [650, 1]  # setpoint 65.0 degC, mode 1
    finally:
        proc.terminate()
        proc.wait(10)
