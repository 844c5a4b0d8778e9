"""The relay's own API request rate (apiQPS, apiBurst): a token bucket every request of
its Kubernetes client passes, so a reconnect storm cannot exceed it and loses nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightkube import AsyncClient, KubeConfig

from edgetwin.cloud import ops
from edgetwin.cloud.api_rate import ApiRateLimit
from edgetwin.cloud.status_writer import Device, StatusWriter
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))


def most_in_any_window(times: list[float], qps: float, burst: int) -> float:
    """The largest excess over the bucket's allowance: for every pair of requests i <= j,
    (j - i + 1) - (burst + qps * (t_j - t_i)). At most 0 when the rate was kept."""
    worst = float("-inf")
    for i in range(len(times)):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (burst + qps * (times[j] - times[i])))
    return worst


class RecordingLimit(ApiRateLimit):
    """The bucket, noting when it let each request go."""

    def __init__(self, qps: float, burst: int) -> None:
        super().__init__(qps, burst)
        self.sent: list[float] = []

    async def acquire(self) -> float:
        waited = await super().acquire()
        self.sent.append(self.clock())
        return waited


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@given(
    qps=st.floats(0.5, 500),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_the_bucket_never_lets_more_through_than_burst_plus_rate(
    qps: float, burst: int, gaps: list[float]
) -> None:
    fake = FakeTime()
    limit = ApiRateLimit(qps, burst, clock=fake.clock)
    times: list[float] = []

    async def run() -> None:
        real_sleep = asyncio.sleep
        asyncio.sleep = fake.sleep  # type: ignore[assignment]
        try:
            for gap in gaps:
                fake.now += gap
                await limit.acquire()
                times.append(fake.now)
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]

    asyncio.run(run())
    assert most_in_any_window(times, qps, burst) <= 1e-6
    # ...and it waits no longer than it must: a request waits only when the bucket is dry.
    assert limit.waited_s <= sum(1 / qps for _ in gaps) + 1e-6


def test_no_limit_and_bad_settings() -> None:
    assert asyncio.run(ApiRateLimit(0, 1).acquire()) == 0.0
    with pytest.raises(ValueError, match="burst"):
        ApiRateLimit(10, 0)


async def test_a_storm_of_status_writes_keeps_the_api_rate_and_loses_nothing(tmp_path: Path) -> None:
    """60 devices' status at once through a client held to 40 requests/s, burst 10:
    every status lands, and the API server never saw more than the bucket allows."""
    qps, burst, devices = 40.0, 10, 60
    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", "plant")))
        for i in range(devices):
            await client.create(
                Device(
                    metadata={"name": f"d{i}", "namespace": "plant"},
                    spec={"nodeName": "edge-a", "deviceModelRef": {"name": "m"}},
                ),
                namespace="plant",
            )
        limit = RecordingLimit(qps, burst)
        ops.instrument(client, limit)
        api.emulator.request_times.clear()
        writer = StatusWriter(client, "edge-a", min_interval_s=0)
        started = time.monotonic()
        futures = [
            writer.submit(
                "plant",
                f"d{i}",
                1,
                {
                    "state": "online",
                    "twins": {"t": {"reported": {"value": "1", "metadata": {"version": "1"}}}},
                },
            )
            for i in range(devices)
        ]
        outcomes = await asyncio.gather(*futures)
        took = time.monotonic() - started
        times = sorted(api.emulator.request_times)
        await writer.close()
        for i in range(devices):
            obj = await client.get(Device, f"d{i}", namespace="plant")
            twins = {t["propertyName"]: t for t in obj["status"]["twins"]}
            assert twins["t"]["reported"]["value"] == "1"
        await client.close()
    assert all(o.applied for o in outcomes)
    assert len(times) >= 2 * devices  # a read and a write each
    # Every request passed the bucket, which never let more through than it allows...
    assert len(limit.sent) >= len(times)  # (and the reads that check the result, after)
    assert most_in_any_window(limit.sent, qps, burst) <= 1e-6
    # ...and at the server the rate over the storm is the bucket's, give or take a
    # quarter second of skew between the first and the last request's trip (a busy
    # machine delays some more than others; without the bucket it is 89 over).
    assert len(times) <= burst + qps * (times[-1] - times[0] + 0.25)
    assert took >= (len(times) - burst) / qps * 0.9


async def test_the_relays_client_serves_requests_while_many_gateways_hold_watches(tmp_path: Path) -> None:
    """Each connected gateway holds two watches; with httpx's default pool (100) the
    first 50 gateways took every connection and status writes failed (PoolTimeout).
    The watches' client has no fixed pool; requests go on a client of their own."""
    from lightkube import KubeConfig as KC

    from edgetwin.runtime.aio import cancel_tasks, wait_within

    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        kube = KC.from_file(api.kubeconfig(tmp_path / "kc", "plant")).get()
        client = ops.api_client(kube, "edgetwin-relay", watches=True)
        await client.create(
            Device(
                metadata={"name": "d0", "namespace": "plant"},
                spec={"nodeName": "edge-a", "deviceModelRef": {"name": "m"}},
            ),
            namespace="plant",
        )

        async def watch() -> None:
            async for _ in client.watch(Device, namespace="plant"):
                pass

        watches = [asyncio.create_task(watch()) for _ in range(150)]
        try:
            deadline = time.monotonic() + 5
            while len(api.emulator.watchers) < 150 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert len(api.emulator.watchers) == 150  # every watch has its own connection
            obj = await wait_within(client.get(Device, "d0", namespace="plant"), 8)
            assert obj.metadata.name == "d0"
        finally:
            await cancel_tasks(watches)
            await client.close()
