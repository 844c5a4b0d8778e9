"""The relay's spec feed through lightkube against the API emulator: only the node's
devices, only what changed since the gateway's resourceVersion, a relist with `synced`
after 410 Gone or with no resourceVersion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.types import PatchType

from edgetwin.cloud.spec_feed import NodeFeed
from edgetwin.cloud.status_writer import Device
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.sync.wire import CLOUD_TO_EDGE, check_message

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[RunningEmulator, AsyncClient]]:
    async with RunningEmulator(Emulator.from_files(CRDS, history=10)) as api:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", "plant")))
        yield api, client
        await client.close()


async def create(client: AsyncClient, name: str, node: str) -> None:
    obj = Device(
        metadata={"name": name, "namespace": "plant"},
        spec={"nodeName": node, "deviceModelRef": {"name": "m"}},
    )
    await client.create(obj, namespace="plant")


class Reader:
    """Collects a feed's messages in the background."""

    def __init__(self, feed: NodeFeed, resume: str) -> None:
        self.got: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run(feed, resume))

    async def _run(self, feed: NodeFeed, resume: str) -> None:
        async for msg in feed.messages(resume):
            check_message(msg, allowed=CLOUD_TO_EDGE)  # every message is valid on the wire
            self.got.append(msg)

    async def until(self, count: int) -> list[dict[str, Any]]:
        for _ in range(250):
            if len(self.got) >= count:
                return self.got
            await asyncio.sleep(0.02)
        raise AssertionError(f"only {self.got}")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def summary(msgs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (
            m["t"],
            m.get("name") or m.get("obj", {}).get("metadata", {}).get("name", ",".join(m.get("names", []))),
        )
        for m in msgs
    ]


async def test_a_new_gateway_gets_its_devices_then_their_changes(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    _, client = cluster
    await create(client, "a1", "edge-a")
    await create(client, "b1", "edge-b")
    feed = NodeFeed(client, Device, "Device", "edge-a")
    reader = Reader(feed, "")
    try:
        assert summary(await reader.until(2)) == [("upsert", "a1"), ("synced", "plant/a1")]
        # The relay's own status writes (no new generation) do not travel to the edge.
        await client.patch(
            Device.Status,
            "a1",
            {"status": {"state": "online"}},
            namespace="plant",
            patch_type=PatchType.MERGE,
        )
        await create(client, "a2", "edge-a")
        await create(client, "b2", "edge-b")  # another node's: never seen
        desired = {"spec": {"properties": [{"name": "setpoint", "desired": {"value": "23"}}]}}
        await client.patch(Device, "a1", desired, namespace="plant", patch_type=PatchType.MERGE)
        await client.delete(Device, "a2", namespace="plant")
        got = await reader.until(5)
        assert summary(got[2:]) == [("upsert", "a2"), ("upsert", "a1"), ("delete", "a2")]
        assert got[3]["obj"]["spec"]["properties"][0]["desired"]["value"] == "23"
    finally:
        await reader.stop()


async def test_resume_sends_only_what_changed_and_relists_when_gone(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    api, client = cluster
    await create(client, "a1", "edge-a")
    await create(client, "a2", "edge-a")
    seen = str(api.emulator.rv)  # what a gateway saw before it went offline
    await client.patch(
        Device, "a2", {"metadata": {"labels": {"x": "1"}}}, namespace="plant", patch_type=PatchType.MERGE
    )
    feed = NodeFeed(client, Device, "Device", "edge-a")
    reader = Reader(feed, seen)
    try:
        assert summary(await reader.until(1)) == [("upsert", "a2")]  # not a1: unchanged
        await asyncio.sleep(0.2)
        assert len(reader.got) == 1 and feed.relists == 0
    finally:
        await reader.stop()
    # A day offline: the API server's history no longer reaches back. 410 -> relist.
    for i in range(15):
        await client.patch(
            Device,
            "a1",
            {"metadata": {"labels": {"n": str(i)}}},
            namespace="plant",
            patch_type=PatchType.MERGE,
        )
    feed = NodeFeed(client, Device, "Device", "edge-a")
    reader = Reader(feed, seen)
    try:
        got = await reader.until(3)
        assert summary(got[:3]) == [("upsert", "a1"), ("upsert", "a2"), ("synced", "plant/a1,plant/a2")]
        assert feed.relists == 1 and got[2]["rv"] == str(api.emulator.rv)
    finally:
        await reader.stop()


async def test_watches_end_at_spread_out_times(
    cluster: tuple[RunningEmulator, AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each watch asks the API server to end it after WATCH_S to 2 x WATCH_S, at random:
    gateways that connected together (after a relay restart) must not all start their
    watches again in the same second, every WATCH_S, for as long as they stay connected."""
    from edgetwin.cloud import spec_feed

    api, client = cluster
    monkeypatch.setattr(spec_feed, "WATCH_S", 100)
    readers = [Reader(NodeFeed(client, Device, "Device", f"edge-{i}"), "") for i in range(30)]
    try:
        for reader in readers:
            await reader.until(1)  # synced: the watch comes next
        for _ in range(250):
            if len(api.emulator.watch_timeouts) >= len(readers):
                break
            await asyncio.sleep(0.02)
        timeouts = list(api.emulator.watch_timeouts)
        assert len(timeouts) == len(readers)
        assert all(t is not None and 100 <= t < 200 for t in timeouts), timeouts
        assert len(set(timeouts)) >= 10, timeouts  # 30 draws from 100 values
    finally:
        for reader in readers:
            await reader.stop()
