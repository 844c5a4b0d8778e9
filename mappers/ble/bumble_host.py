"""One Bumble host per HCI transport and event loop, shared by the bleak scanners and
clients of the Bumble backend (``bumble_backend``), as BlueZ clients share one adapter:
one scan fanned out to every scanner, connection attempts one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bleak.exc import BleakError
from bumble.core import BaseBumbleError
from bumble.core import TimeoutError as BumbleTimeoutError
from bumble.device import Advertisement, Connection, Device
from bumble.hci import Address
from bumble.transport import open_transport

from edgetwin.runtime.aio import Abandoned, wait_within

log = logging.getLogger(__name__)


def plain_address(address: Address) -> str:
    """``F0:00:00:00:00:01/P`` -> ``F0:00:00:00:00:01`` (bleak's form)."""
    return str(address).split("/")[0]


Listener = Callable[[Advertisement], None]

# How long a cancelled connection attempt may take to be confirmed by the controller.
CANCEL_CONFIRM_S = 2.0


class BumbleAdapter:
    """One Bumble host on an HCI transport, shared by the scanners and clients of a loop."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.device: Device | None = None
        self._transport: Any = None
        self._listeners: dict[object, tuple[Listener, bool]] = {}
        self._scanning: bool | None = None  # None: not scanning; else: active?
        self._scan_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._abandoned = Abandoned()  # connection attempts whose callers left, and their closing
        # Addresses (with their type) as last advertised, for clients given a string.
        self.seen: dict[str, Address] = {}

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.source.terminated.done()

    async def open(self) -> None:
        try:
            self._transport = await open_transport(self.spec)
        except (OSError, BaseBumbleError, ValueError) as exc:
            raise BleakError(f"cannot open HCI transport {self.spec!r}: {exc}") from exc
        device = Device.with_hci(
            "edgetwin", Address.generate_static_address(), self._transport.source, self._transport.sink
        )
        device.on(device.EVENT_ADVERTISEMENT, self._on_advertisement)
        try:
            await wait_within(device.power_on(), 10)
        except (TimeoutError, BaseBumbleError) as exc:
            await self.close()
            raise BleakError(f"HCI controller at {self.spec!r} did not power on: {exc!r}") from exc
        self.device = device

    async def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        self._transport = None
        self.device = None

    def _on_advertisement(self, adv: Advertisement) -> None:
        self.seen[plain_address(adv.address)] = adv.address
        for listener, _ in list(self._listeners.values()):
            listener(adv)

    def _need(self) -> Device:
        if self.device is None or not self.alive:
            raise BleakError(f"HCI transport {self.spec!r} is closed")
        return self.device

    async def add_listener(self, token: object, listener: Listener, active: bool) -> None:
        self._listeners[token] = (listener, active)
        await self._rescan()

    async def remove_listener(self, token: object) -> None:
        self._listeners.pop(token, None)
        await self._rescan()

    async def _rescan(self) -> None:
        """Scan while any listener wants to; actively if any wants active scanning."""
        async with self._scan_lock:
            device = self._need()
            want = any(active for _, active in self._listeners.values()) if self._listeners else None
            if want == self._scanning:
                return
            if self._scanning is not None:
                await device.stop_scanning()
                self._scanning = None
            if want is not None:
                await device.start_scanning(active=want, filter_duplicates=False)
                self._scanning = want

    def resolve(self, address: str) -> Address:
        """A bleak address string as a Bumble address with its type: as advertised if
        seen, else random static when its top bits say so, else public."""
        upper = address.upper()
        if upper in self.seen:
            return self.seen[upper]
        kind = (
            Address.RANDOM_DEVICE_ADDRESS
            if int(upper[:2], 16) >> 6 == 0b11
            else Address.PUBLIC_DEVICE_ADDRESS
        )
        return Address(upper, kind)

    async def connect(self, address: Address, timeout: float) -> Connection:  # noqa: ASYNC109 (Bumble's own)
        """Initiate one connection (the controller takes one at a time). On timeout
        Bumble cancels the attempt and waits for the controller to confirm; a
        controller that never confirms (Bumble's stock emulated one) would hold the
        lock for ever, so that wait is bounded too.

        A caller that is cancelled does not cancel the attempt: the controller may
        complete a connection the host no longer expects (Bumble then fails an assertion
        in ``on_le_connection`` and forgets it; the peripheral, connected to nobody,
        stops advertising and stays unreachable). The attempt runs to its end, holding
        the lock, and a connection nobody wants any more is closed."""
        attempt = asyncio.ensure_future(self._attempt(address, timeout))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self._abandoned.add(attempt, then=self._unwanted)
            raise

    def _unwanted(self, attempt: asyncio.Future[Connection]) -> None:
        """An abandoned attempt ended: close the connection it made, if it made one."""
        if not attempt.cancelled() and attempt.exception() is None:
            self._abandoned.add(asyncio.ensure_future(attempt.result().disconnect()))

    async def _attempt(self, address: Address, timeout: float) -> Connection:  # noqa: ASYNC109
        async with self._connect_lock:
            device = self._need()
            try:
                return await wait_within(device.connect(address, timeout=timeout), timeout + CANCEL_CONFIRM_S)
            except (TimeoutError, BumbleTimeoutError):
                raise TimeoutError(
                    f"no connection to {plain_address(address)} within {timeout:g} s"
                ) from None
            except BaseBumbleError as exc:
                raise BleakError(f"connecting to {plain_address(address)} failed: {exc}") from exc


_adapters: dict[tuple[int, str], BumbleAdapter] = {}
_adapters_lock: dict[int, asyncio.Lock] = {}


async def get_adapter(spec: str) -> BumbleAdapter:
    """The running loop's adapter for ``spec``, opened on first use and reopened when
    its transport was lost (a replugged dongle, a restarted controller)."""
    loop = id(asyncio.get_running_loop())
    lock = _adapters_lock.setdefault(loop, asyncio.Lock())
    async with lock:
        adapter = _adapters.get((loop, spec))
        if adapter is not None and adapter.alive:
            return adapter
        if adapter is not None:
            log.warning("HCI transport lost; reopening", extra={"hci": spec})
            await adapter.close()
        adapter = BumbleAdapter(spec)
        await adapter.open()
        _adapters[(loop, spec)] = adapter
        return adapter


async def close_adapters() -> None:
    """Close the running loop's adapters (at shutdown)."""
    loop = id(asyncio.get_running_loop())
    for key in [k for k in _adapters if k[0] == loop]:
        await _adapters.pop(key).close()
