"""Shared fixtures: a real mosquitto per test module, a gateway in a subprocess, and
small MQTT helpers. Nothing here depends on the broker that may run on :1883."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from hypothesis import settings

from edgetwin.mappers.sdk import ReportResult
from tests.harness.processes import Mosquitto

# Properties are judged on behaviour, never on how long one example took on a busy CI
# machine; print_blob lets a failure be replayed exactly.
settings.register_profile("edgetwin", deadline=None, print_blob=True)
settings.load_profile("edgetwin")

BIN = Path(sys.executable).parent
EDGETWIN = str(BIN / "edgetwin")


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


# --------------------------------------------------------------------- manifests
def model_doc(name: str, namespace: str, props: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "DeviceModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"properties": props},
    }


def device_doc(
    name: str,
    namespace: str,
    model: str,
    node: str,
    protocol: dict[str, Any] | None = None,
    properties: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"deviceModelRef": {"name": model}, "nodeName": node}
    if protocol:
        spec["protocol"] = protocol
    if properties:
        spec["properties"] = properties
    return {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


THERMO_PROPS = [
    {"name": "temperature", "type": "FLOAT", "unit": "degC", "minimum": -50, "maximum": 150},
    {"name": "count", "type": "INT"},
    {"name": "label", "type": "STRING"},
    {"name": "enabled", "type": "BOOLEAN", "accessMode": "ReadWrite"},
    {"name": "setpoint", "type": "FLOAT", "accessMode": "ReadWrite", "minimum": 5, "maximum": 35},
]


def write_manifests(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def write_config(tmp: Path, node: str, port: int, manifests: Path, **extra: Any) -> Path:
    cfg = {
        "node": node,
        "store": {"path": str(tmp / "store.db")},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
        "manifests": [str(manifests)],
        **extra,
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------- MQTT client
class Collector:
    """A paho client that records what arrives on its subscriptions."""

    def __init__(
        self, port: int, topics: list[str], client_id: str = "", auth: tuple[str, str] | None = None
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[str, bytes], bool], timeout: float = 10.0) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for topic, payload, _ in self.messages:
                    if pred(topic, payload):
                        return topic, payload
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [t for t, _, _ in self.messages][-10:]
                    raise TimeoutError(f"no matching message within {timeout}s; last topics: {seen}")
                self.cond.wait(left)

    def json_on(
        self, topic: str, timeout: float = 10.0, where: Callable[[Any], bool] = lambda d: True
    ) -> Any:
        _, payload = self.wait_for(lambda t, p: t == topic and where(json.loads(p)), timeout)
        return json.loads(payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --------------------------------------------------------------------- gateway process
class GatewayProcess:
    """``edgetwin gateway run`` in a subprocess, with readiness from its retained
    online status on MQTT."""

    def __init__(
        self, config: Path, port: int, node: str, log: Path, auth: tuple[str, str] | None = None
    ) -> None:
        self.config, self.port, self.node, self.log = config, port, node, log
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> GatewayProcess:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [EDGETWIN, "gateway", "run", "--config", str(self.config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        status = f"edgetwin/{self.node}/gateway/status"
        client = Collector(self.port, [], auth=self.auth)
        got = threading.Event()

        def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
            if msg.payload == b"online":
                got.set()

        client.client.on_message = on_message
        client.client.subscribe(status, qos=1)
        try:
            deadline = time.monotonic() + timeout
            while not got.wait(0.1):
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready:\n{self.log.read_text()[-3000:]}")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def thermostat_gateway(tmp: Path, port: int, node: str, devices: list[tuple[str, str]]) -> GatewayProcess:
    """A started ``gateway run`` for ``node`` serving thermostats (THERMO_PROPS) named
    ``(namespace, name)``, each namespace with its own model, plus one device of another
    node (``plant/other-node``, which it must skip)."""
    namespaces = sorted({ns for ns, _ in devices} | {"plant"})
    manifests = write_manifests(
        tmp / "manifests" / "devices.yaml",
        [model_doc("thermostat", ns, THERMO_PROPS) for ns in namespaces]
        + [device_doc(name, ns, "thermostat", node) for ns, name in devices]
        + [device_doc("other-node", "plant", "thermostat", f"{node}-elsewhere")],
    )
    config = write_config(tmp, node, port, manifests.parent)
    return GatewayProcess(config, port, node, tmp / "gateway.log").start()


async def eventually(pred: Callable[[], Any], within: float = 10.0) -> None:
    """Wait (asynchronously) until ``pred()`` is true, or fail after ``within`` s."""
    import asyncio

    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached within {within}s")
        await asyncio.sleep(0.02)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGETWIN, *args], capture_output=True, text=True, timeout=timeout)


def publish(port: int, topic: str, payload: bytes | str, qos: int = 1) -> None:
    """Publish with the real mosquitto_pub client."""
    data = payload if isinstance(payload, bytes) else payload.encode()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", str(qos), "-t", topic, "-s"],
        input=data,
        check=True,
        timeout=10,
    )


def update_payload(values: dict[str, Any], event_id: str = "e1", ts: int | None = None) -> str:
    doc: dict[str, Any] = {
        "event_id": event_id,
        "twin": {k: {"actual": {"value": v}, "metadata": {"type": "string"}} for k, v in values.items()},
    }
    if ts is not None:
        doc["timestamp"] = ts
    return json.dumps(doc)


class RecordingHost:
    """The MapperHost side, recording what the mapper reports."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.reports: list[tuple[float, str, dict[str, Any]]] = []
        self.errors: dict[str, dict[str, str]] = {}
        self.states: dict[str, list[str]] = {}
        self.skipped: dict[str, int] = {}

    async def report(
        self, device_id: str, values: Mapping[str, Any], timestamp_ms: int | None = None
    ) -> ReportResult:
        self.values.setdefault(device_id, {}).update(values)
        self.reports.append((time.monotonic(), device_id, dict(values)))
        return ReportResult({k: 1 for k in values}, {})

    async def set_state(self, device_id: str, state: str) -> None:
        self.states.setdefault(device_id, []).append(state)

    async def report_errors(self, device_id: str, errors: Mapping[str, str]) -> None:
        self.errors.setdefault(device_id, {}).update(errors)

    def cycles_skipped(self, device_id: str, skipped: int, cycle_ms: int) -> None:
        self.skipped[device_id] = self.skipped.get(device_id, 0) + skipped


@pytest.fixture
async def dump_tasks_when_stuck(request: pytest.FixtureRequest) -> Any:
    """A test stuck past 120 s prints every asyncio task's stack (a hang then names
    its await instead of timing out silently)."""
    import asyncio

    def dump() -> None:
        print(f"\n--- {request.node.nodeid} stuck; asyncio tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)

    handle = asyncio.get_running_loop().call_later(120, dump)
    yield
    handle.cancel()
