"""The BLE simulator's peripherals on Bumble: environmental sensors with a GATT server
(ESS temperature and humidity, battery, a writable relay), advertisement-only beacons,
and a local link that can drop a connection or silence a device on command."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from bumble import hci, ll
from bumble.controller import Controller
from bumble.device import AdvertisingType, Device
from bumble.gatt import Characteristic, CharacteristicValue, Descriptor, Service
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from edgetwin.mappers.ble.adverts import build_ad

SIM_SERVICE = "E7C10000-5E4D-4B7F-9A3C-6D2F00000000"
RELAY_UUID = "E7C10001-5E4D-4B7F-9A3C-6D2F00000000"
STATUS_UUID = "E7C10002-5E4D-4B7F-9A3C-6D2F00000000"
FLOW_UUID = "E7C10003-5E4D-4B7F-9A3C-6D2F00000000"
BEACON_COMPANY = 0xFFFF  # reserved for tests by the Bluetooth SIG
ADV_INTERVAL_MS = 20

_R = Characteristic.Properties.READ
_N = Characteristic.Properties.NOTIFY
_W = Characteristic.Properties.WRITE
_WNR = Characteristic.Properties.WRITE_WITHOUT_RESPONSE
_READABLE = Characteristic.Permissions.READABLE
_WRITEABLE = Characteristic.Permissions.WRITEABLE


class FaultLink(LocalLink):
    """A virtual radio on which controllers can be silenced (out of range): their
    data and advertisements are lost, link-layer control still passes so a central's
    own disconnect completes."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.silent: set[Controller] = set()

    def send_acl_data(
        self, sender_controller: Any, destination_address: Any, transport: Any, data: bytes
    ) -> None:
        if sender_controller in self.silent:
            return
        if self.find_le_controller(destination_address) in self.silent:
            return
        super().send_acl_data(sender_controller, destination_address, transport, data)

    def send_advertising_pdu(self, sender_controller: Any, packet: ll.AdvertisingPdu) -> None:
        if sender_controller in self.silent:
            return
        super().send_advertising_pdu(sender_controller, packet)


@dataclass
class SensorState:
    temperature: float = 21.5
    humidity: float = 45.0
    pressure: float = 101325.0
    battery: int = 97
    relay: bool = False
    counter: int = 0
    vibration: float = 1.25
    flow: float = 12.3
    heart_rate: int = 72
    writes: list[bytes] = field(default_factory=list)


def _i16(x: float) -> bytes:
    return struct.pack("<h", round(x * 100))


class _Peripheral:
    """An emulated device with its own controller on the virtual radio; its random
    static address is ``{first}:00:00:00:{index:04X}``."""

    def __init__(self, link: FaultLink, index: int, name: str, first: str) -> None:
        self.index, self.name = index, name
        self.address = f"{first}:00:00:00:{index >> 8:02X}:{index & 0xFF:02X}"
        self.controller = Controller(name, link=link, public_address=self.address)
        self.device = Device(
            name=name,
            address=hci.Address(self.address),
            host=Host(self.controller, AsyncPipeSink(self.controller)),
        )


class SimSensor(_Peripheral):
    """One emulated environmental sensor."""

    def __init__(self, link: FaultLink, index: int, name: str) -> None:
        super().__init__(link, index, name, "F0")
        self.state = SensorState(temperature=21.5 + index % 7 * 0.25)
        s = self.state
        self.temperature = Characteristic[bytes](
            "2A6E", _R | _N, _READABLE, CharacteristicValue(read=lambda c: _i16(s.temperature))
        )
        self.humidity = Characteristic[bytes](
            "2A6F",
            _R | _N,
            _READABLE,
            CharacteristicValue(read=lambda c: struct.pack("<H", round(s.humidity * 100))),
        )
        pressure = Characteristic[bytes](
            "2A6D",
            _R,
            _READABLE,
            CharacteristicValue(read=lambda c: struct.pack("<I", round(s.pressure * 10))),
        )
        self.battery = Characteristic[bytes](
            "2A19", _R | _N, _READABLE, CharacteristicValue(read=lambda c: bytes([s.battery]))
        )
        self.heart_rate = Characteristic[bytes]("2A37", _N, _READABLE, b"\x10\x48\x00\x04")
        self.relay = Characteristic[bytes](
            RELAY_UUID,
            _R | _W | _WNR | _N,
            _READABLE | _WRITEABLE,
            CharacteristicValue(read=lambda c: bytes([s.relay]), write=self._write_relay),
        )
        status = Characteristic[bytes](
            STATUS_UUID,
            _R,
            _READABLE,
            CharacteristicValue(
                read=lambda c: struct.pack("<HhB", s.counter & 0xFFFF, round(s.vibration * 100), 0b101)
            ),
        )
        # Presentation format: uint16 (0x06), exponent -1, unit 0x2700 (unitless), namespace SIG.
        self.flow = Characteristic[bytes](
            FLOW_UUID,
            _R | _N,
            _READABLE,
            CharacteristicValue(read=lambda c: struct.pack("<H", round(s.flow * 10))),
            descriptors=[
                Descriptor("2904", _READABLE, struct.pack("<BbHBH", 0x06, -1, 0x2700, 0x01, 0x0000))
            ],
        )
        self.device.add_services(
            [
                Service("181A", [self.temperature, self.humidity, pressure]),
                Service("180F", [self.battery]),
                Service("180D", [self.heart_rate]),
                Service(SIM_SERVICE, [self.relay, status, self.flow]),
            ]
        )

    def _write_relay(self, connection: Any, value: bytes) -> None:
        self.state.writes.append(bytes(value))
        self.state.relay = bool(value and value[0])

    async def start(self) -> None:
        await self.device.power_on()
        await self.device.start_advertising(
            advertising_data=build_ad(name=self.name, service_uuids16=[0x181A, 0x180F]),
            auto_restart=True,
            advertising_interval_min=ADV_INTERVAL_MS,
            advertising_interval_max=ADV_INTERVAL_MS,
        )

    def step(self, t: float) -> None:
        s = self.state
        s.counter += 1
        s.temperature = round(21.5 + self.index % 7 * 0.25 + 2 * math.sin(t / 30 + self.index), 2)
        s.humidity = round(45 + 5 * math.cos(t / 45 + self.index), 2)
        s.flow = round(12 + 3 * math.sin(t / 10 + self.index), 1)
        s.vibration = round(1 + abs(math.sin(t)), 2)
        s.heart_rate = 60 + int(20 * abs(math.sin(t / 20)))
        if s.counter % 600 == 0 and s.battery > 5:
            s.battery -= 1

    async def notify(self) -> None:
        s = self.state
        if not self.device.connections:
            return
        await self.device.notify_subscribers(self.temperature, _i16(s.temperature))
        await self.device.notify_subscribers(self.humidity, struct.pack("<H", round(s.humidity * 100)))
        await self.device.notify_subscribers(self.flow, struct.pack("<H", round(s.flow * 10)))
        # Heart Rate Measurement: flags 0x10 (uint8 bpm, RR present), bpm, one RR interval.
        rr = round(60 / s.heart_rate * 1024)
        await self.device.notify_subscribers(
            self.heart_rate, bytes([0x10, s.heart_rate]) + struct.pack("<H", rr)
        )

    async def drop(self) -> None:
        for connection in list(self.device.connections.values()):
            with contextlib.suppress(Exception):
                await connection.disconnect()


class SimBeacon(_Peripheral):
    """An advertisement-only sensor."""

    def __init__(self, link: FaultLink, index: int, name: str) -> None:
        super().__init__(link, index, name, "F1")
        self.state = SensorState(temperature=18.0 + index % 5 * 0.5)

    def advertising_data(self) -> bytes:
        s = self.state
        payload = struct.pack("<hHB", round(s.temperature * 100), round(s.humidity * 100), s.battery)
        return build_ad(
            name=self.name,
            manufacturer=(BEACON_COMPANY, payload),
            service_data16=(0x181A, _i16(s.temperature)),
            flags=0x04,
        )

    async def start(self) -> None:
        await self.device.power_on()
        await self._advertise()

    async def _advertise(self) -> None:
        await self.device.start_advertising(
            advertising_type=AdvertisingType.UNDIRECTED,
            advertising_data=self.advertising_data(),
            advertising_interval_min=100,
            advertising_interval_max=100,
        )

    async def step(self, t: float) -> None:
        s = self.state
        s.counter += 1
        s.temperature = round(18 + self.index % 5 * 0.5 + math.sin(t / 20 + self.index), 2)
        s.humidity = round(50 + 4 * math.sin(t / 40), 2)
        await self.device.stop_advertising()
        await self._advertise()


class CancellingController(Controller):
    """Bumble's emulated controller with a working LE Create Connection Cancel.

    The stock one (bumble 0.0.236) answers the cancel with success but keeps the
    attempt pending, so after one connect to a silent device times out every later
    LE Create Connection is refused (Command Disallowed) until that device advertises
    again. A real controller ends the attempt and reports it with an LE Connection
    Complete event carrying Unknown Connection Identifier (Core spec Vol 4 Part E
    7.8.13), which is what this one does."""

    def on_hci_le_create_connection_cancel_command(
        self, command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        event = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        # After the Command Complete this method's return value produces.
        asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)
