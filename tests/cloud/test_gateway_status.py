"""The relay's Gateway resources (cloud/gateway_status.py): what is written, at a bounded
rate, against the API emulator with the relay's RBAC; the sweep for Gateways whose relay
died."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig

from edgetwin.cloud.gateway_status import Gateway, GatewayReporter, GatewayState, GatewayTiming, iso
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.simulators.stack import CRDS, RELAY_USER, relay_rbac
from edgetwin.simulators.stack import until as until_


def test_when_a_write_is_due() -> None:
    timing = GatewayTiming(min_gap_s=5, interval_s=30, heartbeat_s=60)
    s = GatewayState("n")
    assert not s.due(0, timing)
    s.connected, s.transition_due = True, True
    assert s.due(0, timing)  # a connect: at once
    s.transition_due, s.last_write = False, 0
    s.changed = True
    assert not s.due(29, timing) and s.due(30, timing)  # stats: once per interval
    s.changed, s.last_write = False, 30
    assert not s.due(89, timing) and s.due(90, timing)  # heartbeat while connected
    s.connected = False
    assert not s.due(1000, timing)  # nothing to refresh while disconnected
    s.transition_due, s.last_write = True, 998
    assert not s.due(1002, timing) and s.due(1003, timing)  # flapping: at most one per gap


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[RunningEmulator, AsyncClient]]:
    async with RunningEmulator(Emulator.from_files(CRDS, rbac={RELAY_USER: relay_rbac()})) as running:
        config = running.kubeconfig(tmp_path / "kubeconfig", "plant", RELAY_USER)
        client = AsyncClient(config=KubeConfig.from_file(config), field_manager="edgetwin-relay")
        yield running, client
        await client.close()


async def status_of(client: AsyncClient, node: str) -> dict[str, Any]:
    try:
        return (await client.get(Gateway, node)).to_dict().get("status") or {}
    except Exception:
        return {}


async def test_the_gateway_resource_follows_the_stream_and_its_stats(
    api: tuple[RunningEmulator, AsyncClient],
) -> None:
    running, client = api
    clock = [1_800_000_000.0]
    reporter = GatewayReporter(
        client, "relay-0", GatewayTiming(min_gap_s=0.2, interval_s=1.0, heartbeat_s=30), wall=lambda: clock[0]
    )
    task = asyncio.create_task(reporter.run())
    try:
        reporter.connected("edge-01", {"proto": 2, "version": "0.2.0", "store": "abc"})
        reporter.stats("edge-01", {"devices": 3, "devicesNotReady": 1, "backlog": 2, "oldestMs": 90_000})
        await until_(lambda: status_of(client, "edge-01"), within=5)
        status = await status_of(client, "edge-01")
        assert (
            status["conditions"][0]["status"] == "True" and status["conditions"][0]["reason"] == "Streaming"
        )
        assert (status["version"], status["storeId"], status["relay"]) == ("0.2.0", "abc", "relay-0")
        await until_(lambda: backlog_is(client, 2), within=5)
        status = await status_of(client, "edge-01")
        assert (status["devices"], status["devicesNotReady"]) == (3, 1)
        assert status["oldestPendingTime"] == iso(clock[0] - 90)  # the age, made a time at the relay
        # A burst of stats: at most one write per interval.
        writes = reporter.writes
        for backlog in range(3, 103):
            reporter.stats(
                "edge-01", {"devices": 3, "devicesNotReady": 1, "backlog": backlog, "oldestMs": 1000}
            )
            await asyncio.sleep(0.01)
        await until_(lambda: backlog_is(client, 102), within=5)
        assert reporter.writes - writes <= 3
        reporter.stats("edge-01", {"devices": 3, "devicesNotReady": 1, "backlog": 0, "oldestMs": 0})
        await until_(lambda: backlog_is(client, 0), within=5)
        assert "oldestPendingTime" not in await status_of(client, "edge-01")
        reporter.disconnected("edge-01", "LinkDead", "nothing from the gateway for 45 s: the link is dead")
        await until_(lambda: connected_is(client, "edge-01", "False"), within=5)
        condition = (await status_of(client, "edge-01"))["conditions"][0]
        assert condition["reason"] == "LinkDead" and "45 s" in condition["message"]
        assert running.emulator.stats["forbidden"] == 0  # the shipped RBAC is enough
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def backlog_is(client: AsyncClient, want: int) -> bool:
    return bool((await status_of(client, "edge-01")).get("backlog") == want)


async def connected_is(client: AsyncClient, node: str, want: str) -> bool:
    conditions = (await status_of(client, node)).get("conditions") or [{}]
    return bool(conditions[0].get("status") == want)


async def test_gateways_whose_relay_died_are_swept_to_disconnected(
    api: tuple[RunningEmulator, AsyncClient],
) -> None:
    """Relay A wrote two Gateways as connected and died (no disconnect written); relay
    B's sweep marks the stale one NoHeartbeat and leaves the fresh one alone."""
    _, client = api
    now = time.time()
    dead_relay = GatewayReporter(client, "relay-a", wall=lambda: now - 600)
    dead_relay.connected("stale", {"proto": 2})
    await dead_relay._write(dead_relay.nodes["stale"])
    live_relay = GatewayReporter(client, "relay-c")
    live_relay.connected("fresh", {"proto": 2})
    await live_relay._write(live_relay.nodes["fresh"])
    sweeper = GatewayReporter(client, "relay-b", GatewayTiming(heartbeat_s=60, stale_after_s=180))
    await sweeper._sweep()
    stale = (await status_of(client, "stale"))["conditions"][0]
    assert (stale["status"], stale["reason"]) == ("False", "NoHeartbeat")
    assert (await status_of(client, "fresh"))["conditions"][0]["status"] == "True"
