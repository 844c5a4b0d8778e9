"""``edgetwin status``: the gateway's health in one screen, from its health endpoint and
its store (read-only, safe while it runs)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgetwin.gateway.config import load_config
from edgetwin.gateway.store.reader import gateway_summary, open_reader
from edgetwin.runtime.version import __version__


def status(args: argparse.Namespace) -> int:
    """The gateway's health in one screen: from its health endpoint (when
    ``health.listen`` is set) and its store (always; read-only, safe while it runs)."""
    cfg = load_config(args.config)
    summary = gateway_summary(open_reader(cfg.store.path), now_ms=int(time.time() * 1000))
    health, metrics = _scrape(cfg.health.listen)
    if args.json:
        print(json.dumps({"node": cfg.node, **summary, "health": health, "metrics": metrics}, indent=2))
        return 0 if health.get("status") in ("ok", None) else 1
    lines = [f"edgetwin {__version__}, node {cfg.node}, store {cfg.store.path}"]
    if cfg.health.listen is None:
        lines.append("health   unknown (set health.listen to let the running gateway answer)")
    elif "error" in health:
        lines.append(f"health   NOT ANSWERING at {cfg.health.listen}: {health['error']}")
    else:
        problems = health.get("problems") or []
        lines.append("health   ok" if not problems else "health   FAILING: " + "; ".join(problems))
    d = summary["devices"]
    lines.append(
        f"devices  {d['served']} served, {d['online']} online, {d['offline']} offline, "
        f"{d['not_ready']} not ready"
    )
    for name, reason in d["not_ready_examples"]:
        lines.append(f"         {name}: {reason}"[:200])
    o = summary["outbox"]
    age = f", oldest {o['oldest_age_s']:.0f} s" if o["oldest_age_s"] is not None else ""
    lines.append(f"outbox   {o['devices']} devices waiting for the cloud{age}")
    if cfg.uplink is None:
        lines.append("link     no uplink configured")
    elif metrics:
        up = "connected" if metrics.get("edgetwin_gateway_uplink_connected") == 1 else "DISCONNECTED"
        last = metrics.get("edgetwin_gateway_uplink_last_receive_age_seconds")
        seen = f", relay heard {last:.0f} s ago" if isinstance(last, float) and last == last else ""
        lines.append(
            f"link     {up} to {cfg.uplink.address}{seen}, "
            f"{int(metrics.get('edgetwin_gateway_uplink_connects_total', 0))} connects, "
            f"{int(metrics.get('edgetwin_gateway_uplink_payload_bytes_total', 0))} payload bytes"
        )
    else:
        lines.append(f"link     to {cfg.uplink.address}; state unknown without health.listen")
    if metrics:
        mqtt = "connected" if metrics.get("edgetwin_gateway_mqtt_connected") == 1 else "DISCONNECTED"
        lines.append(f"mqtt     {mqtt} to {cfg.mqtt.url or 'the embedded broker'}")
    e = summary["events_last_hour"]
    lines.append("errors   last hour: " + (", ".join(f"{n} {k}" for k, n in sorted(e.items())) or "none"))
    for line in lines:
        print(line)
    return 0 if not health.get("problems") and "error" not in health else 1


def _scrape(listen: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """The running gateway's /healthz and /metrics (sums per metric name)."""
    if listen is None:
        return {}, {}
    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host.strip("[]")
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=3) as web:
            health = web.get("/healthz").json()
            text = web.get("/metrics").text
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": str(exc) or type(exc).__name__}, {}
    metrics: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
    except ValueError:  # not the Prometheus text format: health only
        return health, {}
    return health, metrics
