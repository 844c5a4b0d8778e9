"""The sync's promises, each checked by faulting an established stream that carries
traffic (never only the connect): real mosquitto, the gateway, the link simulator, the
relay, lightkube and the Kubernetes API emulator, with the real kubectl where a user
would use it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest

from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.simulators.stack import Stack, until
from tests.conftest import device_doc
from tests.harness.processes import Mosquitto
from tests.sync.promises import NODE, PROPS, fleet, publish_many, report


async def test_a_long_drain_at_9600_bit_s_keeps_its_link(stack_factory: Any, mosquitto: Mosquitto) -> None:
    """About 30 KB of status through 9.6 kbit/s: frames are bounded, heartbeats get
    through, and the one stream carries it all."""
    stack = await stack_factory(fleet(60), link_bps=9600, uplink={"budget_bps": 1000})
    await stack.apply(fleet(60))
    await stack.connected()
    await asyncio.to_thread(
        publish_many,
        mosquitto.port,
        # Random text: a stream compressor makes repetitive values nearly free.
        [report(f"s{i:03d}", {p["name"]: os.urandom(20).hex() for p in PROPS}) for i in range(60)],
    )
    took = await until(lambda: not stack.gateway.engine.outbox, within=180, every=0.5, what="the drain")
    assert took > 15  # it really was a long drain at this rate
    assert stack.gateway.uplink.connects == 1


# --------------------------------------------------------------------- 2. backoff
async def test_the_reconnect_backoff_starts_over_after_a_healthy_stream(stack_factory: Any) -> None:
    stack = await stack_factory(fleet(2), uplink={"reconnect_min_ms": 500, "reconnect_max_ms": 30_000})
    await stack.connected()
    took = []
    for _ in range(6):
        await asyncio.sleep(6)  # healthy for a while
        stack.link.cut()
        stack.link.restore()
        dropped = time.monotonic()
        await until(lambda: not stack.gateway.uplink.connected.is_set(), within=5, every=0.01)
        await stack.connected(60)
        took.append(time.monotonic() - dropped)
    assert max(took) < 2.0, took  # 0.5 s x jitter, not 0.5, 1, 2, 4, 8, 16 s


# --------------------------------------------------------------------- 3. late devices
async def test_status_of_a_device_created_in_the_cluster_later_is_kept_and_applied(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    stack = await stack_factory(fleet(3))
    await stack.connected()
    await asyncio.to_thread(publish_many, mosquitto.port, [report("s002", {"p1": "late-value"})])
    gw = stack.gateway
    await asyncio.sleep(3)  # the relay answers that the Device does not exist (yet)
    assert "plant.s002" in gw.engine.outbox  # kept, not dropped
    await stack.apply(fleet(3)[:1] + fleet(3)[3:])  # the model and s002 appear in the cluster
    took = await until(
        lambda: _reported(stack, "s002", "p1"),
        within=10,
        what="the kept status written once the Device exists",
    )
    assert took < 5


async def _reported(stack: Stack, name: str, prop: str) -> Any:
    try:
        return (await stack.status_twins(name)).get(prop, {}).get("reported", {}).get("value")
    except Exception:
        return None


# --------------------------------------------------------------------- 4. echoes and restarts
async def test_a_new_stream_brings_no_echo_of_the_relays_own_status_writes(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    stack = await stack_factory(None)
    await stack.apply(fleet(50, prefix="c"))
    await stack.connected()
    gw = stack.gateway
    await until(lambda: len(gw.engine.devices) == 50, within=20, what="the cluster's devices served")
    for round_ in range(3):
        await asyncio.to_thread(
            publish_many, mosquitto.port, [report(f"c{i:03d}", {"p0": f"r{round_}"}) for i in range(50)]
        )
        await until(lambda: not gw.engine.outbox, within=30, what="the status written")
    before = dict(gw.uplink.received)
    payload, down = gw.uplink.bytes_received, stack.link.bytes_down
    stack.link.cut()
    stack.link.restore()
    await until(lambda: gw.uplink.connects == 2, within=30)
    await asyncio.sleep(2)
    echoes = gw.uplink.received["upsert"] - before.get("upsert", 0)
    assert echoes == 0, f"{echoes} Devices came back after the relay wrote their status"
    assert gw.uplink.bytes_received - payload < 256  # sync content of the new stream
    # On the wire, TLS (with gRPC's post-quantum key share) and HTTP/2 set-up dominate.
    assert stack.link.bytes_down - down < 6 * 1024


@pytest.mark.parametrize("managed_fields", [True, False], ids=["with-stamps", "without-managedFields"])
async def test_a_restart_never_reapplies_an_old_cloud_value_nor_invents_a_conflict(
    stack_factory: Any, mosquitto: Mosquitto, managed_fields: bool
) -> None:
    stack = await stack_factory(None, emulator={"managed_fields": managed_fields})
    docs = fleet(1, prefix="c")
    docs[0]["spec"]["properties"] = [{"name": "sp", "type": "INT", "accessMode": "ReadWrite"}]
    docs[1]["spec"]["properties"] = [{"name": "sp", "desired": {"value": "20"}}]
    await stack.apply(docs)
    await stack.connected()
    gw = stack.gateway
    await until(
        lambda: "plant.c000" in gw.engine.devices and gw.engine.devices["plant.c000"].served, within=20
    )
    prop = gw.engine.devices["plant.c000"].properties["sp"]
    assert prop.desired is not None and prop.desired.value == 20
    await asyncio.sleep(1.2)  # the restart and the edge write come later than the cloud's
    await stack.restart_gateway()
    await stack.connected()
    gw = stack.gateway
    body = payloads.twin_set_request("edge-70", int(time.time() * 1000), {"sp": 70})
    await asyncio.to_thread(publish_many, mosquitto.port, [(topics.twin_update("plant.c000"), body)])
    prop = gw.engine.devices["plant.c000"].properties["sp"]
    await until(lambda: prop.desired is not None and prop.desired.value == 70, within=10)
    await asyncio.sleep(2)  # whatever the new stream brings
    assert prop.desired is not None and (prop.desired.value, prop.desired.origin) == (70, "edge")
    from edgetwin.gateway.store.reader import open_reader, read_events

    conflicts = read_events(open_reader(gw.cfg.store.path), kind="conflict")
    assert conflicts == [], conflicts


# --------------------------------------------------------------------- 5. oversized batches
async def test_an_outbox_larger_than_any_frame_drains_without_wedging(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    stack = await stack_factory(fleet(21))
    await stack.connected()
    await stack.apply(fleet(21))
    stack.link.cut()
    # One property per report keeps each message under mqtt.max_payload (64 KiB); each
    # device's pending status (10 x 15 KB) is still larger than any frame.
    big = [
        report(f"s{i:03d}", {p["name"]: f"{i}{p['name']}" + "z" * 15_000}) for i in range(20) for p in PROPS
    ]
    await asyncio.to_thread(publish_many, mosquitto.port, [*big, report("s020", {"p0": "small"})])
    gw = stack.gateway
    await until(lambda: len(gw.engine.outbox) == 21, within=30)
    stack.link.restore()
    await stack.connected(30)
    await until(lambda: not gw.engine.outbox, within=120, every=0.5, what="the outbox drained")
    assert (await stack.status_twins("s020"))["p0"]["reported"]["value"] == "small"
    twins = await stack.status_twins("s013")
    assert (
        twins["p9"]["reported"]["value"].startswith("13p9zzz")
        and len(twins["p9"]["reported"]["value"]) > 15_000
    )


# --------------------------------------------------------------------- 6. label fallback
async def test_a_cluster_without_selectable_fields_is_served_by_label(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    stack = await stack_factory(None, emulator={"selectable_fields": False})
    docs = fleet(2, prefix="c")
    for doc in docs[1:]:
        doc["metadata"]["labels"] = {"edgetwin.io/node": NODE}
    stranger = device_doc("stranger", "plant", "sensor", "edge-02")
    stranger["metadata"]["labels"] = {"edgetwin.io/node": NODE}  # mislabelled: not ours
    await stack.apply([*docs, stranger])
    await stack.connected()
    gw = stack.gateway
    await until(lambda: {"plant.c000", "plant.c001"} <= set(gw.engine.devices), within=20)
    await asyncio.to_thread(publish_many, mosquitto.port, [report("c001", {"p2": "by-label"})])
    await until(lambda: _reported(stack, "c001", "p2"), within=10, what="status written")
    assert "plant.stranger" not in gw.engine.devices
    assert gw.uplink.connects == 1  # no reconnect loop


# --------------------------------------------------------------------- 7. bookmarks and compaction
async def test_a_reconnect_after_compaction_resumes_without_a_relist(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    stack = await stack_factory(
        None,
        emulator={"compact_s": 1.0, "bookmark_s": 0.3},
        relay={"rv_every_s": 0.5},
    )
    await stack.apply(fleet(20, prefix="c"))
    await stack.connected()
    gw = stack.gateway
    await until(lambda: len(gw.engine.devices) == 20, within=20)
    first_rv = int(gw.uplink.resume["Device"])
    for round_ in range(5):  # status writes move the API server on; compactions pass
        await asyncio.to_thread(
            publish_many, mosquitto.port, [report(f"c{i:03d}", {"p0": f"x{round_}"}) for i in range(20)]
        )
        await asyncio.sleep(1)
    await until(lambda: not gw.engine.outbox, within=30)
    # Resuming from where the stream began would now be 410 Gone (a relist).
    assert stack.api.emulator.compacted > first_rv
    synced_before = gw.uplink.received["synced"]
    down = stack.link.bytes_down
    stack.link.cut()
    stack.link.restore()
    payload = gw.uplink.bytes_received
    await until(lambda: gw.uplink.connects == 2, within=30)
    await asyncio.sleep(2)
    assert gw.uplink.received["synced"] == synced_before, "the reconnect relisted"
    assert gw.uplink.bytes_received - payload < 512
    assert stack.link.bytes_down - down < 6 * 1024


# --------------------------------------------------------------------- 11. what kubectl shows, and when
async def test_a_frequent_reporter_shows_in_kubectl_within_the_status_interval(
    stack_factory: Any, mosquitto: Mosquitto
) -> None:
    """docs/sync-protocol.md: a value shows in kubectl within minStatusInterval plus the
    gateway's batch window and the link, however often the device reports."""
    stack = await stack_factory(fleet(1), relay={"min_status_interval_s": 2.0})
    await stack.apply(fleet(1))
    await stack.connected()
    worst = 0.0
    for round_ in range(4):
        for i in range(10):  # reports every 200 ms; the last of each burst is looked for
            await asyncio.to_thread(publish_many, mosquitto.port, [report("s000", {"p0": f"r{round_}-{i}"})])
            await asyncio.sleep(0.2)
        sent = time.monotonic()
        want = f"r{round_}-9"

        async def shown(want: str = want) -> bool:
            out = await stack.kubectl(
                "get", "device", "s000", "-n", "plant", "-o", "jsonpath={.status.twins[0].reported.value}"
            )
            return out.stdout == want

        await until(shown, within=10, what="the value in kubectl")
        worst = max(worst, time.monotonic() - sent)
    assert worst <= 2.0 + 0.5 + 1.0, worst  # minStatusInterval + batch window + link and kubectl


async def test_the_documented_kubectl_recipe_changes_one_desired_value_and_keeps_the_others(
    stack_factory: Any,
) -> None:
    """docs/sync-protocol.md: a merge patch of spec.properties replaces the whole list
    (CRDs have no strategic merge patch); the JSON patch recipe changes one entry."""
    stack = await stack_factory(None)
    docs = fleet(1, prefix="c")
    docs[0]["spec"]["properties"] = [
        {"name": "mode", "type": "STRING", "accessMode": "ReadWrite"},
        {"name": "sp", "type": "INT", "accessMode": "ReadWrite"},
    ]
    docs[1]["spec"]["properties"] = [
        {"name": "mode", "desired": {"value": "auto"}, "reportCycle": "10s"},
        {"name": "sp", "desired": {"value": "20"}},
    ]
    await stack.apply(docs)
    await stack.connected()
    names = await stack.kubectl(
        "get", "device", "c000", "-n", "plant", "-o", "jsonpath={range .spec.properties[*]}{.name}{' '}{end}"
    )
    index = names.stdout.split().index("sp")
    patch = json.dumps(
        [
            {"op": "test", "path": f"/spec/properties/{index}/name", "value": "sp"},
            {"op": "replace", "path": f"/spec/properties/{index}/desired/value", "value": "23"},
        ]
    )
    result = await stack.kubectl("patch", "device", "c000", "-n", "plant", "--type", "json", "-p", patch)
    assert result.returncode == 0, result.stderr
    spec = (await stack.device("c000"))["spec"]["properties"]
    assert spec[0] == {"name": "mode", "desired": {"value": "auto"}, "reportCycle": "10s"}
    assert spec[1]["desired"]["value"] == "23"
    gw = stack.gateway
    await until(lambda: gw.engine.devices["plant.c000"].properties["sp"].desired.value == 23, within=10)
    # The test op guards against a list that changed meanwhile: a wrong index is refused.
    wrong = patch.replace(
        f'"/spec/properties/{index}/name", "value": "sp"', f'"/spec/properties/{index}/name", "value": "mode"'
    )
    assert (
        await stack.kubectl("patch", "device", "c000", "-n", "plant", "--type", "json", "-p", wrong)
    ).returncode != 0
