"""The BLE mapper runtime on bleak's public API (``BleakScanner``, ``BleakClient``).

* One scanner per mapper, running only while a device is being looked for or an
  advertisement-only device is served; found devices are matched by address, or by
  advertised name (and service UUID).
* Connection slots: at most ``maxConnections`` connections at once, handed out first
  come, first served (:class:`Slots`). A ``keepConnected`` device holds its slot while
  connected; a ``keepConnected: false`` device connects each collectCycle, reads and
  lets go, so more devices than slots are served in turn.
* Per connected device: characteristics resolved once per connection, presentation
  format descriptors read, notifications subscribed (again after every reconnect), the
  other properties read each collectCycle. Notifications faster than the store commits
  are coalesced to the latest value per property (the bound: one pending value per
  property).
* A disconnect, a read that times out, or ``silenceTimeout`` without any value marks the
  device offline; reconnects back off exponentially with jitter. An ATT error or an
  undecodable value marks only that property (``readError``).
* Backends: bleak's platform default (BlueZ on Linux), or a Bumble central when the
  mapper option ``hci`` is set (``mappers: {ble: {hci: "tcp-client:127.0.0.1:9000"}}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError, BleakGATTProtocolError

from edgetwin.mappers.ble.codec import PRESENTATION_DESCRIPTOR, CodecError, PresentationFormat
from edgetwin.mappers.ble.config import parse_connection, parse_visitor
from edgetwin.mappers.ble.radio import (
    DEFAULT_MAX_CONNECTIONS,
    DIRECT_CONNECT_S,
    FRESH_ADVERT_S,
    AdvertCallback,
    DeviceRuntime,
    Discovery,
    LinkLost,
    PropState,
    Slots,
    matches,
    now_ms,
    write_characteristic,
)
from edgetwin.mappers.sdk import (
    DeviceBinding,
    DeviceUnavailable,
    Mapper,
    MapperError,
    MapperHost,
    Value,
    cancel_tasks,
)
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)


class BleMapper(Mapper):
    """``protocolName: ble`` devices over bleak."""

    protocol: ClassVar[str] = "ble"
    OPTIONS: ClassVar[tuple[str, ...]] = ("hci", "adapter", "maxConnections", "reconnectMin", "reconnectMax")

    def __init__(self, host: MapperHost, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(host, options)
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise MapperError(
                f"mappers.ble: unknown option {unknown[0]!r} (known: {', '.join(self.OPTIONS)})"
            )
        self.hci: str | None = self.options.get("hci")
        self.adapter: str | None = self.options.get("adapter")
        size = self.options.get("maxConnections", DEFAULT_MAX_CONNECTIONS)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise MapperError(f"mappers.ble.maxConnections: a positive integer, not {size!r}")
        self.slots = Slots(size)
        from edgetwin.deviceapi.types import parse_duration_ms

        try:
            self.retry_min_s = parse_duration_ms(self.options.get("reconnectMin", "500ms")) / 1000
            self.retry_max_s = parse_duration_ms(self.options.get("reconnectMax", "30s")) / 1000
        except ValueError as exc:
            raise MapperError(f"mappers.ble.reconnectMin/reconnectMax: {exc}") from None
        if not 0 < self.retry_min_s <= self.retry_max_s:
            raise MapperError("mappers.ble: need 0 < reconnectMin <= reconnectMax")
        self.devices: dict[str, DeviceRuntime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._by_device: dict[str, asyncio.Task[None]] = {}
        self.discovery = Discovery(self._scanner)

    # --- backend selection ------------------------------------------------------------

    def _backend_kwargs(self) -> dict[str, Any]:
        if self.hci:
            from edgetwin.mappers.ble.bumble_backend import BumbleClient

            return {"backend": BumbleClient, "hci": self.hci}
        return {"bluez": {"adapter": self.adapter}} if self.adapter else {}

    def _scanner(self, callback: AdvertCallback) -> BleakScanner:
        if self.hci:
            from edgetwin.mappers.ble.bumble_backend import BumbleScanner

            return BleakScanner(callback, backend=BumbleScanner, hci=self.hci)
        return BleakScanner(callback, bluez={"adapter": self.adapter} if self.adapter else {})

    # --- lifecycle --------------------------------------------------------------------

    @classmethod
    def validate(cls, device: DeviceBinding) -> None:
        conn = parse_connection(device.id, device.config)
        for prop in device.properties:
            parse_visitor(device.id, conn, prop)

    async def start(self, devices: list[DeviceBinding]) -> None:
        for device in devices:
            await self.add_device(device)

    async def add_device(self, device: DeviceBinding) -> None:
        await self.remove_device(device.id)
        conn = parse_connection(device.id, device.config)
        props = {p.name: PropState(p, parse_visitor(device.id, conn, p)) for p in device.properties}
        rt = DeviceRuntime(device, conn, props)
        self.devices[device.id] = rt
        run = self._run_advertised if conn.source == "advertisement" else self._run_connected
        task = asyncio.create_task(run(rt), name=f"ble {device.id}")
        self._tasks.append(task)
        self._by_device[device.id] = task

    async def remove_device(self, device_id: str) -> None:
        """Stop serving a device: its loop ends, its connection (and slot) is released,
        an advertisement device stops watching the scanner."""
        self.devices.pop(device_id, None)
        task = self._by_device.pop(device_id, None)
        if task is not None:
            self._tasks.remove(task)
            await cancel_tasks([task])

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        self._by_device.clear()
        await self.discovery.close()
        if self.hci:
            from edgetwin.mappers.ble.bumble_backend import close_adapters

            await close_adapters()

    # --- connected devices ------------------------------------------------------------

    async def _set_online(self, rt: DeviceRuntime, online: bool, reason: str = "") -> None:
        if rt.online is online:
            return
        rt.online = online
        if online:
            log.info("ble device online", extra={"device": rt.binding.id})
        else:
            log.warning("ble device offline", extra={"device": rt.binding.id, "error": reason})
        await self.host.set_state(rt.binding.id, "online" if online else "offline")

    async def _run_connected(self, rt: DeviceRuntime) -> None:
        delay = self.retry_min_s
        while True:
            started = time.monotonic()
            try:
                await self._session(rt)
                delay = self.retry_min_s
            except Exception as exc:
                if not isinstance(exc, LinkLost | BleakError | TimeoutError | OSError):
                    # A bug must not end the device's loop; log it and carry on.
                    log.error("ble session failed", extra={"device": rt.binding.id}, exc_info=exc)
                # Lost, or never reached: look for it (a scan) before connecting again.
                rt.found, rt.reusable = None, False
                if rt.online:  # it was up: a fresh outage starts from the shortest delay
                    delay = self.retry_min_s
                await self._set_online(rt, False, str(exc) or type(exc).__name__)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(self.retry_max_s, delay * 2)
                continue
            if not rt.conn.keepConnected:
                await asyncio.sleep(max(0.0, started + rt.cycle_s - time.monotonic()))

    async def _locate(self, rt: DeviceRuntime) -> BLEDevice:
        """The device to connect to: scanned for (before a slot is taken, so a device
        out of range holds none), unless it was seen advertising just now, or it ended
        its last cycle cleanly (keepConnected: false devices, sparing a scan per
        cycle; their direct connect gets only DIRECT_CONNECT_S)."""
        found = rt.found
        if found is not None and (rt.reusable or self.discovery.seen_within(found.address, FRESH_ADVERT_S)):
            return found
        rt.found = await self.discovery.find(rt.conn, rt.conn.scanTimeout / 1000)
        return rt.found

    async def _fresh(self, rt: DeviceRuntime, ble_device: BLEDevice) -> BLEDevice:
        """After waiting for a slot: the device again if its advert went stale meanwhile
        (it may have left), so no connection is initiated to an absent device."""
        if rt.reusable or self.discovery.seen_within(ble_device.address, FRESH_ADVERT_S):
            return ble_device
        rt.found = await self.discovery.find(rt.conn, rt.conn.scanTimeout / 1000)
        return rt.found

    async def _connect(self, rt: DeviceRuntime, ble_device: BLEDevice) -> BleakClient:
        conn = rt.conn
        rt.lost = None

        def on_disconnect(_client: BleakClient) -> None:
            rt.lost = "disconnected"
            rt.wake.set()

        timeout_s = conn.connectTimeout / 1000
        if rt.reusable and not self.discovery.seen_within(ble_device.address, FRESH_ADVERT_S):
            timeout_s = min(timeout_s, DIRECT_CONNECT_S)
        client = BleakClient(
            ble_device, disconnected_callback=on_disconnect, timeout=timeout_s, **self._backend_kwargs()
        )
        try:
            await wait_within(client.connect(), timeout_s + 1)
        except TimeoutError:
            raise LinkLost(f"connect timed out after {timeout_s:g} s") from None
        except BleakError as exc:
            raise LinkLost(f"connect failed: {exc}") from None
        rt.connects += 1
        return client

    async def _session(self, rt: DeviceRuntime) -> None:
        """One connection: connect, prepare, then serve until lost (or one cycle)."""
        ble_device = await self._locate(rt)
        await self.slots.acquire()
        try:
            try:
                client = await self._connect(rt, await self._fresh(rt, ble_device))
            except LinkLost:
                rt.found = None  # scan again next time: it may have moved or changed address
                raise
            rt.reusable = False  # until this session ends cleanly
            try:
                await self._prepare(rt, client)
                rt.client = client
                rt.last_rx = time.monotonic()
                await self._set_online(rt, True)
                # Everything readable, notified properties included (their first value).
                await self._read_and_report(rt, client, include_notified=True)
                if rt.conn.keepConnected:
                    await self._serve(rt, client)
                rt.reusable = True
            finally:
                rt.client = None
                with contextlib.suppress(BleakError, TimeoutError, OSError):
                    await wait_within(client.disconnect(), 5)
        finally:
            self.slots.release()

    async def _prepare(self, rt: DeviceRuntime, client: BleakClient) -> None:
        """Resolve characteristics, read presentation formats, subscribe notifications."""
        errors: dict[str, str] = {}
        services = client.services
        for name, prop in rt.props.items():
            v = prop.visitor
            assert v.characteristic is not None
            prop.char = None
            try:
                if v.service is not None:
                    svc = services.get_service(v.service)
                    char = svc.get_characteristic(v.characteristic) if svc is not None else None
                else:
                    char = services.get_characteristic(v.characteristic)
            except BleakError as exc:  # e.g. the UUID is on several services: name one
                errors[name] = f"characteristic {v.characteristic}: {exc} (set service)"
                continue
            if char is None:
                errors[name] = f"characteristic {v.characteristic} not found on the device"
                continue
            prop.char = char
            if v.format == "presentation" and prop.presentation is None:
                desc = char.get_descriptor(PRESENTATION_DESCRIPTOR)
                if desc is None:
                    errors[name] = f"characteristic {v.characteristic} has no presentation format descriptor"
                    continue
                try:
                    raw = await wait_within(client.read_gatt_descriptor(desc.handle), self._request_s(rt))
                    prop.presentation = PresentationFormat.parse(bytes(raw))
                except (CodecError, BleakGATTProtocolError) as exc:
                    errors[name] = f"presentation format: {exc}"
                    continue
            if v.notify:
                try:
                    await wait_within(
                        client.start_notify(char, self._notify_handler(rt, name)), self._request_s(rt)
                    )
                except BleakGATTProtocolError as exc:  # refused by the device: this property only
                    errors[name] = f"cannot subscribe: {exc}"
        if errors:
            await self.host.report_errors(rt.binding.id, errors)

    def _request_s(self, rt: DeviceRuntime) -> float:
        return rt.conn.requestTimeout / 1000

    def _notify_handler(
        self, rt: DeviceRuntime, name: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        prop = rt.props[name]

        def on_notify(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            rt.notifications += 1
            rt.last_rx = time.monotonic()
            prop.raw = bytes(data)
            try:
                rt.pending[name] = prop.visitor.decode(prop.raw, prop.presentation)
            except CodecError as exc:
                rt.errors[name] = f"cannot decode: {exc}"
            rt.wake.set()

        return on_notify

    async def _read_props(
        self, rt: DeviceRuntime, client: BleakClient, include_notified: bool
    ) -> dict[str, Value]:
        values: dict[str, Value] = {}
        for name, prop in rt.props.items():
            char = prop.char
            if (
                char is None
                or "read" not in char.properties
                or (prop.visitor.notify and not include_notified)
            ):
                continue
            try:
                data = await wait_within(client.read_gatt_char(char), self._request_s(rt))
            except TimeoutError:
                raise LinkLost(f"read of {name} timed out after {self._request_s(rt):g} s") from None
            except BleakGATTProtocolError as exc:
                rt.errors[name] = f"ATT error: {exc}"
                continue
            except BleakError as exc:
                raise LinkLost(f"read of {name} failed: {exc}") from None
            rt.last_rx = time.monotonic()
            prop.raw = bytes(data)
            try:
                values[name] = prop.visitor.decode(prop.raw, prop.presentation)
            except CodecError as exc:
                rt.errors[name] = f"cannot decode: {exc}"
        return values

    async def _read_and_report(
        self, rt: DeviceRuntime, client: BleakClient, include_notified: bool = True
    ) -> None:
        values = await self._read_props(rt, client, include_notified)
        await self._flush(rt, values)

    async def _flush(self, rt: DeviceRuntime, values: dict[str, Value] | None = None) -> None:
        """Report read values plus pending notifications, and errors, under each
        property's report strategy."""
        merged = dict(rt.pending)
        rt.pending.clear()
        if values:
            merged.update(values)
        if rt.errors:
            errors, rt.errors = rt.errors, {}
            await self.host.report_errors(rt.binding.id, errors)
        if not merged:
            return
        rules = {
            n: (rt.props[n].visitor.report, rt.props[n].visitor.deadband, rt.props[n].binding.report_cycle_ms)
            for n in merged
        }
        due = rt.reporting.due(merged, rules, time.monotonic())
        if due:
            await self.host.report(rt.binding.id, due, now_ms())

    async def _serve(self, rt: DeviceRuntime, client: BleakClient) -> None:
        """Stay connected: report notifications as they come, read the rest each cycle,
        watch for silence; return never, raise :class:`LinkLost` when the link goes."""
        polled = any(p.char is not None and not p.visitor.notify for p in rt.props.values())
        silence_s = (rt.conn.silenceTimeout or 0) / 1000
        next_read = time.monotonic() + rt.cycle_s
        while True:
            if rt.lost is not None or not client.is_connected:
                raise LinkLost(rt.lost or "disconnected")
            now = time.monotonic()
            if polled and now >= next_read:
                await self._read_and_report(rt, client, include_notified=False)
                next_read = max(next_read + rt.cycle_s, time.monotonic())
            elif rt.pending or rt.errors:
                await self._flush(rt)
            now = time.monotonic()
            if silence_s and now - rt.last_rx > silence_s:
                raise LinkLost(f"no data for {now - rt.last_rx:.1f} s (silenceTimeout)")
            deadlines = [next_read if polled else now + 1.0]
            if silence_s:
                deadlines.append(rt.last_rx + silence_s)
            wait = max(0.0, min(deadlines) - now)
            rt.wake.clear()
            if rt.pending or rt.lost is not None:
                continue
            with contextlib.suppress(TimeoutError):
                await wait_within(rt.wake.wait(), wait)

    # --- advertisement devices -----------------------------------------------------------

    async def _run_advertised(self, rt: DeviceRuntime) -> None:
        conn = rt.conn
        silence_s = (conn.silenceTimeout or 30_000) / 1000

        def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
            if not matches(conn, device, adv):
                return
            seen = False
            for name, prop in rt.props.items():
                v = prop.visitor
                data = (
                    adv.manufacturer_data.get(v.manufacturerId)
                    if v.manufacturerId is not None
                    else adv.service_data.get(v.serviceData or "")
                )
                if data is None:
                    continue
                seen = True
                try:
                    rt.pending[name] = v.decode(bytes(data))
                except CodecError as exc:
                    rt.errors[name] = f"cannot decode: {exc}"
            if seen:
                rt.notifications += 1
                rt.last_rx = time.monotonic()
                rt.wake.set()

        token = object()
        delay = self.retry_min_s
        while True:
            try:
                await self.discovery.watch(token, on_advert)
                break
            except (BleakError, OSError) as exc:
                await self._set_online(rt, False, f"cannot scan: {exc}")
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(self.retry_max_s, delay * 2)
        try:
            rt.last_rx = time.monotonic()
            next_report = 0.0
            while True:
                now = time.monotonic()
                if rt.pending and now >= next_report:
                    await self._set_online(rt, True)
                    await self._flush(rt)
                    next_report = now + rt.cycle_s
                elif rt.errors:
                    await self._flush(rt)
                if now - rt.last_rx > silence_s:
                    await self._set_online(rt, False, f"no advertisement for {silence_s:g} s")
                rt.wake.clear()
                wait = min(silence_s, max(0.0, next_report - now) if rt.pending else silence_s)
                with contextlib.suppress(TimeoutError):
                    await wait_within(rt.wake.wait(), max(wait, 0.01))
        finally:
            await self.discovery.unwatch(token)

    # --- writes ---------------------------------------------------------------------------

    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        rt = self.devices.get(device.id)
        if rt is None or prop not in rt.props:
            raise MapperError(f"{device.id} has no BLE property {prop!r}")
        p = rt.props[prop]
        async with rt.write_lock:
            if rt.client is not None and rt.client.is_connected:
                await self._write_on(rt, rt.client, p, value)
            elif rt.conn.keepConnected:
                raise DeviceUnavailable(f"{device.id} is not connected; the write is retried when it is")
            else:
                try:
                    ble_device = await self._locate(rt)
                except LinkLost as exc:
                    raise DeviceUnavailable(f"cannot reach {device.id}: {exc}") from None
                await self.slots.acquire()
                try:
                    try:
                        client = await self._connect(rt, await self._fresh(rt, ble_device))
                    except LinkLost as exc:
                        rt.found, rt.reusable = None, False
                        raise DeviceUnavailable(f"cannot reach {device.id}: {exc}") from None
                    try:
                        await self._prepare(rt, client)
                        await self._write_on(rt, client, p, value)
                    finally:
                        with contextlib.suppress(BleakError, TimeoutError, OSError):
                            await wait_within(client.disconnect(), 5)
                finally:
                    self.slots.release()

    async def _write_on(self, rt: DeviceRuntime, client: BleakClient, p: PropState, value: Value) -> None:
        back = await write_characteristic(rt.binding.id, client, p, value, self._request_s(rt))
        rt.reporting.forget(p.binding.name)
        await self.host.report(rt.binding.id, {p.binding.name: back}, now_ms())
