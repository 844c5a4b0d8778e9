"""The BLE radio shared by a mapper's devices: connection slots handed out first come,
first served, one scanner running only while someone looks for a device, matching
advertisements to devices, and each device's state while it is served."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError, BleakGATTProtocolError

from edgetwin.mappers.ble.codec import CodecError, PresentationFormat
from edgetwin.mappers.ble.config import Connection, Visitor
from edgetwin.mappers.sdk import (
    DeviceBinding,
    MapperError,
    PropertyBinding,
    ReportFilter,
    Value,
)
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 5
# A connection is initiated only to a device seen advertising this recently (so an
# absent device never holds the adapter's one connection attempt for connectTimeout,
# stalling every other device's connect); otherwise it is scanned for first.
FRESH_ADVERT_S = 2.0
# A keepConnected: false device reconnected without a scan (it ended its last cycle
# cleanly) gets this long to connect; if it fails it is scanned for next time.
DIRECT_CONNECT_S = 2.0


class LinkLost(Exception):
    """The device cannot be reached: not found, connect failed, disconnected, silent."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Slots:
    """At most ``size`` holders; waiters are served strictly in arrival order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self.size - self.free

    async def acquire(self) -> None:
        if self.free and not self._waiters:
            self.free -= 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.release()  # handed over just as we were cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        self.peak = max(self.peak, self.in_use)

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next waiter
                return
        self.free += 1


AdvertCallback = Callable[[BLEDevice, AdvertisementData], None]
SEEN_TTL_S = 300.0


class Discovery:
    """One scanner shared by the mapper's devices, running while anyone needs it."""

    def __init__(self, make_scanner: Callable[[AdvertCallback], BleakScanner]) -> None:
        self._make = make_scanner
        self._scanner: BleakScanner | None = None
        self._users = 0
        self._lock = asyncio.Lock()
        self._watchers: dict[object, AdvertCallback] = {}
        # When each address last advertised (while the scanner ran). Bounded by the
        # devices in radio range; forgotten after SEEN_TTL_S.
        self.last_seen: dict[str, float] = {}

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        now = time.monotonic()
        self.last_seen[device.address.upper()] = now
        if len(self.last_seen) > 4096:  # many strangers in range: forget the stale ones
            self.last_seen = {a: t for a, t in self.last_seen.items() if now - t < SEEN_TTL_S}
        for watcher in list(self._watchers.values()):
            watcher(device, adv)

    def seen_within(self, address: str, seconds: float) -> bool:
        seen = self.last_seen.get(address.upper())
        return seen is not None and time.monotonic() - seen <= seconds

    async def _use(self, delta: int) -> None:
        async with self._lock:
            self._users += delta
            if self._users > 0 and self._scanner is None:
                scanner = self._make(self._on_advert)
                await scanner.start()
                self._scanner = scanner
            elif self._users == 0 and self._scanner is not None:
                scanner, self._scanner = self._scanner, None
                with contextlib.suppress(BleakError, OSError):
                    await scanner.stop()

    async def watch(self, token: object, callback: AdvertCallback) -> None:
        self._watchers[token] = callback
        try:
            await self._use(+1)
        except BaseException:
            self._watchers.pop(token, None)
            raise

    async def unwatch(self, token: object) -> None:
        if self._watchers.pop(token, None) is not None:
            await self._use(-1)

    async def find(self, conn: Connection, timeout_s: float) -> BLEDevice:
        """Scan until an advertisement matches ``conn``; raises :class:`LinkLost`."""
        found: asyncio.Future[BLEDevice] = asyncio.get_running_loop().create_future()

        def match(device: BLEDevice, adv: AdvertisementData) -> None:
            if not found.done() and matches(conn, device, adv):
                found.set_result(device)

        token = object()
        try:
            await self.watch(token, match)
        except (BleakError, OSError) as exc:
            raise LinkLost(f"cannot scan: {exc}") from exc
        try:
            return await wait_within(found, timeout_s)
        except TimeoutError:
            raise LinkLost(f"not found within {timeout_s:g} s ({describe(conn)})") from None
        finally:
            await self.unwatch(token)

    async def close(self) -> None:
        self._watchers.clear()
        async with self._lock:
            self._users = 0
            if self._scanner is not None:
                scanner, self._scanner = self._scanner, None
                with contextlib.suppress(BleakError, OSError):
                    await scanner.stop()


def matches(conn: Connection, device: BLEDevice, adv: AdvertisementData) -> bool:
    if conn.address:
        return device.address.upper() == conn.address
    name = adv.local_name or device.name
    if name != conn.name:
        return False
    return conn.serviceUuid is None or conn.serviceUuid in adv.service_uuids


def describe(conn: Connection) -> str:
    if conn.address:
        return f"address {conn.address}"
    return f"name {conn.name!r}" + (f" with service {conn.serviceUuid}" if conn.serviceUuid else "")


@dataclass
class PropState:
    binding: PropertyBinding
    visitor: Visitor
    char: BleakGATTCharacteristic | None = None
    presentation: PresentationFormat | None = None
    raw: bytes = b""  # last bytes read, so that writing one field keeps the others


@dataclass
class DeviceRuntime:
    binding: DeviceBinding
    conn: Connection
    props: dict[str, PropState]
    client: BleakClient | None = None
    online: bool | None = None
    reporting: ReportFilter = field(default_factory=ReportFilter)
    # Values decoded from notifications or advertisements, not yet reported.
    pending: dict[str, Value] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lost: str | None = None
    last_rx: float = 0.0
    notifications: int = 0
    connects: int = 0
    found: BLEDevice | None = None
    # The last session ended cleanly (keepConnected: false cycles): its device may be
    # reconnected without a scan. Any loss clears it: the next attempt scans first.
    reusable: bool = False
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def cycle_s(self) -> float:
        return self.binding.collect_cycle_ms / 1000


async def write_characteristic(
    device_id: str, client: BleakClient, p: PropState, value: Value, request_s: float
) -> Value:
    """Write ``value`` to ``p``'s characteristic and return what it reads back (the value
    written when it cannot be read); failures are :class:`MapperError` naming why."""
    name = p.binding.name
    if p.char is None:
        raise MapperError(f"characteristic {p.visitor.characteristic} not found on {device_id}")
    if not p.raw and "read" in p.char.properties and p.visitor.format == "custom":
        # A field of a larger value is written over the rest of the current value.
        with contextlib.suppress(BleakError, TimeoutError):
            p.raw = bytes(await wait_within(client.read_gatt_char(p.char), request_s))
    try:
        payload = p.visitor.encode(value, p.raw, p.presentation)
    except CodecError as exc:
        raise MapperError(f"cannot encode {value!r} for {name}: {exc}") from None
    response = p.visitor.writeWithResponse
    if response and "write" not in p.char.properties:
        response = False  # the characteristic only takes commands
    try:
        await wait_within(client.write_gatt_char(p.char, payload, response=response), request_s)
        if "read" in p.char.properties:
            data = await wait_within(client.read_gatt_char(p.char), request_s)
            p.raw = bytes(data)
            back = p.visitor.decode(p.raw, p.presentation)
        else:  # write-only: the value written is the best knowledge there is
            back = value
    except TimeoutError:
        raise MapperError(f"write of {name} timed out") from None
    except BleakGATTProtocolError as exc:
        raise MapperError(f"write of {name} refused: {exc}") from None
    except (BleakError, CodecError) as exc:
        raise MapperError(f"write of {name} failed: {exc}") from None
    return back
