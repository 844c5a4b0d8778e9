#!/usr/bin/env python3
"""Link benchmark: what edgetwin puts on a narrowband link, next to a baseline that
sends each change straight to the API server.

    .venv/bin/python -m scripts.bench.link [--devices 1000] [--props 10]

One run, everything through the link simulator (edgetwin.simulators.link) on loopback:
  * steady state: bytes on the wire (both directions, TLS and gRPC framing included)
    per property update, devices reporting once a second;
  * a day offline: the link is cut while every property of every device changes; a day
    of 1 Hz changes composes in the outbox to one entry per device holding the newest
    value of each property, so the gateway is given one change per property (version
    numbers aside, the outbox after a day is the same size). Then the link comes back
    at 64 kbit/s: bytes and seconds until the outbox is empty (every entry applied);
  * baseline: a standard Kubernetes client (lightkube) sending each change as a JSON
    merge patch of Device status through the same proxy: bytes per change measured,
    times the changes of a day offline (devices x props x 86,400);
  * the idle link: bytes per day with the shipped heartbeat (uplink.heartbeat_ms of silence);
  * a dead link on an established stream carrying a drain at 64 kbit/s: seconds until
    the gateway notices (goal 30);
  * a reconnect after --reconnect-after seconds of a healthy stream while the API server
    compacts its history every --compact-s: relist or not, and bytes.
The gateway talks to a private mosquitto; the API is the emulator (edgetwin.simulators.kube.emulator).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.types import PatchType

from edgetwin.cloud.relay import read_pki, serve
from edgetwin.cloud.session import RelaySettings
from edgetwin.cloud.status_writer import Device
from edgetwin.deploy import DEPLOY, crd_files
from edgetwin.gateway.config import parse_config
from edgetwin.gateway.mqtt import topics
from edgetwin.gateway.service import Gateway
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.simulators.link import LinkSim
from scripts.bench import workloads
from scripts.bench.ingest import start_mosquitto

NODE = "edge-bench"
DAY = 86_400
RATE = 8_000  # bytes/s = 64 kbit/s


def manifests(devices: int, props: int) -> list[dict]:
    docs: list[dict] = [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "DeviceModel",
            "metadata": {"name": "sensor", "namespace": "plant"},
            "spec": {"properties": [{"name": f"p{i}", "type": "FLOAT"} for i in range(props)]},
        }
    ]
    for d in range(devices):
        docs.append(
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": f"s{d:04d}", "namespace": "plant"},
                "spec": {"deviceModelRef": {"name": "sensor"}, "nodeName": NODE},
            }
        )
    return docs


_events = itertools.count()


def publish_all(port: int, updates: list[tuple[str, dict]]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for dev, values in updates:
        twin = {k: {"actual": {"value": v}} for k, v in values.items()}
        body = json.dumps({"event_id": f"b{next(_events)}", "twin": twin})
        infos.append(client.publish(topics.twin_update(dev), body, qos=1))
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()


def make_pki(tmp: Path) -> Path:
    pki = tmp / "pki"
    subprocess.run([str(DEPLOY / "pki" / "make-test-pki"), str(pki), NODE], check=True, capture_output=True)
    return pki


async def wait_empty(gw: Gateway, limit_s: float) -> float:
    start = time.monotonic()
    while gw.engine.outbox:
        if time.monotonic() - start > limit_s:
            raise SystemExit(f"outbox not drained within {limit_s} s ({len(gw.engine.outbox)} left)")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--props", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=240.0)
    ap.add_argument(
        "--reconnect-after", type=float, default=600.0, help="seconds connected before the reconnect test"
    )
    ap.add_argument("--compact-s", type=float, default=300.0, help="the API server's compaction interval")
    ap.add_argument(
        "--min-status-interval",
        type=float,
        default=RelaySettings.min_status_interval_s,
        help="the relay's minStatusInterval in seconds (default: the shipped default)",
    )
    ap.add_argument("--changes", type=int, default=5, help="changes of each property while the link is cut")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random readings")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-link-"))
    pki = await asyncio.to_thread(make_pki, tmp)
    broker = start_mosquitto(tmp)
    mqtt_port = broker.port
    docs = manifests(args.devices, args.props)
    (tmp / "m.yaml").write_text(yaml.safe_dump_all(docs))
    try:
        async with RunningEmulator(Emulator.from_files(crd_files(), compact_s=args.compact_s)) as api:
            kc = api.kubeconfig(tmp / "kc", "plant")
            kc_text = kc.read_text()
            client = AsyncClient(config=KubeConfig.from_file(kc))
            for doc in docs[1:]:
                await client.create(Device(metadata=doc["metadata"], spec=doc["spec"]), namespace="plant")
            server, _, relay_port = await serve(
                client,
                "127.0.0.1:0",
                *read_pki(pki),
                RelaySettings(min_status_interval_s=args.min_status_interval),
            )
            link = LinkSim("127.0.0.1", relay_port, latency_s=0.05)
            await link.start()
            cfg = parse_config(
                {
                    "node": NODE,
                    "store": {"path": str(tmp / "s.db")},
                    "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
                    "manifests": [str(tmp / "m.yaml")],
                    "log": {"level": "WARNING"},
                    "uplink": {
                        "address": f"127.0.0.1:{link.port}",
                        "server_name": "localhost",
                        "ca_file": str(pki / "ca.pem"),
                        "cert_file": str(pki / f"{NODE}.pem"),
                        "key_file": str(pki / f"{NODE}-key.pem"),
                        "budget_bps": RATE,
                    },
                }
            )
            up = cfg.uplink
            assert up is not None
            print(
                f"configuration: {args.devices} devices x {args.props} FLOAT properties; uplink defaults but "
                f"budget_bps {up.budget_bps} (64 kbit/s), batch_window_ms {up.batch_window_ms}, frame_s "
                f"{up.frame_s:g}, heartbeat_ms {up.heartbeat_ms}; relay minStatusInterval "
                f"{args.min_status_interval:g} s; link latency 50 ms; readings: random, two decimals "
                f"in [-500, 500), seed {args.seed}",
                flush=True,
            )
            gw = Gateway(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop))
            await asyncio.wait_for(gw.ready.wait(), 60)
            await asyncio.wait_for(gw.uplink.connected.wait(), 30)
            await wait_empty(gw, 120)
            await asyncio.sleep(2)

            # 1. Steady state: 50 devices each report a random property with its own random
            # reading once a second for 10 s; then the old friendly workload, labelled.
            devs = [f"plant.s{d:04d}" for d in range(min(50, args.devices))]
            all_devs = [f"plant.s{d:04d}" for d in range(args.devices)]

            async def steady_run(seconds: list[list[workloads.Update]]) -> tuple[float, str]:
                before = link.bytes_up + link.bytes_down
                up0, down0 = link.bytes_up, link.bytes_down
                pay_up0, pay_down0 = gw.uplink.bytes_sent, gw.uplink.bytes_received
                frames0 = gw.uplink.frames_sent
                n = 0
                for updates in seconds:
                    await asyncio.to_thread(publish_all, mqtt_port, updates)
                    n += len(updates)
                    await asyncio.sleep(1)
                await wait_empty(gw, 60)
                await asyncio.sleep(1.5)
                detail = (
                    f"up {(link.bytes_up - up0) / n:.1f} on the wire of which "
                    f"{(gw.uplink.bytes_sent - pay_up0) / n:.1f} compressed payload, "
                    f"down {(link.bytes_down - down0) / n:.1f} of which "
                    f"{(gw.uplink.bytes_received - pay_down0) / n:.1f}; "
                    f"{gw.uplink.frames_sent - frames0} frames up, {n} updates"
                )
                return (link.bytes_up + link.bytes_down - before) / n, detail

            steady, detail = await steady_run(workloads.steady(devs, args.props, 10, rng))
            print(
                f"steady state: {steady:.1f} bytes on the wire per property update "
                f"(50 devices at 1 Hz, a random property each, random readings; goal 14)\n"
                f"  per update: {detail}"
            )
            friendly, detail = await steady_run(workloads.friendly(devs, 10))
            print(
                f"  friendly workload (extra line, not the figure: p0 with the same value from every "
                f"device each second): {friendly:.1f} bytes per update; {detail}"
            )

            # 2. A backlog: the link is cut while every property of every device changes
            # --changes times (random readings); then 64 kbit/s until the outbox is empty.
            link.cut()
            await asyncio.sleep(0.5)
            updates = workloads.backlog(all_devs, args.props, args.changes, rng)
            await asyncio.to_thread(publish_all, mqtt_port, updates)
            while len(gw.engine.outbox) < args.devices:  # noqa: ASYNC110 (polling the engine)
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)  # the last updates committed
            changes = args.devices * args.props
            link.bandwidth_bps = RATE * 8
            before = link.bytes_up + link.bytes_down
            restored = time.monotonic()
            link.restore()
            await asyncio.wait_for(gw.uplink.connected.wait(), 120)
            reconnected = time.monotonic() - restored
            from_connect = await wait_empty(gw, 600)
            drained = reconnected + from_connect
            drain_bytes = link.bytes_up + link.bytes_down - before
            print(
                f"backlog ({args.devices} devices x {args.props} properties, {args.changes} changes each "
                f"while cut = {len(updates) * args.props:,} changes, {changes:,} property entries after "
                f"composition): drained in {from_connect:.1f} s at 64 kbit/s from the gateway's first "
                f"connection (goal 10 s; {drained:.1f} s from the link's return, {reconnected:.1f} s of it "
                f"reconnect backoff), {drain_bytes:,} bytes on the wire; a day of 1 Hz changes composes "
                f"to the same {changes:,} entries"
            )

            # 3. Baseline: each change as a JSON merge patch from a standard client, same proxy.
            base_link = LinkSim("127.0.0.1", api.port)
            await base_link.start()
            base_kc = tmp / "kc-base"
            base_kc.write_text(kc_text.replace(f":{api.port}", f":{base_link.port}"))
            base = AsyncClient(config=KubeConfig.from_file(base_kc))
            samples = 200
            await base.get(Device, "s0000", namespace="plant")  # connection set up outside the count
            b0 = base_link.bytes_up + base_link.bytes_down
            for _ in range(samples):
                prop, value = f"p{rng.randrange(args.props)}", workloads.reading(rng)
                patch = {"status": {"twins": [{"propertyName": prop, "reported": {"value": str(value)}}]}}
                await base.patch(Device.Status, "s0000", patch, namespace="plant", patch_type=PatchType.MERGE)
            per_change = (base_link.bytes_up + base_link.bytes_down - b0) / samples
            day_bytes = per_change * changes * DAY
            print(
                f"baseline (lightkube JSON merge patch per change, same proxy): "
                f"{per_change:.0f} bytes per change; a day offline = {day_bytes / 1e9:,.1f} GB, "
                f"{day_bytes / RATE / 86400:,.0f} days at 64 kbit/s; "
                f"steady state ratio {per_change / steady:.0f}x; "
                f"reconcile ratio {day_bytes / drain_bytes:,.0f}x"
            )
            await base.close()
            await base_link.stop()

            # 4. The idle link: heartbeats only.
            await asyncio.sleep(2)
            i0, t0 = link.bytes_up + link.bytes_down, time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            idle = (link.bytes_up + link.bytes_down - i0) / (time.monotonic() - t0) * DAY
            print(
                f"idle link: {idle / 1e6:.2f} MB/day (goal 0.5; a heartbeat after "
                f"{cfg.uplink.heartbeat_ms / 1000:g} s of silence; "
                "a dead link is noticed within 30 s)"
            )

            # 5. A dead link on an established, busy stream: blackholed during a drain.
            link.cut()
            await asyncio.sleep(0.5)
            refill = [
                (d, {f"p{k}": 40 + i / 7 + k for k in range(args.props)}) for i, d in enumerate(all_devs)
            ]
            await asyncio.to_thread(publish_all, mqtt_port, refill)
            while len(gw.engine.outbox) < len(all_devs):  # noqa: ASYNC110 (polling the engine)
                await asyncio.sleep(0.05)
            link.restore()
            await asyncio.wait_for(gw.uplink.connected.wait(), 60)
            await asyncio.sleep(3)
            busy = len(gw.engine.outbox)
            link.blackhole(True)
            dead_at = time.monotonic()
            while gw.uplink.connected.is_set():  # noqa: ASYNC110 (polling the uplink)
                await asyncio.sleep(0.05)
            noticed = time.monotonic() - dead_at
            link.restore()
            await asyncio.wait_for(gw.uplink.connected.wait(), 60)
            await wait_empty(gw, 600)
            print(
                f"dead link on a busy stream at 64 kbit/s (blackholed with {busy} devices still to "
                f"drain): noticed in {noticed:.1f} s (goal 30 s); the drain then completed"
            )

            # 6. A reconnect after a long healthy stream: bookmarks keep the resume point
            # inside the API server's history (compacted every compact_s), so no relist.
            link.bandwidth_bps = None
            print(
                f"connected for {args.reconnect_after:g} s with status writes, the API server "
                f"compacting every {api.emulator.compact_s:g} s ...",
                flush=True,
            )
            started = time.monotonic()
            first_rv = int(gw.uplink.resume.get("Device", "0") or 0)
            i = 0
            while time.monotonic() - started < args.reconnect_after:
                await asyncio.to_thread(publish_all, mqtt_port, [(d, {"p2": i}) for d in devs])
                i += 1
                await asyncio.sleep(10)
            await wait_empty(gw, 60)
            compacted = api.emulator.compacted
            synced, payload = gw.uplink.received["synced"], gw.uplink.bytes_received + gw.uplink.bytes_sent
            wire = link.bytes_up + link.bytes_down
            connects = gw.uplink.connects
            link.cut()
            link.restore()
            while gw.uplink.connects == connects:  # noqa: ASYNC110 (polling the uplink)
                await asyncio.sleep(0.05)
            await asyncio.sleep(3)
            relisted = gw.uplink.received["synced"] > synced
            sync_bytes = gw.uplink.bytes_received + gw.uplink.bytes_sent - payload
            print(
                f"reconnect after {args.reconnect_after:g} s (history compacted to rv {compacted}, "
                f"the stream began at rv {first_rv}): {'RELIST' if relisted else 'no relist'}, "
                f"{sync_bytes} bytes of sync (goal < 2 KB), "
                f"{link.bytes_up + link.bytes_down - wire} bytes on the wire with TLS and HTTP/2 set-up"
            )

            stop.set()
            await asyncio.wait_for(task, 60)
            await server.stop(None)
            await link.stop()
            await client.close()
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
