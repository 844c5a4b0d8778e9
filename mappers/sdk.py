"""The mapper SDK: what a device mapper plugin implements and what it may call.

A mapper is a class registered in the ``edgetwin.mappers`` entry point group under its
protocol name (the ``spec.protocol.protocolName`` of the devices it serves)::

    [project.entry-points."edgetwin.mappers"]
    acme = "acme_mapper:AcmeMapper"

The gateway constructs it with a :class:`MapperHost` and the mapper's options from the
gateway config, calls :meth:`Mapper.start` with the devices it serves, :meth:`Mapper.write`
for desired values, and :meth:`Mapper.stop` at shutdown. The mapper reports through the
host; a report returns once the values are durably committed to the twin store.

Most mappers poll: subclass :class:`PollingMapper` and implement ``read`` (and ``write``
for writable properties); it runs one loop per device at the device's collectCycle,
marks devices online/offline and backs off with jitter while a device is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from edgetwin.deviceapi import PropertyType, Value
from edgetwin.runtime.aio import cancel_tasks as _cancel_tasks

__all__ = [
    "Cadence",
    "DeviceBinding",
    "DeviceUnavailable",
    "Mapper",
    "MapperError",
    "MapperHost",
    "PollingMapper",
    "PropertyBinding",
    "PropertyType",
    "ReportFilter",
    "ReportResult",
    "Value",
    "cancel_tasks",
]

log = logging.getLogger(__name__)

DEFAULT_COLLECT_CYCLE_MS = 1_000


class MapperError(Exception):
    """A read or write failed; the message says why (shown in the twin and the log)."""


class DeviceUnavailable(MapperError):
    """The device cannot be reached right now (disconnected, out of range, its link
    down), so a write did not get to it. Unlike a plain :class:`MapperError` this does
    not use up one of the write's attempts: the gateway retries once the device is
    back (reported online)."""


@dataclass(frozen=True, slots=True)
class PropertyBinding:
    """One property of a device as a mapper sees it."""

    name: str
    type: PropertyType
    writable: bool
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    # spec.properties[].visitors.configData: how to reach this property on the device.
    visitor: Mapping[str, Any] = field(default_factory=dict)
    collect_cycle_ms: int | None = None
    report_cycle_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceBinding:
    """One device served by a mapper: its id, protocol config and properties."""

    id: str
    namespace: str
    name: str
    protocol: str
    config: Mapping[str, Any]
    properties: tuple[PropertyBinding, ...]

    def get_property(self, name: str) -> PropertyBinding:
        for prop in self.properties:
            if prop.name == name:
                return prop
        raise KeyError(f"device {self.id} has no property {name!r}")

    @property
    def collect_cycle_ms(self) -> int:
        cycles = [p.collect_cycle_ms for p in self.properties if p.collect_cycle_ms]
        return min(cycles) if cycles else int(self.config.get("collectCycle", DEFAULT_COLLECT_CYCLE_MS))


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What the gateway made of a report: accepted values' versions, rejected reasons."""

    versions: Mapping[str, int]
    rejected: Mapping[str, str]


class MapperHost(Protocol):
    """What the gateway offers a mapper."""

    async def report(
        self, device_id: str, values: Mapping[str, Any], timestamp_ms: int | None = None
    ) -> ReportResult:
        """Report values read from a device; returns once they are committed."""
        ...

    async def set_state(self, device_id: str, state: str) -> None:
        """Report the device's connection state: "online", "offline" or "unknown"."""
        ...

    async def report_errors(self, device_id: str, errors: Mapping[str, str]) -> None:
        """Mark properties that could not be read, with the reason (e.g. a Modbus
        exception); the mark stays until a value for the property is reported."""
        ...

    def cycles_skipped(self, device_id: str, skipped: int, cycle_ms: int) -> None:
        """A polling loop overran: ``skipped`` cycles of ``cycle_ms`` were not done
        (counted, and warned about at most once a minute per device)."""
        ...


class Mapper(ABC):
    """Base of every mapper plugin."""

    protocol: ClassVar[str]

    def __init__(self, host: MapperHost, options: Mapping[str, Any] | None = None) -> None:
        self.host = host
        self.options = dict(options or {})

    @classmethod  # noqa: B027 (an optional hook)
    def validate(cls, device: DeviceBinding) -> None:
        """Check a device's protocol and visitor config; raise ``ValueError`` naming the
        device, property and field that is wrong. Called before :meth:`start`."""

    @abstractmethod
    async def start(self, devices: list[DeviceBinding]) -> None:
        """Begin serving ``devices``; return once running (work goes on in tasks)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop all work and release connections."""

    async def add_device(self, device: DeviceBinding) -> None:
        """Start serving one more device (defined in the cluster while running). The
        default raises ``NotImplementedError``: the gateway then restarts this mapper with
        all its devices, which disturbs the others; mappers should implement it."""
        raise NotImplementedError

    async def update_device(self, device: DeviceBinding) -> None:
        """A served device's definition changed (its config, visitors, or its model).
        The default removes and adds it again."""
        await self.remove_device(device.id)
        await self.add_device(device)

    async def remove_device(self, device_id: str) -> None:
        """Stop serving a device: no more requests to it, its connection released. The
        default raises ``NotImplementedError`` (the gateway restarts the mapper)."""
        raise NotImplementedError

    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        """Write a desired value to the device, then report the value read back.
        Raise :class:`MapperError` with the reason when it cannot be written."""
        raise MapperError(f"{type(self).__name__} does not support writes")


@dataclass(slots=True)
class _LastReport:
    value: Any = None
    at: float = 0.0


class ReportFilter:
    """Per-property report strategy shared by mappers: ``cycle`` reports every value read;
    ``change`` only values that changed (numbers: by more than ``deadband``), and in any
    case after the property's ``reportCycle`` of silence."""

    def __init__(self) -> None:
        self._last: dict[str, _LastReport] = {}

    def due(
        self,
        values: Mapping[str, Any],
        rules: Mapping[str, tuple[str, float | None, int | None]],
        now: float,
    ) -> dict[str, Any]:
        """The values to report now; ``rules[name]`` is (report, deadband, reportCycle ms)."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            report, deadband, report_cycle_ms = rules[name]
            if report == "cycle":  # every value, nothing to remember
                out[name] = value
                continue
            last = self._last.setdefault(name, _LastReport())
            silence = report_cycle_ms / 1000 if report_cycle_ms else None
            changed = last.at == 0.0 or _changed(last.value, value, deadband)
            if report == "cycle" or changed or (silence is not None and now - last.at >= silence):
                out[name] = value
                last.value, last.at = value, now
        return out

    def forget(self, name: str) -> None:
        """Report the property's next value whatever it is (e.g. after a write)."""
        self._last.pop(name, None)


def _changed(old: Any, new: Any, deadband: float | None) -> bool:
    if deadband is not None and isinstance(old, int | float) and isinstance(new, int | float):
        return abs(new - old) > deadband
    return bool(old != new or type(old) is not type(new))


async def cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel a mapper's tasks, wait until they have ended, and forget them.

    A task whose cancellation got swallowed (by a third-party library's own
    ``asyncio.wait_for``, see :mod:`deviceapi.aio`) is cancelled again each second until
    it ends, so a mapper's stop() never hangs. Mappers await with
    :func:`deviceapi.aio.wait_within`, not ``asyncio.wait_for``."""
    await _cancel_tasks(tasks)
    tasks.clear()


class Cadence:
    """A fixed polling cycle on a grid of slots (``cycle_ms`` each). :meth:`wait` sleeps
    until the next slot starts. When the work ran late, the next cycle starts at once if
    its slot is still open (late, but done); slots that passed entirely are skipped, not
    done in a burst, and reported to the host, which counts them and warns."""

    def __init__(
        self,
        host: MapperHost,
        device_id: str,
        cycle_ms: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.host, self.device_id, self.cycle_ms = host, device_id, cycle_ms
        self._clock, self._sleep = clock, sleep
        self.next_at = clock()
        self.skipped = 0

    def restart(self) -> None:
        """Start afresh from now (after an outage: no cycles count as skipped)."""
        self.next_at = self._clock()

    async def wait(self) -> None:
        cycle_s = self.cycle_ms / 1000
        self.next_at += cycle_s
        now = self._clock()
        missed = int((now - self.next_at) / cycle_s) if now > self.next_at else 0
        if missed:
            self.next_at += missed * cycle_s
            self.skipped += missed
            self.host.cycles_skipped(self.device_id, missed, self.cycle_ms)
        await self._sleep(max(0.0, self.next_at - now))


class PollingMapper(Mapper):
    """A mapper that reads every device each collectCycle, one task per device."""

    # Backoff while a device is unreachable.
    retry_min_s: ClassVar[float] = 0.5
    retry_max_s: ClassVar[float] = 30.0

    def __init__(self, host: MapperHost, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(host, options)
        self._tasks: list[asyncio.Task[None]] = []
        self._by_device: dict[str, asyncio.Task[None]] = {}
        self.devices: dict[str, DeviceBinding] = {}

    @abstractmethod
    async def read(self, device: DeviceBinding) -> dict[str, Any]:
        """Read the device's properties. Raise :class:`MapperError` (or ``OSError`` /
        ``TimeoutError``) when the device cannot be reached."""

    async def start(self, devices: list[DeviceBinding]) -> None:
        for device in devices:
            await self.add_device(device)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        self._by_device.clear()

    async def add_device(self, device: DeviceBinding) -> None:
        await self.remove_device(device.id)
        self.devices[device.id] = device
        task = asyncio.create_task(self._poll(device), name=f"poll {device.id}")
        self._tasks.append(task)
        self._by_device[device.id] = task

    async def remove_device(self, device_id: str) -> None:
        self.devices.pop(device_id, None)
        task = self._by_device.pop(device_id, None)
        if task is not None:
            self._tasks.remove(task)
            await cancel_tasks([task])

    async def _poll(self, device: DeviceBinding) -> None:
        cadence = Cadence(self.host, device.id, device.collect_cycle_ms)
        delay = self.retry_min_s
        online: bool | None = None
        while True:
            try:
                values = await self.read(device)
            except Exception as exc:  # a bug in read() must not end the device's polling
                if not isinstance(exc, MapperError | OSError | TimeoutError):
                    log.error("read raised", extra={"device": device.id}, exc_info=exc)
                if online is not False:
                    log.warning("device unreachable", extra={"device": device.id, "error": str(exc)})
                    await self.host.set_state(device.id, "offline")
                    online = False
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(self.retry_max_s, delay * 2)
                cadence.restart()
                continue
            delay = self.retry_min_s
            if online is not True:
                await self.host.set_state(device.id, "online")
                online = True
            if values:
                await self.host.report(device.id, values, int(time.time() * 1000))
            await cadence.wait()
