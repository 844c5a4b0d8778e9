"""What ``edgetwin demo`` prints: the twin table, the one-line status, the summary, and
the cluster check, from plain values (no I/O here)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from edgetwin.deviceapi.values import value_to_text
from edgetwin.gateway.twin.engine import TwinEngine


def render(engine: TwinEngine, started: float) -> str:
    """The twins as a table: one row per property."""
    lines = [f"edgetwin demo  node demo-node  up {time.monotonic() - started:5.1f}s", ""]
    lines.append(
        f"{'DEVICE':<20} {'STATE':<8} {'PROPERTY':<12} {'REPORTED':>10} {'VER':>5}  "
        f"{'DESIRED':>8} {'WRITE':<8}"
    )
    for dev in sorted(engine.devices.values(), key=lambda d: d.id):
        for name, prop in dev.properties.items():
            rep = prop.reported
            value = "-" if rep is None else json.dumps(rep.value)
            desired = "-" if prop.desired is None else json.dumps(prop.desired.value)
            lines.append(
                f"{dev.id:<20} {dev.state:<8} {name:<12} {value:>10} {rep.version if rep else '-':>5}  "
                f"{desired:>8} {prop.write_state.value or '-':<8}"
            )
    return "\n".join(lines)


Twins = dict[tuple[str, str], tuple[int, str]]  # (device id, property) -> (version, value text)


def reported(engine: TwinEngine) -> Twins:
    """Each reported property's version and value, as Device status writes the value."""
    return {
        (dev.id, name): (prop.reported.version, value_to_text(prop.reported.value))
        for dev in engine.devices.values()
        for name, prop in dev.properties.items()
        if prop.reported is not None
    }


def pending(engine: TwinEngine) -> set[tuple[str, str]]:
    """The properties whose status waits in the outbox for the cloud."""
    return {(dev, prop) for dev, entry in engine.outbox.items() for prop in entry.props}


def queued(engine: TwinEngine) -> tuple[int, int]:
    """Devices with status waiting for the cloud, and their properties waiting."""
    return len(engine.outbox), sum(len(entry.props) for entry in engine.outbox.values())


def cluster_twins(kubectl_json: str) -> Twins:
    """The reported versions and values in ``kubectl get devices -o json`` output."""
    out: Twins = {}
    for item in json.loads(kubectl_json).get("items", []):
        meta = item.get("metadata", {})
        device = f"{meta.get('namespace')}.{meta.get('name')}"
        for twin in (item.get("status") or {}).get("twins") or []:
            rep = twin.get("reported") or {}
            version = (rep.get("metadata") or {}).get("version")
            if version is not None:
                out[(device, twin.get("propertyName", ""))] = (int(version), str(rep.get("value")))
    return out


def missing(want: Twins, cluster: Twins, now: Twins | None = None) -> list[str]:
    """Properties (``dev/prop``) whose value in the cluster is older than in ``want``, or
    differs from it at the same version, or (given the gateway's twins ``now``) is newer
    than anything the gateway has: a gateway that lost its store."""
    wrong = []
    for key, (version, text) in want.items():
        have = cluster.get(key)
        ahead = now is not None and have is not None and have[0] > now.get(key, (0, ""))[0]
        if have is None or have[0] < version or (have[0] == version and have[1] != text) or ahead:
            wrong.append(f"{key[0]}/{key[1]}")
    return sorted(wrong)


def merge_patch_bytes(device_id: str, prop: str, value: str, version: int) -> int:
    """The fewest bytes one direct Kubernetes status PATCH of one value takes: its request
    line, the headers it cannot do without and its JSON merge patch body (no TLS, no
    authentication, no response)."""
    namespace, _, name = device_id.partition(".")
    body = json.dumps(
        {
            "status": {
                "twins": [
                    {
                        "propertyName": prop,
                        "reported": {
                            "value": value,
                            "metadata": {"timestamp": "2026-12-07T00:00:00.000Z", "version": str(version)},
                        },
                    }
                ]
            }
        },
        separators=(",", ":"),
    )
    head = (
        f"PATCH /apis/edgetwin.io/v1alpha1/namespaces/{namespace}/devices/{name}/status HTTP/1.1\r\n"
        f"Host: kubernetes\r\nContent-Type: application/merge-patch+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return len(head) + len(body)


@dataclass
class Tally:
    """What the story counts as it goes."""

    started: float = field(default_factory=time.monotonic)
    values: int = 0  # values the gateway took (the growth of the twins' versions)
    direct_bytes: int = 0  # what one direct PATCH per value would have sent
    peak_devices: int = 0  # the outbox at its largest while the link was cut
    peak_properties: int = 0
    kept_values: int = 0  # values the restarted gateway came back with
    kept_waiting: int = 0  # of them waiting for the cloud (in the outbox)
    restarts: int = 0
    cut: bool = False
    restored: bool = False
    drain_s: float | None = None
    link_bytes: int = 0
    lost: list[str] = field(default_factory=list)  # not in the cluster at the end
    lost_in_restart: list[str] = field(default_factory=list)  # older or gone after the restart
    checked: int = 0  # properties compared with the cluster
    checked_by: str = "kubectl get devices -o json"
    _last: dict[tuple[str, str], int] = field(default_factory=dict)

    def observe(self, engine: TwinEngine) -> None:
        """Count the values taken since the last look."""
        for (dev, prop), (version, text) in reported(engine).items():
            before = self._last.get((dev, prop), 0)
            if version > before:
                self.values += version - before
                self.direct_bytes += (version - before) * merge_patch_bytes(dev, prop, text, version)
                self._last[(dev, prop)] = version
        if self.cut and not self.restored:
            devices, props = queued(engine)
            self.peak_devices = max(self.peak_devices, devices)
            self.peak_properties = max(self.peak_properties, props)

    def status_line(self, engine: TwinEngine, connected: bool) -> str:
        devices, props = queued(engine)
        _, since_ms = engine.backlog()
        oldest = f", oldest {max(0.0, time.time() - since_ms / 1000):.1f} s" if since_ms else ""
        link = "restored" if self.restored else ("cut" if self.cut else "up")
        return (
            f"  {time.monotonic() - self.started:5.1f}s  link {link:<8} uplink "
            f"{'connected' if connected else 'down':<9}  "
            f"outbox {devices} devices ({props} properties{oldest})  "
            f"values {self.values:,}  link bytes {self.link_bytes:,}"
        )

    def summary(self) -> str:
        drain = f"{self.drain_s:.1f} s" if self.drain_s is not None else "not within 60 s"
        ratio = f" ({self.direct_bytes / self.link_bytes:,.0f}x less)" if self.link_bytes else ""
        every = sorted(set(self.lost) | set(self.lost_in_restart))
        lost = f"{len(every)}" + (f" ({', '.join(every[:5])})" if every else "")
        return "\n".join(
            [
                "summary",
                f"  values reported       {self.values:,} (the growth of the twins' versions)",
                f"  queued while cut      {self.peak_devices} devices, "
                f"{self.peak_properties} properties at the most",
                f"  gateway restarts      {self.restarts} (it came back with {self.kept_values} values and "
                f"{self.kept_waiting} properties waiting for the cluster; "
                f"{len(self.lost_in_restart)} older or gone)",
                f"  link cut, restored    {'yes' if self.cut else 'no'}, {'yes' if self.restored else 'no'}",
                f"  delivered             the backlog in the cluster {drain} after the link came back",
                f"  in the cluster        {self.checked - len(self.lost)} of {self.checked} properties at or "
                f"past the gateway's version, the same value at the same version ({self.checked_by})",
                f"  lost                  {lost}",
                f"  bytes on the link     {self.link_bytes:,} both ways, TLS and gRPC included; one direct "
                f"PATCH per value would have sent at least {self.direct_bytes:,}{ratio}",
            ]
        )
