"""Relay status writes through a real Kubernetes client (lightkube) against the API
emulator: at most one write per device per minStatusInterval at 10 Hz, only the node's
own devices, re-reads on 409 Conflict, and the result is the in-order merge."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.types import PatchType

from edgetwin.cloud.status_merge import merge_edge_status
from edgetwin.cloud.status_writer import Device, Outcome, StatusWriter, WriteSlots, merge_diff
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[RunningEmulator, AsyncClient]]:
    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", "plant")))
        for name, node in (("d1", "edge-a"), ("d2", "edge-a"), ("d3", "edge-a"), ("other", "edge-b")):
            obj = Device(
                metadata={"name": name, "namespace": "plant"},
                spec={"nodeName": node, "deviceModelRef": {"name": "m"}},
            )
            await client.create(obj, namespace="plant")
        yield api, client
        await client.close()


def reading(rev: int, temp: float) -> dict[str, Any]:
    return {
        "state": "online",
        "twins": {"temperature": {"reported": {"value": str(temp), "metadata": {"version": str(rev)}}}},
    }


async def test_ten_hz_reports_write_at_most_once_per_interval(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    api, client = cluster
    interval, seconds = 0.5, 2.0
    writer = StatusWriter(client, "edge-a", min_interval_s=interval)
    expected: dict[str, dict[str, Any]] = {}
    futures = []
    start = time.monotonic()
    rev = 0
    while time.monotonic() - start < seconds:
        for name in ("d1", "d2", "d3"):
            rev += 1
            patch = reading(rev, 20 + rev / 10)
            expected[name] = merge_edge_status(expected.get(name), patch, rev)
            futures.append(writer.submit("plant", name, rev, patch))
        await asyncio.sleep(0.1)  # 10 Hz per device
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    elapsed = time.monotonic() - start
    # Each message is applied, or superseded by a newer revision of its device while it
    # waited (cancelled: the gateway heeds only the newest revision's answer)...
    assert all(o.applied for o in outcomes if not isinstance(o, asyncio.CancelledError))
    # ...and the newest of each device is applied.
    assert all(isinstance(o, Outcome) and o.applied for o in outcomes[-3:])
    assert sum(isinstance(o, asyncio.CancelledError) for o in outcomes) > 0
    for name in ("d1", "d2", "d3"):
        writes = api.emulator.status_writes[("plant", name)]
        assert 1 <= writes <= math.ceil(elapsed / interval) + 1, (name, writes)
        obj = await client.get(Device, name, namespace="plant")
        assert obj["status"] == expected[name]  # nothing lost by folding
    assert len(futures) >= 3 * 15  # ~60 messages became a handful of writes
    await writer.close()


async def test_another_nodes_device_is_refused_and_never_written(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    api, client = cluster
    writer = StatusWriter(client, "edge-a", min_interval_s=0.1)
    outcome = await writer.submit("plant", "other", 1, reading(1, 20.0))
    assert not outcome.applied and "belongs to node 'edge-b'" in outcome.reason
    missing = await writer.submit("plant", "ghost", 2, reading(2, 20.0))
    assert not missing.applied and "does not exist" in missing.reason
    assert api.emulator.status_writes[("plant", "other")] == 0
    await writer.close()


async def test_conflicts_are_read_again_and_replays_are_not_written(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    api, client = cluster
    writer = StatusWriter(client, "edge-a", min_interval_s=0.0)
    api.emulator.conflicts_to_inject = 2
    assert (await writer.submit("plant", "d1", 5, reading(5, 21.0))).applied
    assert writer.conflicts == 2 and writer.writes == 1
    # The same message again (a replay after a reconnect): applied, no write.
    assert (await writer.submit("plant", "d1", 5, reading(5, 21.0))).applied
    assert writer.writes == 1 and api.emulator.status_writes[("plant", "d1")] == 1
    await writer.close()


def test_merge_diff_turns_old_into_new() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "gone": True, "list": [1]}
    new = {"a": 1, "b": {"c": 5, "d": 3}, "list": [1, 2], "added": "x"}
    patch = merge_diff(old, new)
    assert patch == {"b": {"c": 5}, "gone": None, "list": [1, 2], "added": "x"}
    from edgetwin.simulators.kube.objects import merge_patch

    assert merge_patch(old, patch) == new


async def test_a_device_written_before_is_written_without_a_read_and_a_foreign_write_forces_one(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    """Steady state costs one request per status write (the conditional patch), not two;
    the resourceVersion still guards it: a write by anyone else in between is a 409, a
    re-read, and the merge of both."""
    api, client = cluster
    writer = StatusWriter(client, "edge-a", min_interval_s=0)
    stats = api.emulator.stats
    assert (await writer.submit("plant", "d1", 1, reading(1, 20.0))).applied
    gets, patches = stats["GET /apis/edgetwin.io/v1alpha1"], stats["PATCH /apis/edgetwin.io/v1alpha1"]
    assert (await writer.submit("plant", "d1", 2, reading(2, 21.0))).applied
    assert stats["GET /apis/edgetwin.io/v1alpha1"] == gets  # no read
    assert stats["PATCH /apis/edgetwin.io/v1alpha1"] == patches + 1

    # Someone else writes the status (another replica, a user): the cached version is old.
    obj = await client.get(Device, "d1", namespace="plant")
    await client.patch(
        Device.Status,
        "d1",
        {"status": {"conditions": [{"type": "Other", "status": "True"}]}},
        namespace="plant",
        patch_type=PatchType.MERGE,
    )
    conflicts = writer.conflicts
    assert (await writer.submit("plant", "d1", 3, reading(3, 22.0))).applied
    assert writer.conflicts == conflicts + 1  # refused as stale, then read again
    after = await client.get(Device, "d1", namespace="plant")
    assert obj.metadata.resourceVersion != after.metadata.resourceVersion
    twins = {t["propertyName"]: t for t in after["status"]["twins"]}
    assert twins["temperature"]["reported"]["value"] == "22.0"
    assert any(c["type"] == "Other" for c in after["status"]["conditions"])  # the other write kept
    await writer.close()


async def test_a_device_gone_quiet_is_still_spaced_by_the_interval_and_odd_text_survives_being_kept(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    """Between writes the writer keeps little per device (the status packed, no task), yet
    a device that reports again right after its write still waits out minStatusInterval,
    and what was kept is the status exactly (non-ASCII, escapes, NUL)."""
    api, client = cluster
    interval = 0.6
    writer = StatusWriter(client, "edge-a", min_interval_s=interval)
    odd = 'é 漢 🌡 \\ " \x00 \u2028'
    patch = reading(1, 20.0)
    patch["twins"]["temperature"]["reported"]["value"] = odd
    assert (await writer.submit("plant", "d1", 1, patch)).applied
    first = time.monotonic()
    await asyncio.sleep(0.05)  # the write's task has ended; the device is quiet
    patch = reading(2, 21.0)
    patch["twins"]["temperature"]["reported"]["value"] = odd + "2"
    assert (await writer.submit("plant", "d1", 2, patch)).applied
    assert time.monotonic() - first >= interval * 0.9
    assert api.emulator.status_writes[("plant", "d1")] == 2
    obj = await client.get(Device, "d1", namespace="plant")
    twins = {t["propertyName"]: t for t in obj["status"]["twins"]}
    assert twins["temperature"]["reported"]["value"] == odd + "2"
    # Written from what was kept (no read) and equal to what the API server holds.
    assert writer._known[("plant", "d1")].status == obj["status"]
    await writer.close()


async def test_first_writes_of_a_stream_list_the_nodes_devices_once_instead_of_a_read_each(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    """After a relay restart every device's first write needs its status: one list of the
    node's Devices instead of a read per device. Another node's device in the answer's
    way is still refused, and a device created after the list is still read."""
    api, client = cluster
    writer = StatusWriter(client, "edge-a", min_interval_s=0)
    writer.list_params = lambda: {"fieldSelector": "spec.nodeName=edge-a"}
    stats = api.emulator.stats
    before = dict(stats)

    def since(key: str) -> int:
        """Requests the emulator counted under ``key`` since the test began."""
        return stats[key] - before.get(key, 0)

    lists_key, reads_key = "GET /apis/edgetwin.io/v1alpha1/devices", "GET /apis/edgetwin.io/v1alpha1"
    outcomes = await asyncio.gather(
        *(
            writer.submit("plant", name, rev, reading(rev, 20.0 + rev))
            for rev, name in enumerate(["d1", "d2", "d3"], 1)
        )
    )
    assert all(o.applied for o in outcomes)
    assert (since(lists_key), since(reads_key), since("PATCH /apis/edgetwin.io/v1alpha1")) == (1, 0, 3)
    assert writer.seeded == 3
    for rev, name in enumerate(["d1", "d2", "d3"], 1):
        obj = await client.get(Device, name, namespace="plant")
        twins = {t["propertyName"]: t for t in obj["status"]["twins"]}
        assert twins["temperature"]["reported"]["value"] == str(20.0 + rev)

    reads = since(reads_key)  # the test's own reads above count too
    refused = await writer.submit("plant", "other", 9, reading(9, 1.0))
    assert not refused.applied and "belongs to node 'edge-b'" in refused.reason
    await client.create(
        Device(
            metadata={"name": "d4", "namespace": "plant"},
            spec={"nodeName": "edge-a", "deviceModelRef": {"name": "m"}},
        ),
        namespace="plant",
    )
    assert (await writer.submit("plant", "d4", 10, reading(10, 5.0))).applied
    assert (since(lists_key), since(reads_key) - reads) == (1, 2)  # one list per stream; "other" and d4 read
    assert api.emulator.status_writes[("plant", "other")] == 0
    await writer.close()


async def test_status_waiting_for_its_write_is_held_packed() -> None:
    """Under apiQPS every device of every gateway has a status waiting for its write,
    for minutes in a reconnect storm: it is held packed, and a waiting device costs no
    task. The writer keeps nothing of the decoded message, and 2,000 devices' waiting
    status (twenty properties each) take under 2.5 KB a device in the writer with the
    answer's future (~1.8 KB; with a task per waiting device ~3.4 KB; the decoded
    objects themselves were ~4.8 KB more)."""
    import tracemalloc
    import weakref

    import msgpack

    class Decoded(dict[str, Any]):
        """A decoded map that can be watched for being let go (a weak reference)."""

    slots = WriteSlots(1)
    slots.free = 0  # the relay's request pool is taken: every write waits
    writer = StatusWriter(None, "edge-a", 5.0, shared=slots)  # type: ignore[arg-type]
    alive: list[weakref.ref[Decoded]] = []

    def decoded(i: int) -> dict[str, Any]:
        twins = {
            f"property-{p}": {"reported": {"value": f"{i / 10 + p}", "time": 1_764_350_000_000 + i}, "rev": i}
            for p in range(20)
        }
        patch = {"twins": twins, "online": True, "lastSeen": 1_764_350_000_000 + i}
        unpacked: Decoded = msgpack.unpackb(msgpack.packb(patch), raw=False, object_hook=Decoded)
        alive.append(weakref.ref(unpacked))
        return unpacked

    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        futures = [writer.submit("plant", f"d{i}", 7, decoded(i)) for i in range(2000)]
        await asyncio.sleep(0.05)  # every write is waiting for the pool
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert not any(f.done() for f in futures)
    assert sum(ref() is not None for ref in alive) == 0  # nothing decoded is kept
    # What the writer, msgpack and asyncio hold (not the test's own objects, nor pytest's).
    kept = [
        tracemalloc.Filter(True, f"*/{part}*") for part in ("cloud/status_writer.py", "msgpack/", "asyncio/")
    ]
    stats = after.filter_traces(kept).compare_to(before.filter_traces(kept), "filename")
    per_device = sum(s.size_diff for s in stats) / 2000
    assert per_device < 2500, f"{per_device:.0f} B per waiting device"
    assert len(asyncio.all_tasks()) == 1  # this test's: the waiting writes are not tasks
    await writer.close()


async def test_writers_sharing_slots_take_turns_and_a_node_keeps_its_cap() -> None:
    """Writers waiting for the relay's request slots take turns, one write each: a node
    with many devices ready does not hold up a node with one. A node never has more
    than its cap in flight, all writers together never more than the slots, and every
    slot comes back."""
    slots = WriteSlots(3)
    slots.free = 0  # taken: both nodes' devices get in line first
    order: list[str] = []
    inflight = {"big": 0, "small": 0, "all": 0}
    most = {"big": 0, "small": 0, "all": 0}

    def writer(node: str, cap: int) -> StatusWriter:
        w = StatusWriter(None, node, 0.0, max_concurrent=cap, shared=slots)  # type: ignore[arg-type]

        async def write(key: tuple[str, str], messages: list[tuple[int, bytes]]) -> Outcome:
            for k in (node, "all"):
                inflight[k] += 1
                most[k] = max(most[k], inflight[k])
            order.append(key[1])
            await asyncio.sleep(0.01)
            for k in (node, "all"):
                inflight[k] -= 1
            return Outcome(True)

        w._write = write  # type: ignore[method-assign]
        return w

    big, small = writer("big", 2), writer("small", 4)
    futures = [big.submit("plant", f"b{i}", 1, {}) for i in range(6)]
    futures.append(small.submit("plant", "s0", 1, {}))
    for _ in range(3):
        slots.release()  # the pool frees up
    assert all(o.applied for o in await asyncio.gather(*futures))
    assert order.index("s0") <= 1, order  # its turn after one of big's, not after two
    assert sorted(order) == sorted([f"b{i}" for i in range(6)] + ["s0"])
    assert most == {"big": 2, "small": 1, "all": 3}
    assert slots.free == 3
    await big.close()
    await small.close()


async def test_deltas_waiting_for_one_write_are_composed_and_nothing_is_lost(
    cluster: tuple[RunningEmulator, AsyncClient],
) -> None:
    """statusDeltas: a device's later messages hold only what changed. While they wait
    for the interval they are composed into one, so a write holds every property of
    them all; the older ones are cancelled (superseded), the newest applied."""
    api, client = cluster
    writer = StatusWriter(client, "edge-a", min_interval_s=0.5)
    assert (await writer.submit("plant", "d1", 1, reading(1, 20.0))).applied  # starts the interval
    props = ["temperature", "humidity", "pressure", "flow"]
    futures = []
    for rev, prop in enumerate(props, start=2):
        entry = {"reported": {"value": f"{rev}.5", "metadata": {"version": str(rev)}}}
        futures.append(writer.submit("plant", "d1", rev, {"twins": {prop: entry}}))
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[:-1])
    assert isinstance(outcomes[-1], Outcome) and outcomes[-1].applied
    assert api.emulator.status_writes[("plant", "d1")] == 2
    twins = (await client.get(Device, "d1", namespace="plant"))["status"]["twins"]
    values = {t["propertyName"]: t["reported"]["value"] for t in twins}
    assert values == {"temperature": "2.5", "humidity": "3.5", "pressure": "4.5", "flow": "5.5"}
    await writer.close()
