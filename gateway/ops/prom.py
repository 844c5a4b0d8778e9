"""The gateway's Prometheus metrics (docs/operations.md, "Metrics"). Read from the
gateway's own state when scraped, so they cost nothing per message; only the commit
latency histogram is observed as it happens (once per commit)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.twin.engine import TwinEngine


class Gateway(Protocol):
    """What the metrics read of the gateway (gateway.service)."""

    metrics: Metrics
    engine: TwinEngine
    devices: Any  # gateway.devices.Devices: counts()
    bus: Any  # gateway.mqtt.bus.MqttBus | None
    uplink: Any  # gateway.uplink.Uplink | None


PREFIX = "edgetwin_gateway_"
_GAUGES = frozenset({"tasks"})  # asyncio tasks alive: a leak shows as growth


class GatewayCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def collect(self) -> Iterator[Any]:
        gw = self.gw
        # Every counter the gateway keeps (also on edgetwin/{node}/gateway/metrics).
        for name, value in sorted(gw.metrics.counters.items()):
            if name in _GAUGES:  # kept beside the counters, but it goes down too
                yield GaugeMetricFamily(PREFIX + name, f"gateway gauge {name}", value)
            else:
                yield CounterMetricFamily(PREFIX + name, f"gateway counter {name}", value=value)
        depth, since_ms = gw.engine.backlog()
        yield GaugeMetricFamily(
            PREFIX + "outbox_devices", "Devices with status not yet taken by the cloud", depth
        )
        age = max(0.0, time.time() - since_ms / 1000) if since_ms is not None else 0.0
        yield GaugeMetricFamily(PREFIX + "outbox_oldest_age_seconds", "Age of the oldest outbox entry", age)
        served, not_ready = gw.devices.counts()
        yield GaugeMetricFamily(PREFIX + "devices_served", "Devices this gateway serves", served)
        yield GaugeMetricFamily(
            PREFIX + "devices_not_ready", "Declared devices that are not Ready", not_ready
        )
        online = sum(1 for d in gw.engine.devices.values() if d.state == "online")
        yield GaugeMetricFamily(PREFIX + "devices_online", "Devices whose state is online", online)
        bus = gw.bus
        connected = 1 if bus is not None and bus.connected.is_set() else 0
        yield GaugeMetricFamily(PREFIX + "mqtt_connected", "1 while connected to the broker", connected)
        up = gw.uplink
        if up is not None:
            yield GaugeMetricFamily(
                PREFIX + "uplink_connected",
                "1 while the relay has welcomed the stream",
                up.connected.is_set(),
            )
            yield CounterMetricFamily(
                PREFIX + "uplink_connects", "Streams the relay welcomed", value=up.connects
            )
            yield _bytes(up)
            yield CounterMetricFamily(PREFIX + "uplink_frames_sent", "Sync frames sent", value=up.frames_sent)
            yield CounterMetricFamily(
                PREFIX + "uplink_status_applied", "Status messages the relay applied", value=up.applied
            )
            last = up.last_rx_at
            ago = time.monotonic() - last if last else float("nan")
            yield GaugeMetricFamily(
                PREFIX + "uplink_last_receive_age_seconds", "Since the relay last sent", ago
            )


def _bytes(up: Any) -> CounterMetricFamily:
    family = CounterMetricFamily(
        PREFIX + "uplink_payload_bytes", "Sync frame payload bytes", labels=["direction"]
    )
    family.add_metric(["up"], up.bytes_sent)
    family.add_metric(["down"], up.bytes_received)
    return family


class GatewayMetrics:
    """A registry per gateway (several may run in one test process)."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(gateway))
        self.commit_seconds = Histogram(
            PREFIX + "commit_seconds",
            "Group commit latency (staging and fsync)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )


__all__ = ["GatewayMetrics"]
