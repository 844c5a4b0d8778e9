#!/usr/bin/env python3
"""Broker outage benchmark: the mosquitto settings of docs/mqtt.md, as written, through a
gateway outage of --minutes at --rate QoS 1 updates/s.

    .venv/bin/python -m scripts.bench.broker_outage [--minutes 10] [--rate 1000]

Prints what the publisher had acknowledged, what the gateway applied after it came back,
mosquitto's own drop counter, mosquitto's memory with the queue at its fullest, and how
long the gateway took to catch up. The baseline in the same run is the same outage
against mosquitto's defaults for the session queue (max_queued_messages 1000), where
the broker acknowledges and drops. It reuses tests/gateway/mqtt/test_broker_settings.py's helpers
on purpose: the benchmark is that test's guarantee at full length.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import Collector, GatewayProcess
from tests.gateway.mqtt.test_broker_settings import (
    NODE,
    documented_mosquitto_conf,
    gateway_config,
    localise,
    publish_at_rate,
    total_versions,
)
from tests.harness.processes import free_port, mosquitto_binary, rss_mb, wait_port

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


def run(conf_text: str, minutes: float, rate: int, label: str) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="edgetwin-outage-"))
    folder.chmod(0o755)
    (folder / "data").mkdir(mode=0o777)
    (folder / "data").chmod(0o777)
    (folder / "mosquitto.log").touch(mode=0o666)
    (folder / "mosquitto.log").chmod(0o666)
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(localise(conf_text, port, folder))
    gw_auth, mapper_auth = ("edgetwin", "gw-secret"), ("mapper", "mapper-secret")
    for i, (user, password) in enumerate((gw_auth, mapper_auth)):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(folder / "passwd"), user, password], check=True)
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        gw = GatewayProcess(gateway_config(folder, port, gw_auth), port, NODE, folder / "gw.log", gw_auth)
        return _outage(gw, broker, port, mapper_auth, minutes, rate, label)
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _outage(
    gw: GatewayProcess,
    broker: subprocess.Popen[bytes],
    port: int,
    mapper_auth: tuple[str, str],
    minutes: float,
    rate: int,
    label: str,
) -> dict[str, float]:
    # mosquitto's drop counter, watched through the whole run (its last value counts).
    sys_dropped = Collector(port, [SYS_DROPPED], auth=mapper_auth)
    try:
        gw.start()
        gw.stop()
        total = int(minutes * 60 * rate)
        print(f"[{label}] gateway down; publishing {total:,} updates at {rate}/s ...", flush=True)
        acked = publish_at_rate(port, mapper_auth, total=total, rate=rate)
        broker_mb = rss_mb(broker.pid)
        started = time.monotonic()
        gw.start()
        applied, last_change, last = 0, time.monotonic(), -1
        while applied < acked and time.monotonic() - last_change < 30:
            time.sleep(1)
            applied = total_versions(gw)
            if applied != last:
                last, last_change = applied, time.monotonic()
        caught_up = last_change - started  # when the last update was applied
        time.sleep(12)  # one more sys_interval (10 s) for the counter to be published
        with sys_dropped.cond:
            values = [int(p) for t, p, _ in sys_dropped.messages if t == SYS_DROPPED]
        dropped = values[-1] if values else -1  # -1: the broker never published it
        gw.stop()
        return {
            "acked": acked,
            "applied": applied,
            "lost": acked - applied,
            "dropped": dropped,
            "broker_mb": broker_mb,
            "catch_up_s": caught_up,
        }
    finally:
        sys_dropped.close()
        gw.stop()  # also when something above failed: never leave a gateway behind


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--baseline-minutes", type=float, default=0.5)
    args = ap.parse_args()
    documented = documented_mosquitto_conf()
    defaults = documented.replace("max_queued_messages 1000000", "max_queued_messages 1000")
    base = run(defaults, args.baseline_minutes, args.rate, "baseline: max_queued_messages 1000")
    docs = run(documented, args.minutes, args.rate, "docs/mqtt.md settings")
    for label, r in (("baseline (queue 1,000)", base), ("docs/mqtt.md settings", docs)):
        print(
            f"{label}: acknowledged {r['acked']:,.0f}, applied {r['applied']:,.0f}, lost {r['lost']:,.0f}, "
            f"broker dropped {r['dropped']:,.0f}; broker RSS with the queue full {r['broker_mb']:.0f} MB; "
            f"caught up in {r['catch_up_s']:.1f} s"
        )
    ratio = docs["lost"] / max(1, docs["acked"])
    print(
        f"outage {args.minutes:g} min at {args.rate}/s: lost fraction {ratio:.6f} (baseline "
        f"{base['lost'] / max(1, base['acked']):.3f})"
    )


if __name__ == "__main__":
    main()
