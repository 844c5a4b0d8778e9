#!/usr/bin/env python3
"""Memory benchmark: the gateway's resident memory with many devices, every property
holding a value, the uplink connected (as a gateway with a cluster runs).

    .venv/bin/python -m scripts.bench.memory [--devices 1000] [--props 10] [--no-uplink]

Starts `edgetwin gateway run` (a process, as deployed) on a private mosquitto, with its
uplink to a relay (`edgetwin cloud run`, a process) on the Kubernetes API emulator that
holds the devices, reports a distinct value for every property of every device (one
update per device, QoS 1, each answered after its commit), waits for the answers and
for the outbox to drain to the cluster, lets the process settle and prints its RSS once
the gateway has given freed heap back (it trims every heap.TRIM_EVERY_S; the RSS 3 s
after the fill is printed too). Baselines in the same run: the same gateway serving no
devices, with and without the uplink. Goal: <= 60 MB at 1,000 devices x 10 properties,
uplink on.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho

from edgetwin.gateway.store.reader import gateway_summary, open_reader
from edgetwin.runtime.heap import TRIM_EVERY_S
from scripts.bench.cloud import Cloud
from scripts.bench.ingest import NODE, start_gateway, start_mosquitto
from tests.harness.processes import rss_mb


def drained(store: Path, limit_s: float = 300.0) -> float:
    """Seconds until the gateway's outbox is empty (read from its store, read-only)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        summary = gateway_summary(open_reader(store), now_ms=int(time.time() * 1000))
        if summary["outbox"]["devices"] == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit(f"the outbox did not drain within {limit_s:g} s")


def fill(port: int, devices: int, props: int) -> float:
    """Report every property of every device; returns seconds until the last answer."""
    answered = 0
    done = threading.Event()

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        nonlocal answered
        answered += 1
        if answered >= devices:
            done.set()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_message = on_message
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe("$hw/events/device/+/twin/update/result", 1)
    time.sleep(0.3)
    t0 = time.monotonic()
    rng = random.Random(devices)
    for i in range(devices):
        twin = {f"p{j}": {"actual": {"value": str(rng.randrange(-100_000, 100_000))}} for j in range(props)}
        c.publish(f"$hw/events/device/b.d{i}/twin/update", json.dumps({"event_id": f"e{i}", "twin": twin}), 1)
    if not done.wait(120):
        raise SystemExit(f"only {answered} of {devices} updates answered")
    took = time.monotonic() - t0
    c.loop_stop()
    c.disconnect()
    return took


class Rss(NamedTuple):
    """One gateway's resident memory, MB: all of it, its private part (heap, stacks) and
    the pages of mapped files (libraries' code and data: shared with other processes
    mapping them, and dropped by the kernel under memory pressure)."""

    total: float
    anon: float
    files: float

    @classmethod
    def of(cls, pid: int) -> Rss:
        return cls(rss_mb(pid), rss_mb(pid, "RssAnon"), rss_mb(pid, "RssFile"))

    def __str__(self) -> str:
        return f"RSS {self.total:6.1f} MB (private {self.anon:.1f}, mapped files {self.files:.1f})"


def measure(
    tmp: Path, port: int, devices: int, props: int, uplink: dict[str, Any] | None
) -> tuple[float, Rss, float, float]:
    """RSS 3 s after the fill (and the drain, with an uplink), RSS once the gateway has
    trimmed its heap since (it gives freed heap back every heap.TRIM_EVERY_S), the fill's
    and the drain's seconds."""
    extra = {"uplink": uplink} if uplink else None
    tag = "-up" if uplink else ""
    gw = start_gateway(tmp, port, devices, props, extra, tag)
    try:
        took = fill(port, devices, props) if devices else 0.0
        drain = drained(tmp / f"gw-{devices}{tag}" / "store.db") if uplink and devices else 0.0
        time.sleep(3.0)  # let the metrics publisher and commits settle
        right_after = rss_mb(gw.pid)
        time.sleep(TRIM_EVERY_S + 1.0)
        return right_after, Rss.of(gw.pid), took, drain
    finally:
        gw.terminate()
        gw.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--props", type=int, default=10)
    ap.add_argument("--no-uplink", action="store_true", help="measure a gateway without a cluster")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-memory-"))
    broker = start_mosquitto(tmp)
    port = broker.port
    cloud = None if args.no_uplink else Cloud(tmp)
    uplink = cloud.uplink if cloud else None
    try:
        print(
            f"edgetwin memory benchmark: node {NODE}, shipped defaults, {args.devices} devices x "
            f"{args.props} INT properties with distinct random values, uplink "
            f"{'on (relay and API emulator in their own processes)' if uplink else 'off'}",
            flush=True,
        )
        _, bare, _, _ = measure(tmp, port, 0, args.props, None)
        print(f"  baseline, no devices, no uplink      {bare}", flush=True)
        base = bare
        if uplink:
            _, base, _, _ = measure(tmp, port, 0, args.props, uplink)
            adds = base.total - bare.total
            print(f"  baseline, no devices, uplink on      {base} (the uplink adds {adds:.1f})")
            _, alone, _, _ = measure(tmp, port, args.devices, args.props, None)
            print(f"  {args.devices} devices x {args.props} properties, no uplink  {alone}", flush=True)
            assert cloud is not None
            cloud.add_devices(args.devices)
        right_after, rss, took, drain = measure(tmp, port, args.devices, args.props, uplink)
        per_prop = (rss.total - base.total) * 1024 * 1024 / (args.devices * args.props)
        print(
            f"  {args.devices} devices x {args.props} properties, all set"
            f"{', outbox drained' if uplink else ''}  "
            f"{rss}, goal <= 60; {per_prop:.0f} bytes per property above the baseline, "
            f"ratio {rss.total / base.total:.2f}; filled in {took:.1f} s"
            + (f", drained to the cluster in {drain:.1f} s" if uplink else "")
            + f"; {right_after:.1f} MB 3 s after, before the heap was trimmed"
        )
    finally:
        if cloud is not None:
            cloud.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
