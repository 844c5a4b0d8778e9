"""The chaos harness (``scripts/chaos``): the whole system on loopback, randomized faults
from a seed, then invariants. A development tool, like the API emulator and the link
simulator; never run against production.

The system: mosquitto (persistent sessions), the gateway in its own process (restarted
like systemd would when it exits), its store on a small tmpfs, the uplink through the
link simulator to the relay in its own process, lightkube to the Kubernetes API emulator;
a Modbus boiler (served from a cluster-defined Device), two BLE sensors on the BLE
emulator (cluster-defined), MQTT devices from a local manifest fed by a publisher that
also plays their external mapper (it applies deltas); desired values set at the edge and
in the cloud all along.

Faults, drawn from the seed: gateway SIGKILL, relay SIGKILL, broker restart, link cut,
half-open link, link slowed to 9.6 kbit/s, API server 409/500/410/slow answers, Modbus
device drops and exception responses, BLE drops and silences, poison payloads, a full
disk. After the last fault everything is restored and the harness waits for the system
to converge, then checks:

1. every update the broker acknowledged to the publisher is in the twin, applied once
   (the property's version counts every update, its value is the last one);
2. the cloud's status equals the edge twin, value and version, for every property;
3. every desired value was applied, or failed with a reason;
4. the gateway's memory and task count stayed bounded;
5. nothing is wedged: a fresh update to every device is answered and reaches the cloud.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgetwin.simulators.stack import CRDS, make_pki
from tests.harness.processes import Proc, free_port, mosquitto_binary, rss_mb, wait_port

NODE = "edge-chaos"
EDGETWIN = str(Path(sys.executable).parent / "edgetwin")
MQTT_DEVICES = [f"m{i}" for i in range(5)]
MQTT_PROPS = ["a", "b", "c"]
POISON = [
    b"[" * 50_000,
    b'{"event_id": "p", "twin": {"a": {"actual": {"value": ' + b"9" * 5_000 + b"}}}}",
    b'{"event_id": "\xff\xfe", "twin": {}}',
    b"not json at all",
    json.dumps({"event_id": "p", "twin": {"x" * 500: {"actual": {"value": 1}}}}).encode(),
]
FAULTS = (
    "gateway_kill",
    "relay_kill",
    "broker_restart",
    "link_cut",
    "half_open",
    "link_slow",
    "api_409",
    "api_500",
    "api_410",
    "api_slow",
    "modbus_drop",
    "modbus_exception",
    "ble_drop",
    "ble_silence",
    "poison",
    "disk_full",
)


@dataclass
class Report:
    seed: int
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    acknowledged: int = 0
    lost: int = 0
    applied_twice: int = 0
    converge_s: float = 0.0
    max_rss_mb: float = 0.0
    max_tasks: int = 0
    gateway_restarts: int = 0
    invariants: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.invariants.values())

    def text(self) -> str:
        lines = [
            f"chaos seed {self.seed}: {sum(self.faults.values())} faults injected",
            "  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items())),
        ]
        if self.skipped:
            lines.append(
                "  not injected here: " + ", ".join(f"{k} {n}" for k, n in sorted(self.skipped.items()))
            )
        lines += [
            f"  updates acknowledged by the broker: {self.acknowledged}; lost: {self.lost}; "
            f"applied twice: {self.applied_twice}",
            f"  converged {self.converge_s:.1f} s after the last fault; "
            f"gateway restarts {self.gateway_restarts}; "
            f"gateway peak RSS {self.max_rss_mb:.0f} MB, peak tasks {self.max_tasks}",
        ]
        for name, (ok, detail) in self.invariants.items():
            lines.append(f"  [{'ok' if ok else 'FAILED'}] {name}" + (f": {detail}" if detail else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------- processes
def _fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    with contextlib.suppress(OSError), path.open("wb") as f:
        while True:
            f.write(b"\0" * (1 << 20))


# --------------------------------------------------------------------- the publisher
class Publisher:
    """MQTT devices' traffic: updates with unique event ids (the broker's PUBACK makes an
    update acknowledged: it must reach the twin), and an external mapper that applies
    deltas by reporting the desired value."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.acked: dict[tuple[str, str], list[int]] = {}  # per property: acknowledged values in order
        self.sent = 0
        self.counter = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="chaos-publisher", clean_session=False
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_delta
        self.client.on_publish = self._on_publish
        self._pending: dict[int, tuple[str, str, int]] = {}
        self._early: set[int] = set()
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, c: Any, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            c.subscribe("$hw/events/device/+/twin/update/delta", qos=1)

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, p: Any) -> None:
        with self.lock:
            item = self._pending.pop(mid, None)
            if item is None:  # acknowledged before update() could note it
                self._early.add(mid)
            else:
                self._acked(item)

    def _acked(self, item: tuple[str, str, int]) -> None:
        dev, prop, value = item
        self.acked.setdefault((dev, prop), []).append(value)

    def _on_delta(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            doc = json.loads(msg.payload)
            dev = msg.topic.split("/")[3]
            delta = {k: {"actual": {"value": v}} for k, v in doc["delta"].items()}
            body = json.dumps({"event_id": f"apply-{time.time_ns()}", "twin": delta})
            c.publish(f"$hw/events/device/{dev}/twin/update", body, qos=1)

    def update(self) -> None:
        dev, prop = random.choice(MQTT_DEVICES), random.choice(MQTT_PROPS)
        with self.lock:
            self.counter += 1
            value = self.counter
        body = json.dumps({"event_id": f"u{value}", "twin": {prop: {"actual": {"value": value}}}})
        # Not under self.lock: paho's thread takes it in on_publish while holding its own.
        info = self.client.publish(f"$hw/events/device/plant.{dev}/twin/update", body, qos=1)
        # While disconnected paho answers NO_CONN but keeps the message and sends it on
        # reconnect; only a full queue means it was not taken.
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return
        with self.lock:
            self.sent += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acked((dev, prop, value))
            else:
                self._pending[info.mid] = (dev, prop, value)

    def raw(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def in_flight(self) -> int:
        with self.lock:
            return len(self._pending)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --------------------------------------------------------------------- the harness
class Harness:
    def __init__(self, seed: int, faults: int, duration_s: float, workdir: Path, quiet: bool = True) -> None:
        self.seed, self.n_faults, self.duration_s = seed, faults, duration_s
        self.rng = random.Random(seed)
        self.dir = workdir
        self.quiet = quiet
        self.report = Report(seed)
        self.tmpfs = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._down: set[str] = set()  # components now faulted (one fault of a kind at a time)
        self._stop = False

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # ----------------------------------------------------------------- set-up
    def _mount_store(self) -> Path:
        store = self.dir / "store"
        store.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store)], capture_output=True, text=True
        )
        self.tmpfs = result.returncode == 0
        if not self.tmpfs:
            self.log(
                f"no tmpfs for the store ({result.stderr.strip() or 'mount failed'}); disk_full is skipped"
            )
        return store

    def _mosquitto(self) -> None:
        mq = self.dir / "mq"
        mq.mkdir(mode=0o777, exist_ok=True)
        mq.chmod(0o777)
        self.dir.chmod(0o755)
        self.mqtt_port = free_port()
        conf = mq / "mosquitto.conf"
        conf.write_text(
            f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            f"persistence true\npersistence_location {mq}/\nautosave_interval 5\n"
            "max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0\nsys_interval 2\n"
        )
        self.broker = Proc([mosquitto_binary(), "-c", str(conf)], self.dir / "mosquitto.out")
        self.broker.start()
        wait_port(self.mqtt_port)

    async def _api(self) -> None:
        from lightkube import AsyncClient, KubeConfig

        from edgetwin.simulators.kube.emulator import Emulator
        from edgetwin.simulators.kube.running import RunningEmulator

        self.api = RunningEmulator(Emulator.from_files(CRDS, compact_s=30, bookmark_s=5))
        await self.api.start()
        self.kubeconfig = self.api.kubeconfig(self.dir / "kubeconfig", "plant")
        self.client = AsyncClient(config=KubeConfig.from_file(self.kubeconfig), field_manager="chaos")

    def _relay(self) -> None:
        self.relay_port = free_port()
        cfg = {
            "listen": f"127.0.0.1:{self.relay_port}",
            "tls": {
                "cert_file": str(self.pki / "relay.pem"),
                "key_file": str(self.pki / "relay-key.pem"),
                "ca_file": str(self.pki / "ca.pem"),
            },
            "kubeconfig": str(self.kubeconfig),
            "minStatusInterval": "1s",
            "log": {"level": "WARNING"},
        }
        (self.dir / "relay.yaml").write_text(yaml.safe_dump(cfg))
        self.relay = Proc(
            [EDGETWIN, "cloud", "run", "--config", str(self.dir / "relay.yaml")], self.dir / "relay.log"
        )
        self.relay.start()
        wait_port(self.relay_port)

    async def _devices(self) -> None:
        from lightkube.generic_resource import create_namespaced_resource

        from edgetwin.cloud.status_writer import Device
        from edgetwin.simulators.ble import sensor_manifests
        from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests

        self.boiler = BoilerSimulator("127.0.0.1", free_port())
        await self.boiler.start()
        ble_port = free_port()
        self.ble = Proc(
            [EDGETWIN, "sim", "ble", "--port", str(ble_port), "--count", "2", "--notify-interval", "0.5"],
            self.dir / "ble.log",
            stdin=True,
        )
        self.ble.start()
        wait_port(ble_port)
        self.ble_hci = f"tcp-client:127.0.0.1:{ble_port}"
        model = create_namespaced_resource("edgetwin.io", "v1alpha1", "DeviceModel", "devicemodels")
        cluster = boiler_manifests(NODE, "127.0.0.1", self.boiler.port) + sensor_manifests(
            NODE, count=2, collect_cycle="1s"
        )
        for doc in cluster:
            res = Device if doc["kind"] == "Device" else model
            await self.client.create(res(metadata=doc["metadata"], spec=doc["spec"]))
        # The MQTT devices come from a local manifest.
        props = [{"name": p, "type": "INT"} for p in MQTT_PROPS] + [
            {"name": "sp", "type": "INT", "accessMode": "ReadWrite"}
        ]
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "DeviceModel",
                "metadata": {"name": "counter", "namespace": "plant"},
                "spec": {"properties": props},
            }
        ] + [
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": d, "namespace": "plant"},
                "spec": {"deviceModelRef": {"name": "counter"}, "nodeName": NODE},
            }
            for d in MQTT_DEVICES
        ]
        (self.dir / "manifests.yaml").write_text(yaml.safe_dump_all(docs))
        for doc in docs:  # the cluster has them too, so their status can be written
            res = Device if doc["kind"] == "Device" else model
            await self.client.create(res(metadata=doc["metadata"], spec=doc["spec"]))

    def _gateway_config(self) -> Path:
        cfg = {
            "node": NODE,
            "store": {"path": str(self.store / "store.db"), "events_max": 1000},
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{self.mqtt_port}",
                "client_id": "edgetwin-chaos",
                "keepalive": 10,
            },
            "manifests": [str(self.dir / "manifests.yaml")],
            "mappers": {"ble": {"hci": self.ble_hci, "reconnectMin": "200ms", "reconnectMax": "3s"}},
            "writes": {"attempts": 30, "retry_min": "300ms", "retry_max": "3s"},
            "log": {"level": "WARNING"},
            "uplink": {
                "address": f"127.0.0.1:{self.link.port}",
                "server_name": "localhost",
                "ca_file": str(self.pki / "ca.pem"),
                "cert_file": str(self.pki / f"{NODE}.pem"),
                "key_file": str(self.pki / f"{NODE}-key.pem"),
                "budget_bps": 1000,
                "reconnect_min_ms": 200,
                "reconnect_max_ms": 5000,
            },
        }
        path = self.dir / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    async def _supervise_gateway(self) -> None:
        """Restart the gateway whenever it ends (as systemd's Restart=always)."""
        while not self._stop:
            if not self.gateway.running and "gateway" not in self._down:
                if self.gateway.proc is not None:
                    self.report.gateway_restarts += 1
                await asyncio.to_thread(self.gateway.start)
            if self.gateway.running and self.gateway.proc is not None:
                self.report.max_rss_mb = max(self.report.max_rss_mb, rss_mb(self.gateway.proc.pid))
            await asyncio.sleep(1.0)

    def _watch_metrics(self) -> None:
        def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
            with contextlib.suppress(ValueError):
                self.report.max_tasks = max(
                    self.report.max_tasks, int(json.loads(msg.payload).get("tasks", 0))
                )

        self.metrics = paho.Client(CallbackAPIVersion.VERSION2)
        self.metrics.on_message = on_message
        self.metrics.on_connect = lambda c, u, f, r, p: c.subscribe(f"edgetwin/{NODE}/gateway/metrics", qos=0)
        self.metrics.connect_async("127.0.0.1", self.mqtt_port)
        self.metrics.loop_start()

    async def start(self) -> None:
        from edgetwin.simulators.link import LinkSim

        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self._mount_store()
        self.pki = make_pki(self.dir / "pki", NODE)
        self._mosquitto()
        await self._api()
        self._relay()
        self.link = LinkSim("127.0.0.1", self.relay_port)
        await self.link.start()
        await self._devices()
        self.gateway = Proc(
            [EDGETWIN, "gateway", "run", "--config", str(self._gateway_config())], self.dir / "gateway.log"
        )
        self._tasks.append(asyncio.create_task(self._supervise_gateway()))
        self.publisher = Publisher(self.mqtt_port)
        self._watch_metrics()

    async def stop(self) -> None:
        self._stop = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.publisher.close()
        self.metrics.loop_stop()
        self.gateway.stop()
        self.relay.stop()
        self.ble.stop()
        self.broker.stop()
        await self.link.stop()
        await self.boiler.stop()
        await self.client.close()
        await self.api.stop()
        if self.tmpfs:
            await asyncio.to_thread(subprocess.run, ["umount", str(self.store)], capture_output=True)

    # ----------------------------------------------------------------- load
    async def _traffic(self) -> None:
        """Updates at about 30/s, desired values every few seconds from both sides."""
        from lightkube.types import PatchType

        from edgetwin.cloud.status_writer import Device

        tick = 0
        while not self._stop:
            for _ in range(3):
                self.publisher.update()
            tick += 1
            if tick % 40 == 0:  # edge desired values: an MQTT device's sp, the BLE relay
                dev = self.rng.choice(MQTT_DEVICES)
                body = {"event_id": f"set-{tick}", "twin": {"sp": {"expected": {"value": tick}}}}
                self.publisher.raw(f"$hw/events/device/plant.{dev}/twin/update", json.dumps(body).encode())
                relay = {
                    "event_id": f"relay-{tick}",
                    "twin": {"relay": {"expected": {"value": tick % 80 == 0}}},
                }
                self.publisher.raw(
                    "$hw/events/device/plant.env-sensor-1/twin/update", json.dumps(relay).encode()
                )
            if tick % 60 == 20 and "api" not in self._down:  # cloud desired values: the boiler's setpoint
                patch = [
                    {
                        "op": "add",
                        "path": "/spec/properties/3/desired",
                        "value": {"value": str(40 + tick % 30)},
                    }
                ]
                with contextlib.suppress(Exception):
                    await self.client.patch(
                        Device, "boiler-mb", patch, namespace="plant", patch_type=PatchType.JSON
                    )
            await asyncio.sleep(0.1)

    # ----------------------------------------------------------------- faults
    def _later(self, seconds: float, undo: Any, component: str) -> None:
        async def run() -> None:
            await asyncio.sleep(seconds)
            result = undo()
            if asyncio.iscoroutine(result):
                await result
            self._down.discard(component)

        self._down.add(component)
        self._tasks.append(asyncio.create_task(run()))

    async def inject(self, kind: str) -> bool:
        r = self.rng
        if kind in ("gateway_kill", "disk_full") and "gateway" in self._down:
            return False
        if kind == "gateway_kill":
            await asyncio.to_thread(self.gateway.kill)  # the supervisor starts it again
        elif kind == "relay_kill":
            if "relay" in self._down:
                return False
            await asyncio.to_thread(self.relay.kill)
            self._later(r.uniform(0.5, 3), self.relay.start, "relay")
        elif kind == "broker_restart":
            if "broker" in self._down:
                return False
            await asyncio.to_thread(self.broker.stop)  # a clean stop: mosquitto saves its sessions
            self._later(r.uniform(0.5, 3), self.broker.start, "broker")
        elif kind in ("link_cut", "half_open", "link_slow"):
            if "link" in self._down:
                return False
            if kind == "link_cut":
                self.link.cut()
                self._later(r.uniform(0.5, 5), self.link.restore, "link")
            elif kind == "half_open":
                self.link.blackhole(True)
                self._later(r.uniform(5, 40), self.link.restore, "link")
            else:
                self.link.bandwidth_bps = 9600

                def fast() -> None:
                    self.link.bandwidth_bps = None

                self._later(r.uniform(10, 30), fast, "link")
        elif kind.startswith("api_"):
            emulator = self.api.emulator
            if kind == "api_409":
                emulator.conflicts_to_inject += r.randint(1, 6)
            elif kind == "api_500":
                emulator.errors_to_inject += r.randint(1, 10)
            elif kind == "api_slow":
                emulator.slow_to_inject += r.randint(1, 10)
            else:
                await emulator.forget_history()
        elif kind == "modbus_drop":
            if "modbus" in self._down:
                return False
            await self.boiler.stop()
            self._later(r.uniform(1, 8), self.boiler.start, "modbus")
        elif kind == "modbus_exception":
            self.boiler.fail_reads += r.randint(1, 20)
        elif kind == "ble_drop":
            self.ble.send(f"drop env-sensor-{r.randint(1, 2)}")
        elif kind == "ble_silence":
            self.ble.send(f"silence env-sensor-{r.randint(1, 2)} {r.uniform(2, 15):.1f}")
        elif kind == "poison":
            for _ in range(r.randint(5, 50)):
                self.publisher.raw(
                    f"$hw/events/device/plant.{r.choice(MQTT_DEVICES)}/twin/update", r.choice(POISON)
                )
        elif kind == "disk_full":
            if not self.tmpfs:
                self.report.skipped[kind] += 1
                return True
            filler = self.store / "filler"
            await asyncio.to_thread(_fill, filler)

            def free() -> None:
                filler.unlink(missing_ok=True)

            self._later(r.uniform(2, 8), free, "gateway")
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.report.faults[kind] += 1
        return True

    async def run_faults(self) -> None:
        gap = self.duration_s / max(1, self.n_faults)
        injected = 0
        while injected < self.n_faults:
            await asyncio.sleep(self.rng.uniform(0.3 * gap, 1.7 * gap))
            kind = self.rng.choice(FAULTS)
            if await self.inject(kind):
                injected += 1
                self.log(f"fault {injected}/{self.n_faults}: {kind}")

    # ----------------------------------------------------------------- checks
    def _twins(self) -> dict[str, dict[str, Any]]:
        from edgetwin.gateway.store.reader import open_reader, read_twin

        db = open_reader(self.store / "store.db")
        try:
            out: dict[str, dict[str, Any]] = {}
            for row in db.query("SELECT DISTINCT device_id FROM twin_property"):
                twin = read_twin(db, row["device_id"])
                if twin is not None:
                    out[row["device_id"]] = twin["twin"]
            return out
        finally:
            db.conn.close()

    def _pending(self) -> list[str]:
        from edgetwin.gateway.store.reader import list_devices, open_reader

        db = open_reader(self.store / "store.db")
        try:
            return [d["device"] for d in list_devices(db) if d["outbox"]]
        finally:
            db.conn.close()

    async def _cloud(self) -> dict[str, dict[str, Any]]:
        from edgetwin.cloud.status_writer import Device

        out: dict[str, dict[str, Any]] = {}
        async for obj in self.client.list(Device, namespace="plant"):
            doc: dict[str, Any] = obj.to_dict()  # type: ignore[no-untyped-call]
            status = doc.get("status") or {}
            out[f"plant.{doc['metadata']['name']}"] = {
                t["propertyName"]: t for t in status.get("twins") or []
            }
        return out

    def _check_acknowledged(self, twins: dict[str, dict[str, Any]]) -> tuple[bool, str]:
        lost = twice = 0
        details = []
        with self.publisher.lock:
            acked = {k: list(v) for k, v in self.publisher.acked.items()}
        self.report.acknowledged = sum(len(v) for v in acked.values())
        for (dev, prop), values in acked.items():
            rep = twins.get(f"plant.{dev}", {}).get(prop, {}).get("reported") or {}
            if rep.get("value") != values[-1]:
                lost += 1
                details.append(f"{dev}/{prop}: {rep.get('value')} != {values[-1]}")
            elif rep.get("version") != len(values):
                if rep.get("version", 0) > len(values):
                    twice += 1
                else:
                    lost += 1
                details.append(f"{dev}/{prop}: version {rep.get('version')} for {len(values)} updates")
        self.report.lost, self.report.applied_twice = lost, twice
        return lost == 0 and twice == 0, "; ".join(details[:5])

    @staticmethod
    def _check_cloud(
        twins: dict[str, dict[str, Any]], cloud: dict[str, dict[str, Any]], at_least: bool = False
    ) -> tuple[bool, str]:
        bad = []
        for dev, props in twins.items():
            for prop, entry in props.items():
                rep = entry.get("reported")
                if rep is None:
                    continue
                got = cloud.get(dev, {}).get(prop, {}).get("reported") or {}
                meta = got.get("metadata") or {}
                if at_least and int(meta.get("version") or 0) > rep["version"]:
                    continue  # the cloud is further along than the snapshot
                want_text = (
                    "true"
                    if rep["value"] is True
                    else "false"
                    if rep["value"] is False
                    else str(rep["value"])
                )
                if got.get("value") != want_text or meta.get("version") != str(rep["version"]):
                    cloud_side = f"{got.get('value')}@{meta.get('version')}"
                    bad.append(f"{dev}/{prop}: cloud {cloud_side} edge {want_text}@{rep['version']}")
        return not bad, "; ".join(bad[:5])

    @staticmethod
    def _check_desired(twins: dict[str, dict[str, Any]]) -> tuple[bool, str]:
        bad = []
        for dev, props in twins.items():
            for prop, entry in props.items():
                des = entry.get("desired")
                if des is None:
                    continue
                state, reason = des.get("writeState"), des.get("writeReason")
                if state not in ("applied", "failed") or (state == "failed" and not reason):
                    bad.append(f"{dev}/{prop}: {state} {reason!r}")
        return not bad, "; ".join(bad[:5])

    async def converge(self, limit_s: float) -> None:
        """Wait for every invariant to hold (or ``limit_s``), then record them.

        The MQTT devices are quiet now: their twins must be exact and their outbox empty.
        The Modbus and BLE devices go on reporting every cycle, so their outbox is never
        empty; for them the cloud must reach every version the edge twin had when the
        faults ended (a snapshot), with the same value where the versions are equal."""
        started = time.monotonic()
        snapshot = {dev: props for dev, props in self._twins().items() if not dev.startswith("plant.m")}
        results: dict[str, tuple[bool, str]] = {}
        while True:
            with contextlib.suppress(Exception):
                twins = self._twins()
                cloud = await self._cloud()
                quiet = {dev: props for dev, props in twins.items() if dev.startswith("plant.m")}
                pending = [d for d in self._pending() if d.startswith("plant.m")]
                results = {
                    "every acknowledged update applied, once": self._check_acknowledged(twins),
                    "nothing left in the outbox (quiet devices)": (not pending, ", ".join(pending[:5])),
                    "cloud status equals the edge twin (quiet devices)": self._check_cloud(quiet, cloud),
                    "cloud status reaches the edge twin (reporting devices)": self._check_cloud(
                        snapshot, cloud, at_least=True
                    ),
                    "every desired value applied or failed with a reason": self._check_desired(twins),
                }
                if all(ok for ok, _ in results.values()) and self.publisher.in_flight() == 0:
                    break
            if time.monotonic() - started > limit_s:
                break
            await asyncio.sleep(1.0)
        self.report.converge_s = time.monotonic() - started
        self.report.invariants.update(results)

    async def fresh_updates_flow(self) -> tuple[bool, str]:
        """Nothing wedged: a new update to every MQTT device is answered at once."""
        answered: set[str] = set()
        done = threading.Event()

        def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
            with contextlib.suppress(ValueError):
                event = json.loads(msg.payload).get("event_id", "")
                if event.startswith("fresh-"):
                    answered.add(event)
                    if len(answered) == len(MQTT_DEVICES):
                        done.set()

        client = paho.Client(CallbackAPIVersion.VERSION2)
        client.on_message = on_message
        client.connect("127.0.0.1", self.mqtt_port)
        client.loop_start()
        client.subscribe("$hw/events/device/+/twin/update/result", qos=1)
        await asyncio.sleep(0.5)
        for dev in MQTT_DEVICES:
            body = json.dumps({"event_id": f"fresh-{dev}", "twin": {"a": {"actual": {"value": -1}}}})
            client.publish(f"$hw/events/device/plant.{dev}/twin/update", body, qos=1)
        ok = await asyncio.to_thread(done.wait, 15)
        client.loop_stop()
        client.disconnect()
        return ok, "" if ok else f"answered {sorted(answered)}"

    async def run(self) -> Report:
        await self.start()
        try:
            await asyncio.sleep(5)  # the system comes up
            traffic = asyncio.create_task(self._traffic())
            await self.run_faults()
            self.log("last fault injected; restoring and waiting for the system to converge")
            await asyncio.sleep(1)
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
            while self._down:  # every fault's own restore  # noqa: ASYNC110 (a set the tasks empty)
                await asyncio.sleep(0.5)
            self.link.restore()
            self.link.bandwidth_bps = None
            await self.converge(limit_s=300)
            fresh_ok, detail = await self.fresh_updates_flow()
            self.report.invariants["nothing wedged: fresh updates answered"] = (fresh_ok, detail)
            self.report.invariants["gateway memory and tasks bounded"] = (
                self.report.max_rss_mb < 250 and self.report.max_tasks < 300,
                f"peak RSS {self.report.max_rss_mb:.0f} MB, peak tasks {self.report.max_tasks}",
            )
            return self.report
        finally:
            await self.stop()


async def run(
    seed: int, faults: int, duration_s: float, workdir: Path | None = None, quiet: bool = True
) -> Report:
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # its frame dumps when a device drops
    own = workdir is None
    folder = workdir or Path(tempfile.mkdtemp(prefix="edgetwin-chaos-"))
    try:
        return await Harness(seed, faults, duration_s, folder, quiet).run()
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds over which faults are spread (3 s each)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder (logs, store) here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    duration = args.duration if args.duration is not None else 3.0 * args.faults
    report = asyncio.run(run(args.seed, args.faults, duration, args.keep, quiet=args.quiet))
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
