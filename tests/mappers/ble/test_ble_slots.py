"""Connection slots are handed out first come, first served, never exceed the limit,
and a waiter that gives up (cancelled) neither loses nor leaks a slot; devices are
matched by address, or by name and service."""

from __future__ import annotations

import asyncio

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from edgetwin.mappers.ble.config import parse_connection
from edgetwin.mappers.ble.radio import Slots, matches


async def test_slots_are_fifo_and_bounded() -> None:
    slots = Slots(2)
    order: list[int] = []
    running = 0
    peak = 0

    async def user(i: int) -> None:
        nonlocal running, peak
        await slots.acquire()
        order.append(i)
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        slots.release()

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(user(i)))
        await asyncio.sleep(0)  # arrival order 0, 1, 2, ...
    await asyncio.gather(*tasks)
    assert order == list(range(10))
    assert peak == 2 and slots.peak == 2 and slots.free == 2


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.wait_for(second, 1)  # the slot went to the next waiter
    assert slots.in_use == 1
    slots.release()
    assert slots.free == 1
    # Cancelled just as the slot was handed over: it is passed on, not lost.
    await slots.acquire()
    third = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # hands the slot to `third`...
    third.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(third, return_exceptions=True)
    assert slots.free == 1


def adv(name: str | None, uuids: list[str]) -> AdvertisementData:
    return AdvertisementData(name, {}, {}, uuids, None, -50, ())


def test_devices_match_by_address_or_name_and_service() -> None:
    dev = BLEDevice("F0:00:00:00:00:01", "env-1", None)
    by_address = parse_connection("p.d", {"address": "f0:00:00:00:00:01"})
    assert matches(by_address, dev, adv(None, []))
    assert not matches(by_address, BLEDevice("F0:00:00:00:00:02", "env-1", None), adv("env-1", []))
    ess = "0000181a-0000-1000-8000-00805f9b34fb"
    by_name = parse_connection("p.d", {"name": "env-1", "serviceUuid": "181A"})
    assert matches(by_name, dev, adv("env-1", [ess]))
    assert not matches(by_name, dev, adv("env-1", []))  # the service must be advertised
    assert not matches(by_name, dev, adv("env-2", [ess]))
    assert matches(parse_connection("p.d", {"name": "env-1"}), dev, adv(None, []))  # name known to the OS


async def test_a_newcomer_cannot_overtake_a_waiter() -> None:
    slots = Slots(1)
    await slots.acquire()
    got: list[str] = []

    async def take(name: str) -> None:
        await slots.acquire()
        got.append(name)

    waiter = asyncio.create_task(take("waiter"))
    await asyncio.sleep(0)
    slots.release()  # the slot is the waiter's now, even before it runs...
    newcomer = asyncio.create_task(take("newcomer"))  # ...so this one queues behind it
    await asyncio.sleep(0.01)
    assert got == ["waiter"] and not newcomer.done()
    slots.release()
    await asyncio.wait_for(newcomer, 1)
    assert got == ["waiter", "newcomer"]
    await waiter
