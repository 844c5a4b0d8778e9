"""A bleak backend onto a Bumble central: bleak's public API (``BleakScanner``,
``BleakClient``) over any HCI transport Bumble opens, without BlueZ.

    BleakClient(device, backend=BumbleClient, hci="tcp-client:127.0.0.1:9000")
    BleakScanner(callback, backend=BumbleScanner, hci="usb:0")

``hci`` is a Bumble transport spec: ``tcp-client:HOST:PORT`` for an emulated controller
(``edgetwin sim ble``, Bumble's controllers app), ``usb:N`` or ``serial:/dev/ttyUSB0,1000000``
for a dongle. Every scanner and client with the same ``hci`` in one event loop shares one
Bumble host (:class:`BumbleAdapter`), as BlueZ clients share one adapter: one scan fanned
out to all scanners, and connection attempts one at a time (an LE controller initiates
one connection at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from bleak.args import SizedBuffer
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble import att
from bumble.core import BaseBumbleError
from bumble.core import TimeoutError as BumbleTimeoutError
from bumble.device import Advertisement, Connection, Peer
from bumble.hci import Address

from edgetwin.mappers.ble.adverts import ParsedAdvert, parse_ad
from edgetwin.mappers.ble.bumble_host import BumbleAdapter, close_adapters, get_adapter, plain_address
from edgetwin.runtime.aio import Abandoned, wait_within

log = logging.getLogger(__name__)

_PROPERTY_NAMES = (
    (0x01, "broadcast"),
    (0x02, "read"),
    (0x04, "write-without-response"),
    (0x08, "write"),
    (0x10, "notify"),
    (0x20, "indicate"),
    (0x40, "authenticated-signed-writes"),
    (0x80, "extended-properties"),
)


def _uuid128(uuid: Any) -> str:
    return str(uuid.to_hex_str("-")).lower() if len(uuid.uuid_bytes) == 16 else _short(uuid)


def _short(uuid: Any) -> str:
    from edgetwin.mappers.ble.codec import normalize_uuid

    return normalize_uuid(uuid.to_hex_str())


def _advertisement_data(adv: Advertisement, parsed: ParsedAdvert) -> AdvertisementData:
    return AdvertisementData(
        local_name=parsed.local_name,
        manufacturer_data=dict(parsed.manufacturer_data),
        service_data=dict(parsed.service_data),
        service_uuids=list(parsed.service_uuids),
        tx_power=parsed.tx_power,
        rssi=adv.rssi,
        platform_data=(adv,),
    )


class BumbleScanner(BaseBleakScanner):
    """bleak scanner backend on a Bumble host; pass ``hci=`` (a Bumble transport spec)."""

    def __init__(
        self,
        detection_callback: Any,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        hci: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        if self._service_uuids is not None:  # "180F" matches as the 128-bit form adverts carry
            from edgetwin.mappers.ble.codec import normalize_uuid

            self._service_uuids = [normalize_uuid(u) for u in self._service_uuids]
        self._hci = hci
        self._active = scanning_mode != "passive"
        self._adapter: BumbleAdapter | None = None
        self._merged: dict[str, ParsedAdvert] = {}

    async def start(self) -> None:
        self.seen_devices = {}
        self._merged = {}
        self._adapter = await get_adapter(self._hci)
        await self._adapter.add_listener(self, self._on_advertisement, self._active)

    async def stop(self) -> None:
        if self._adapter is not None:
            with contextlib.suppress(BleakError):
                await self._adapter.remove_listener(self)

    def _on_advertisement(self, adv: Advertisement) -> None:
        address = plain_address(adv.address)
        parsed = parse_ad(adv.data_bytes)
        merged = self._merged.get(address)
        if merged is None:
            merged = self._merged[address] = parsed
        else:
            merged.merge(parsed)
        if not self.is_allowed_uuid(merged.service_uuids):
            return
        data = _advertisement_data(adv, merged)
        device = self.create_or_update_device(address, address, merged.local_name, adv.address, data)
        self.call_detection_callbacks(device, data)


class BumbleClient(BaseBleakClient):
    """bleak client backend on a Bumble host; pass ``hci=`` (a Bumble transport spec)."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        hci: str,
        services: set[str] | None = None,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        self._hci = hci
        self._bumble_address = (
            address_or_ble_device.details
            if isinstance(address_or_ble_device, BLEDevice)
            and isinstance(address_or_ble_device.details, Address)
            else None
        )
        self._name = address_or_ble_device.name if isinstance(address_or_ble_device, BLEDevice) else None
        self._service_filter = services
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._closing = False
        self._lost: asyncio.Future[None] | None = None  # resolved when the link goes
        self._abandoned = Abandoned()  # GATT operations whose callers left
        self._disconnecting = False  # disconnect() is closing the connection

    @property
    def name(self) -> str:
        return self._name or self.address

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection is not None else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if pair:
            raise BleakError("the Bumble backend does not pair; use an unpaired (Just Works) device")
        adapter = await get_adapter(self._hci)
        address = self._bumble_address or adapter.resolve(self.address)
        timeout = kwargs.get("timeout", self._timeout)
        connection = await adapter.connect(address, timeout)
        self._connection = connection
        self._closing = False
        self._lost = asyncio.get_running_loop().create_future()
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            self._peer = Peer(connection)
            self.services = await wait_within(
                self._gatt("service discovery", self._discover(self._peer)), timeout
            )
        except BaseException as exc:
            await self.disconnect()
            if isinstance(exc, TimeoutError | BumbleTimeoutError):
                raise TimeoutError(f"service discovery on {self.address} timed out") from None
            if isinstance(exc, BaseBumbleError):
                raise BleakError(f"service discovery on {self.address} failed: {exc}") from exc
            raise

    async def _discover(self, peer: Peer) -> BleakGATTServiceCollection:
        from bumble.core import UUID

        wanted = [UUID(u) for u in self._service_filter] if self._service_filter else []
        await peer.discover_services(wanted)
        collection = BleakGATTServiceCollection()
        connection = peer.connection
        for service in peer.services:
            await peer.discover_characteristics(service=service)
            bleak_service = BleakGATTService(service, service.handle, _uuid128(service.uuid))
            collection.add_service(bleak_service)
            for char in service.characteristics:
                await peer.discover_descriptors(characteristic=char)
                props = cast(Any, [name for bit, name in _PROPERTY_NAMES if char.properties & bit])
                bleak_char = BleakGATTCharacteristic(
                    char,
                    char.handle,
                    _uuid128(char.uuid),
                    props,
                    lambda: connection.att_mtu - 3,
                    bleak_service,
                )
                collection.add_characteristic(bleak_char)
                for desc in char.descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(desc, desc.handle, _uuid128(desc.type), bleak_char)
                    )
        return collection

    def _on_disconnection(self, reason: int) -> None:
        self._connection = None
        self._peer = None
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._end_abandoned()
        if not self._closing and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        connection = self._connection
        self._closing = True
        if connection is None:
            return
        self._connection = None
        self._peer = None
        self._disconnecting = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        try:
            with contextlib.suppress(BaseBumbleError, TimeoutError, OSError):
                await wait_within(connection.disconnect(), 5)
        finally:
            self._disconnecting = False
            self._end_abandoned()

    def _end_abandoned(self) -> None:
        """The connection is gone (no response can come any more): end the operations
        left running for it, which would otherwise wait for Bumble's 30 s ATT timeout
        (one queued behind another request never had its request sent)."""
        self._abandoned.cancel_all()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise BleakError("the Bumble backend does not pair")

    async def unpair(self) -> None:
        raise BleakError("the Bumble backend does not pair")

    def _need_peer(self) -> Peer:
        if self._peer is None:
            raise BleakError(f"not connected to {self.address}")
        return self._peer

    async def _gatt(self, what: str, coro: Any) -> Any:
        """Run one GATT operation; it fails at once when the link goes (Bumble would
        otherwise wait for the ATT timeout of 30 s).

        An operation whose caller is cancelled is left to finish on its own, never
        cancelled: ATT has one request in flight per bearer and Bumble matches a response
        to whichever request is pending, so a request abandoned after it was sent would
        have its response taken as the answer to the next one (a battery level read as a
        pressure), or set on a cancelled future (``InvalidStateError`` in ``on_packet``).
        It ends with its response, Bumble's ATT timeout, or when the connection is gone
        (:meth:`_end_abandoned`), and never outlives the connection."""
        lost = self._lost
        if lost is None:
            coro.close()
            raise BleakError(f"{what} on {self.address}: not connected")
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandoned.add(task)
            raise
        if not task.done():
            if self._disconnecting:  # ours, still closing: a response may yet arrive
                self._abandoned.add(task)  # ended once it is closed
            else:  # gone: nothing can answer it any more
                task.cancel()
            raise BleakError(f"{what} on {self.address}: disconnected")
        if task.cancelled():
            raise BleakError(f"{what} on {self.address}: disconnected")
        try:
            return task.result()
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from exc
        except (TimeoutError, BumbleTimeoutError):
            raise TimeoutError(f"{what} on {self.address} timed out") from None
        except BaseBumbleError as exc:
            raise BleakError(f"{what} on {self.address} failed: {exc}") from exc

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._need_peer()
        return bytearray(await self._gatt(f"read {characteristic.uuid}", peer.read_value(characteristic.obj)))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._need_peer()
        return bytearray(
            await self._gatt(f"read descriptor {descriptor.uuid}", peer.read_value(descriptor.obj))
        )

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        peer = self._need_peer()
        await self._gatt(
            f"write {characteristic.uuid}",
            peer.write_value(characteristic.obj, bytes(data), with_response=response),
        )

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        peer = self._need_peer()
        await self._gatt(
            f"write descriptor {descriptor.uuid}",
            peer.write_value(descriptor.obj, bytes(data), with_response=True),
        )

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        peer = self._need_peer()

        def deliver(value: bytes) -> None:
            callback(bytearray(value))

        await self._gatt(f"subscribe {characteristic.uuid}", peer.subscribe(characteristic.obj, deliver))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        peer = self._need_peer()
        await self._gatt(f"unsubscribe {characteristic.uuid}", peer.unsubscribe(characteristic.obj))


__all__ = ["BumbleAdapter", "BumbleClient", "BumbleScanner", "close_adapters", "get_adapter"]
