"""A half-open link is noticed within 30 s while both directions are busy: the sync
promise that takes longest to check, in its own module so that it runs beside the
others (scripts/test runs one module per worker)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from edgetwin.simulators.stack import Stack, until
from tests.harness.processes import Mosquitto
from tests.sync.promises import PROPS, fleet, publish_many, report


@pytest.mark.parametrize("kbit", [64, 9.6])
async def test_a_half_open_link_is_noticed_within_30_s_while_both_directions_are_busy(
    stack_factory: Any, mosquitto: Mosquitto, kbit: float
) -> None:
    """Status pours up (200 devices x 10 values) and Devices pour down (a relist of 150
    cluster Devices) at 64 or 9.6 kbit/s; the link neither drops while it is healthy nor
    stays up longer than 30 s once it silently drops everything."""
    link_bps = kbit * 1000
    stack = await stack_factory(
        fleet(200),
        link_bps=link_bps,
        uplink={"budget_bps": int(link_bps / 8 * 0.8)},
    )
    gw = stack.gateway
    await stack.connected()
    # Busy both ways: a relist and a steady stream of spec changes (down), values that
    # take some 30 s of the link (up; random, so compression cannot shrink them).
    await stack.apply(fleet(200) + fleet(150, prefix="c")[1:])
    await asyncio.to_thread(
        publish_many,
        mosquitto.port,
        [
            report(f"s{i:03d}", {p["name"]: os.urandom(int(kbit * 1.6)).hex() + str(i) for p in PROPS})
            for i in range(200)
        ],
    )
    changing = asyncio.create_task(_keep_changing_specs(stack, 150))
    await asyncio.sleep(10)
    assert gw.uplink.connects == 1, "a healthy (busy) stream was dropped"
    up, down = stack.link.bytes_up, stack.link.bytes_down
    # Traffic both ways before the fault (a loaded machine may take more than a moment
    # to move the next frame down; the fault must still hit a stream carrying both).
    await until(
        lambda: stack.link.bytes_up > up and stack.link.bytes_down > down, within=10, what="traffic both ways"
    )
    assert gw.engine.outbox, "the drain already finished: the link was not busy when faulted"
    stack.link.blackhole(True)
    changing.cancel()
    noticed = await until(lambda: not gw.uplink.connected.is_set(), within=35, what="the dead link noticed")
    assert noticed <= 30, noticed
    # Back: it reconnects and everything gets through.
    stack.link.restore()
    await stack.connected(60)
    await until(lambda: not gw.engine.outbox, within=600, every=0.5, what="the outbox drained")
    twins = await stack.status_twins("s199")
    assert twins["p3"]["reported"]["value"].endswith("199")


async def _keep_changing_specs(stack: Stack, count: int) -> None:
    """Spec changes (new generations) of the cluster's devices, one every 100 ms."""
    from lightkube.types import PatchType

    from edgetwin.cloud.status_writer import Device

    i = 0
    while True:
        patch = {"spec": {"properties": [{"name": "p0", "collectCycle": 1000 + i}]}}
        await stack.client.patch(
            Device, f"c{i % count:03d}", patch, namespace="plant", patch_type=PatchType.MERGE
        )
        i += 1
        await asyncio.sleep(0.1)
