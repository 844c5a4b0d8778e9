#!/usr/bin/env python3
"""Memory benchmark: the gateway's resident memory with many devices, every property
holding a value.

    .venv/bin/python -m scripts.bench.memory [--devices 1000] [--props 10]

Starts `edgetwin gateway run` (a process, as deployed) on a private mosquitto, reports a
value for every property of every device (one update per device, QoS 1, each answered
after its commit), waits for the answers, lets the process settle and prints its RSS
once the gateway has given freed heap back (it trims every heap.TRIM_EVERY_S; the RSS
3 s after the fill, before that, is printed too); the baseline in the same run is the
same gateway serving no devices. Goal: <= 60 MB at 1,000 devices x 10 properties.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from edgetwin.runtime.heap import TRIM_EVERY_S
from scripts.bench.ingest import NODE, start_gateway, start_mosquitto
from tests.harness.processes import rss_mb


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
    for i in range(devices):
        twin = {f"p{j}": {"actual": {"value": str(i * 100 + j)}} for j in range(props)}
        c.publish(f"$hw/events/device/b.d{i}/twin/update", json.dumps({"event_id": f"e{i}", "twin": twin}), 1)
    if not done.wait(120):
        raise SystemExit(f"only {answered} of {devices} updates answered")
    took = time.monotonic() - t0
    c.loop_stop()
    c.disconnect()
    return took


def measure(tmp: Path, port: int, devices: int, props: int) -> tuple[float, float, float]:
    """RSS 3 s after the fill, RSS once the gateway has trimmed its heap since (it gives
    freed heap back every heap.TRIM_EVERY_S), and the fill's seconds."""
    gw = start_gateway(tmp, port, devices, props)
    try:
        took = fill(port, devices, props) if devices else 0.0
        time.sleep(3.0)  # let the metrics publisher and commits settle
        right_after = rss_mb(gw.pid)
        time.sleep(TRIM_EVERY_S + 1.0)
        return right_after, rss_mb(gw.pid), took
    finally:
        gw.terminate()
        gw.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--props", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-memory-"))
    broker = start_mosquitto(tmp)
    port = broker.port
    try:
        _, base, _ = measure(tmp, port, 0, args.props)
        right_after, rss, took = measure(tmp, port, args.devices, args.props)
        per_prop = (rss - base) * 1024 * 1024 / (args.devices * args.props)
        print(f"edgetwin memory benchmark: node {NODE}")
        print(f"  baseline, no devices                 RSS {base:6.1f} MB")
        print(
            f"  {args.devices} devices x {args.props} properties, all set  RSS {rss:6.1f} MB "
            f"(goal <= 60), {per_prop:.0f} bytes per property above the baseline, "
            f"ratio {rss / base:.2f}; filled in {took:.1f} s; {right_after:.1f} MB 3 s after "
            f"the fill, before the heap was trimmed"
        )
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
