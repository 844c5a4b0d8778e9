#!/usr/bin/env python3
"""Ingest benchmark: reported updates through MQTT -> twin -> durable store.

    .venv/bin/python -m scripts.bench.ingest [--updates 30000] [--rate 2000] [--no-uplink]

For 10 devices x 10 properties and 1,000 devices x 10 properties it prints:
  * sustained updates/s: a publisher process sends one-property QoS 1 updates as fast as
    the broker takes them; counted when the gateway's update result arrives (results are
    published only after the durable commit, WAL + synchronous=FULL);
  * p50/p99 latency publish -> result over 10 s at a fixed rate, after a warm-up (an
    upper bound on publish -> commit: it includes the result's trip back through the
    broker);
  * the same traffic through the same broker with no gateway (subscriber receives the
    publisher's messages directly) as the baseline, and the ratio.
Then the gateway's RSS with 100 idle devices. The gateway is pinned to one core. Each
update is one random property with a random reading; the gateway's uplink is on (a relay
and the API emulator holding the devices, their own processes) unless --no-uplink.

A private mosquitto is started on a free loopback port; nothing else is touched.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml

from scripts.bench.workloads import reading
from tests.harness.processes import Mosquitto, rss_mb

EDGETWIN = str(Path(sys.executable).parent / "edgetwin")
NODE = "bench"
LATENCY_S = 10  # seconds of fixed-rate traffic for the latency figures


def start_mosquitto(tmp: Path) -> Mosquitto:
    """The benches' broker: the tests' private mosquitto, with room for a flood and $SYS each second."""
    return Mosquitto(tmp, extra="sys_interval 1\n", max_queued=1_000_000)


def start_gateway(
    tmp: Path, port: int, devices: int, props: int, extra: dict[str, Any] | None = None, tag: str = ""
) -> subprocess.Popen[bytes]:
    """``edgetwin gateway run`` serving ``devices`` b.d0.. (``extra``: more config keys)."""
    model = {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "DeviceModel",
        "metadata": {"name": "m", "namespace": "b"},
        "spec": {"properties": [{"name": f"p{i}", "type": "INT"} for i in range(props)]},
    }
    docs = [model] + [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": f"d{i}", "namespace": "b"},
            "spec": {"deviceModelRef": {"name": "m"}, "nodeName": NODE},
        }
        for i in range(devices)
    ]
    work = tmp / f"gw-{devices}{tag}"
    work.mkdir()
    (work / "m.yaml").write_text(yaml.safe_dump_all(docs))
    cfg = {
        "node": NODE,
        "store": {"path": str(work / "store.db")},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "client_id": f"edgetwin-bench-{devices}{tag}"},
        "manifests": [str(work / "m.yaml")],
        "log": {"level": "WARNING"},
        **(extra or {}),
    }
    (work / "gw.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [EDGETWIN, "gateway", "run", "--config", str(work / "gw.yaml")]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", str((os.cpu_count() or 2) - 1), *cmd]
    proc = subprocess.Popen(cmd, stdout=(work / "gw.log").open("wb"), stderr=subprocess.STDOUT)
    got = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_message = lambda *a: got.set() if a[2].payload == b"online" else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(f"edgetwin/{NODE}/gateway/status", 1)
    if not got.wait(30):
        raise RuntimeError((work / "gw.log").read_text())
    c.loop_stop()
    c.disconnect()
    return proc


# --------------------------------------------------------------------- publisher
def publisher(port: int, topics: list[str], count: int, rate: float, start: Any) -> None:
    """Runs in its own process. rate <= 0: as fast as the broker takes them. Each update
    names a random property and carries a random reading (scripts/bench/workloads.py)."""
    rng = random.Random(f"{count}-{rate}-{len(topics)}")
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start.wait()
    t0 = time.perf_counter()
    last_info = None
    for i in range(count):
        topic = topics[i % len(topics)]
        prop = f"p{rng.randrange(10)}"
        event = f"{i}:{time.perf_counter_ns()}"
        value = reading(rng)
        body = f'{{"event_id":"{event}","twin":{{"{prop}":{{"actual":{{"value":"{value}"}}}}}}}}'
        last_info = c.publish(topic, body, qos=1)
        if rate > 0:
            ahead = t0 + (i + 1) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        elif i % 500 == 499:
            # Do not let paho's queue grow without bound: wait for the broker.
            last_info.wait_for_publish(10)
    if last_info is not None:
        last_info.wait_for_publish(30)
    time.sleep(0.2)
    c.loop_stop()
    c.disconnect()


class Receiver:
    """Counts arrivals and latencies (from the send time in event_id)."""

    def __init__(self, port: int, topic: str) -> None:
        self.count = 0
        self.latencies: list[float] = []
        self.first = self.last = 0.0
        self.done = threading.Event()
        self.expect = 0
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(topic, 1)
        time.sleep(0.3)

    def reset(self, expect: int) -> None:
        self.count, self.latencies, self.expect = 0, [], expect
        self.done.clear()

    def _on(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter_ns()
        payload = msg.payload
        i = payload.find(b'"event_id":"')
        if i < 0:
            return
        end = payload.index(b'"', i + 12)
        sent = int(payload[i + 12 : end].split(b":")[1])
        self.latencies.append((now - sent) / 1e6)
        if self.count == 0:
            self.first = time.perf_counter()
        self.count += 1
        self.last = time.perf_counter()
        if self.count >= self.expect:
            self.done.set()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def run_phase(port: int, topics: list[str], rx: Receiver, count: int, rate: float) -> dict[str, float]:
    rx.reset(count)
    start = mp.Event()
    proc = mp.Process(target=publisher, args=(port, topics, count, rate, start))
    proc.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    start.set()
    ok = rx.done.wait(120)
    elapsed = (rx.last if ok else time.perf_counter()) - t0
    proc.join(60)
    lat = sorted(rx.latencies) or [float("nan")]
    return {
        "rate": rx.count / elapsed if elapsed > 0 else 0.0,
        "received": rx.count,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def bench_shape(
    tmp: Path, port: int, devices: int, updates: int, rate: float, uplink: dict[str, Any] | None
) -> None:
    topics = [f"$hw/events/device/b.d{i}/twin/update" for i in range(devices)]
    raw_topics = [f"bench/raw/d{i}" for i in range(devices)]
    # Baseline first: the same publisher straight to a subscriber, same broker.
    # Steady state at a fixed rate first (after a warm-up), then the flood.
    rx = Receiver(port, "bench/raw/#")
    base_lat = run_phase(port, raw_topics, rx, int(rate * LATENCY_S), rate)
    base_max = run_phase(port, raw_topics, rx, updates, 0)
    rx.close()
    gw = start_gateway(tmp, port, devices, 10, {"uplink": uplink} if uplink else None)
    try:
        rx = Receiver(port, "$hw/events/device/+/twin/update/result")
        run_phase(port, topics, rx, min(updates, 2000), 0)  # warm-up
        time.sleep(2)
        gw_lat = run_phase(port, topics, rx, int(rate * LATENCY_S), rate)
        gw_max = run_phase(port, topics, rx, updates, 0)
        rx.close()
    finally:
        gw.terminate()
        gw.wait(20)
    label = f"{devices} devices x 10 properties"
    print(f"\n== {label}")
    print(
        f"  sustained updates/s  gateway {gw_max['rate']:9.0f}   raw broker {base_max['rate']:9.0f}   "
        f"ratio {gw_max['rate'] / base_max['rate']:.2f}  ({gw_max['received']:.0f}/{updates} answered)"
    )
    print(
        f"  latency @ {rate:.0f}/s    gateway p50 {gw_lat['p50']:6.1f} ms  p99 {gw_lat['p99']:6.1f} ms   "
        f"raw broker p50 {base_lat['p50']:6.1f} ms  p99 {base_lat['p99']:6.1f} ms"
    )


def idle_rss(tmp: Path, port: int) -> None:
    gw = start_gateway(tmp, port, 100, 10)
    try:
        time.sleep(3)
        print(f"\n== idle gateway with 100 devices: RSS {rss_mb(gw.pid):.1f} MB (goal <= 60 MB)")
    finally:
        gw.terminate()
        gw.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=2_000)
    parser.add_argument("--no-uplink", action="store_true", help="a gateway without a cluster")
    args = parser.parse_args()
    from scripts.bench.cloud import Cloud  # it imports this module

    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-"))
    broker = start_mosquitto(tmp)
    port = broker.port
    cloud = None if args.no_uplink else Cloud(tmp)
    try:
        print(
            f"edgetwin ingest benchmark: {os.cpu_count()} cores, gateway pinned to one, store on {tmp}; "
            f"shipped defaults, QoS 1 updates of one random property with a random reading "
            f"(two decimals in [-500, 500)); uplink "
            + (
                "on (relay and API emulator in their own processes, the devices in the cluster)"
                if cloud
                else "off"
            ),
            flush=True,
        )
        if cloud is not None:
            cloud.add_devices(1000)  # b.d0 .. b.d999: both shapes' devices
        for devices in (10, 1000):
            bench_shape(tmp, port, devices, args.updates, args.rate, cloud.uplink if cloud else None)
        idle_rss(tmp, port)
    finally:
        if cloud is not None:
            cloud.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
