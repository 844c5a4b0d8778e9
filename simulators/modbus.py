"""A Modbus TCP device simulator for the demo and tests: a boiler controller whose
values move (``edgetwin sim modbus``).

Register map (unit id 1 by default)::

    input registers  0-1  supply temperature  float32 degC (ABCD)
                     2-3  return temperature  float32 degC
                     4    pressure            uint16, 0.01 bar
    holding register 0    setpoint            int16, 0.1 degC   (writable)
                     1    mode                uint16            (writable)
    coil             0    run                                   (writable)
    discrete input   0    alarm (temperature above 95 degC)

With ``run`` on, the temperature climbs towards the setpoint; off, it cools towards
15 degC. Addresses outside these blocks answer "illegal data address". ``requests``
counts the requests served (for request-count tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

FC_READ_COILS, FC_READ_DISCRETE, FC_READ_HOLDING, FC_READ_INPUT = 1, 2, 3, 4


def float32_registers(x: float) -> list[int]:
    raw = struct.pack(">f", x)
    return [raw[0] << 8 | raw[1], raw[2] << 8 | raw[3]]


class BoilerSimulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 5020, unit: int = 1) -> None:
        self.host, self.port, self.unit = host, port, unit
        self.requests = 0
        self.temperature = 20.0
        self.setpoint = 65.0
        self.run = True
        self._last = time.monotonic()
        self._server: ModbusTcpServer | None = None
        # Fault injection: the next N reads answer a Modbus exception (4, device failure).
        self.fail_reads = 0

    def _device(self) -> SimDevice:
        return SimDevice(
            id=self.unit,
            simdata=(
                [SimData(0, count=16, values=self.run, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [
                    SimData(0, values=int(self.setpoint * 10), datatype=DataType.REGISTERS),
                    SimData(1, values=1, datatype=DataType.REGISTERS),
                ],
                [SimData(0, count=5, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )

    def _step(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        target = self.setpoint if self.run else 15.0
        self.temperature += (target - self.temperature) * (1 - math.exp(-dt / 20.0))

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> Any:
        self.requests += 1
        if set_values is None and self.fail_reads > 0:
            self.fail_reads -= 1
            return ExcCodes.DEVICE_FAILURE
        if set_values is not None:  # a write: keep our model in step with it
            if function_code in (5, 15) and address == 0:
                self.run = bool(set_values[0])
            if function_code in (6, 16) and address == 0:
                raw = int(set_values[0])
                self.setpoint = (raw - 0x10000 if raw & 0x8000 else raw) / 10
            return None
        self._step()
        if function_code == FC_READ_INPUT:
            values = (
                float32_registers(round(self.temperature, 2))
                + float32_registers(round(self.temperature - 8.5, 2))
                + [int(150 + 40 * math.sin(time.monotonic() / 5))]
            )
            registers[0:5] = values
        elif function_code == FC_READ_DISCRETE:
            registers[0] = 1 if self.temperature > 95 else 0
        return None

    async def start(self) -> None:
        self._server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


async def serve(host: str, port: int, unit: int) -> None:
    sim = BoilerSimulator(host, port, unit)
    await sim.start()
    print(f"boiler simulator on {host}:{port} unit {unit} (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def boiler_manifests(
    node: str, host: str, port: int, unit: int = 1, namespace: str = "plant"
) -> list[dict[str, Any]]:
    """DeviceModel and Device for the simulated boiler (the demo uses them; they are
    also the worked example in docs/mappers/modbus.md)."""
    model = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "DeviceModel",
        "metadata": {"name": "modbus-boiler", "namespace": namespace},
        "spec": {
            "protocol": "modbus",
            "properties": [
                {"name": "supply_temp", "type": "FLOAT", "unit": "degC"},
                {"name": "return_temp", "type": "FLOAT", "unit": "degC"},
                {"name": "pressure", "type": "FLOAT", "unit": "bar"},
                {
                    "name": "setpoint",
                    "type": "FLOAT",
                    "accessMode": "ReadWrite",
                    "unit": "degC",
                    "minimum": 20,
                    "maximum": 90,
                },
                {"name": "run", "type": "BOOLEAN", "accessMode": "ReadWrite"},
                {"name": "alarm", "type": "BOOLEAN"},
            ],
        },
    }

    def visitor(**config: Any) -> dict[str, Any]:
        return {"protocolName": "modbus", "configData": config}

    device = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": "boiler-mb", "namespace": namespace},
        "spec": {
            "deviceModelRef": {"name": "modbus-boiler"},
            "nodeName": node,
            "protocol": {
                "protocolName": "modbus",
                "configData": {"transport": "tcp", "host": host, "port": port, "unitId": unit},
            },
            "properties": [
                {
                    "name": "supply_temp",
                    "collectCycle": "1s",
                    "visitors": visitor(table="input_register", address=0, dataType="float32"),
                },
                {
                    "name": "return_temp",
                    "collectCycle": "1s",
                    "visitors": visitor(table="input_register", address=2, dataType="float32"),
                },
                {
                    "name": "pressure",
                    "collectCycle": "1s",
                    "reportCycle": "30s",
                    "visitors": visitor(
                        table="input_register", address=4, scale=0.01, report="change", deadband=0.05
                    ),
                },
                {
                    "name": "setpoint",
                    "collectCycle": "1s",
                    "visitors": visitor(table="holding_register", address=0, dataType="int16", scale=0.1),
                },
                {"name": "run", "collectCycle": "1s", "visitors": visitor(table="coil", address=0)},
                {
                    "name": "alarm",
                    "collectCycle": "1s",
                    "visitors": visitor(table="discrete_input", address=0, report="change"),
                },
            ],
        },
    }
    return [model, device]
