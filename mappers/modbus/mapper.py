"""The Modbus mapper runtime: polling, writes and faults on pymodbus's async clients.

* One client and one lock per endpoint (TCP host:port, or serial line): one request at a
  time per connection, as real devices and RS-485 lines need; several unit ids on one
  line share it. Writes take the same lock, so they are serialized with polling.
* One poll task per device and collect cycle, reading the planned requests
  (``planner``). An exception response to a merged request is narrowed down: its
  properties are read one by one, only the failing ones are marked (``readError``) and
  from then on read alone; the others keep reporting.
* A lost connection or timeout marks the device offline and retries with exponential
  backoff and jitter; the next successful cycle marks it online. Each endpoint fails on
  its own: a dead device never holds another endpoint's lock.
* Reporting per property: every cycle, or on change (beyond ``deadband``), and in any
  case after ``reportCycle`` of silence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from edgetwin.mappers.modbus.codec import CodecError, decode, encode, encode_bit
from edgetwin.mappers.modbus.config import BIT_TABLES, Connection, Visitor, parse_connection, parse_visitor
from edgetwin.mappers.modbus.planner import ReadRequest, Span, plan_reads
from edgetwin.mappers.sdk import (
    Cadence,
    DeviceBinding,
    DeviceUnavailable,
    Mapper,
    MapperError,
    PropertyBinding,
    ReportFilter,
    Value,
    cancel_tasks,
)
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)

DEFAULT_CYCLE_MS = 1000
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class LinkDown(Exception):
    """The endpoint cannot be reached (connect failure, timeout, lost connection)."""


class DeviceException(Exception):
    """The device answered with a Modbus exception response."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"Modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})")


def link_key(conn: Connection) -> str:
    if conn.transport == "rtu":
        return f"serial:{conn.serialPort}"
    return f"{conn.transport}:{conn.host}:{conn.port}"


class Link:
    """One connection to an endpoint, used by one request at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self.requests = 0
        timeout = conn.timeout / 1000
        self.client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if conn.transport == "rtu":
            assert conn.serialPort is not None
            self.client = AsyncModbusSerialClient(
                conn.serialPort,
                baudrate=conn.baudrate,
                parity=conn.parity,
                stopbits=conn.stopbits,
                bytesize=conn.bytesize,
                timeout=timeout,
                retries=conn.retries,
                reconnect_delay=0,
            )
        else:
            assert conn.host is not None
            self.client = AsyncModbusTcpClient(
                conn.host,
                port=conn.port,
                framer=FramerType.RTU if conn.transport == "rtu-over-tcp" else FramerType.SOCKET,
                timeout=timeout,
                retries=conn.retries,
                reconnect_delay=0,
            )

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one request; raises :class:`LinkDown` or :class:`DeviceException`."""
        async with self.lock:
            client = self.client
            if not client.connected:
                try:
                    ok = await wait_within(client.connect(), self.conn.timeout / 1000 + 1)
                except (OSError, TimeoutError, ModbusException) as exc:
                    raise LinkDown(f"cannot connect: {exc or type(exc).__name__}") from None
                if not ok:
                    raise LinkDown("cannot connect")
            self.requests += 1
            try:
                result = await getattr(client, method)(*args, **kwargs)
            except (ModbusException, OSError, TimeoutError) as exc:
                client.close()
                raise LinkDown(str(exc) or type(exc).__name__) from None
            finally:
                if self.conn.interFrameDelay:
                    await asyncio.sleep(self.conn.interFrameDelay / 1000)
            if result.isError():
                code = getattr(result, "exception_code", 0)
                if not code:
                    client.close()
                    raise LinkDown(str(result))
                raise DeviceException(int(code))
            return result

    async def read(self, table: str, address: int, count: int, unit: int) -> list[Any]:
        method = {
            "coil": "read_coils",
            "discrete_input": "read_discrete_inputs",
            "holding_register": "read_holding_registers",
            "input_register": "read_input_registers",
        }[table]
        result = await self.call(method, address, count=count, device_id=unit)
        values = result.bits if table in BIT_TABLES else result.registers
        return list(values[:count])

    def close(self) -> None:
        self.client.close()


@dataclass
class DeviceRuntime:
    binding: DeviceBinding
    conn: Connection
    link: Link
    props: dict[str, tuple[PropertyBinding, Visitor]]
    reporting: ReportFilter = field(default_factory=ReportFilter)
    # Properties that failed inside a merged request: read alone from then on.
    alone: set[str] = field(default_factory=set)
    # Plans per group of names, with the size of ``alone`` they were made for (it only
    # grows, so a different size means the plan is stale).
    _plans: dict[tuple[str, ...], tuple[int, list[ReadRequest]]] = field(default_factory=dict)

    def spans(self, names: Sequence[str]) -> list[Span]:
        return [
            Span(n, self.props[n][1].table, self.props[n][1].address, self.props[n][1].count) for n in names
        ]

    def plan(self, names: Sequence[str]) -> list[ReadRequest]:
        key = tuple(names)
        cached = self._plans.get(key)
        if cached is not None and cached[0] == len(self.alone):
            return cached[1]
        plan = self._make_plan(names)
        self._plans[key] = (len(self.alone), plan)
        return plan

    def _make_plan(self, names: Sequence[str]) -> list[ReadRequest]:
        together = [n for n in names if n not in self.alone]
        plan = plan_reads(
            self.spans(together),
            max_gap=self.conn.maxGap,
            max_registers=self.conn.maxRegisters,
            max_bits=self.conn.maxBits,
        )
        return plan + [
            ReadRequest(s.table, s.address, s.count, (s,))
            for s in self.spans(sorted(self.alone & set(names)))
        ]


class ModbusMapper(Mapper):
    """Modbus TCP, RTU and RTU over TCP devices (``protocolName: modbus``)."""

    protocol: ClassVar[str] = "modbus"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.links: dict[str, Link] = {}
        self.devices: dict[str, DeviceRuntime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._device_tasks: dict[str, list[asyncio.Task[None]]] = {}

    @classmethod
    def validate(cls, device: DeviceBinding) -> None:
        parse_connection(device.id, device.config)
        for prop in device.properties:
            if prop.visitor:
                parse_visitor(device.id, prop)

    async def start(self, devices: list[DeviceBinding]) -> None:
        for device in devices:
            await self.add_device(device)

    async def add_device(self, device: DeviceBinding) -> None:
        await self.remove_device(device.id)
        conn = parse_connection(device.id, device.config)
        # Devices on one endpoint (units on a line or behind a gateway) share its
        # connection, opened with the first device's settings.
        key = link_key(conn)
        link = self.links.get(key) or self.links.setdefault(key, Link(conn))
        props = {p.name: (p, parse_visitor(device.id, p)) for p in device.properties if p.visitor}
        rt = self.devices[device.id] = DeviceRuntime(device, conn, link, props)
        cycles: dict[int, list[str]] = {}
        for name, (p, _) in props.items():
            cycles.setdefault(p.collect_cycle_ms or DEFAULT_CYCLE_MS, []).append(name)
        tasks = [
            asyncio.create_task(self._poll(rt, cycle_ms, names), name=f"modbus {device.id}")
            for cycle_ms, names in cycles.items()
        ]
        self._device_tasks[device.id] = tasks
        self._tasks.extend(tasks)

    async def remove_device(self, device_id: str) -> None:
        """No more requests to the device; its endpoint's connection is closed when no
        other device uses it."""
        rt = self.devices.pop(device_id, None)
        tasks = self._device_tasks.pop(device_id, [])
        for task in tasks:
            self._tasks.remove(task)
        await cancel_tasks(tasks)
        if rt is not None and not any(other.link is rt.link for other in self.devices.values()):
            self.links.pop(link_key(rt.conn), None)
            rt.link.close()

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        self._device_tasks.clear()
        for link in self.links.values():
            link.close()

    # ----------------------------------------------------------------- polling
    async def read_once(
        self, rt: DeviceRuntime, names: Sequence[str]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Read ``names`` once: values and per-property errors. Raises LinkDown."""
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        unit = rt.conn.unitId
        for req in rt.plan(names):
            try:
                data = await rt.link.read(req.table, req.address, req.count, unit)
            except DeviceException as exc:
                if len(req.members) == 1:
                    errors[req.members[0].key] = str(exc)
                    continue
                # Narrow it down: read each member alone; only the failing ones stay alone.
                for span in req.members:
                    try:
                        part = await rt.link.read(span.table, span.address, span.count, unit)
                    except DeviceException as one:
                        rt.alone.add(span.key)
                        errors[span.key] = str(one)
                        continue
                    self._decode_into(rt, span, part, values, errors)
                continue
            for span in req.members:
                self._decode_into(rt, span, data[req.slice_for(span)], values, errors)
        return values, errors

    @staticmethod
    def _decode_into(
        rt: DeviceRuntime, span: Span, data: list[Any], values: dict[str, Any], errors: dict[str, str]
    ) -> None:
        visitor = rt.props[span.key][1]
        try:
            if span.table in BIT_TABLES:
                values[span.key] = decode(visitor, bits=data)
            else:
                values[span.key] = decode(visitor, registers=data)
        except CodecError as exc:
            errors[span.key] = f"cannot decode: {exc}"

    def due_reports(self, rt: DeviceRuntime, values: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The values to report now under each property's strategy."""
        rules = {
            name: (rt.props[name][1].report, rt.props[name][1].deadband, rt.props[name][0].report_cycle_ms)
            for name in values
        }
        return rt.reporting.due(values, rules, now)

    async def _poll(self, rt: DeviceRuntime, cycle_ms: int, names: list[str]) -> None:
        host, dev_id = self.host, rt.binding.id
        delay = RETRY_MIN_S
        online: bool | None = None
        cadence = Cadence(host, dev_id, cycle_ms)
        while True:
            try:
                values, errors = await self.read_once(rt, names)
            except LinkDown as exc:
                if online is not False:
                    log.warning("modbus device unreachable", extra={"device": dev_id, "error": str(exc)})
                    await host.set_state(dev_id, "offline")
                    online = False
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(RETRY_MAX_S, delay * 2)
                cadence.restart()
                continue
            delay = RETRY_MIN_S
            if online is not True:
                await host.set_state(dev_id, "online")
                online = True
            if errors:
                await host.report_errors(dev_id, errors)
            due = self.due_reports(rt, values, time.monotonic())
            if due:
                await host.report(dev_id, due, int(time.time() * 1000))
            await cadence.wait()  # an overrun skips (and counts) the missed cycles

    # ----------------------------------------------------------------- writes
    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        rt = self.devices[device.id]
        if prop not in rt.props:
            raise MapperError(f"{prop} has no Modbus visitor")
        visitor = rt.props[prop][1]
        unit, link = rt.conn.unitId, rt.link
        try:
            if visitor.table == "coil":
                await link.call("write_coil", visitor.address, encode_bit(value), device_id=unit)
            elif visitor.table == "holding_register":
                current: list[int] = []
                if visitor.mask is not None or visitor.dataType == "bit":
                    current = await link.read("holding_register", visitor.address, visitor.count, unit)
                regs = encode(visitor, value, current)
                if len(regs) == 1:
                    await link.call("write_register", visitor.address, regs[0], device_id=unit)
                else:
                    await link.call("write_registers", visitor.address, regs, device_id=unit)
            else:
                raise MapperError(f"{visitor.table} cannot be written")
            # Read back: the twin shows what the device holds, not what was sent.
            data = await link.read(visitor.table, visitor.address, visitor.count, unit)
        except LinkDown as exc:
            raise DeviceUnavailable(f"write of {prop} did not reach the device: {exc}") from None
        except (CodecError, DeviceException) as exc:
            raise MapperError(f"write of {prop} failed: {exc}") from None
        back = decode(visitor, bits=data) if visitor.table in BIT_TABLES else decode(visitor, registers=data)
        rt.reporting.forget(prop)
        await self.host.report(device.id, {prop: back}, int(time.time() * 1000))
