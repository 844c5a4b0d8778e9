"""``edgetwin demo``: the gateway on embedded defaults with simulated devices.

An embedded MQTT broker on a free loopback port, a temporary store, the demo manifests
(simulated devices served by the ``virtual`` mapper), a Modbus boiler simulator served
by the real Modbus mapper, and a live view of the twins. Every 15 s the demo sets a new
edge-local desired setpoint on both boilers through MQTT, exactly as ``edgetwin twin
set`` does, so the desired -> write -> read back -> reported path shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edgetwin.deploy import DEPLOY
from edgetwin.gateway.config import parse_config
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.simulators.ble import BleSimulator, sensor_manifests
from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests
from edgetwin.simulators.stack import free_port

SETPOINTS = (55.0, 70.0, 62.5, 80.0)


def render(engine: TwinEngine, started: float) -> str:
    lines = [
        f"edgetwin demo  node demo-node  up {time.monotonic() - started:5.1f}s  (Ctrl-C to stop)",
        "",
    ]
    header = (
        f"{'DEVICE':<20} {'STATE':<8} {'PROPERTY':<12} {'REPORTED':>10} {'VER':>5}  "
        f"{'DESIRED':>8} {'WRITE':<8}"
    )
    lines.append(header)
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


async def _set_desired(host: str, port: int, value: float) -> None:
    import aiomqtt

    from edgetwin.gateway.mqtt import payloads, topics

    body = payloads.twin_set_request(payloads.new_event_id(), int(time.time() * 1000), {"setpoint": value})
    async with aiomqtt.Client(host, port) as client:
        for device in ("plant.boiler-1", "plant.boiler-mb"):
            await client.publish(topics.twin_update(device), body, qos=1)
        relay = payloads.twin_set_request(
            payloads.new_event_id(), int(time.time() * 1000), {"relay": value >= SETPOINTS[0]}
        )
        await client.publish(topics.twin_update("plant.env-sensor-1"), relay, qos=1)


class CloudStandIn:
    """``demo --cloud``: the Kubernetes API emulator (a development stand-in, not for
    production), the relay with a test PKI, and the demo's Devices in the emulator."""

    def __init__(self, tmp: Path, node: str) -> None:
        self.tmp, self.node = tmp, node
        self.deploy = DEPLOY
        self.api: Any = None
        self.client: Any = None
        self.server: Any = None

    async def start(self, manifest_paths: list[Path]) -> dict[str, Any]:
        """Start everything; returns the gateway's ``uplink`` config."""
        import subprocess

        from lightkube import AsyncClient, KubeConfig
        from lightkube.generic_resource import create_namespaced_resource

        from edgetwin.cloud.relay import read_pki, serve
        from edgetwin.cloud.session import RelaySettings
        from edgetwin.simulators.kube.emulator import Emulator
        from edgetwin.simulators.kube.objects import BANNER
        from edgetwin.simulators.kube.running import RunningEmulator

        pki = self.tmp / "pki"
        await asyncio.to_thread(
            subprocess.run,
            ["bash", str(self.deploy / "pki" / "make-test-pki"), str(pki), self.node],
            check=True,
            capture_output=True,
        )
        self.api = RunningEmulator(Emulator.from_files(sorted((self.deploy / "crds").glob("*.yaml"))))
        await self.api.start()
        kubeconfig = self.api.kubeconfig(self.tmp / "kubeconfig", "plant")
        self.client = AsyncClient(config=KubeConfig.from_file(kubeconfig))
        kinds = {
            "Device": create_namespaced_resource("edgetwin.io", "v1alpha1", "Device", "devices"),
            "DeviceModel": create_namespaced_resource(
                "edgetwin.io", "v1alpha1", "DeviceModel", "devicemodels"
            ),
        }
        for path in manifest_paths:
            files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
            for file in files:
                for doc in yaml.safe_load_all(file.read_text()):
                    if doc and doc.get("kind") in kinds:
                        res = kinds[doc["kind"]]
                        obj = res(metadata=doc["metadata"], spec=doc.get("spec", {}))
                        await self.client.create(obj, namespace=doc["metadata"].get("namespace", "default"))
        self.server, _, port = await serve(
            self.client, "127.0.0.1:0", *read_pki(pki), RelaySettings(min_status_interval_s=1.0)
        )
        print(
            f"{BANNER}\n  cloud: relay on 127.0.0.1:{port}; try:  KUBECONFIG={kubeconfig} kubectl get devices"
        )
        return {
            "address": f"127.0.0.1:{port}",
            "server_name": "localhost",
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / f"{self.node}.pem"),
            "key_file": str(pki / f"{self.node}-key.pem"),
        }

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
        if self.client is not None:
            await self.client.close()
        if self.api is not None:
            await self.api.stop()


def _workdir(path: Path) -> Path:
    """A chosen folder for the demo's files; each demo starts with a fresh store."""
    path.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        (path / f"store.db{suffix}").unlink(missing_ok=True)
    return path


async def run_demo(
    duration: float | None = None,
    live: bool = True,
    cloud: bool = False,
    workdir: Path | None = None,
    mqtt_port: int = 0,
) -> int:
    tmp = _workdir(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgetwin-demo-"))
    try:
        return await _demo(tmp, duration, live, cloud, mqtt_port)
    finally:
        if workdir is None:  # a temporary folder: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)


async def _demo(tmp: Path, duration: float | None, live: bool, cloud: bool, mqtt_port: int) -> int:
    async with contextlib.AsyncExitStack() as parts:  # each part stops even if a later one fails
        manifests = resources.files("edgetwin.simulators") / "demo_manifests"
        port = mqtt_port or free_port()
        # A simulated Modbus boiler on its own port, served by the real Modbus mapper.
        sim = BoilerSimulator("127.0.0.1", free_port())
        await sim.start()
        parts.push_async_callback(sim.stop)
        (tmp / "modbus.yaml").write_text(
            yaml.safe_dump_all(boiler_manifests("demo-node", sim.host, sim.port))
        )
        # Emulated BLE sensors (Bumble) on a virtual radio, served by the real BLE mapper.
        ble = BleSimulator("127.0.0.1", free_port(), count=2, beacons=1)
        await ble.start()
        parts.push_async_callback(ble.stop)
        (tmp / "ble.yaml").write_text(yaml.safe_dump_all(sensor_manifests("demo-node", count=2, beacons=1)))
        manifest_paths = [Path(str(manifests)), tmp / "modbus.yaml", tmp / "ble.yaml"]
        config: dict[str, Any] = {
            "node": "demo-node",
            "store": {"path": str(tmp / "store.db")},
            "mqtt": {"embedded": {"host": "127.0.0.1", "port": port}},
            "manifests": [str(p) for p in manifest_paths],
            "mappers": {"virtual": {"seed": 7}, "ble": {"hci": ble.hci}},
        }
        if cloud:
            stand_in = CloudStandIn(tmp, "demo-node")
            parts.push_async_callback(stand_in.stop)
            config["uplink"] = await stand_in.start(manifest_paths)
        cfg = parse_config(config, "demo")
        print(
            f"edgetwin demo: store {tmp / 'store.db'}, MQTT broker on 127.0.0.1:{port}, "
            f"Modbus boiler simulator on {sim.host}:{sim.port}, BLE sensors on HCI {ble.hci}"
        )
        print(f"  watch it:  mosquitto_sub -h 127.0.0.1 -p {port} -t 'edgetwin/#' -v")
        await _run_gateway(Gateway(cfg), port, duration, live and sys.stdout.isatty())
    return 0


async def _run_gateway(gateway: Gateway, port: int, duration: float | None, live: bool) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(gateway.run(stop))
    started = time.monotonic()
    try:
        ready = asyncio.create_task(gateway.ready.wait())
        await asyncio.wait({ready, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()
        tick = 0
        while duration is None or time.monotonic() - started < duration:
            await asyncio.sleep(1.0)
            tick += 1
            if tick % 15 == 5:
                value = SETPOINTS[(tick // 15) % len(SETPOINTS)]
                with contextlib.suppress(Exception):
                    await _set_desired("127.0.0.1", port, value)
            if live:
                sys.stdout.write("\x1b[2J\x1b[H" + render(gateway.engine, started) + "\n")
                sys.stdout.flush()
            elif tick % 5 == 0 or (duration is not None and time.monotonic() - started >= duration):
                print(render(gateway.engine, started), flush=True)
            if runner.done():
                runner.result()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
